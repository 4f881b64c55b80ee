"""Windowed FIFO through the running services: rollout -> gateway -> data pool on a real Tansu broker.

Ten publishing episodes are queued (positions 0-9); the one at position 5 names an unknown scaffold and
fails at once. A gated scripted inference replica holds every other episode's only model call until the
test releases it, so episodes finish in an order the test chooses (the head last but one), and each
batch the trainer would get (FetchBatch once the released trajectories are in the pool) must equal what
the window rule predicts. The rule is written out here from its definition (the report's windowed FIFO:
the trainer may take a finished episode only within W = ceil(f * N) positions of the queue's head, N the
positions from the head to the newest, the head the oldest episode neither taken nor failed), not taken
from the code under test. The window f = 0.3 comes from the run's config in the run store (the pool's
own default is greedy, f = 1), as the trainer writes it; the failed episode's skip marker must free its
position at once (the pool's gap timeout is 600 s).

Then rollout (a real process) is killed with kill -9 while position 10 is in flight and 11 is done; a
fresh rollout queues one more episode, which must be position 12 (not 0 again), and position 10, lost
with the killed process, must stop holding the window at once. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest

from forgerl.datapool.broker import TansuBroker
from forgerl.gateway.testing import ScriptedInference
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from forgerl.rollout.suites import tooluse
from forgerl.rollout.tasks import get_suite
from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import free_port, serve_in_process
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.main import build as build_datapool
from forgerl.services.gateway.config import GatewayConfig
from forgerl.services.gateway.main import build as build_gateway
from forgerl.services.rollout.config import RolloutConfig
from forgerl.services.rollout.main import spec_for
from forgerl.services.rollout.servicer import build_servicer
from forgerl.store import Store
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, inference_pb2_grpc, rollout_pb2, rollout_pb2_grpc, run_pb2

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
K = rollout_pb2.EpisodeEventKind
RUN = "run-windowed-fifo"
WINDOW = 0.3
ALL_TASKS = get_suite("tooluse").tasks("test")[:13]
TASKS = ALL_TASKS[:10]
LOST, BEFORE_KILL, AFTER_RESTART = 10, 11, 12  # positions of the last three
FAILING = 5  # the position whose episode names an unknown scaffold
USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


class WindowRule:
    """The windowed-FIFO rule over a generation queue of `n` positions, from its definition."""

    def __init__(self, n: int, window: float) -> None:
        self.state = ["running"] * n
        self.window = Fraction(str(window))  # exact: 0.3 * 10 is 3 positions, not 3.0000000000000004

    def submit(self) -> None:
        self.state.append("running")

    def finish(self, seq: int) -> None:
        self.state[seq] = "finished"

    def fail(self, seq: int) -> None:
        self.state[seq] = "failed"

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            waiting = [p for p, s in enumerate(self.state) if s in ("running", "finished")]
            if not waiting:
                break
            head = waiting[0]
            width = max(1, math.ceil(self.window * (len(self.state) - head)))
            ready = [p for p in range(head, head + width) if p < len(self.state) and self.state[p] == "finished"]
            if not ready:
                break
            self.state[ready[0]] = "taken"
            out.append(ready[0])
        return out


class GatedInference(ScriptedInference):
    """Answers every episode at once with a final answer, but only after the test opens its task's gate."""

    def __init__(self, tokenizer: Any, model_path: str) -> None:
        super().__init__(respond=self._answer, eos_id=tokenizer.eos_token_id, model_path=model_path)
        self.tok = tokenizer
        self.task_of = {t.instructions: t.id for t in ALL_TASKS}
        self.gates = {t.id: asyncio.Event() for t in ALL_TASKS}

    def open_all(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def _task(self, prompt: list[int]) -> str:
        text = self.tok.decode(prompt, skip_special_tokens=False)
        return self.task_of[USER.search(text).group(1)]  # type: ignore[union-attr]

    def _answer(self, prompt: list[int]) -> list[int]:
        return [*self.tok.encode("<think>\nno tools\n</think>\n\n0", add_special_tokens=False), self.tok.eos_token_id]

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await self.gates[self._task(list(request.prompt_token_ids))].wait()
        async for response in super().Generate(request, context):
            yield response


@pytest.fixture(scope="module")
def broker() -> Iterator[TansuBroker]:
    with TansuBroker() as b:
        yield b


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fifo-tokenizer")
    save_tokenizer(train_tokenizer(list(tooluse.tokenizer_corpus(("test",))), vocab_size=1024), path)
    return path


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        await asyncio.sleep(0.05)


class Scenario:
    """The test's side of the services: queues episodes, opens gates, records what ended and was served."""

    def __init__(self, stack: AsyncExitStack, inference: GatedInference, pool_address: str) -> None:
        self.stack, self.inference = stack, inference
        self.pool = datapool_pb2_grpc.DatapoolServiceStub(self.connect(pool_address))
        self.rule = WindowRule(0, WINDOW)
        self.events: list[rollout_pb2.EpisodeEvent] = []
        self.recorded: list[int] = []  # finish order: the position of each episode that ended, as they came
        self.failed: set[int] = set()
        self.served: list[int] = []
        self.batches: list[tuple[list[int], list[int]]] = []  # (served, predicted by the rule)

    def connect(self, address: str) -> grpc.aio.Channel:
        channel = aio_channel(address)
        self.stack.push_async_callback(channel.close)
        return channel

    async def follow(self, address: str) -> rollout_pb2_grpc.RolloutServiceStub:
        """A rollout service's stub once it serves; its events of the run are recorded until it goes away."""
        stub = rollout_pb2_grpc.RolloutServiceStub(self.connect(address))

        async def serving() -> bool:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.GetRolloutStats(rollout_pb2.GetRolloutStatsRequest(run_id=RUN), timeout=1.0)
                return True
            return False

        await until(serving, f"rollout at {address} to serve", timeout_s=60)

        async def read() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):  # the process was killed
                async for response in stub.StreamEpisodeEvents(rollout_pb2.StreamEpisodeEventsRequest(run_id=RUN)):
                    self.events.append(response.event)

        self.stack.callback(asyncio.create_task(read()).cancel)
        return stub

    async def submit(self, rollout: rollout_pb2_grpc.RolloutServiceStub, positions: range, scaffold: str) -> None:
        """Queue the tasks at these positions (in order); the rule learns of them in the same order."""
        ids = [ALL_TASKS[p].id for p in positions]
        await rollout.Submit(
            rollout_pb2.SubmitRequest(
                run_id=RUN, suite="tooluse", split="test", task_ids=ids, group_size=1,
                scaffold_version=scaffold, publish=True,
            )
        )  # fmt: skip
        for _ in positions:
            self.rule.submit()

    def ended(self) -> list[rollout_pb2.EpisodeEvent]:
        return [e for e in self.events if e.kind in (K.EPISODE_EVENT_KIND_FINISHED, K.EPISODE_EVENT_KIND_FAILED)]

    async def phase(self, release: list[int], *, failing: int = 0, skip_markers: int = 1) -> None:
        """Open the gates of `release`, wait until they (and `failing` more) ended and reached the pool,
        then fetch a batch and note what the rule predicts from the recorded finish order."""
        for position in release:
            self.inference.gates[ALL_TASKS[position].id].set()
        want = len(self.recorded) + len(release) + failing

        async def all_ended() -> bool:
            return len(self.ended()) >= want

        await until(all_ended, f"episodes {release} to end")
        for event in self.ended()[len(self.recorded) :]:
            position = POSITION[event.task_id]
            self.recorded.append(position)
            if event.kind == K.EPISODE_EVENT_KIND_FAILED:
                self.failed.add(position)
                self.rule.fail(position)
            else:
                assert event.trajectory_id, event.message
                self.rule.finish(position)
        finished = len(self.recorded) - len(self.failed)

        async def in_pool() -> bool:
            s = await self.pool.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=RUN))
            return s.buffered == finished - len(self.served) and s.skipped == skip_markers

        await until(in_pool, f"the trajectories of {release} and {skip_markers} skip marker(s) in the data pool")
        resp = await self.pool.FetchBatch(
            datapool_pb2.FetchBatchRequest(run_id=RUN, size=len(ALL_TASKS), policy_version=1, timeout_s=0.3)
        )
        got = [int(t.labels["forgerl/submit_seq"]) for t in resp.trajectories]
        assert [POSITION[t.task_id] for t in resp.trajectories] == got, "stamped with the queue position"
        self.batches.append((got, self.rule.take(len(ALL_TASKS))))
        self.served.extend(got)
        if resp.batch_id:
            await self.pool.Ack(datapool_pb2.AckRequest(run_id=RUN, batch_id=resp.batch_id))


