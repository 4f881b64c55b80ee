"""The gateway in two chat formats: MiniMax-M2's own (vLLM's `minimax_m2` parsers) and the ChatML family
parsed by vLLM's `hermes` parser. References are written here by hand from the public formats (the
layout MiniMax-M2's model card and tool-calling guide describe; Hermes/Qwen's `<tool_call>` JSON), never
produced by the code under test."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from forgerl.gateway.app import GatewayApp
from forgerl.gateway.chat import ChatFormat
from forgerl.gateway.requests import parse_chat_request
from forgerl.gateway.routing import Router
from forgerl.gateway.service import EpisodeInfo, GatewayCore, TurnResult
from forgerl.gateway.testing import ScriptedInference, ScriptedReplica
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

pytestmark = pytest.mark.unit

READ_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read lines of a file",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "limit": {"type": "integer"},
                "flags": {"type": "array", "items": {"type": "string"}},
                "follow": {"type": "boolean"},
            },
            "required": ["path"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the repository",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
TOOLS = [READ_TOOL, SEARCH_TOOL]
SYSTEM = {"role": "system", "content": "You are a careful coding agent."}
USER = {"role": "user", "content": "Why does main() crash?"}
# Two turns of an episode: (reasoning, content, calls as (name, arguments object)).
Turn = tuple[str, str, list[tuple[str, dict[str, Any]]]]
TURN_1: Turn = (
    "I need the file and the definition.",
    "Reading it now.",
    [
        ("read_file", {"path": "src/app.py", "limit": 40, "flags": ["-n"], "follow": True}),
        ("search", {"query": "def main"}),
    ],
)
TURN_2: Turn = ("Line 12 divides by zero.", "main() divides by `len(items)`, which is 0 for an empty list.", [])


@pytest.fixture(scope="module")
def m2_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("m2-tokenizer")
    save_tokenizer(train_tokenizer(vocab_size=1024, chat_format="minimax_m2"), path)
    return load_tokenizer(path)


@pytest.fixture(params=["minimax_m2", "hermes"])
def family(request: pytest.FixtureRequest, m2_tokenizer: Any, tokenizer: Any) -> tuple[str, Any, ChatFormat]:
    if request.param == "minimax_m2":
        return "minimax_m2", m2_tokenizer, ChatFormat(m2_tokenizer)
    return "hermes", tokenizer, ChatFormat(tokenizer, parser="hermes")


def generated_text(name: str, reasoning: str, content: str, calls: list[tuple[str, dict[str, Any]]]) -> str:
    """What a model writes after the generation prompt, in each format's published layout."""
    if name == "minimax_m2":  # the prompt ends with `<think>\n`; strings raw, other values as JSON
        text = f"{reasoning}\n</think>\n\n{content}"
        if calls:
            text += "\n<minimax:tool_call>\n"
            for tool, args in calls:
                text += f'<invoke name="{tool}">\n'
                for key, value in args.items():
                    raw = value if isinstance(value, str) else json.dumps(value)
                    text += f'<parameter name="{key}">{raw}</parameter>\n'
                text += "</invoke>\n"
            text += "</minimax:tool_call>"
        return text + "[e~["
    text = f"<think>\n{reasoning}\n</think>\n\n{content}"
    for tool, args in calls:
        text += f'\n<tool_call>\n{{"name": "{tool}", "arguments": {json.dumps(args)}}}\n</tool_call>'
    return text + "<|im_end|>"


def assistant(reasoning: str, content: str, calls: list[tuple[str, dict[str, Any]]], ids: list[str]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
    if calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": tool, "arguments": args}}
            for i, (tool, args) in zip(ids, calls, strict=True)
        ]
    return message


def core_for(fmt: ChatFormat, *generations: str) -> tuple[GatewayCore, ScriptedInference]:
    server = ScriptedInference(eos_id=fmt.end_of_turn)
    server.add(*(fmt.encode(text) for text in generations))
    return GatewayCore(fmt, Router([ScriptedReplica("replica-0", server)])), server


async def turn(core: GatewayCore, episode: Any, messages: list[dict[str, Any]]) -> TurnResult:
    request = parse_chat_request({"messages": messages, "tools": TOOLS}, "forgerl")
    return await core.run_turn(await core.prepare_turn(episode, request, time.perf_counter()))


def sent_back(result: TurnResult) -> dict[str, Any]:
    """The reply as an OpenAI client sends it back: without reasoning_content, arguments as JSON text."""
    calls = result.parser.valid_tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": result.parser.content or None}
    if calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
        ]
    return message


