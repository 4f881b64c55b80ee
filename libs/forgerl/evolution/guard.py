"""What a proposed change may touch: the agent's scaffold, never what measures it.

A proposal is a set of dotted paths with new values (`sampling.temperature: 0.7`). Self-evolution improves
the score it is measured by, so the measuring side stays out of its reach: graders, tests, datasets and
budgets are not scaffold fields, and a change naming them (or anything else outside the allowed roots) is
refused as a whole and logged. The agent kind is refused too: `oracle` replays the gold solution.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forgerl.rollout.scaffold_config import ScaffoldConfig

# Scaffold fields a proposal may change: prompts, tools, sampling, turn limits, tool execution, context.
ALLOWED_ROOTS = frozenset(
    {
        "system_prompts",
        "tools",
        "sampling",
        "max_turns",
        "max_turns_by_suite",
        "parallel_tool_calls",
        "max_parallel_tools",
        "tool_timeout_s",
        "context",
        "notes",
    }
)
# Named so the refusal says why; anything not allowed is refused whether listed here or not.
PROTECTED_ROOTS = frozenset(
    {"graders", "grader", "tests", "test", "datasets", "dataset", "suite", "suites", "budget", "budgets"}
    | {"rewards", "reward", "agent", "version", "parent"}
)


@dataclass(frozen=True)
class Proposal:
    """A change to the incumbent scaffold, with the proposer's reasons."""

    changes: Mapping[str, Any]
    rationale: str
    proposer: str
    operator: str = ""  # which mutation operator (built-in) or model made it


@dataclass(frozen=True)
class GuardResult:
    allowed: bool
    violations: tuple[str, ...] = field(default=())

    @property
    def reason(self) -> str:
        return "; ".join(self.violations)


def check(proposal: Proposal) -> GuardResult:
    """Allowed only when every changed path lies under an allowed root."""
    violations = []
    if not proposal.changes:
        violations.append("the proposal changes nothing")
    for path in proposal.changes:
        root = path.split(".", 1)[0]
        if root in PROTECTED_ROOTS:
            violations.append(f"{path}: {root} measures or bounds the agent and is not the proposer's to change")
        elif root not in ALLOWED_ROOTS:
            allowed = ", ".join(sorted(ALLOWED_ROOTS))
            violations.append(f"{path}: not a scaffold field a proposal may change ({allowed})")
    return GuardResult(not violations, tuple(violations))


def apply(parent: ScaffoldConfig, proposal: Proposal, version: str) -> ScaffoldConfig:
    """The candidate: `parent` with the proposal's paths set (call `check` first); pydantic validates it."""
    guard = check(proposal)
    if not guard.allowed:
        raise ValueError(f"proposal refused by the guard: {guard.reason}")
    data = parent.model_dump(mode="json")
    for path, value in proposal.changes.items():
        node = data
        *parents, leaf = path.split(".")
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise ValueError(f"{path}: {key} is not a mapping in scaffold {parent.version}")
            node = node[key]
        node[leaf] = value
    data["version"] = version
    data["parent"] = parent.version
    return ScaffoldConfig.model_validate(data)


def flatten(config: ScaffoldConfig) -> dict[str, Any]:
    """Dotted path -> leaf value (tools by name), for diffs."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            out[prefix] = value

    data = config.model_dump(mode="json", exclude={"version", "parent"})
    data["tools"] = {t["name"]: t for t in data["tools"]}
    walk("", data)
    return out


def diff(parent: ScaffoldConfig, child: ScaffoldConfig) -> list[dict[str, Any]]:
    """The changed paths between two versions: [{"path", "before", "after"}], sorted by path."""
    a, b = flatten(parent), flatten(child)
    return [
        {"path": path, "before": a.get(path), "after": b.get(path)}
        for path in sorted(set(a) | set(b))
        if a.get(path) != b.get(path)
    ]
