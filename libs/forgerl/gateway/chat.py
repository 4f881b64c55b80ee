"""Chat messages as the agents send them, and their tokens as the chat template renders them.

The gateway renders only messages that are new to an episode; everything the model generated is kept as
the token ids it generated (never decoded and re-encoded). `ChatFormat.suffix_ids` renders new messages
so that a fresh conversation gives exactly `apply_chat_template`'s tokens: every message block starts
with the special `<|im_start|>` token, so tokenising blocks one after the other equals tokenising them
together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgerl.gateway.errors import bad_request
from forgerl.model.tokenizer import END_THINK, END_TOOL_CALL, IM_END, IM_START, THINK, TOOL_CALL

ROLES = ("system", "user", "assistant", "tool")
# A first message for rendering blocks on their own: the template treats a leading system message and
# the tools header specially, so later blocks are rendered after this anchor and the anchor cut off.
_ANCHOR = {"role": "user", "content": ""}


@dataclass(frozen=True)
class ToolCallMessage:
    """A tool call inside an assistant message (OpenAI's `{"id", "type", "function": {...}}`)."""

    id: str
    name: str
    arguments: str  # JSON text, verbatim

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Message:
    """One chat message, normalised: content is text, `reasoning` is the assistant's reasoning_content."""

    role: str
    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallMessage, ...] = ()
    tool_call_id: str = ""
    # Extensions an agent may set on tool messages for the trajectory (ignored by the template).
    is_error: bool = False
    duration_s: float | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template reads it."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            if self.reasoning:
                out["reasoning_content"] = self.reasoning
            if self.tool_calls:
                out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        elif self.role == "tool" and self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise bad_request(
                    f"{where}.content[{i}] is a {kind!r} part: only text parts "
                    '({"type": "text", "text": "..."}) are supported',
                    param=f"{where}.content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"{where}.content must be a string, a list of text parts, or null", param=f"{where}.content")


def _arguments(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return json.dumps(value, ensure_ascii=False)
    raise bad_request(f"{where}.function.arguments must be a JSON string", param=f"{where}.function.arguments")


def parse_message(raw: Any, index: int) -> Message:
    """A message of the request body, checked; a GatewayError (400) names what is wrong."""
    where = f"messages[{index}]"
    if not isinstance(raw, Mapping):
        raise bad_request(f"{where} must be an object with a role and content", param=where)
    role = raw.get("role")
    if role == "developer":
        role = "system"
    if role not in ROLES:
        raise bad_request(
            f"{where}.role is {role!r}: use one of system, developer, user, assistant, tool", param=f"{where}.role"
        )
    content = _text(raw.get("content"), where)
    if role == "assistant":
        reasoning = raw.get("reasoning_content")
        if reasoning is None:
            reasoning = raw.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, str):
            raise bad_request(f"{where}.reasoning_content must be a string", param=f"{where}.reasoning_content")
        calls = []
        raw_calls = raw.get("tool_calls") or []
        if not isinstance(raw_calls, list):
            raise bad_request(f"{where}.tool_calls must be a list", param=f"{where}.tool_calls")
        for j, call in enumerate(raw_calls):
            cw = f"{where}.tool_calls[{j}]"
            fn = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise bad_request(f"{cw} needs function.name and function.arguments", param=cw)
            calls.append(
                ToolCallMessage(
                    id=str(call.get("id") or ""), name=fn["name"], arguments=_arguments(fn.get("arguments", "{}"), cw)
                )
            )
        return Message(role="assistant", content=content, reasoning=reasoning or "", tool_calls=tuple(calls))
    if role == "tool":
        duration = raw.get("duration_s")
        return Message(
            role="tool",
            content=content,
            tool_call_id=str(raw.get("tool_call_id") or ""),
            is_error=bool(raw.get("is_error", False)),
            duration_s=float(duration) if isinstance(duration, int | float) else None,
        )
    return Message(role=role, content=content)


def parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", param="messages")
    return [parse_message(m, i) for i, m in enumerate(raw)]


@dataclass(frozen=True)
class Tools:
    """The request's function tools: rendered into the system block, so part of the history's identity."""

    specs: tuple[Mapping[str, Any], ...] = ()
    names: frozenset[str] = field(default_factory=frozenset)
    key: str = ""  # canonical JSON, to tell whether two requests offer the same tools

    @classmethod
    def parse(cls, raw: Any) -> Tools:
        if raw is None:
            return cls()
        if not isinstance(raw, list):
            raise bad_request("tools must be a list of function tools", param="tools")
        names = []
        for i, tool in enumerate(raw):
            fn = tool.get("function") if isinstance(tool, Mapping) else None
            if (
                not isinstance(tool, Mapping)
                or tool.get("type", "function") != "function"
                or not isinstance(fn, Mapping)
                or not isinstance(fn.get("name"), str)
                or not fn["name"]
            ):
                raise bad_request(
                    f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                    param=f"tools[{i}]",
                )
            names.append(fn["name"])
        if not raw:
            return cls()
        return cls(tuple(raw), frozenset(names), json.dumps(raw, sort_keys=True, ensure_ascii=False))

    def __bool__(self) -> bool:
        return bool(self.specs)


class ChatFormat:
    """The tokenizer and chat template of the served model, and the marker tokens the parser needs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        markers = {}
        for name in (IM_START, IM_END, THINK, END_THINK, TOOL_CALL, END_TOOL_CALL):
            ids = tokenizer.encode(name, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"the tokenizer has no single token for {name!r}: it is not the ForgeRL chat format")
            markers[name] = ids[0]
        self.im_start = markers[IM_START]
        self.im_end = markers[IM_END]
        self.think = markers[THINK]
        self.end_think = markers[END_THINK]
        self.tool_call = markers[TOOL_CALL]
        self.end_tool_call = markers[END_TOOL_CALL]
        self.stop_token_ids = (self.im_end,)
        anchored = self._render([_ANCHOR], None, False)
        self.generation_prompt_ids = self.encode(self._render([_ANCHOR], None, True)[len(anchored) :])
        # What closes a generated assistant turn in the next prompt: the template's text after the turn.
        self.close_after_end = self.encode("\n")
        self.close_without_end = self.encode(IM_END + "\n")
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._byte_decoder = _byte_level_decoder(tokenizer)

    @property
    def byte_level(self) -> bool:
        """Whether every token stands for bytes (byte-level BPE), so text can be decoded byte by byte."""
        return self._byte_decoder is not None

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=False))

    def _render(self, messages: Sequence[Mapping[str, Any]], tools: Tools | None, generation: bool) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                list(messages),
                tools=list(tools.specs) if tools else None,
                tokenize=False,
                add_generation_prompt=generation,
            )
        except Exception as err:  # jinja's raise_exception, or a message the template cannot read
            raise bad_request(f"the chat template cannot render these messages: {err}", param="messages") from None
        return str(text)

    def render(self, messages: Sequence[Message], tools: Tools | None = None, generation: bool = True) -> str:
        """The text of a whole conversation, as a fresh `apply_chat_template` gives it."""
        return self._render([m.to_template() for m in messages], tools, generation)

    def prompt_ids(self, messages: Sequence[Message], tools: Tools | None = None) -> list[int]:
        """Tokens of a fresh conversation plus the generation prompt (the first turn of an episode)."""
        return self.encode(self.render(messages, tools, True))

    def suffix_ids(self, messages: Sequence[Message], generation: bool = True) -> list[int]:
        """Tokens of messages appended to a history that ends after a message block, then (by default) the
        generation prompt; the tools header is not repeated (it belongs to the first block)."""
        anchored = self._render([_ANCHOR], None, False)
        text = self._render([_ANCHOR, *(m.to_template() for m in messages)], None, generation)
        if not text.startswith(anchored):
            raise AssertionError("the chat template renders the first message differently with followers")
        return self.encode(text[len(anchored) :])

    def closing_ids(self, generated: Sequence[int]) -> list[int]:
        """What follows a generated assistant turn in the next prompt: `\\n` after `<|im_end|>`, or the
        `<|im_end|>` a truncated turn never generated, then `\\n`."""
        if generated and generated[-1] == self.im_end:
            return list(self.close_after_end)
        return list(self.close_without_end)

    def strip_reasoning_ids(self, generated: Sequence[int]) -> list[int]:
        """The generated ids without the leading `<think>...</think>` block and the whitespace after it.

        Only whole generated tokens are dropped; the rest stays as generated (the strip-reasoning ablation)."""
        ids = list(generated)
        if not ids or ids[0] != self.think:
            return ids
        try:
            end = ids.index(self.end_think)
        except ValueError:  # truncated inside the reasoning: nothing but reasoning was generated
            return [i for i in ids if i == self.im_end][-1:]
        rest = ids[end + 1 :]
        while rest and rest[0] != self.im_end and self.token_text(rest[0]).isspace():
            rest.pop(0)
        return rest

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.decode([token_id])
        return text

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (byte-level BPE: exact even for a part of a UTF-8 character)."""
        data = self._token_bytes.get(token_id)
        if data is None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if self._byte_decoder is not None and all(ch in self._byte_decoder for ch in piece):
                data = bytes(self._byte_decoder[ch] for ch in piece)
            else:
                data = self.token_text(token_id).encode()
            self._token_bytes[token_id] = data
        return data


def _byte_level_decoder(tokenizer: Any) -> dict[str, int] | None:
    """GPT-2's byte<->unicode table, when the tokenizer is byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in repr(backend.decoder):
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}
