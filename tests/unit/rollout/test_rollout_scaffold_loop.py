"""The interleaved-thinking scaffold against a scripted OpenAI endpoint (httpx mock transport, no network)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from forgerl.rollout.scaffold import (
    MALFORMED_NOTE,
    EpisodeContext,
    InterleavedAgent,
    ModelUnavailableError,
    apply_context_policy,
)
from forgerl.rollout.scaffold_config import DEFAULT, ContextPolicy
from forgerl.rollout.tasks import Task
from forgerl.rollout.tools import ToolBox

pytestmark = pytest.mark.unit

TASK = Task(
    id="tooluse/train/00000", suite="tooluse", split="train", instructions="What is 47 + 38?",
    test_command="true", time_budget_s=60, baseline_s=10, tools=("calculator", "python"), answer_file="answer.txt",
)  # fmt: skip


def completion(content: str = "", reasoning: str = "", calls: list[tuple[str, Any]] = (), finish: str = "") -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": n, "arguments": a if isinstance(a, str) else json.dumps(a)}}
            for i, (n, a) in enumerate(calls)
        ]  # fmt: skip
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "forgerl",
        "choices": [{"index": 0, "message": message, "finish_reason": finish or ("tool_calls" if calls else "stop")}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }  # fmt: skip


class FakeModel:
    """Answers chat completions from a script; records every request body and its headers."""

    def __init__(self, script: list[dict | Callable[[dict], dict]], status: int = 200) -> None:
        self.script = list(script)
        self.requests: list[dict] = []
        self.headers: list[httpx.Headers] = []
        self.status = status

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        self.headers.append(request.headers)
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "nope"}})
        step = self.script.pop(0)
        return httpx.Response(200, json=step(body) if callable(step) else step)

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://gateway.test/v1", api_key="ep-key-123", max_retries=0,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(self.handler)),
        )  # fmt: skip


def context(model: FakeModel, scaffold=DEFAULT, task: Task = TASK) -> EpisodeContext:
    return EpisodeContext(
        task=task, scaffold=scaffold, tools=ToolBox(task.tools, sandbox=None), deadline=time.monotonic() + 30,
        client=model.client(), model="forgerl",
    )  # fmt: skip


async def test_think_call_observe_answer_keeps_reasoning_in_the_history() -> None:
    model = FakeModel([
        completion(reasoning="Use the calculator.", calls=[("calculator", {"expression": "47 + 38"})]),
        completion(content="85", reasoning="It is 85."),
    ])  # fmt: skip
    ctx = context(model)
    result = await InterleavedAgent().run(ctx)
    assert result.stopped == "answer" and result.final_answer == "85"
    assert len(result.turns) == 2 and result.turns[0].tool_results[0].content == "85"
    first, second = model.requests
    assert model.headers[0]["authorization"] == "Bearer ep-key-123"
    assert [m["role"] for m in first["messages"]] == ["system", "user"]
    assert first["messages"][0]["content"] == DEFAULT.system_prompt("tooluse")
    assert [t["function"]["name"] for t in first["tools"]] == ["calculator", "python"]
    assert first["max_tokens"] == DEFAULT.sampling.max_tokens
    # Interleaved thinking: the earlier turn's reasoning and tool call go back with the tool's result.
    assistant, tool = second["messages"][2], second["messages"][3]
    assert assistant["reasoning_content"] == "Use the calculator."
    assert assistant["tool_calls"][0]["function"]["name"] == "calculator"
    assert tool == {"role": "tool", "tool_call_id": "call_0", "content": "85"}
    assert [p.malformed_calls + p.tool_errors + p.format_errors for p in result.step_processes()] == [0, 0]


async def test_independent_calls_run_in_parallel_or_in_order() -> None:
    calls = [("calculator", {"expression": f"{i} * 2"}) for i in range(4)]
    started: list[float] = []
    box_call = ToolBox.call

    async def slow_call(self: ToolBox, name: str, arguments: Any) -> Any:
        started.append(time.monotonic())
        await asyncio.sleep(0.2)
        return await box_call(self, name, arguments)

    for parallel, bound in ((True, 0.15), (False, 0.55)):
        started.clear()
        model = FakeModel([completion(calls=calls), completion(content="done")])
        scaffold = DEFAULT.derive("p", parallel_tool_calls=parallel, max_parallel_tools=4)
        ctx = context(model, scaffold)
        ctx.tools.call = slow_call.__get__(ctx.tools)  # type: ignore[method-assign]
        result = await InterleavedAgent().run(ctx)
        assert [r.content for r in result.turns[0].tool_results] == ["0", "2", "4", "6"]  # in call order
        spread = max(started) - min(started)
        assert (spread < bound) if parallel else (spread > bound)


async def test_malformed_calls_and_markup_are_penalised_and_the_loop_goes_on() -> None:
    model = FakeModel([
        completion(calls=[("calculator", '{"expression": 47 +'), ("teleport", {})]),
        completion(content='<tool_call>{"name": "calculator", oops</tool_call>'),
        completion(content="85"),
    ])  # fmt: skip
    result = await InterleavedAgent().run(context(model))
    assert result.final_answer == "85" and len(result.turns) == 3
    processes = result.step_processes()
    assert processes[0].malformed_calls == 2 and processes[1].format_errors == 1
    assert model.requests[2]["messages"][-1] == {"role": "user", "content": MALFORMED_NOTE}


async def test_turn_budget_and_truncated_generations() -> None:
    looping = [completion(calls=[("calculator", {"expression": "1 + 1"})], finish="length") for _ in range(4)]
    result = await InterleavedAgent().run(context(FakeModel(looping)))
    assert result.stopped == "turn_budget" and len(result.turns) == DEFAULT.turn_budget("tooluse") == 4
    processes = result.step_processes()
    assert processes[-1].over_budget and not processes[0].over_budget
    assert all(p.format_errors == 1 for p in processes)  # finish_reason "length": cut off


async def test_gateway_down_is_infrastructure_a_refusal_is_the_agents() -> None:
    with pytest.raises(ModelUnavailableError):
        await InterleavedAgent().run(context(FakeModel([], status=503)))
    result = await InterleavedAgent().run(context(FakeModel([], status=400)))
    assert result.stopped == "model_error" and result.turns == []


def test_context_policy_elides_old_observations_and_strips_reasoning() -> None:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    for i in range(6):
        messages.append({"role": "assistant", "content": "", "reasoning_content": f"think {i}",
                         "tool_calls": [{"id": f"c{i}", "type": "function",
                                         "function": {"name": "bash", "arguments": "{}"}}]})  # fmt: skip
        messages.append({"role": "tool", "tool_call_id": f"c{i}", "content": "x" * 500})
    policy = ContextPolicy(max_context_chars=2000, keep_recent_observations=2, keep_reasoning=False)
    out = apply_context_policy(messages, policy)
    tools = [m["content"] for m in out if m["role"] == "tool"]
    assert tools[-2:] == ["x" * 500, "x" * 500] and tools[0].startswith("[tool output elided")
    assert not any("reasoning_content" in m for m in out)
    assert messages[3]["content"] == "x" * 500, "the agent's own history is not modified"
    keep = apply_context_policy(messages, ContextPolicy())
    assert keep == messages
