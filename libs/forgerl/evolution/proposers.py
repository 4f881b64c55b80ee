"""Proposers: built-in mutation operators over scaffold configs, and a model behind an OpenAI-compatible API.

Both read the same context (the incumbent, the last rounds' memory, failed episodes, the budget left) and
return a `Proposal`; neither can write anything: the controller applies a proposal only after the guard.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import yaml

from forgerl.evolution.guard import Proposal
from forgerl.evolution.ledger import BudgetView
from forgerl.rollout.scaffold_config import ScaffoldConfig


@dataclass(frozen=True)
class Failure:
    """One failed evaluation episode, as the proposer sees it."""

    task_id: str
    message: str = ""


@dataclass(frozen=True)
class ProposalContext:
    incumbent: ScaffoldConfig
    suite: str
    memory: str
    failures: Sequence[Failure]
    budget: BudgetView
    round_index: int
    tried: frozenset[str] = field(default=frozenset())  # operators already tried on this incumbent


class Proposer(Protocol):
    name: str

    async def propose(self, context: ProposalContext) -> Proposal: ...


# Instructions a prompt mutation may append; each targets a failure mode seen in tool-use episodes.
PROMPT_HINTS = (
    "Call exactly one tool, read its output, then answer.",
    "Copy the tool's output into your answer exactly, without extra words.",
    "Write expressions for the calculator in plain arithmetic (digits, + - * / and parentheses).",
    "When the task asks for text, use the python tool and print the result.",
    "If a tool call fails, fix the arguments and call it again before answering.",
)

Operator = Callable[[ScaffoldConfig, ProposalContext, random.Random], tuple[dict[str, Any], str]]


def _prompt_hint(config: ScaffoldConfig, ctx: ProposalContext, rng: random.Random) -> tuple[dict[str, Any], str]:
    current = config.system_prompt(ctx.suite)
    hints = [h for h in PROMPT_HINTS if h not in current] or list(PROMPT_HINTS)
    hint = rng.choice(hints)
    key = ctx.suite if ctx.suite in config.system_prompts else "*"
    return {f"system_prompts.{key}": f"{current} {hint}"}, f"add the instruction {hint!r} to the {key} prompt"


def _temperature(config: ScaffoldConfig, ctx: ProposalContext, rng: random.Random) -> tuple[dict[str, Any], str]:
    factor = rng.choice((0.5, 0.7, 1.3))
    value = round(min(2.0, max(0.05, config.sampling.temperature * factor)), 3)
    return {"sampling.temperature": value}, f"temperature {config.sampling.temperature} -> {value}"


def _top_p(config: ScaffoldConfig, ctx: ProposalContext, rng: random.Random) -> tuple[dict[str, Any], str]:
    value = rng.choice([p for p in (0.8, 0.9, 0.95, 1.0) if p != config.sampling.top_p])
    return {"sampling.top_p": value}, f"top_p {config.sampling.top_p} -> {value}"


def _max_tokens(config: ScaffoldConfig, ctx: ProposalContext, rng: random.Random) -> tuple[dict[str, Any], str]:
    value = max(32, int(config.sampling.max_tokens * rng.choice((0.5, 2.0))))
    return {"sampling.max_tokens": value}, f"max_tokens per turn {config.sampling.max_tokens} -> {value}"


def _turns(config: ScaffoldConfig, ctx: ProposalContext, rng: random.Random) -> tuple[dict[str, Any], str]:
    current = config.turn_budget(ctx.suite)
    # Rollout's finished-episode message starts with why the agent stopped: "turn_budget; 4 turns; ...".
    ran_out = sum(f.message.startswith("turn_budget") for f in ctx.failures)
    value = current + 1 if ran_out or current <= 2 else max(1, current + rng.choice((-1, 1)))
    why = f" ({ran_out} failures ran out of turns)" if ran_out else ""
    return {f"max_turns_by_suite.{ctx.suite}": value}, f"turn budget on {ctx.suite} {current} -> {value}{why}"


def _tool_output(config: ScaffoldConfig, ctx: ProposalContext, rng: random.Random) -> tuple[dict[str, Any], str]:
    current = config.context.max_tool_output_chars
    value = max(256, int(current * rng.choice((0.5, 2.0))))
    return {"context.max_tool_output_chars": value}, f"tool output kept in history {current} -> {value} chars"


OPERATORS: dict[str, Operator] = {
    "prompt_hint": _prompt_hint,
    "temperature": _temperature,
    "top_p": _top_p,
    "max_tokens": _max_tokens,
    "turn_budget": _turns,
    "tool_output": _tool_output,
}


class MutationProposer:
    """Picks an operator not yet tried on this incumbent (all tried: any), seeded per round."""

    name = "mutation"

    def __init__(self, seed: int = 0, operators: Sequence[str] = tuple(OPERATORS)) -> None:
        unknown = sorted(set(operators) - set(OPERATORS))
        if unknown:
            raise ValueError(f"unknown mutation operators {unknown}; known: {', '.join(OPERATORS)}")
        self.seed = seed
        self.operators = tuple(operators)

    async def propose(self, context: ProposalContext) -> Proposal:
        rng = random.Random(f"{self.seed}:{context.round_index}")
        fresh = [op for op in self.operators if op not in context.tried] or list(self.operators)
        op = rng.choice(fresh)
        changes, what = OPERATORS[op](context.incumbent, context, rng)
        failed = len(context.failures)
        rationale = f"{what}; the incumbent failed {failed} evaluated episodes last round" if failed else what
        return Proposal(changes=changes, rationale=rationale, proposer=self.name, operator=op)


SYSTEM = (
    "You improve an AI agent's scaffold. You may change only these fields of its YAML config: system_prompts, "
    "tools, sampling, max_turns, max_turns_by_suite, parallel_tool_calls, max_parallel_tools, tool_timeout_s, "
    "context. Answer with one JSON object and nothing else: "
    '{"changes": {"<dotted.path>": <new value>, ...}, "rationale": "<why, citing the failures>"}'
)


class ModelProposer:
    """Asks a model through any OpenAI-compatible chat-completions endpoint (the gateway, or another)."""

    name = "model"

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout_s = timeout_s

    def messages(self, ctx: ProposalContext) -> list[dict[str, str]]:
        failures = "\n".join(f"- {f.task_id}: {f.message[:300]}" for f in ctx.failures[:20]) or "- none recorded"
        config = yaml.safe_dump(ctx.incumbent.model_dump(mode="json", exclude={"tools"}), sort_keys=False)
        user = (
            f"Suite: {ctx.suite}. Round {ctx.round_index}; budget left: "
            f"{ctx.budget.limits.rounds - ctx.budget.rounds} rounds.\n\n"
            f"Memory of the last rounds:\n{ctx.memory or '(none yet)'}\n\n"
            f"Failed episodes of the incumbent:\n{failures}\n\nIncumbent config:\n{config}"
        )
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]

    async def propose(self, context: ProposalContext) -> Proposal:
        body = {"model": self.model, "messages": self.messages(context), "temperature": 0.7}
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            response = await client.post(f"{self.base_url}/chat/completions", json=body, headers=self.headers)
        if response.status_code != 200:
            raise RuntimeError(f"proposer model at {self.base_url} answered {response.status_code}: {response.text}")
        content = response.json()["choices"][0]["message"].get("content") or ""
        return parse_model_proposal(content, self.model)


def parse_model_proposal(content: str, model: str) -> Proposal:
    """The first JSON object in the model's answer, as a proposal; raises ValueError naming what is wrong."""
    match = re.search(r"\{.*\}", content, re.DOTALL)
    if match is None:
        raise ValueError(f"model {model} answered no JSON object: {content[:200]!r}")
    data = json.loads(match.group(0))
    changes = data.get("changes")
    if not isinstance(changes, dict):
        raise ValueError(f"model {model}: 'changes' must be an object of dotted paths, got {changes!r}")
    return Proposal(changes=changes, rationale=str(data.get("rationale", "")), proposer="model", operator=model)