@contextlib.contextmanager
def rollout_process(config: RolloutConfig, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The rollout service as its own process (`python -m forgerl.services.rollout.main`)."""
    flags = {
        "host": "127.0.0.1", "port": str(port), "state_dir": str(config.state_dir),
        "sandbox_root": config.sandbox_root, "gateway_address": config.gateway_address,
        "datapool_address": config.datapool_address, "max_in_flight": str(config.max_in_flight),
        "grace_s": "1", "log_level": "warning",
    }  # fmt: skip
    argv = [f"--{key.replace('_', '-')}={value}" for key, value in flags.items()]
    process = subprocess.Popen([sys.executable, "-m", "forgerl.services.rollout.main", *argv])
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=30)


POSITION = {t.id: i for i, t in enumerate(ALL_TASKS)}  # a task's position in the run's queue, by construction


async def test_batches_follow_the_window_rule(
    broker: TansuBroker, tokenizer_dir: Path, tmp_path: Path, sandbox_root: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'runs.db'}"
    with Store.open(db_url) as store:  # as the trainer's StartRun records the run's config
        config = run_config_from_dict({"rl": {"fifo_window": WINDOW, "max_staleness": -1}})
        store.runs.create(run_pb2.Run(run_id=RUN, config=config, state=run_pb2.RUN_STATE_RUNNING))
    inference = GatedInference(load_tokenizer(tokenizer_dir), str(tokenizer_dir))
    async with AsyncExitStack() as stack:
        stack.callback(inference.open_all)  # nothing left waiting at teardown
        ro_config = await start_services(stack, broker, inference, tokenizer_dir, tmp_path, sandbox_root, db_url)
        s = Scenario(stack, inference, ro_config.datapool_address)
        port = free_port()
        first = stack.enter_context(rollout_process(ro_config, port))
        rollout = await s.follow(f"127.0.0.1:{port}")
        # Queue order, as submitted: tasks 0-4, the failing one, tasks 6-9.
        await s.submit(rollout, range(0, FAILING), "default")
        await s.submit(rollout, range(FAILING, FAILING + 1), "no-such-scaffold")
        await s.submit(rollout, range(FAILING + 1, len(TASKS)), "default")
        # The head (0) and positions 4 and 6 stay slow; 1-3 and 7-9 finish first (and 5 fails at once).
        await s.phase([1, 2, 3, 7, 8, 9], failing=1)
        for release in ([0], [4], [6]):
            await s.phase(release)

        # 10 stays in flight, 11 finishes: the window waits for 10. Then rollout is killed.
        await s.submit(rollout, range(LOST, BEFORE_KILL + 1), "default")
        await s.phase([BEFORE_KILL])
        first.kill()
        first.wait(timeout=30)
        s.rule.fail(LOST)  # lost with the process, by definition
        restarted = await s.follow(
            await stack.enter_async_context(serve_in_process(spec_for(build_servicer(ro_config)), ro_config))
        )
        await s.submit(restarted, range(AFTER_RESTART, AFTER_RESTART + 1), "default")
        await s.phase([AFTER_RESTART], skip_markers=2)

    assert [got for got, _ in s.batches] == [predicted for _, predicted in s.batches], s.batches
    # The rule held episodes back: with f = 0.3 the first batch is two of the six finished, not all six.
    assert [len(got) for got, _ in s.batches] == [2, 2, 2, 3, 0, 2]
    assert s.failed == {FAILING}
    assert sorted(s.served) == [p for p in range(len(ALL_TASKS)) if p not in (FAILING, LOST)]


async def start_services(
    stack: AsyncExitStack,
    broker: TansuBroker,
    inference: GatedInference,
    tokenizer_dir: Path,
    tmp_path: Path,
    sandbox_root: Path,
    db_url: str,
) -> RolloutConfig:
    """Inference, data pool and gateway in this process; returns the rollout configuration that uses them."""
    inference_server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, inference_server)
    inference_address = f"127.0.0.1:{inference_server.add_insecure_port('127.0.0.1:0')}"
    await inference_server.start()
    stack.push_async_callback(inference_server.stop, 0)
    pool_config = DatapoolConfig(
        kafka_bootstrap=broker.bootstrap, fifo_window=1.0, database_url=db_url, gap_timeout_s=600.0,
        state_dir=tmp_path / "pool", grace_s=1.0, log_level="warning",
    )  # fmt: skip
    pool_address = await stack.enter_async_context(serve_in_process(build_datapool(pool_config), pool_config))
    gw_config = GatewayConfig(
        http_port=0, inference_replicas=inference_address, datapool_address=pool_address,
        tokenizer_path=str(tokenizer_dir), log_format="console", grace_s=1.0,
    )  # fmt: skip
    gateway_address = await stack.enter_async_context(serve_in_process(build_gateway(gw_config), gw_config))
    return RolloutConfig(
        state_dir=tmp_path / "rollout", sandbox_root=str(sandbox_root), gateway_address=gateway_address,
        datapool_address=pool_address, max_in_flight=len(ALL_TASKS), grace_s=1.0,
    )  # fmt: skip
