"""Chat messages as the agents send them, and their tokens as the served tokenizer's chat template renders them.

The gateway renders only messages that are new to an episode; everything the model generated is kept as
the token ids it generated (never decoded and re-encoded). `ChatFormat.suffix_ids` renders new messages as
the text the template adds when they follow the history: `render(history + new)` minus `render(history)`,
with the history's reasoning left out of both renders (it shapes only its own assistant blocks, and
MiniMax-M2's template drops it once a new user message follows). Every block of the supported templates
starts with a special token (`<|im_start|>`, `]~b]`), so tokenising blocks one after the other equals
tokenising them together.

Token-exactness, precisely: within one user turn the gateway's ids equal one `apply_chat_template` of
the whole conversation. Across user turns they equal it for the ChatML family; for MiniMax-M2 they differ
exactly by the `<think>...</think>` spans of assistant turns before the last user message, which the
published template drops and the gateway keeps (the ids the model generated and was trained on).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgerl.gateway.errors import bad_request
from forgerl.model.chat_formats import M2_TOOL_CALL
from forgerl.model.tokenizer import END_THINK, IM_START, THINK, TOOL_CALL

ROLES = ("system", "user", "assistant", "tool")
# A first message for measuring what the template adds around one message (the generation prompt, the
# text after an assistant turn): the anchor's own rendering is cut off.
_ANCHOR = {"role": "user", "content": ""}
_SENTINEL = "\x00reply\x00"
# Parsers of generated text, by name (forgerl.gateway.formats builds them): "forgerl" reads the ChatML
# family's marker tokens itself, the others are vLLM's tool parsers of the same name.
PARSER_NAMES = ("forgerl", "hermes", "minimax_m2")


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

    def to_template(self, object_arguments: bool = False, reasoning: bool = True) -> dict[str, Any]:
        """The message as the chat template reads it; `object_arguments` gives tool-call arguments as
        objects (templates that write one tag per parameter need them), else as the JSON text."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.role == "assistant":
            if self.reasoning and reasoning:
                out["reasoning_content"] = self.reasoning
            if self.tool_calls:
                out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
                if object_arguments:
                    for call in out["tool_calls"]:
                        call["function"]["arguments"] = _json_object(call["function"]["arguments"])
        elif self.role == "tool" and self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def _json_object(text: str) -> Any:
    """Arguments as an object when they are a JSON object; else the text (the template then says why)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


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


def detect_parser(tokenizer: Any) -> str:
    """The parser for the tokenizer's chat format: the format is a property of the tokenizer (its template
    and markers), so a real MiniMax-M2 tokenizer gets vLLM's `minimax_m2` parser without configuration."""
    template = str(getattr(tokenizer, "chat_template", None) or "")
    vocab = tokenizer.get_vocab()
    if "]~b]ai" in template and M2_TOOL_CALL in vocab:
        return "minimax_m2"
    if IM_START in template and TOOL_CALL in vocab:
        return "forgerl"
    raise ValueError(
        "the tokenizer's chat template is neither MiniMax-M2's (]~b]ai, <minimax:tool_call>) nor the ChatML "
        "family (<|im_start|>, <tool_call>): give the gateway a tokenizer in one of these formats"
    )


