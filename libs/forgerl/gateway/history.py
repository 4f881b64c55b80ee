"""Token-exact histories: which recorded point of an episode a request continues, and its prompt ids.

Every turn of an episode leaves two points a later request may continue from:
- its *prompt* point: the messages of its request, whose tokens are the turn's prompt without the
  generation prompt (an agent that drops a reply, e.g. on a format error, continues from here);
- its *reply* point: those messages plus the assistant reply the gateway returned, whose tokens are the
  prompt, the generated ids exactly as generated (earlier reasoning removed only with strip_reasoning), and
  what closes the turn.
A request is matched to the point with the most messages that its messages start with; the new messages
after it are rendered with the chat template and appended. The model's own text is never re-tokenised.

An assistant message is the same as the recorded reply when its content, tool calls (name and arguments,
compared as JSON) and reasoning agree, where missing reasoning counts as agreeing: the gateway puts the
recorded reasoning back (interleaved thinking survives agents that drop `reasoning_content`). Any other
difference, or an assistant message the model never generated, contradicts the record: a 400 that names
the message, and nothing recorded changes.
"""

from __future__ import annotations

import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forgerl.gateway.chat import ChatFormat, Message, ToolCallMessage, Tools
from forgerl.gateway.errors import GatewayError
from forgerl.gateway.parsing import ParsedToolCall


class HistoryMismatch(GatewayError):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(
            400,
            f"messages[{index}] contradicts this episode's recorded history: {reason}. Send the history back as "
            "the gateway returned it (reasoning_content may be left out; it is restored)",
            code="history_mismatch",
            param=f"messages[{index}]",
        )
        self.index = index
        self.reason = reason


@dataclass
class TurnRecord:
    """One model call of an episode, with the messages it answered and what it generated."""

    index: int
    messages: list[Message]  # the request's messages; recorded replies of earlier turns in place of the agent's
    tools_key: str
    prompt_ids: array  # int32
    generation_prompt_len: int
    generated_ids: list[int]
    logprobs: list[float]
    reply: Message  # the assistant message returned to the agent
    tool_calls: list[ParsedToolCall]  # malformed ones included
    finish_reason: str  # the engine's: stop, length or abort
    policy_version: int = 0
    cached_prompt_tokens: int = 0
    ttft_s: float = 0.0
    generation_s: float = 0.0
    tool_s: float | None = None
    finished_at: float = 0.0
    replica: str = ""
    tool_results: list[Message] = field(default_factory=list)
    routed_experts: Any = None  # trajectory_pb2.RoutedExperts or None
    # Tokens that follow the prompt at this turn's reply point (generated ids, maybe stripped, + closing).
    reply_tail: list[int] = field(default_factory=list)

    def prompt_point_ids(self) -> list[int]:
        return list(self.prompt_ids[: len(self.prompt_ids) - self.generation_prompt_len])

    def reply_point_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.reply_tail]


@dataclass
class Base:
    """The recorded point a request continues from (turn None: a fresh conversation)."""

    turn: TurnRecord | None
    reply: bool
    messages: list[Message]

    @property
    def size(self) -> int:
        return len(self.messages)

    def ids(self) -> list[int]:
        if self.turn is None:
            return []
        return self.turn.reply_point_ids() if self.reply else self.turn.prompt_point_ids()


def _short(text: str, limit: int = 60) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "...", ensure_ascii=False)


