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
position at once (the pool's gap timeout is 600 s). Then rollout restarts (a fresh service) and queues
one more episode: it must be position 10 of the run's queue, not 0 again. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
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
from forgerl.runtime.testing import serve_in_process
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
ALL_TASKS = get_suite("tooluse").tasks("test")[:11]
TASKS, AFTER_RESTART = ALL_TASKS[:10], ALL_TASKS[10]
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
        ro_config = RolloutConfig(
            state_dir=tmp_path / "rollout", sandbox_root=str(sandbox_root), gateway_address=gateway_address,
            datapool_address=pool_address, max_in_flight=len(TASKS), grace_s=1.0,
        )  # fmt: skip
        rollout_address = await stack.enter_async_context(
            serve_in_process(spec_for(build_servicer(ro_config)), ro_config)
        )
        events: list[rollout_pb2.EpisodeEvent] = []

        def connect(address: str) -> grpc.aio.Channel:
            channel = aio_channel(address)
            stack.push_async_callback(channel.close)
            return channel

        def follow(address: str) -> rollout_pb2_grpc.RolloutServiceStub:
            stub = rollout_pb2_grpc.RolloutServiceStub(connect(address))

            async def read() -> None:
                async for response in stub.StreamEpisodeEvents(rollout_pb2.StreamEpisodeEventsRequest(run_id=RUN)):
                    events.append(response.event)

            stack.callback(asyncio.create_task(read()).cancel)
            return stub

        rollout = follow(rollout_address)
        pool = datapool_pb2_grpc.DatapoolServiceStub(connect(pool_address))

        # Queue order, as submitted: tasks 0-4, the failing one, tasks 6-9.
        for ids, scaffold in (([t.id for t in TASKS[:FAILING]], "default"), ([TASKS[FAILING].id], "no-such-scaffold"),
                              ([t.id for t in TASKS[FAILING + 1 :]], "default")):  # fmt: skip
            await rollout.Submit(
                rollout_pb2.SubmitRequest(
                    run_id=RUN, suite="tooluse", split="test", task_ids=ids, group_size=1,
                    scaffold_version=scaffold, publish=True,
                )
            )  # fmt: skip
        seq_of = {t.id: i for i, t in enumerate(ALL_TASKS)}  # AFTER_RESTART: the run's 11th, position 10

        rule = WindowRule(len(TASKS), WINDOW)
        recorded: list[int] = []  # finish order: the position of each FINISHED/FAILED event, as they came
        served: list[int] = []
        batches: list[tuple[list[int], list[int]]] = []  # (served, predicted)

        def ended() -> list[rollout_pb2.EpisodeEvent]:
            return [e for e in events if e.kind in (K.EPISODE_EVENT_KIND_FINISHED, K.EPISODE_EVENT_KIND_FAILED)]

        async def stats() -> datapool_pb2.GetPoolStatsResponse:
            return await pool.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=RUN))

        async def phase(release: list[int]) -> None:
            for seq in release:
                inference.gates[ALL_TASKS[seq].id].set()
            want = len(recorded) + len(release) + (1 if not recorded else 0)  # the failing one ends first

            async def all_ended() -> bool:
                return len(ended()) >= want

            await until(all_ended, f"episodes {release} to end")
            for event in ended()[len(recorded) :]:
                seq = seq_of[event.task_id]
                recorded.append(seq)
                if event.kind == K.EPISODE_EVENT_KIND_FAILED:
                    assert seq == FAILING, event.message
                    rule.fail(seq)
                else:
                    assert event.trajectory_id, event.message
                    rule.finish(seq)
            finished = sum(1 for s in recorded if s != FAILING)

            async def in_pool() -> bool:
                s = await stats()
                return s.buffered == finished - len(served) and s.skipped == 1

            await until(in_pool, f"the trajectories of {release} and the skip marker in the data pool")
            resp = await pool.FetchBatch(
                datapool_pb2.FetchBatchRequest(run_id=RUN, size=len(TASKS), policy_version=1, timeout_s=0.3)
            )
            got = [int(t.labels["forgerl/submit_seq"]) for t in resp.trajectories]
            assert [seq_of[t.task_id] for t in resp.trajectories] == got, "stamped with the queue position"
            batches.append((got, rule.take(len(TASKS))))
            served.extend(got)
            if resp.batch_id:
                await pool.Ack(datapool_pb2.AckRequest(run_id=RUN, batch_id=resp.batch_id))

        # The head (0) and positions 4 and 6 stay slow; 1-3 and 7-9 finish first.
        for release in ([1, 2, 3, 7, 8, 9], [0], [4], [6]):
            await phase(release)

        # Rollout restarts: a fresh service, whose numbering must go on where the run's queue ends.
        restarted = follow(
            await stack.enter_async_context(serve_in_process(spec_for(build_servicer(ro_config)), ro_config))
        )
        await restarted.Submit(
            rollout_pb2.SubmitRequest(
                run_id=RUN, suite="tooluse", split="test", task_ids=[AFTER_RESTART.id], group_size=1,
                scaffold_version="default", publish=True,
            )
        )  # fmt: skip
        rule.submit()
        await phase([seq_of[AFTER_RESTART.id]])

    assert [got for got, _ in batches] == [predicted for _, predicted in batches], batches
    # The rule held episodes back: with f = 0.3 the first batch is two of the six finished, not all six.
    assert [len(got) for got, _ in batches] == [2, 2, 2, 3, 1]
    assert sorted(served) == [s for s in range(len(ALL_TASKS)) if s != FAILING]
