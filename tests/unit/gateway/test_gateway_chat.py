"""Rendering: new messages only, with tokens equal to a fresh `apply_chat_template`."""

from __future__ import annotations

import pytest
from gateway_helpers import CALC_TOOL

from forgerl.gateway.chat import ChatFormat, Tools, parse_messages
from forgerl.gateway.errors import GatewayError

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "You are a careful agent."},
    {"role": "user", "content": "What is 12 + 7?"},
    {
        "role": "assistant",
        "reasoning_content": "I will use the calculator.",
        "content": "",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "calculator", "arguments": '{"expression": "12 + 7"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": '{"result": 19}'},
    {"role": "assistant", "reasoning_content": "The tool says 19.", "content": "The answer is 19."},
    {"role": "user", "content": [{"type": "text", "text": "And 19 * 2? "}, {"type": "text", "text": "Über 30?"}]},
]


def fresh_ids(tokenizer, messages, tools=None, generation=True) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=generation)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("tools", [None, [CALC_TOOL]])
def test_fresh_prompt_equals_apply_chat_template(tokenizer, fmt: ChatFormat, tools) -> None:
    messages = parse_messages(CONVERSATION)
    assert fmt.prompt_ids(messages, Tools.parse(tools)) == fresh_ids(tokenizer, CONVERSATION, tools)


@pytest.mark.parametrize("split", range(1, len(CONVERSATION)))
def test_history_plus_suffix_equals_fresh(tokenizer, fmt: ChatFormat, split: int) -> None:
    """Tokens of the first `split` messages (no generation prompt) + the rest rendered on their own."""
    messages = parse_messages(CONVERSATION)
    head = fresh_ids(tokenizer, CONVERSATION[:split], [CALC_TOOL], generation=False)
    assert head + fmt.suffix_ids(messages[:split], messages[split:], Tools.parse([CALC_TOOL])) == fresh_ids(
        tokenizer, CONVERSATION, [CALC_TOOL]
    )


def test_generation_prompt_and_closing(fmt: ChatFormat) -> None:
    assert fmt.decode(fmt.generation_prompt_ids) == "<|im_start|>assistant\n"
    assert fmt.closing_ids([5, fmt.end_of_turn]) == fmt.encode("\n")
    assert fmt.decode(fmt.closing_ids([5, 6])) == "<|im_end|>\n"  # a truncated turn is closed for it


def test_strip_reasoning_ids(fmt: ChatFormat, gen) -> None:
    ids = gen(content="Done.", reasoning="think hard")
    assert fmt.decode(fmt.strip_reasoning_ids(ids)) == "Done.<|im_end|>"
    assert fmt.strip_reasoning_ids(gen(content="plain")) == gen(content="plain")
    truncated = gen(content="x", reasoning="never ends")[:4]
    assert fmt.strip_reasoning_ids(truncated) == []


def test_token_bytes_of_split_characters(fmt: ChatFormat) -> None:
    ids = fmt.encode("naïve 🙂")
    assert b"".join(fmt.token_bytes(i) for i in ids) == "naïve 🙂".encode()


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ([], "non-empty list"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "only text parts"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "function.name"),
        (["hello"], "must be an object"),
    ],
)
def test_bad_messages_are_400(raw, fragment: str) -> None:
    with pytest.raises(GatewayError) as err:
        parse_messages(raw)
    assert err.value.status == 400 and fragment in err.value.message


def test_developer_role_is_system_and_tools_key_is_canonical() -> None:
    assert parse_messages([{"role": "developer", "content": "x"}])[0].role == "system"
    a = Tools.parse([{"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}])
    b = Tools.parse([{"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}])
    assert a.key == b.key and a.names == {"f"}
    with pytest.raises(GatewayError):
        Tools.parse([{"type": "retrieval"}])
