"""Rollout through the real gateway: services/rollout -> services/gateway (OpenAI HTTP + GatewayService) ->
a scripted inference replica over gRPC -> trajectories into a (capturing) data pool.

The inference replica "knows the answers": it reads the task out of the prompt the gateway rendered with
the chat template and generates the gold turn's tokens (reasoning, hermes tool calls, final answer). So
the whole agent path runs for real: the default scaffold's OpenAI client, the gateway's chat template,
tool-call parsing and token-exact recording, tools and tests in local sandboxes, rewards, CloseEpisode,
and the hand-over to the data pool. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

pytest.importorskip("forgerl.gateway.testing", reason="the gateway (issue 7) is not in this tree")

from forgerl.gateway.testing import ScriptedInference
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from forgerl.rollout.suites import tooluse
from forgerl.rollout.tasks import Task, get_suite
from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.gateway.config import GatewayConfig
from forgerl.services.gateway.main import build as build_gateway
from forgerl.services.rollout.config import RolloutConfig
from forgerl.services.rollout.main import spec_for
from forgerl.services.rollout.servicer import build_servicer
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, inference_pb2_grpc, rollout_pb2, rollout_pb2_grpc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
K = rollout_pb2.EpisodeEventKind
SUITES = {"tooluse": get_suite("tooluse"), "swe": get_suite("swe")}
USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rollout-tokenizer")
    save_tokenizer(train_tokenizer(list(tooluse.tokenizer_corpus(("test",))), vocab_size=1024), path)
    return path


class GoldModel:
    """`respond(prompt_ids)` for ScriptedInference: the next gold turn of the task named in the prompt."""

    def __init__(self, tokenizer: Any, behaviour: str = "gold") -> None:
        self.tok = tokenizer
        self.behaviour = behaviour
        self.by_instructions: dict[str, Task] = {t.instructions: t for s in SUITES.values() for t in s}
        self.calls = 0

    def __call__(self, prompt: list[int]) -> list[int]:
        self.calls += 1
        text = self.tok.decode(prompt, skip_special_tokens=False)
        task = self.by_instructions[USER.search(text).group(1)]  # type: ignore[union-attr]
        turn = text.count("<|im_start|>assistant") - 1  # the generation prompt opens one more
        gold = SUITES[task.suite].gold(task)
        if self.behaviour == "malformed":
            out = '<tool_call>\n{"name": "calculator", "arguments": {"expression": \n</tool_call>'
        elif turn < len(gold.turns):
            reasoning = " ".join(c.reasoning for c in gold.turns[turn])
            out = f"<think>\n{reasoning}\n</think>\n\n" + "\n".join(
                f'<tool_call>\n{{"name": "{c.name}", "arguments": {json.dumps(dict(c.arguments))}}}\n</tool_call>'
                for c in gold.turns[turn]
            )
        else:
            out = f"<think>\n{gold.final_reasoning}\n</think>\n\n{gold.final_answer}"
        return [*self.tok.encode(out, add_special_tokens=False), self.tok.eos_token_id]


class CapturingPool(datapool_pb2_grpc.DatapoolServiceServicer):
    def __init__(self) -> None:
        self.received: list[Any] = []

    async def PutTrajectories(self, request: Any, context: Any) -> Any:
        self.received.extend(request.trajectories)
        return datapool_pb2.PutTrajectoriesResponse(accepted=len(request.trajectories))


@asynccontextmanager
async def grpc_server(add: Any, servicer: Any) -> AsyncIterator[str]:
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def run_submission(stub: Any, **fields: Any) -> list[Any]:
    sub = await stub.Submit(rollout_pb2.SubmitRequest(run_id="run-e2e", scaffold_version="default", **fields))
    call = stub.StreamEpisodeEvents(
        rollout_pb2.StreamEpisodeEventsRequest(submission_id=sub.submission_id), timeout=300
    )
    return [r.event async for r in call]


async def test_rollout_through_the_real_gateway(tokenizer_dir: Path, tmp_path: Path, sandbox_root: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    model = GoldModel(tok)
    inference = ScriptedInference(respond=model, eos_id=tok.eos_token_id, model_path=str(tokenizer_dir))
    pool = CapturingPool()
    async with AsyncExitStack() as stack:
        inference_address = await stack.enter_async_context(
            grpc_server(inference_pb2_grpc.add_InferenceServiceServicer_to_server, inference)
        )
        pool_address = await stack.enter_async_context(
            grpc_server(datapool_pb2_grpc.add_DatapoolServiceServicer_to_server, pool)
        )
        gw_config = GatewayConfig(
            http_port=0, inference_replicas=inference_address, datapool_address=pool_address,
            tokenizer_path=str(tokenizer_dir), log_format="console", grace_s=1.0,
        )  # fmt: skip
        gateway_address = await stack.enter_async_context(serve_in_process(build_gateway(gw_config), gw_config))
        config = RolloutConfig(
            state_dir=tmp_path, sandbox_root=str(sandbox_root), gateway_address=gateway_address, max_in_flight=4
        )
        address = await stack.enter_async_context(serve_in_process(spec_for(build_servicer(config)), config))
        channel = aio_channel(address)
        stack.push_async_callback(channel.close)
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)

        tool_ids = [t.id for t in SUITES["tooluse"].tasks("test")[:4]]  # levels 1-4: calculator and python
        swe_ids = [SUITES["swe"].tasks("test")[0].id]
        events = await run_submission(
            stub, suite="tooluse", split="test", task_ids=tool_ids, group_size=2, publish=True
        )
        events += await run_submission(stub, suite="swe", split="test", task_ids=swe_ids, group_size=1, publish=True)
        finished = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
        assert len(finished) == 9, [e.message for e in events if e.kind != K.EPISODE_EVENT_KIND_STARTED]
        for e in finished:
            assert e.success and e.reward.performance == 1.0 and e.reward.process == 0.0, (e.task_id, e.message)
            assert e.trajectory_id
        published = {t.trajectory_id: t for t in pool.received}
        assert set(published) == {e.trajectory_id for e in finished}
        for e in finished:
            traj = published[e.trajectory_id]
            gold = SUITES[traj.suite].gold(SUITES[traj.suite].get(traj.task_id))
            assert len(traj.turns) == len(gold.turns) + 1 == len(traj.step_rewards)
            assert traj.success and traj.reward.performance == 1.0 and traj.scaffold_version == "default"
            first = traj.turns[0]
            assert first.prompt_token_ids and first.generated_token_ids
            assert [c.name for c in first.tool_calls] == [c.name for c in gold.turns[0]]
            assert first.tool_results and not first.tool_results[0].is_error
            assert traj.turns[-1].content.strip() == gold.final_answer
        # Group ids: the two episodes of a task share one.
        groups = {}
        for t in published.values():
            groups.setdefault(t.task_id, set()).add(t.group_id)
        assert all(len(g) == 1 for g in groups.values())

        # A model that writes broken tool calls: penalised by the process reward, scored 0, still published.
        model.behaviour = "malformed"
        events = await run_submission(
            stub, suite="tooluse", split="test", task_ids=tool_ids[:1], group_size=1, publish=True
        )
        (bad,) = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
        assert not bad.success and bad.reward.performance == 0.0 and bad.reward.process < 0

        # A model too slow for the task's time budget: the episode is cut off during its first model call,
        # which the gateway never records. It finishes unpublished and unsuccessful; before, rollout put a step
        # reward on turn 0 and the gateway refused the close (INVALID_ARGUMENT), failing the episode.
        model.behaviour = "gold"
        inference.token_delay_s = 1.0
        split = tooluse.generate(tooluse.SEED)  # the cache entry ToolUseSuite reads
        first, *rest = split["test"]
        split["test"] = (dataclasses.replace(first, time_budget_s=1.0), *rest)
        try:
            received = len(pool.received)
            events = await run_submission(
                stub, suite="tooluse", split="test", task_ids=[first.id], group_size=1, publish=True
            )
        finally:
            split["test"] = (first, *rest)
        ended = [e for e in events if e.kind in (K.EPISODE_EVENT_KIND_FINISHED, K.EPISODE_EVENT_KIND_FAILED)]
        assert [e.kind for e in ended] == [K.EPISODE_EVENT_KIND_FINISHED], [e.message for e in events]
        assert not ended[0].success and not ended[0].trajectory_id and "0 turns" in ended[0].message
        assert len(pool.received) == received
    assert not [p for p in sandbox_root.iterdir() if not p.name.startswith(".")]
