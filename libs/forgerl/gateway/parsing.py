"""Generated token ids split into reasoning, content and tool calls: the ChatML family's own parser
("forgerl"; forgerl.gateway.vllm_parsing holds the vLLM-backed ones, forgerl.gateway.formats picks one).

    <think>\\n{reasoning}\\n</think>\\n\\n{content}\\n<tool_call>\\n{"name": ..., "arguments": {...}}
    \\n</tool_call><|im_end|>

The markers are single tokens, so the split is done on ids; only the text between markers is decoded
(incrementally, for streaming: a character split over two tokens is emitted once complete). Streaming and
non-streaming give the same text: the concatenated deltas equal the final parse.

A tool call that is not a JSON object with a string `name` and object `arguments`, names a tool the request
did not offer, or is never closed, is malformed: its raw text (tags included) goes back to the agent as
content, and the call is recorded with `malformed=True` for the process reward.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from forgerl.gateway.chat import ChatFormat
from forgerl.model.tokenizer import END_TOOL_CALL, TOOL_CALL

# The template's own layout of a call: arguments taken verbatim from it render back identically.
_CANONICAL_CALL = re.compile(r'^\{"name": ("(?:[^"\\]|\\.)*"), "arguments": (.*)\}$', re.DOTALL)


def new_tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text; for a malformed call, the raw text between the tags
    malformed: bool = False
    error: str = ""
    raw: str = ""


@dataclass
class Delta:
    """What one step of parsing added: text to stream, and tool calls completed in this step."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: Delta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)


def parse_tool_call(inner: str, tool_names: frozenset[str] | None) -> tuple[str, str, str]:
    """(name, arguments JSON, error) of the text between `<tool_call>` and `</tool_call>`; error "" if valid."""
    text = inner.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return "", "", f"not JSON: {err.msg} at character {err.pos}"
    if not isinstance(obj, dict):
        return "", "", "not a JSON object"
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return "", "", 'no string "name"'
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except json.JSONDecodeError:
            return name, "", "arguments is a string that is not JSON"
        if not isinstance(decoded, dict):
            return name, "", "arguments is not a JSON object"
        arguments = args
    elif isinstance(args, dict):
        arguments = json.dumps(args, ensure_ascii=False)
        match = _CANONICAL_CALL.match(text)
        if match is not None:
            try:
                if json.loads(match.group(1)) == name and json.loads(match.group(2)) == args:
                    arguments = match.group(2)
            except json.JSONDecodeError:
                pass
    else:
        return name, "", "arguments is not a JSON object"
    if tool_names is not None and name not in tool_names:
        offered = ", ".join(sorted(tool_names)) or "none"
        return name, arguments, f"unknown tool {name!r} (offered: {offered})"
    return name, arguments, ""


