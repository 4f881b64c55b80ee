"""The HTTP face, driven in-process through httpx's ASGI transport: responses, SSE, and 4xx errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from gateway_helpers import CALC_TOOL

from forgerl.gateway.app import GatewayApp
from forgerl.gateway.service import EpisodeInfo

pytestmark = pytest.mark.unit

USER = {"role": "user", "content": "What is 12 + 7?"}


@pytest.fixture
def setup(harness, gen):
    h = harness()
    app = GatewayApp(h.core, max_request_bytes=4096)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://gateway/v1")
    episode = h.core.open_episode(EpisodeInfo(run_id="r"))
    return h, client, episode


def auth(episode) -> dict[str, str]:
    return {"Authorization": f"Bearer {episode.key}"}


def sse(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def test_models(setup) -> None:
    _, client, _ = setup
    body = (await client.get("/models")).json()
    assert body["data"][0]["id"] == "forgerl"
    assert (await client.get("/models/forgerl")).status_code == 200
    assert (await client.get("/models/gpt-9")).status_code == 404


async def test_completion_with_a_tool_call_and_logprobs(setup, gen, fmt) -> None:
    h, client, episode = setup
    ids = gen(content="Computing.", reasoning="tool time", calls=(("calculator", '{"expression": "12+7"}'),))
    h.server.add(ids)
    response = await client.post(
        "/chat/completions",
        headers=auth(episode),
        json={"model": "anything", "messages": [USER], "tools": [CALC_TOOL], "logprobs": True, "temperature": 0.5},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and body["model"] == "anything"
    assert choice["message"]["content"] == "Computing." and choice["message"]["reasoning_content"] == "tool time"
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "12+7"}'}
    tokens = choice["logprobs"]["content"]
    assert len(tokens) == len(ids) and b"".join(bytes(t["bytes"]) for t in tokens) == fmt.decode(ids).encode()
    assert body["usage"]["completion_tokens"] == len(ids)
    assert body["usage"]["prompt_tokens"] == len(h.server.log[0].prompt_token_ids)


async def test_streaming_chunks_join_to_the_message(setup, gen) -> None:
    h, client, episode = setup
    h.server.chunk_size = 1
    ids = gen(
        content="Let me see 🙂.",
        reasoning="think",
        calls=(("calculator", '{"expression": "1"}'), ("calculator", '{"expression": "2"}')),
    )
    h.server.add(ids)
    response = await client.post(
        "/chat/completions",
        headers={"X-Forgerl-Episode": episode.key},
        json={
            "messages": [USER],
            "tools": [CALC_TOOL],
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
        },
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == len(ids)
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert deltas[0]["role"] == "assistant"
    assert "".join(d.get("content") or "" for d in deltas) == "Let me see 🙂."
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "think"
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0, 1] and calls[1]["function"]["arguments"] == '{"expression": "2"}'
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"
    logprob_tokens = [
        t for e in events[:-2] if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["content"]
    ]
    assert len(logprob_tokens) == len(ids)
    assert len(episode.turns) == 1 and episode.turns[0].generated_ids == ids


@pytest.mark.parametrize(
    ("headers", "content", "status", "code"),
    [
        ({}, b'{"messages": [{"role": "user", "content": "hi"}]}', 401, "missing_episode_key"),
        ({"Authorization": "Bearer fep-nope"}, b'{"messages": []}', 401, "invalid_episode_key"),
        (None, b'{"messages": [{"role": "user", "content": "hi"', 400, "invalid_json"),
        (None, b"", 400, "invalid_json"),
        (
            None,
            b'{"messages": [{"role": "user", "content": "x"}], "pad": "' + b"x" * 5000 + b'"}',
            413,
            "request_too_large",
        ),
        (None, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 5}', 400, None),
        (None, b'{"messages": [{"role": "user", "content": "hi"}], "n": 3}', 400, None),
        (None, b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["X"]}', 400, None),
        (None, b'{"messages": "hi"}', 400, None),
        (None, b"[1, 2]", 400, None),
    ],
)
async def test_bad_requests_are_4xx_with_a_message(setup, gen, headers, content, status, code) -> None:
    h, client, episode = setup
    h.server.add(gen(content="first"))
    ok = await client.post("/chat/completions", headers=auth(episode), json={"messages": [USER]})
    assert ok.status_code == 200
    response = await client.post(
        "/chat/completions",
        headers=auth(episode) if headers is None else headers,
        content=content,
        params={},
        timeout=10,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    assert len(episode.turns) == 1 and len(h.server.log) == 1  # nothing recorded is lost, nothing generated
    h.server.add(gen(content="second"))
    again = await client.post(
        "/chat/completions",
        headers=auth(episode),
        json={"messages": [USER, ok.json()["choices"][0]["message"], {"role": "user", "content": "more"}]},
    )
    assert again.status_code == 200 and len(episode.turns) == 2


async def test_history_mismatch_and_closed_episode(setup, gen) -> None:
    h, client, episode = setup
    h.server.add(gen(content="first"))
    ok = (await client.post("/chat/completions", headers=auth(episode), json={"messages": [USER]})).json()
    bad = [USER, {"role": "assistant", "content": "not what you said"}, {"role": "user", "content": "?"}]
    response = await client.post("/chat/completions", headers=auth(episode), json={"messages": bad})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "history_mismatch" and error["param"] == "messages[1]" and "first" in error["message"]
    assert ok["choices"][0]["message"]["content"] == "first"
    await h.core.close_episode(episode.key)
    response = await client.post("/chat/completions", headers=auth(episode), json={"messages": [USER]})
    assert response.status_code == 403 and response.json()["error"]["code"] == "episode_closed"


async def test_unknown_route_is_a_json_404(setup) -> None:
    _, client, _ = setup
    response = await client.post("/completions", json={})
    assert response.status_code == 404 and "error" in response.json()


async def test_tool_choice(setup, gen) -> None:
    h, client, episode = setup
    ids = gen(content="x", calls=(("calculator", '{"expression": "1"}'),))
    h.server.add(ids)
    body = {"messages": [USER], "tools": [CALC_TOOL], "tool_choice": "none"}
    message = (await client.post("/chat/completions", headers=auth(episode), json=body)).json()["choices"][0]["message"]
    assert "tool_calls" not in message and "<tool_call>" in message["content"]  # not parsed with "none"
    named = {"type": "function", "function": {"name": "search"}}
    response = await client.post("/chat/completions", headers=auth(episode), json={**body, "tool_choice": named})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tool_choice"
    response = await client.post(
        "/chat/completions", headers=auth(episode), json={"messages": [USER], "tool_choice": "required"}
    )
    assert response.status_code == 400
