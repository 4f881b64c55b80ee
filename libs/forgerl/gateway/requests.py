"""The body of `POST /v1/chat/completions`, checked field by field (a 400 names the field at fault).

Fields the gateway does not use (user, metadata, store, penalties, ...) are accepted and ignored. The
engine takes token ids and plain sampling, so `stop` strings, `n` > 1 and structured `response_format`s
are refused rather than silently dropped. `tool_choice` "required" or a named function is checked against
the tools but not enforced by decoding; "none" turns tool-call parsing off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forgerl.gateway.chat import Message, Tools, parse_messages
from forgerl.gateway.errors import bad_request

# Deepest nesting of a request body: a chat request with tool schemas nests ~10 levels; the limit keeps the
# recursive parts of the gateway (message and schema walks) far from Python's recursion limit of 1000.
MAX_JSON_DEPTH = 64
# The engine's wire format carries top_k and max_tokens as int32 (protos/forgerl/v1/inference.proto).
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[Message]
    tools: Tools
    tool_choice: str  # auto | none | required | function
    tool_choice_name: str
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int  # 0: the gateway's default
    seed: int | None

    @property
    def parse_tool_names(self) -> frozenset[str] | None:
        """The tool names generated calls are checked against, or None when calls are not parsed."""
        if not self.tools or self.tool_choice == "none":
            return None
        return self.tools.names


def _number(body: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{key} must be a number", param=key)
    if not lo <= value <= hi:
        raise bad_request(f"{key}={value}: must be between {lo} and {hi}", param=key)
    return float(value)


def _int(body: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer", param=key)
    if value < lo or (hi is not None and value > hi):
        bound = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"{key}={value}: must be {bound}", param=key)
    return value


def check_json_value(body: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """400 for a body nested deeper than `max_depth` or holding a string that is not Unicode text (a lone
    UTF-16 surrogate such as "\\ud800", which JSON can escape but UTF-8 cannot encode); iterative, so any
    depth is safe to check."""
    stack: list[tuple[Any, str, int]] = [(body, "body", 1)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > max_depth:
            raise bad_request(f"the request body nests deeper than {max_depth} levels (at {where}): flatten it")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"a key of {where}")
                stack.append((item, f"{where}.{key}", depth + 1))
        else:
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad_request(
            f"{where} is not valid Unicode: {text[err.start : err.end]!a} at character {err.start} is a lone "
            "UTF-16 surrogate; send text (pair surrogates, or escape the character itself)",
            code="invalid_unicode",
        ) from None


def parse_chat_request(body: Any, default_model: str) -> ChatRequest:
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    check_json_value(body)
    messages = parse_messages(body.get("messages"))
    tools = Tools.parse(body.get("tools"))
    tool_choice, tool_choice_name = _tool_choice(body.get("tool_choice"), tools)
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise bad_request("n must be 1: an episode is one trajectory (open more episodes to sample more)", param="n")
    stop = body.get("stop")
    if stop:
        raise bad_request(
            "stop sequences are not supported: a turn ends at the end-of-turn token; limit it with max_tokens",
            param="stop",
        )
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type", "text") != "text":
        raise bad_request(
            f"response_format {fmt.get('type')!r} is not supported (no constrained decoding): use text",
            param="response_format",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise bad_request("stream_options must be an object", param="stream_options")
    logprobs = body.get("logprobs", False)
    if not isinstance(logprobs, bool):
        raise bad_request("logprobs must be true or false", param="logprobs")
    max_tokens = _int(body, "max_completion_tokens", 1, INT32_MAX)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, INT32_MAX)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    model = body.get("model", default_model)
    if not isinstance(model, str):
        raise bad_request("model must be a string", param="model")
    return ChatRequest(
        model=model or default_model,
        messages=messages,
        tools=tools,
        tool_choice=tool_choice,
        tool_choice_name=tool_choice_name,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        logprobs=logprobs,
        top_logprobs=_int(body, "top_logprobs", 0, 20) or 0,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_int(body, "top_k", -1, INT32_MAX) or 0,  # the engine checks it against the vocabulary
        max_tokens=max_tokens or 0,
        seed=seed,
    )


def _tool_choice(raw: Any, tools: Tools) -> tuple[str, str]:
    if raw is None:
        return "auto", ""
    if raw in ("auto", "none", "required"):
        if raw == "required" and not tools:
            raise bad_request('tool_choice "required" needs tools', param="tool_choice")
        return str(raw), ""
    if isinstance(raw, Mapping) and raw.get("type") == "function":
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or name not in tools.names:
            raise bad_request(f"tool_choice names function {name!r}, which is not among the tools", param="tool_choice")
        return "function", name
    raise bad_request(
        'tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )
