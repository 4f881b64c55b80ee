"""A stand-in gateway for rollout's tests: GatewayService over gRPC plus an OpenAI-compatible HTTP endpoint
whose "model" replays the gold solution of the task it is asked about (or a scripted wrong behaviour).

It checks what the real gateway relies on: the agent authenticates with its episode key, and every
CloseEpisode carries one step reward per model call. All on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web

from forgerl.rollout.tasks import Suite, Task
from forgerl.v1 import gateway_pb2, gateway_pb2_grpc, trajectory_pb2


@dataclass
class EpisodeState:
    request: gateway_pb2.OpenEpisodeRequest
    episode_id: str
    calls: int = 0
    closed: gateway_pb2.CloseEpisodeRequest | None = None


@dataclass
class FakeGateway(gateway_pb2_grpc.GatewayServiceServicer):
    suites: dict[str, Suite]
    behaviour: str = "gold"  # gold | wrong | down
    episodes: dict[str, EpisodeState] = field(default_factory=dict)
    base_url: str = ""
    published: list[trajectory_pb2.Trajectory] = field(default_factory=list)
    opened: int = 0

    async def OpenEpisode(self, request: gateway_pb2.OpenEpisodeRequest, context: Any) -> Any:
        key = f"ek-{uuid.uuid4().hex}"
        self.episodes[key] = EpisodeState(request, uuid.uuid4().hex)
        self.opened += 1
        return gateway_pb2.OpenEpisodeResponse(
            episode_id=self.episodes[key].episode_id, episode_key=key, base_url=self.base_url
        )

    async def CloseEpisode(self, request: gateway_pb2.CloseEpisodeRequest, context: Any) -> Any:
        state = self.episodes.get(request.episode_key)
        if state is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown episode key")
        assert state is not None
        state.closed = request
        traj = trajectory_pb2.Trajectory(
            schema_version=1,
            trajectory_id=f"traj-{state.episode_id}",
            run_id=state.request.run_id,
            task_id=state.request.task_id,
            group_id=state.request.group_id,
            episode_id=state.episode_id,
            scaffold_version=state.request.scaffold_version,
            turns=[trajectory_pb2.Turn() for _ in range(state.calls)],
            step_rewards=request.step_rewards,
            reward=request.reward,
            success=request.success,
        )
        if request.publish:
            self.published.append(traj)
        return gateway_pb2.CloseEpisodeResponse(trajectory=traj)

    # -- the OpenAI side -------------------------------------------------------------------------------

    def _task(self, state: EpisodeState) -> Task:
        return self.suites[state.request.suite].get(state.request.task_id)

    async def chat(self, request: web.Request) -> web.Response:
        if self.behaviour == "down":
            return web.json_response({"error": {"message": "overloaded"}}, status=503)
        auth = request.headers.get("Authorization", "")
        state = self.episodes.get(auth.removeprefix("Bearer "))
        if state is None or state.closed is not None:
            return web.json_response({"error": {"message": "unknown or closed episode key"}}, status=401)
        body = await request.json()
        state.calls += 1
        task = self._task(state)
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if self.behaviour == "mini-swe-agent":
            return web.json_response(_mini_swe_agent_turn(task, turn))
        assert body["messages"][1]["content"] == task.instructions
        if self.behaviour == "wrong":
            return web.json_response(_completion("I do not know.", "No idea.", []))
        gold = self.suites[task.suite].gold(task)
        if turn < len(gold.turns):
            calls = [
                {"id": f"call_{turn}_{i}", "type": "function",
                 "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))}}
                for i, c in enumerate(gold.turns[turn])
            ]  # fmt: skip
            reasoning = " ".join(c.reasoning for c in gold.turns[turn])
            return web.json_response(_completion("", reasoning, calls))
        return web.json_response(_completion(gold.final_answer, gold.final_reasoning, []))


def _mini_swe_agent_turn(task: Task, turn: int) -> dict[str, Any]:
    """A model driving mini-swe-agent (bash tool calls only) to the gold fix of a SWE task, then submitting."""
    if turn == 0:
        path, buggy, correct = task.metadata["path"], task.metadata["buggy"], task.metadata["correct"]
        command = (
            f"python3 - <<'PYEOF'\ns = open({path!r}).read()\n"
            f"open({path!r}, 'w').write(s.replace({buggy!r}, {correct!r}))\n"
            "PYEOF\npython3 -m unittest -q 2>&1 | tail -1"
        )
        thought = "Apply the fix and run the tests."
    else:
        command, thought = "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT", "The tests pass; submit."
    call = {
        "id": f"call_{turn}",
        "type": "function",
        "function": {"name": "bash", "arguments": json.dumps({"command": command})},
    }
    return _completion(thought, "", [call])


def _completion(content: str, reasoning: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:8]}", "object": "chat.completion", "created": 0, "model": "forgerl",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if calls else "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip


@asynccontextmanager
async def running_fake_gateway(
    suites: dict[str, Suite], behaviour: str = "gold"
) -> AsyncIterator[tuple[FakeGateway, str]]:
    """Yields (gateway, "127.0.0.1:<grpc port>"); its base_url points at the HTTP side."""
    gateway = FakeGateway(suites, behaviour)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", gateway.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    gateway.base_url = f"http://127.0.0.1:{port}/v1"
    server = grpc.aio.server()
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(gateway, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield gateway, f"127.0.0.1:{grpc_port}"
    finally:
        await server.stop(0)
        await runner.cleanup()
        await asyncio.sleep(0)
