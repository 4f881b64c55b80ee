"""The gateway service driven by the official `openai` SDK over HTTP, on scripted inference replicas over
gRPC (the generations are known, so tool calls happen and every token can be checked)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from gateway_services import capturing_datapool, running_gateway

from forgerl.model.tokenizer import load_tokenizer
from forgerl.v1 import gateway_pb2

pytestmark = pytest.mark.integration

CALC_TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}
START = [
    {"role": "system", "content": "You are a careful agent with a calculator."},
    {"role": "user", "content": "What is (12 + 7) * 2, and 3 * 3?"},
]


def assistant_ids(
    tok: Any, content: str = "", reasoning: str = "", calls: tuple[tuple[str, dict], ...] = ()
) -> list[int]:
    text = f"<think>\n{reasoning}\n</think>\n\n" if reasoning else ""
    text += content
    for i, (name, args) in enumerate(calls):
        text += (
            "\n" if content or i else ""
        ) + f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'
    return [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]


def script(tok: Any) -> list[list[int]]:
    return [
        assistant_ids(
            tok,
            "Two sums first.",
            "I need 12 + 7 and 3 * 3; both at once.",
            (("calculator", {"expression": "12 + 7"}), ("calculator", {"expression": "3 * 3"})),
        ),
        assistant_ids(tok, "", "19 and 9. Now double 19.", (("calculator", {"expression": "19 * 2"}),)),
        assistant_ids(tok, "(12 + 7) * 2 = 38 and 3 * 3 = 9.", "38 and 9."),
    ]


def calculator(arguments: str) -> str:
    expression = json.loads(arguments)["expression"]
    return str(eval(expression, {"__builtins__": {}}))


async def ask(client: openai.AsyncOpenAI, messages: list[dict], stream: bool) -> tuple[dict[str, Any], str]:
    """One call; the assistant message as an agent would append it (reasoning_content dropped)."""
    if not stream:
        response = await client.chat.completions.create(model="forgerl", messages=messages, tools=[CALC_TOOL])
        choice = response.choices[0]
        assert choice.message.model_extra.get("reasoning_content")  # returned ...
        message = choice.message.model_dump(exclude_none=True)
        message.pop("reasoning_content", None)  # ... and dropped by this agent
        return message, choice.finish_reason
    content, reasoning, calls, finish = "", "", {}, ""
    events = await client.chat.completions.create(
        model="forgerl", messages=messages, tools=[CALC_TOOL], stream=True, stream_options={"include_usage": True}
    )
    async for event in events:
        if not event.choices:
            assert event.usage is not None and event.usage.completion_tokens > 0
            continue
        delta = event.choices[0].delta
        content += delta.content or ""
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, {"id": call.id, "type": "function", "function": {"name": "", "arguments": ""}})
            calls[call.index]["function"]["name"] += call.function.name or ""
            calls[call.index]["function"]["arguments"] += call.function.arguments or ""
        finish = event.choices[0].finish_reason or finish
    assert reasoning
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message, finish


async def run_agent(client: openai.AsyncOpenAI, stream: bool) -> list[dict]:
    messages = [dict(m) for m in START]
    for _ in range(6):
        message, finish = await ask(client, messages, stream)
        messages.append(message)
        if finish != "tool_calls":
            return messages
        for call in message["tool_calls"]:
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": calculator(call["function"]["arguments"])}
            )
    raise AssertionError("the episode did not end")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_openai_sdk_multi_turn_tool_calling_is_token_exact(tokenizer_dir: Path, replicas, stream: bool) -> None:
    tok = load_tokenizer(tokenizer_dir)
    generations = script(tok)
    for r in replicas:
        r.inference.add(*generations)
    async with (
        capturing_datapool() as (pool, pool_address),
        running_gateway([r.address for r in replicas], datapool_address=pool_address) as gw,
    ):
        opened = await gw.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="run-1", task_id="t", group_id="g"))
        assert opened.base_url.startswith("http://127.0.0.1:")
        client = openai.AsyncOpenAI(api_key=opened.episode_key, base_url=opened.base_url, max_retries=0)
        messages = await run_agent(client, stream)
        assert messages[-1]["content"] == "(12 + 7) * 2 = 38 and 3 * 3 = 9."
        assert [m["content"] for m in messages if m["role"] == "tool"] == ["19", "9", "38"]
        status = await gw.stub.GetEpisode(gateway_pb2.GetEpisodeRequest(episode_key=opened.episode_key))
        assert status.turns == 3 and not status.closed
        closed = await gw.stub.CloseEpisode(
            gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key, publish=True)
        )
        await client.close()
    trajectory = closed.trajectory
    engine = next(r.inference for r in replicas if r.address == status.replica)
    # token for token what inference generated, on the prompts inference saw
    assert [list(t.generated_token_ids) for t in trajectory.turns] == [e.generated for e in engine.log] == generations
    assert [list(t.prompt_token_ids) for t in trajectory.turns] == [e.prompt_token_ids for e in engine.log]
    for before, after in itertools.pairwise(trajectory.turns):
        head = [*before.prompt_token_ids, *before.generated_token_ids]
        assert list(after.prompt_token_ids[: len(head)]) == head  # never re-tokenised
    # the agent dropped reasoning_content; the prompts still carry it
    assert "I need 12 + 7 and 3 * 3; both at once." in tok.decode(list(trajectory.turns[2].prompt_token_ids))
    assert [len(t.tool_calls) for t in trajectory.turns] == [2, 1, 0]
    assert [r.content for r in trajectory.turns[0].tool_results] == ["19", "9"]
    assert all(len(t.behaviour_logprobs) == len(t.generated_token_ids) == len(t.loss_mask) for t in trajectory.turns)
    assert all(t.policy_version == 1 and t.timings.time_to_first_token_s > 0 for t in trajectory.turns)
    assert trajectory.turns[0].timings.tool_s > 0
    assert [t.trajectory_id for t in pool.received] == [trajectory.trajectory_id]


async def test_fail_over_between_and_during_turns(tokenizer_dir: Path, replicas) -> None:
    tok = load_tokenizer(tokenizer_dir)
    first, second, _ = script(tok)
    async with running_gateway([r.address for r in replicas]) as gw:
        opened = await gw.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="run-1"))
        key = opened.episode_key
        home_address = (await gw.stub.GetEpisode(gateway_pb2.GetEpisodeRequest(episode_key=key))).replica
        home = next(r for r in replicas if r.address == home_address)
        other = next(r for r in replicas if r.address != home_address)
        client = openai.AsyncOpenAI(api_key=key, base_url=opened.base_url, max_retries=0)

        home.inference.add(first)
        home.inference.fail_after = 5  # dies mid-stream: the other replica continues the same turn
        other.inference.add(first[5:])
        messages = [dict(m) for m in START]
        message, finish = await ask(client, messages, stream=True)
        assert finish == "tool_calls" and len(message["tool_calls"]) == 2
        assert other.inference.log[0].prompt_token_ids[-5:] == first[:5]
        moved = (await gw.stub.GetEpisode(gateway_pb2.GetEpisodeRequest(episode_key=key))).replica
        assert moved == other.address

        await other.kill()  # and now that one dies between turns: back to the first, which recovered
        home.inference.add(second)
        messages.append(message)
        for call in message["tool_calls"]:
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": calculator(call["function"]["arguments"])}
            )
        message, finish = await ask(client, messages, stream=False)
        assert finish == "tool_calls"
        closed = await gw.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=key))
        await client.close()
    t0, t1 = closed.trajectory.turns
    assert list(t0.generated_token_ids) == first and list(t1.generated_token_ids) == second
    assert list(t1.prompt_token_ids[: len(t0.prompt_token_ids) + len(first)]) == [*t0.prompt_token_ids, *first]
    assert closed.trajectory.labels["forgerl/replica_moves"] == "2"


async def test_bad_input_is_4xx_and_loses_nothing(tokenizer_dir: Path, replicas) -> None:
    tok = load_tokenizer(tokenizer_dir)
    first, second, _ = script(tok)
    for r in replicas:
        r.inference.add(first, second)
    async with running_gateway([r.address for r in replicas], max_request_bytes=64 * 1024) as gw:
        opened = await gw.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="run-1"))
        client = openai.AsyncOpenAI(api_key=opened.episode_key, base_url=opened.base_url, max_retries=0)
        messages = [dict(m) for m in START]
        message, _ = await ask(client, messages, stream=False)
        url = opened.base_url + "/chat/completions"
        headers = {"Authorization": f"Bearer {opened.episode_key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=30) as http:
            bad_json = await http.post(url, headers=headers, content=b'{"messages": [')
            unknown = await http.post(url, headers={"Authorization": "Bearer fep-wrong"}, json={"messages": START})
            huge = await http.post(url, headers=headers, json={"messages": START, "x": "y" * 100_000})
        assert (bad_json.status_code, unknown.status_code, huge.status_code) == (400, 401, 413)
        assert "not valid JSON" in bad_json.json()["error"]["message"]
        assert "unknown episode key" in unknown.json()["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="contradicts this episode's recorded history"):
            edited = {**message, "tool_calls": message["tool_calls"][:1]}
            await client.chat.completions.create(model="forgerl", messages=[*messages, edited], tools=[CALC_TOOL])
        with pytest.raises(openai.AuthenticationError):
            stranger = openai.AsyncOpenAI(api_key="fep-nope", base_url=opened.base_url, max_retries=0)
            await stranger.chat.completions.create(model="forgerl", messages=START)
        assert [m.id for m in (await client.models.list()).data] == ["forgerl"]

        messages.append(message)
        for call in message["tool_calls"]:
            messages.append(
                {"role": "tool", "tool_call_id": call["id"], "content": calculator(call["function"]["arguments"])}
            )
        await ask(client, messages, stream=False)
        closed = await gw.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key))
        assert len(closed.trajectory.turns) == 2
        with pytest.raises(openai.PermissionDeniedError, match="closed"):
            await client.chat.completions.create(model="forgerl", messages=START)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key="fep-unknown"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        await client.close()


async def test_close_retries_after_the_data_pool_refused(tokenizer_dir: Path, replicas) -> None:
    tok = load_tokenizer(tokenizer_dir)
    for r in replicas:
        r.inference.add(script(tok)[2])
    async with (
        capturing_datapool() as (pool, pool_address),
        running_gateway([r.address for r in replicas], datapool_address=pool_address) as gw,
    ):
        opened = await gw.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="run-1"))
        client = openai.AsyncOpenAI(api_key=opened.episode_key, base_url=opened.base_url, max_retries=0)
        await client.chat.completions.create(model="forgerl", messages=START)
        pool.failures_left = 1
        request = gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key, publish=True, success=True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await gw.stub.CloseEpisode(request)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "retry CloseEpisode" in err.value.details()
        status = await gw.stub.GetEpisode(gateway_pb2.GetEpisodeRequest(episode_key=opened.episode_key))
        assert status.turns == 1 and not status.closed
        closed = await gw.stub.CloseEpisode(request)
        assert len(closed.trajectory.turns) == 1 and [t.trajectory_id for t in pool.received] == [
            closed.trajectory.trajectory_id
        ]
        await client.close()