def template_ids(tokenizer: Any, messages: list[dict[str, Any]], generation: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=True, add_generation_prompt=generation)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_m2_template_writes_the_published_layout(m2_tokenizer: Any) -> None:
    call = {"name": "read_file", "arguments": {"path": "a.py", "limit": 3}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok", "reasoning_content": "look", "tool_calls": [{"function": call}]},
        {"role": "tool", "content": "x = 1"},
        {"role": "tool", "content": "y"},
    ]
    text = m2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "]~!b[]~b]system\nYou are a helpful assistant.[e~[\n"
        "]~b]user\nhi[e~[\n"
        "]~b]ai\n<think>\nlook\n</think>\n\nok\n<minimax:tool_call>\n"
        '<invoke name="read_file">\n<parameter name="path">a.py</parameter>\n<parameter name="limit">3</parameter>\n'
        "</invoke>\n</minimax:tool_call>[e~[\n"
        "]~b]tool\n<response>x = 1</response>\n<response>y</response>[e~[\n"
        "]~b]ai\n<think>\n"
    )
    # a later user message drops the reasoning of the turns before it (the published template's rule)
    later = m2_tokenizer.apply_chat_template([*messages, {"role": "user", "content": "and?"}], tokenize=False)
    assert "look" not in later and "]~b]ai\nok\n<minimax:tool_call>" in later


