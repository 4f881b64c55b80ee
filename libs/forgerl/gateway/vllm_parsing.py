"""Generated ids parsed with vLLM's own reasoning and tool parsers (MiniMax-M2's `minimax_m2`, the ChatML
family's `hermes`): the gateway returns what vLLM's OpenAI server would return for the same text.

vLLM is imported when the first parser is built (STYLE.md: heavy backends behind a small registry,
forgerl.gateway.formats), so importing the gateway does not pull it in.

The text is parsed once, when the generation ends (the end-of-turn token, or `finish`): a stream of these
formats carries the reply in one delta at its end, and the joined deltas equal the final parse like the
incremental "forgerl" parser's. Calls the parser did not return (broken markup, or a tool the request did
not offer) are recorded as malformed for the process reward: one per call opening it found no call for.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from forgerl.gateway.chat import ChatFormat
from forgerl.gateway.parsing import Delta, ParsedToolCall, new_tool_call_id


@dataclass(frozen=True)
class VllmParsers:
    """Names in vLLM's ReasoningParserManager / ToolParserManager, and the text that opens one call."""

    reasoning: str
    tool: str
    call_opening: str


def _request(tools: Sequence[Mapping[str, Any]]) -> Any:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    # The parsers read only `tools` (schemas for typing parameters) and tool_choice from the request.
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": ""}], "model": "forgerl", "tools": list(tools) or None}
    )


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


class VllmGenerationParser:
    """Feed generated ids; the parse happens at the end of the turn (see the module docstring)."""

    def __init__(
        self,
        fmt: ChatFormat,
        parsers: VllmParsers,
        tool_names: frozenset[str] | None,
        tools: Sequence[Mapping[str, Any]],
        new_id: Callable[[], str] = new_tool_call_id,
    ) -> None:
        from vllm.reasoning import ReasoningParserManager
        from vllm.tool_parsers import ToolParserManager

        self.fmt = fmt
        self.parsers = parsers
        self.tool_names = tool_names
        self.new_id = new_id
        self.request = _request(tools)
        self.reasoning_parser = ReasoningParserManager.get_reasoning_parser(parsers.reasoning)(fmt.tokenizer)
        self.tool_parser = ToolParserManager.get_tool_parser(parsers.tool)(fmt.tokenizer, self.request.tools)
        self.ids: list[int] = []
        self.ended = False
        self.finished = False
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[ParsedToolCall] = []  # every call, malformed ones included

    @property
    def valid_tool_calls(self) -> list[ParsedToolCall]:
        return [call for call in self.tool_calls if not call.malformed]

    def feed(self, token_ids: Sequence[int]) -> Delta:
        for token in token_ids:
            if self.ended:
                break
            if token == self.fmt.end_of_turn:
                self.ended = True
                return self.finish()
            self.ids.append(token)
        return Delta()

    def finish(self) -> Delta:
        if self.finished:
            return Delta()
        self.finished = True
        text = self.fmt.decode(self.ids)
        reasoning, content = self._split_reasoning(text)
        if self.tool_names is not None:
            content = self._tool_calls(content)
        self.reasoning, self.content = reasoning.strip(), content.strip()
        return Delta(self.reasoning, self.content, list(self.valid_tool_calls))

    def _split_reasoning(self, text: str) -> tuple[str, str]:
        # vLLM's reasoning parsers take text without an end of reasoning as all reasoning (they assume the
        # prompt opened it); in the ChatML family a turn opens its reasoning itself, or has none.
        opened = self.fmt.opens_reasoning or (bool(self.ids) and self.ids[0] == self.fmt.think)
        if not opened:
            return "", text
        reasoning, content = self.reasoning_parser.extract_reasoning(text, self.request)
        return reasoning or "", content or ""

    def _tool_calls(self, content: str) -> str:
        info = self.tool_parser.extract_tool_calls(content, self.request)
        offered = self.tool_names or frozenset()
        for call in info.tool_calls if info.tools_called else []:
            name, arguments = call.function.name, call.function.arguments or "{}"
            error = (
                "" if name in offered else f"unknown tool {name!r} (offered: {', '.join(sorted(offered)) or 'none'})"
            )
            if not error and not _is_json_object(arguments):
                error = "arguments is not a JSON object"
            self.tool_calls.append(
                ParsedToolCall(
                    id="" if error else self.new_id(),
                    name=name,
                    arguments=arguments,
                    malformed=bool(error),
                    error=error,
                )
            )
        missing = content.count(self.parsers.call_opening) - len(self.tool_calls)
        for _ in range(max(0, missing)):
            self.tool_calls.append(
                ParsedToolCall(
                    id="",
                    name="",
                    arguments="",
                    malformed=True,
                    error=f"vLLM's {self.parsers.tool} parser read no call here (broken markup or an unknown tool)",
                    raw=content,
                )
            )
        return str(info.content or "") if info.tools_called else content
