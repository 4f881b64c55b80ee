"""Generated ids split into reasoning, content and tool calls; streaming deltas equal the final parse."""

from __future__ import annotations

import json

import pytest

from forgerl.gateway.chat import ChatFormat, parse_messages
from forgerl.gateway.history import reply_message
from forgerl.gateway.parsing import Delta, GenerationParser, parse_generation, parse_tool_call

pytestmark = pytest.mark.unit

TOOLS = frozenset({"calculator", "search"})


def stream(fmt: ChatFormat, ids: list[int], tools=TOOLS, step: int = 1) -> tuple[GenerationParser, Delta]:
    parser = GenerationParser(fmt, tools)
    total = Delta()
    for i in range(0, len(ids), step):
        total.extend(parser.feed(ids[i : i + step]))
    total.extend(parser.finish())
    return parser, total


def test_reasoning_content_and_a_tool_call(fmt: ChatFormat, gen) -> None:
    ids = gen(
        content="Let me compute.",
        reasoning="12 + 7 needs the tool.",
        calls=(("calculator", '{"expression": "12 + 7"}'),),
    )
    p = parse_generation(fmt, ids, TOOLS)
    assert p.reasoning == "12 + 7 needs the tool."
    assert p.content == "Let me compute."
    [call] = p.tool_calls
    assert (call.name, call.arguments, call.malformed) == ("calculator", '{"expression": "12 + 7"}', False)
    assert call.id.startswith("call_") and p.ended


def test_parallel_tool_calls_without_content(fmt: ChatFormat, gen) -> None:
    ids = gen(reasoning="two at once", calls=(("calculator", '{"expression": "1"}'), ("search", '{"q": "x"}')))
    p = parse_generation(fmt, ids, TOOLS)
    assert p.content == "" and [c.name for c in p.valid_tool_calls] == ["calculator", "search"]
    assert len({c.id for c in p.tool_calls}) == 2


def test_reply_renders_back_to_the_generated_tokens(fmt: ChatFormat, gen) -> None:
    """The returned message, rendered by the template, is exactly what the model generated."""
    ids = gen(content="Sure.", reasoning="plan", calls=(("calculator", '{"expression":  "2*3" }'),))
    p = parse_generation(fmt, ids, TOOLS)
    reply = reply_message(p.content, p.reasoning, p.tool_calls)
    user = parse_messages([{"role": "user", "content": "q"}])
    rendered = fmt.render([*user, reply], generation=False)
    prompt = fmt.render(user, generation=True)
    assert rendered == prompt + fmt.decode(ids) + "\n"


@pytest.mark.parametrize(
    ("inner", "error"),
    [
        ('{"name": "calculator", "arguments": {"expression": "1"', "not JSON"),
        ('["calculator"]', "not a JSON object"),
        ('{"arguments": {}}', 'no string "name"'),
        ('{"name": "calculator", "arguments": "[1]"}', "not a JSON object"),
        ('{"name": "calculator", "arguments": 3}', "not a JSON object"),
        ('{"name": "rm_rf", "arguments": {}}', "unknown tool"),
    ],
)
def test_malformed_tool_calls(inner: str, error: str) -> None:
    assert error in parse_tool_call(inner, TOOLS)[2]


def test_malformed_call_comes_back_as_content(fmt: ChatFormat) -> None:
    text = 'I will call it.\n<tool_call>\n{"name": "calculator", "arguments": {oops}}\n</tool_call><|im_end|>'
    p = parse_generation(fmt, fmt.encode(text), TOOLS)
    assert p.valid_tool_calls == []
    [call] = p.tool_calls
    assert (
        call.malformed
        and "not JSON" in call.error
        and call.arguments.strip() == '{"name": "calculator", "arguments": {oops}}'
    )
    assert p.content == 'I will call it.\n<tool_call>\n{"name": "calculator", "arguments": {oops}}\n</tool_call>'


def test_unclosed_call_and_truncated_reasoning(fmt: ChatFormat) -> None:
    p = parse_generation(fmt, fmt.encode('ok\n<tool_call>\n{"name": "calc'), TOOLS)
    assert p.tool_calls[0].malformed and "never closed" in p.tool_calls[0].error
    assert p.content == 'ok\n<tool_call>\n{"name": "calc'
    p = parse_generation(fmt, fmt.encode("<think>\nstill thinking"), TOOLS)
    assert (p.reasoning, p.content, p.ended) == ("still thinking", "", False)


def test_tool_calls_are_content_when_not_parsed(fmt: ChatFormat, gen) -> None:
    ids = gen(content="x", calls=(("calculator", "{}"),))
    p = parse_generation(fmt, ids, None)  # no tools offered, or tool_choice "none"
    assert p.tool_calls == [] and p.content == 'x\n<tool_call>\n{"name": "calculator", "arguments": {}}\n</tool_call>'


def test_arguments_in_other_layouts_are_normalised(fmt: ChatFormat) -> None:
    name, args, error = parse_tool_call('{"arguments": {"expression": "1"}, "name": "calculator"}', TOOLS)
    assert (name, json.loads(args), error) == ("calculator", {"expression": "1"}, "")
    name, args, error = parse_tool_call('{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}', TOOLS)
    assert (args, error) == ('{"expression": "1"}', "")


@pytest.mark.parametrize("step", [1, 2, 3, 7])
def test_streamed_deltas_join_to_the_final_parse(fmt: ChatFormat, step: int) -> None:
    text = (
        "<think>\n  Ünïcödé 🙂 reasoning\n\n</think>\n\n  Content with émojis 🚀 and  spaces \n"
        '<tool_call>\n{"name": "search", "arguments": {"q": "naïve"}}\n</tool_call>\n'
        "<tool_call>\nbroken\n</tool_call>\ntrailing text  \n<|im_end|>"
    )
    ids = fmt.encode(text)
    final = parse_generation(fmt, ids, TOOLS)
    parser, total = stream(fmt, ids, step=step)
    assert total.reasoning == final.reasoning == "Ünïcödé 🙂 reasoning"
    assert total.content == final.content
    assert final.content.startswith("Content with émojis 🚀 and  spaces") and final.content.endswith("trailing text")
    assert [c.name for c in total.tool_calls] == ["search"]
    assert [c.malformed for c in parser.tool_calls] == [False, True]


def test_tokens_after_end_of_turn_are_ignored(fmt: ChatFormat) -> None:
    p = parse_generation(fmt, [*fmt.encode("done"), fmt.end_of_turn, *fmt.encode("junk")], TOOLS)
    assert p.content == "done"