def test_m2_markers_and_detection(m2_tokenizer: Any, tokenizer: Any) -> None:
    for marker in ("]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"):
        assert len(m2_tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    ids = m2_tokenizer.encode("]~b]ai\n<think>\nx\n</think>\n\ny[e~[", add_special_tokens=False)
    assert m2_tokenizer.decode(ids, skip_special_tokens=True) == "ai\n<think>\nx\n</think>\n\ny"
    fmt = ChatFormat(m2_tokenizer)
    assert fmt.parser == "minimax_m2" and ChatFormat(tokenizer).parser == "forgerl"
    assert fmt.end_of_turn == m2_tokenizer.convert_tokens_to_ids("[e~[") and fmt.opens_reasoning
    assert fmt.decode(fmt.generation_prompt_ids) == "]~b]ai\n<think>\n"
    assert fmt.decode(fmt.closing_ids([5, fmt.end_of_turn])) == "\n"
    assert fmt.decode(fmt.closing_ids([5, 6])) == "[e~[\n"  # a truncated turn is closed for it
    stripped = fmt.strip_reasoning_ids(fmt.encode("plan\n</think>\n\nDone.[e~["))
    assert fmt.decode(stripped) == "</think>\n\nDone.[e~["  # the prompt's <think> gets an empty block


async def test_turn_by_turn_equals_one_apply_chat_template(family: tuple[str, Any, ChatFormat]) -> None:
    """Within one user turn, every prompt and the final reply point equal one render of the whole."""
    name, tokenizer, fmt = family
    core, server = core_for(fmt, generated_text(name, *TURN_1), generated_text(name, *TURN_2))
    episode = core.open_episode(EpisodeInfo(run_id="r"))
    r1 = await turn(core, episode, [SYSTEM, USER])
    assert list(r1.record.prompt_ids) == template_ids(tokenizer, [SYSTEM, USER], True)
    ids = [c.id for c in r1.parser.valid_tool_calls]
    results = [
        {"role": "tool", "tool_call_id": ids[0], "content": "def main():\n    return 1 / len(items)"},
        {"role": "tool", "tool_call_id": ids[1], "content": "src/app.py:12: def main():"},
    ]
    r2 = await turn(core, episode, [SYSTEM, USER, sent_back(r1), *results])
    whole = [SYSTEM, USER, assistant(*TURN_1, ids), *results]
    assert list(r2.record.prompt_ids) == template_ids(tokenizer, whole, True)
    assert list(r2.record.prompt_ids[: len(r1.record.reply_point_ids())]) == r1.record.reply_point_ids()
    final = r2.record.reply_point_ids()
    assert final == template_ids(tokenizer, [*whole, assistant(*TURN_2, [])], False)
    assert [entry.prompt_token_ids for entry in server.log] == [list(r1.record.prompt_ids), list(r2.record.prompt_ids)]


async def test_across_user_turns(family: tuple[str, Any, ChatFormat]) -> None:
    """After a new user message the gateway keeps the earlier reasoning it generated. ChatML renders it too;
    MiniMax-M2's template drops it, so the prompt differs from one render exactly by that span."""
    name, tokenizer, fmt = family
    core, _ = core_for(fmt, generated_text(name, *TURN_2), generated_text(name, "Check it.", "Yes.", []))
    episode = core.open_episode(EpisodeInfo(run_id="r"))
    r1 = await turn(core, episode, [SYSTEM, USER])
    follow_up = {"role": "user", "content": "Are you sure?"}
    r2 = await turn(core, episode, [SYSTEM, USER, sent_back(r1), follow_up])
    prompt = list(r2.record.prompt_ids)
    assert prompt[: len(r1.record.reply_point_ids())] == r1.record.reply_point_ids()  # kept as generated
    whole = [SYSTEM, USER, assistant(*TURN_2, []), follow_up]
    rendered = tokenizer.apply_chat_template(whole, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    if name == "hermes":
        assert prompt == template_ids(tokenizer, whole, True)
        return
    earlier_reasoning = f"<think>\n{TURN_2[0]}\n</think>\n\n"
    assert prompt != template_ids(tokenizer, whole, True)
    assert fmt.decode(prompt).replace(earlier_reasoning, "", 1) == rendered


async def post_m2_turn(m2_tokenizer: Any, stream: bool) -> httpx.Response:
    """TURN_1 in M2's format, generated for a first request over the gateway's HTTP API."""
    core, _ = core_for(ChatFormat(m2_tokenizer), generated_text("minimax_m2", *TURN_1))
    episode = core.open_episode(EpisodeInfo(run_id="r"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=GatewayApp(core, 1 << 20).app), base_url="http://g/v1")
    return await client.post(
        "/chat/completions",
        headers={"Authorization": f"Bearer {episode.key}"},
        json={"model": "MiniMax-M2", "messages": [SYSTEM, USER], "tools": TOOLS, "stream": stream},
    )


async def test_real_m2_output_is_the_openai_message(m2_tokenizer: Any) -> None:
    response = await post_m2_turn(m2_tokenizer, stream=False)
    assert response.status_code == 200, response.text
    completion = ChatCompletion.model_validate(response.json())  # the OpenAI SDK's own type
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Reading it now."
    assert response.json()["choices"][0]["message"]["reasoning_content"] == "I need the file and the definition."
    calls = [
        (c.function.name, json.loads(c.function.arguments))
        for c in choice.message.tool_calls or []
        if isinstance(c, ChatCompletionMessageFunctionToolCall)
    ]
    # typed from the schema: 40 an integer, ["-n"] an array, true a boolean; strings stay strings
    assert calls == TURN_1[2]


async def test_m2_unknown_tool_and_broken_markup_are_malformed(m2_tokenizer: Any) -> None:
    fmt = ChatFormat(m2_tokenizer)
    text = (
        "Try tools.\n</think>\n\n<minimax:tool_call>\n"
        '<invoke name="delete_repo">\n<parameter name="path">/</parameter>\n</invoke>\n'
        '<invoke name="search">\n<parameter name="query">main</parameter>\n</invoke>\n'
        "</minimax:tool_call>[e~["
    )
    core, _ = core_for(fmt, text)
    result = await turn(core, core.open_episode(EpisodeInfo(run_id="r")), [USER])
    assert [(c.name, c.malformed) for c in result.parser.valid_tool_calls] == [("search", False)]
    assert sum(c.malformed for c in result.parser.tool_calls) == 1  # delete_repo was not offered
    assert result.record.reply.reasoning == "Try tools."


async def test_m2_stream_joins_to_the_message(m2_tokenizer: Any) -> None:
    """vLLM-parsed formats stream the reply as one delta at the end: the joined deltas equal the message."""
    response = await post_m2_turn(m2_tokenizer, stream=True)
    assert response.status_code == 200, response.text
    events = [json.loads(b[6:]) for b in response.text.split("\n\n") if b.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == TURN_1[1]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == TURN_1[0]
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == TURN_1[2]
    assert [c["index"] for c in calls] == [0, 1]


async def test_m2_strip_reasoning_leaves_an_empty_block(m2_tokenizer: Any) -> None:
    """M2's generation prompt opens `<think>`: the ablation keeps `</think>` so the turn stays well formed."""
    fmt = ChatFormat(m2_tokenizer)
    core, _ = core_for(fmt, generated_text("minimax_m2", *TURN_2), generated_text("minimax_m2", "x", "y", []))
    episode = core.open_episode(EpisodeInfo(run_id="r", strip_reasoning=True))
    r1 = await turn(core, episode, [USER])
    r2 = await turn(core, episode, [USER, sent_back(r1), {"role": "user", "content": "Sure?"}])
    text = fmt.decode(list(r2.record.prompt_ids))
    assert TURN_2[0] not in text and f"]~b]ai\n<think>\n</think>\n\n{TURN_2[1]}[e~[\n]~b]user\nSure?" in text
