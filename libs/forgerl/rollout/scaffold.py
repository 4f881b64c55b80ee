"""Agents behind one episode API: our interleaved-thinking scaffold, the scripted test agents, and
third-party OpenAI-client agents (mini-swe-agent).

An agent gets an `EpisodeContext` (task, scaffold config, the episode's tool box, an OpenAI client bound
to the gateway with the episode's key, a deadline) and returns an `AgentResult`: its final answer and one
`TurnRecord` per model call, which is what the gateway records as a trajectory turn and what the process
reward is computed on.

The interleaved loop: send the history (system, task, then every earlier turn's reasoning, tool calls and
tool results: interleaved thinking), get reasoning + tool calls back, run the calls (concurrently when
the config allows; calls of one turn are independent), append the results, repeat until the model
answers without calling a tool, the turn budget is spent or the deadline passes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from forgerl.rollout.rewards import StepProcess
from forgerl.rollout.scaffold_config import ContextPolicy, ScaffoldConfig
from forgerl.rollout.tasks import GoldSolution, Task
from forgerl.rollout.tools import ToolBox, ToolOutcome, clip

FORMAT_MARKERS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
MALFORMED_NOTE = (
    'Your tool call could not be parsed. Write it as <tool_call>{"name": ..., "arguments": {...}}</tool_call> '
    "with a JSON object, or answer without tool-call markup."
)


class ModelUnavailableError(Exception):
    """The model endpoint (gateway) could not be reached: infrastructure, retry the episode."""


@dataclass
class TurnRecord:
    index: int
    reasoning: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # {"id", "name", "arguments"}
    tool_results: list[ToolOutcome] = field(default_factory=list)
    format_errors: int = 0
    finish_reason: str = ""
    duration_s: float = 0.0

    def process(self, over_budget: bool = False) -> StepProcess:
        return StepProcess(
            malformed_calls=sum(r.malformed for r in self.tool_results),
            tool_errors=sum(r.is_error and not r.malformed for r in self.tool_results),
            format_errors=self.format_errors,
            over_budget=over_budget,
        )


@dataclass
class AgentResult:
    final_answer: str
    turns: list[TurnRecord]
    stopped: str  # answer | turn_budget | time_budget | model_error
    messages: list[dict[str, Any]] = field(default_factory=list)
    detail: str = ""

    def step_processes(self) -> list[StepProcess]:
        over = self.stopped in ("turn_budget", "time_budget")
        return [t.process(over_budget=over and i == len(self.turns) - 1) for i, t in enumerate(self.turns)]


@dataclass
class EpisodeContext:
    task: Task
    scaffold: ScaffoldConfig
    tools: ToolBox
    deadline: float  # time.monotonic() by which the agent must have answered
    gold: GoldSolution | None = None
    client: Any = None  # openai.AsyncOpenAI bound to the gateway (base_url, api_key = episode key)
    model: str = "forgerl-policy"
    base_url: str = ""
    api_key: str = ""
    # Turns land here as they finish, so an episode cut off by its deadline still has what was done.
    turns: list[TurnRecord] = field(default_factory=list)


class Agent(Protocol):
    needs_model: bool

    async def run(self, ctx: EpisodeContext) -> AgentResult: ...


async def run_tool_calls(ctx: EpisodeContext, calls: Sequence[dict[str, Any]]) -> list[ToolOutcome]:
    """Run one turn's tool calls: concurrently (bounded) when the scaffold allows, else in order."""
    scaffold = ctx.scaffold
    if not scaffold.parallel_tool_calls or len(calls) <= 1:
        return [await ctx.tools.call(c["name"], c["arguments"]) for c in calls]
    gate = asyncio.Semaphore(scaffold.max_parallel_tools)

    async def one(call: dict[str, Any]) -> ToolOutcome:
        async with gate:
            return await ctx.tools.call(call["name"], call["arguments"])

    return list(await asyncio.gather(*(one(c) for c in calls)))