class _Detokenizer:
    """Incremental decoding of one run of non-marker tokens.

    Byte-level BPE: each token's bytes through an incremental UTF-8 decoder (a character split over two
    tokens comes out once complete). Other tokenizers: vLLM's prefix/read offsets over `decode`."""

    def __init__(self, fmt: ChatFormat) -> None:
        self.fmt = fmt
        self.bytes_level = fmt.byte_level
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token_id: int) -> str:
        if self.bytes_level:
            return str(self.utf8.decode(self.fmt.token_bytes(token_id)))
        self.ids.append(token_id)
        prefix_text = self.fmt.decode(self.ids[self.prefix : self.read])
        text = self.fmt.decode(self.ids[self.prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        if self.bytes_level:
            return str(self.utf8.decode(b"", final=True))
        prefix_text = self.fmt.decode(self.ids[self.prefix : self.read])
        text = self.fmt.decode(self.ids[self.prefix :])
        self.ids, self.prefix, self.read = [], 0, 0
        return text[len(prefix_text) :]


class _Stripped:
    """Streams text with leading and trailing whitespace removed: the deltas join to `full.strip()`."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""
        self.parts: list[str] = []

    def push(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        text = self.pending + text
        body = text.rstrip()
        self.pending = text[len(body) :]
        if body:
            self.parts.append(body)
        return body

    @property
    def text(self) -> str:
        return "".join(self.parts)


class GenerationParsing(Protocol):
    """What the gateway reads from a parser of one generation, whichever format it parses."""

    finished: bool
    tool_calls: list[ParsedToolCall]  # every call, malformed ones included

    @property
    def reasoning(self) -> str: ...

    @property
    def content(self) -> str: ...

    @property
    def valid_tool_calls(self) -> list[ParsedToolCall]: ...

    def feed(self, token_ids: Sequence[int]) -> Delta: ...

    def finish(self) -> Delta: ...


class GenerationParser:
    """Feed generated ids as they arrive; each `feed` returns the delta to stream, `finish` the rest.

    `tool_names`: the tools the request offered, or None when tool calls are not parsed (no tools, or
    tool_choice "none"): then `<tool_call>` blocks are plain content.
    """

    def __init__(
        self,
        fmt: ChatFormat,
        tool_names: frozenset[str] | None,
        new_id: Callable[[], str] = new_tool_call_id,
    ) -> None:
        self.fmt = fmt
        markers = [fmt.think, fmt.end_think, fmt.marker(TOOL_CALL), fmt.marker(END_TOOL_CALL)]
        if None in markers:
            raise ValueError("the forgerl parser reads the ChatML family's marker tokens, which this tokenizer lacks")
        self.think, self.end_think, self.tool_call, self.end_tool_call = (int(m or 0) for m in markers)
        self.tool_names = tool_names
        self.new_id = new_id
        self.state = "start"  # start | reasoning | content | tool | done
        self.detok = _Detokenizer(fmt)
        self.reasoning_out = _Stripped()
        self.content_out = _Stripped()
        self.tool_text = ""
        self.tool_calls: list[ParsedToolCall] = []  # every call, malformed ones included
        self.ended = False  # <|im_end|> seen
        self.finished = False

    # --- results -------------------------------------------------------------------------------------

    @property
    def reasoning(self) -> str:
        return self.reasoning_out.text

    @property
    def content(self) -> str:
        return self.content_out.text

    @property
    def valid_tool_calls(self) -> list[ParsedToolCall]:
        return [call for call in self.tool_calls if not call.malformed]

    # --- feeding -------------------------------------------------------------------------------------

    def feed(self, token_ids: Sequence[int]) -> Delta:
        delta = Delta()
        for token in token_ids:
            if self.state == "done":
                break
            self._token(token, delta)
        return delta

    def finish(self) -> Delta:
        """End of generation: flush pending text; an unclosed tool call becomes malformed content."""
        delta = Delta()
        if self.finished:
            return delta
        self._flush(delta)
        if self.state == "tool":
            self._malformed(self.tool_text, "never closed with </tool_call>", delta, closed=False)
        self.state = "done"
        self.finished = True
        return delta

    def _token(self, token: int, delta: Delta) -> None:
        if token == self.fmt.end_of_turn:
            self.ended = True
            self.finish_into(delta)
            return
        if self.state == "start":
            if token == self.think:
                self.state = "reasoning"
                return
            self.state = "content"
        if self.state == "reasoning" and token == self.end_think:
            self._flush(delta)
            self.state = "content"
            return
        if self.state == "content" and token == self.tool_call and self.tool_names is not None:
            self._flush(delta)
            self.state = "tool"
            self.tool_text = ""
            return
        if self.state == "tool" and token == self.end_tool_call:
            self._flush(delta)
            self._close_tool_call(delta)
            self.state = "content"
            return
        self._emit(self.detok.push(token), delta)

    def finish_into(self, delta: Delta) -> None:
        delta.extend(self.finish())

    def _flush(self, delta: Delta) -> None:
        self._emit(self.detok.flush(), delta)

    def _emit(self, text: str, delta: Delta) -> None:
        if not text:
            return
        if self.state == "reasoning":
            delta.reasoning += self.reasoning_out.push(text)
        elif self.state == "tool":
            self.tool_text += text
        else:
            delta.content += self.content_out.push(text)

    def _close_tool_call(self, delta: Delta) -> None:
        name, arguments, error = parse_tool_call(self.tool_text, self.tool_names or None)
        if error:
            self._malformed(self.tool_text, error, delta, closed=True, name=name)
            return
        call = ParsedToolCall(id=self.new_id(), name=name, arguments=arguments, raw=self.tool_text)
        self.tool_calls.append(call)
        delta.tool_calls.append(call)

    def _malformed(self, inner: str, error: str, delta: Delta, *, closed: bool, name: str = "") -> None:
        fmt = self.fmt
        raw = fmt.token_text(self.tool_call) + inner + (fmt.token_text(self.end_tool_call) if closed else "")
        self.tool_calls.append(ParsedToolCall(id="", name=name, arguments=inner, malformed=True, error=error, raw=raw))
        delta.content += self.content_out.push(raw)


def parse_generation(fmt: ChatFormat, token_ids: Sequence[int], tool_names: frozenset[str] | None) -> GenerationParser:
    """Parse a whole generation at once (the same parser the streaming path feeds token by token)."""
    parser = GenerationParser(fmt, tool_names)
    parser.feed(token_ids)
    parser.finish()
    return parser