def _json_equal(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return bool(json.loads(a) == json.loads(b))
    except (json.JSONDecodeError, TypeError):
        return False


def compare(recorded: Message, sent: Message) -> str | None:
    """None when `sent` agrees with `recorded`, else what differs."""
    if recorded.role != sent.role:
        return f"role is {sent.role!r} where the history has {recorded.role!r}"
    if recorded.role != "assistant":
        if recorded.content != sent.content:
            return f"content {_short(sent.content)} differs from the recorded {_short(recorded.content)}"
        if recorded.role == "tool" and recorded.tool_call_id != sent.tool_call_id:
            return f"tool_call_id {sent.tool_call_id!r} differs from the recorded {recorded.tool_call_id!r}"
        return None
    if recorded.content.strip() != sent.content.strip():
        return (
            f"assistant content {_short(sent.content.strip())} differs from what the model generated, "
            f"{_short(recorded.content.strip())}"
        )
    if sent.reasoning.strip() and sent.reasoning.strip() != recorded.reasoning.strip():
        return "reasoning_content differs from the model's recorded reasoning (send it unchanged, or leave it out)"
    if len(sent.tool_calls) != len(recorded.tool_calls):
        return f"{len(sent.tool_calls)} tool call(s) where the model made {len(recorded.tool_calls)}"
    for j, (r, s) in enumerate(zip(recorded.tool_calls, sent.tool_calls, strict=True)):
        if r.name != s.name:
            return f"tool_calls[{j}] calls {s.name!r} where the model called {r.name!r}"
        if not _json_equal(r.arguments, s.arguments):
            return (
                f"tool_calls[{j}].function.arguments {_short(s.arguments)} differ from the model's "
                f"{_short(r.arguments)}"
            )
    return None


def _common(recorded: Sequence[Message], sent: Sequence[Message]) -> tuple[int, str | None]:
    """Length of the agreeing prefix, and why the next message differs (None if `sent` ran out first)."""
    for i, r in enumerate(recorded):
        if i >= len(sent):
            return i, None
        why = compare(r, sent[i])
        if why is not None:
            return i, why
    return len(recorded), None


def match_history(turns: Sequence[TurnRecord], messages: Sequence[Message], tools: Tools) -> tuple[Base, list[Message]]:
    """The recorded point `messages` continue (most messages; the latest turn on a tie), and the new messages.

    Raises HistoryMismatch when they contradict the record."""
    if not turns:
        return Base(None, False, []), list(messages)
    best: Base | None = None
    blocked: tuple[int, str] | None = None  # an assistant message right after a prompt point that differs
    first_diff: tuple[int, str] | None = None
    for turn in reversed(turns):
        n = len(turn.messages)
        if best is not None and n + 1 <= best.size:
            continue
        if turn.tools_key != tools.key:
            if first_diff is None:
                first_diff = (0, "the request's tools differ from the tools of the recorded history")
            continue
        k, why = _common(turn.messages, messages)
        if k < n:
            if why is not None and (first_diff is None or k > first_diff[0]):
                first_diff = (k, why)
            if why is None and (first_diff is None or k > first_diff[0]):
                first_diff = (k, "the history is shorter than the recorded one, which goes on")
            continue
        candidate = Base(turn, False, list(turn.messages))
        if len(messages) > n and messages[n].role == "assistant":
            why = compare(turn.reply, messages[n])
            if why is None:
                candidate = Base(turn, True, [*turn.messages, turn.reply])
            elif blocked is None or n > blocked[0]:
                blocked = (n, why)
        if best is None or candidate.size > best.size:
            best = candidate
    if best is None:
        index, reason = first_diff or (0, "it does not continue the recorded history")
        raise HistoryMismatch(index, reason)
    new = list(messages[best.size :])
    for offset, message in enumerate(new):
        if message.role == "assistant":
            index = best.size + offset
            if blocked is not None and blocked[0] == index:
                raise HistoryMismatch(index, blocked[1])
            raise HistoryMismatch(index, "it is an assistant message the model did not generate in this episode")
    return best, new


def build_prompt(fmt: ChatFormat, base: Base, new: Sequence[Message], tools: Tools) -> tuple[list[int], list[Message]]:
    """Prompt ids of a request (recorded ids of the base, then the new messages and the generation prompt)
    and the messages of the new turn's record."""
    if base.turn is None:
        return fmt.prompt_ids(new, tools), list(new)
    return base.ids() + fmt.suffix_ids(base.messages, new, tools), [*base.messages, *new]


def reply_message(content: str, reasoning: str, calls: Sequence[ParsedToolCall]) -> Message:
    """The assistant message of a turn as the agent gets it (and must send back)."""
    return Message(
        role="assistant",
        content=content,
        reasoning=reasoning,
        tool_calls=tuple(ToolCallMessage(c.id, c.name, c.arguments) for c in calls if not c.malformed),
    )