def apply_context_policy(messages: list[dict[str, Any]], policy: ContextPolicy) -> list[dict[str, Any]]:
    """The messages to send: reasoning kept or dropped, the oldest tool results elided past the budget."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and not policy.keep_reasoning and m.get("reasoning_content"):
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
        out.append(m)

    def size(ms: list[dict[str, Any]]) -> int:
        return sum(len(json.dumps(x, ensure_ascii=False)) for x in ms)

    if size(out) <= policy.max_context_chars:
        return out
    tool_idx = [i for i, m in enumerate(out) if m["role"] == "tool"]
    elidable = tool_idx[: max(0, len(tool_idx) - policy.keep_recent_observations)]
    for i in elidable:
        if size(out) <= policy.max_context_chars:
            break
        original = out[i]["content"]
        out[i] = {**out[i], "content": f"[tool output elided: {len(original)} characters]"}
    return out


def _message_reasoning(message: Any) -> str:
    for name in ("reasoning_content", "reasoning"):
        value = getattr(message, name, None)
        if value is None:
            extra = getattr(message, "model_extra", None) or {}
            value = extra.get(name)
        if value:
            return str(value)
    return ""


class InterleavedAgent:
    """Our default scaffold, talking to the gateway through the official OpenAI SDK."""

    needs_model = True

    async def run(self, ctx: EpisodeContext) -> AgentResult:
        import openai

        task, scaffold = ctx.task, ctx.scaffold
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": scaffold.system_prompt(task.suite)},
            {"role": "user", "content": task.instructions},
        ]
        tools = scaffold.tool_specs(task.tools)
        budget = scaffold.turn_budget(task.suite)
        sampling = scaffold.sampling
        for index in range(budget):
            remaining = ctx.deadline - time.monotonic()
            if remaining <= 0:
                return AgentResult("", ctx.turns, "time_budget", messages)
            started = time.monotonic()
            try:
                response = await ctx.client.chat.completions.create(
                    model=ctx.model,
                    messages=apply_context_policy(messages, scaffold.context),
                    tools=tools or openai.NOT_GIVEN,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    timeout=remaining,
                )
            except openai.APITimeoutError:  # before APIConnectionError: the SDK makes it a subclass of that
                return AgentResult("", ctx.turns, "time_budget", messages)
            except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
                raise ModelUnavailableError(f"model endpoint unavailable: {exc}") from exc
            except openai.APIStatusError as exc:  # e.g. the prompt outgrew the context: the agent's doing
                return AgentResult("", ctx.turns, "model_error", messages, detail=str(exc)[:500])
            choice = response.choices[0]
            message = choice.message
            reasoning = _message_reasoning(message)
            content = message.content or ""
            calls = [
                {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                for c in (message.tool_calls or [])
            ]
            turn = TurnRecord(
                index=index,
                reasoning=reasoning,
                content=content,
                tool_calls=calls,
                finish_reason=choice.finish_reason or "",
            )
            unparsed = any(m in content for m in FORMAT_MARKERS)
            if unparsed or choice.finish_reason == "length":
                turn.format_errors = 1
            assistant: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                assistant["reasoning_content"] = reasoning
            if calls:
                assistant["tool_calls"] = [
                    {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in calls
                ]
            messages.append(assistant)
            if calls:
                turn.tool_results = await run_tool_calls(ctx, calls)
                limit = scaffold.context.max_tool_output_chars
                for call, result in zip(calls, turn.tool_results, strict=True):
                    messages.append(
                        {"role": "tool", "tool_call_id": call["id"], "content": clip(result.content, limit)}
                    )
            turn.duration_s = time.monotonic() - started
            ctx.turns.append(turn)
            if calls:
                continue
            if unparsed and index + 1 < budget:
                messages.append({"role": "user", "content": MALFORMED_NOTE})
                continue
            return AgentResult(content.strip(), ctx.turns, "answer", messages)
        return AgentResult("", ctx.turns, "turn_budget", messages)


class OracleAgent:
    """Scripted test agent that knows the answers: replays the task's gold solution through the same tool
    box (and so the same sandbox), then answers. Needs no model."""

    needs_model = False

    async def run(self, ctx: EpisodeContext) -> AgentResult:
        if ctx.gold is None:
            raise ValueError(f"task {ctx.task.id} has no gold solution for the oracle agent")
        for index, turn_calls in enumerate(ctx.gold.turns):
            started = time.monotonic()
            calls = [
                {"id": f"call_{index}_{i}", "name": c.name, "arguments": json.dumps(dict(c.arguments))}
                for i, c in enumerate(turn_calls)
            ]
            turn = TurnRecord(index=index, reasoning=" ".join(c.reasoning for c in turn_calls), tool_calls=calls)
            turn.tool_results = await run_tool_calls(ctx, calls)
            turn.duration_s = time.monotonic() - started
            ctx.turns.append(turn)
        answer = ctx.gold.final_answer
        ctx.turns.append(TurnRecord(index=len(ctx.gold.turns), reasoning=ctx.gold.final_reasoning, content=answer))
        return AgentResult(answer, ctx.turns, "answer")


class NoopAgent:
    """Scripted test agent that does nothing: no tool call, an empty answer. Needs no model."""

    needs_model = False

    async def run(self, ctx: EpisodeContext) -> AgentResult:
        ctx.turns.append(TurnRecord(index=0))
        return AgentResult("", ctx.turns, "answer")


def make_agent(scaffold: ScaffoldConfig) -> Agent:
    if scaffold.agent == "interleaved":
        return InterleavedAgent()
    if scaffold.agent == "oracle":
        return OracleAgent()
    if scaffold.agent == "noop":
        return NoopAgent()
    if scaffold.agent == "mini-swe-agent":
        from forgerl.rollout.third_party import MiniSweAgent

        return MiniSweAgent()
    raise ValueError(f"unknown agent kind {scaffold.agent!r}")