class ChatFormat:
    """The tokenizer and chat template of the served model, the end-of-turn token and the parser's name.

    `parser`: one of PARSER_NAMES, or "auto" (detect_parser)."""

    def __init__(self, tokenizer: Any, parser: str = "auto") -> None:
        self.tokenizer = tokenizer
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self.parser = detect_parser(tokenizer) if parser == "auto" else parser
        if self.parser not in PARSER_NAMES:
            raise ValueError(f"parser {parser!r}: use auto or one of {', '.join(PARSER_NAMES)}")
        # MiniMax-M2's template writes one <parameter> tag per argument, so it needs them as an object.
        self.object_arguments = self.parser == "minimax_m2"
        eos = getattr(tokenizer, "eos_token", None)
        end = self.marker(eos) if isinstance(eos, str) else None
        if end is None:
            raise ValueError(f"the tokenizer's eos_token {eos!r} is not a single token: it must end a turn")
        self.end_of_turn = end
        self.eos_text = str(eos)
        self.think = self.marker(THINK)
        self.end_think = self.marker(END_THINK)
        self.stop_token_ids = (self.end_of_turn,)
        anchored = self._render([_ANCHOR], None, False)
        self.generation_prompt_ids = self.encode(self._render([_ANCHOR], None, True)[len(anchored) :])
        # Whether the generation prompt opens the reasoning (M2: `]~b]ai\n<think>\n`): generated ids then
        # start inside it.
        opening = [i for i in self.generation_prompt_ids if not self.decode([i]).isspace()]
        self.opens_reasoning = bool(opening) and self.think is not None and opening[-1] == self.think
        # What closes a generated assistant turn in the next prompt: the template's text after the turn.
        closing = self._closing_text(anchored)
        self.close_without_end = self.encode(closing)
        self.close_after_end = self.encode(closing[len(self.eos_text) :])
        self._token_text: dict[int, str] = {}
        self._token_bytes: dict[int, bytes] = {}
        self._byte_decoder = _byte_level_decoder(tokenizer)

    def marker(self, text: str) -> int | None:
        """The id of a marker that is a single token, else None."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def _closing_text(self, anchored: str) -> str:
        reply = {"role": "assistant", "content": _SENTINEL}
        text = self._render([_ANCHOR, reply], None, False)[len(anchored) :]
        closing = text[text.index(_SENTINEL) + len(_SENTINEL) :]
        if not closing.startswith(self.eos_text):
            raise ValueError(
                f"the chat template closes an assistant turn with {closing!r}, not with the eos token "
                f"{self.eos_text!r}: the gateway needs the model's end-of-turn token to end the turn"
            )
        return closing

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

    def render(
        self, messages: Sequence[Message], tools: Tools | None = None, generation: bool = True, plain: int = 0
    ) -> str:
        """The text of a whole conversation, as a fresh `apply_chat_template` gives it; the first `plain`
        messages without their reasoning."""
        rendered = [m.to_template(self.object_arguments, reasoning=i >= plain) for i, m in enumerate(messages)]
        return self._render(rendered, tools, generation)

    def prompt_ids(self, messages: Sequence[Message], tools: Tools | None = None) -> list[int]:
        """Tokens of a fresh conversation plus the generation prompt (the first turn of an episode)."""
        return self.encode(self.render(messages, tools, True))

    def suffix_ids(
        self, history: Sequence[Message], new: Sequence[Message], tools: Tools | None = None, generation: bool = True
    ) -> list[int]:
        """Tokens the template adds when `new` follows `history` (which ends after a message block), then
        (by default) the generation prompt."""
        before = self.render(history, tools, False, plain=len(history))
        after = self.render([*history, *new], tools, generation, plain=len(history))
        if not after.startswith(before):
            raise bad_request(
                "the chat template renders this episode's history differently once the new messages follow "
                "(e.g. more tool results for a turn whose results were already sent), so the prompt cannot "
                "extend the recorded tokens: send the complete results of a turn in one request",
                param="messages",
            )
        return self.encode(after[len(before) :])

    def closing_ids(self, generated: Sequence[int]) -> list[int]:
        """What follows a generated assistant turn in the next prompt: the template's text after the end-of-
        turn token (`\\n`), or, for a truncated turn, the end-of-turn token it never generated and that text."""
        if generated and generated[-1] == self.end_of_turn:
            return list(self.close_after_end)
        return list(self.close_without_end)

    def strip_reasoning_ids(self, generated: Sequence[int]) -> list[int]:
        """The generated ids without their reasoning (the strip-reasoning ablation); only whole generated
        tokens are dropped, the rest stays as generated.

        A turn that opens with `<think>` loses the block up to `</think>` and the whitespace after it. When the
        generation prompt opened the reasoning (M2), the prompt's `<think>` stays, so the ids before `</think>`
        are dropped and `</think>` and the rest kept: an empty reasoning block, still well formed."""
        ids = list(generated)
        opened = self.opens_reasoning or (bool(ids) and ids[0] == self.think)
        if not ids or not opened or self.end_think is None:
            return ids
        try:
            end = ids.index(self.end_think)
        except ValueError:  # truncated inside the reasoning: nothing but reasoning was generated
            return [i for i in ids if i == self.end_of_turn][-1:]
        if self.opens_reasoning:
            return ids[end:]
        rest = ids[end + 1 :]
        while rest and rest[0] != self.end_of_turn and self.token_text(rest[0]).isspace():
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
