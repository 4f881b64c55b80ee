"""What the controller keeps about each round, as plain data the console and the gRPC API both render."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from forgerl.evolution.stats import Decision


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class State(enum.StrEnum):
    PROPOSING = "proposing"
    EVALUATING = "evaluating"
    AWAITING_APPROVAL = "awaiting_approval"
    PROMOTED = "promoted"
    REJECTED = "rejected"
    INCONCLUSIVE = "inconclusive"
    ROLLED_BACK = "rolled_back"


FINAL_STATES = frozenset({State.PROMOTED, State.REJECTED, State.INCONCLUSIVE, State.ROLLED_BACK})


@dataclass
class Stage:
    """One evaluation stage: both versions on the same tasks, and what the decision rule made of it."""

    name: str  # "subset", "dev" or "heldout"
    split: str
    seeds: int
    candidate_rate: float
    incumbent_rate: float
    decision: dict[str, Any]
    per_task: list[dict[str, Any]]  # {"task", "candidate", "incumbent", "difference"}

    @classmethod
    def of(
        cls,
        name: str,
        split: str,
        seeds: int,
        candidate: dict[str, list[float]],
        incumbent: dict[str, list[float]],
        decision: Decision,
    ) -> Stage:
        rows = []
        for task in sorted(candidate):
            c = sum(candidate[task]) / len(candidate[task])
            i = sum(incumbent[task]) / len(incumbent[task])
            rows.append({"task": task, "candidate": c, "incumbent": i, "difference": c - i})
        rate = lambda scores: sum(map(sum, scores.values())) / max(1, sum(map(len, scores.values())))  # noqa: E731
        return cls(name, split, seeds, rate(candidate), rate(incumbent), decision.to_json(), rows)


@dataclass
class Iteration:
    id: str
    index: int
    base: str
    state: State = State.PROPOSING
    candidate: str = ""
    proposer: str = ""
    operator: str = ""
    rationale: str = ""
    changes: dict[str, Any] = field(default_factory=dict)
    diff: list[dict[str, Any]] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    verdict: str = ""
    approved_by: str = ""
    note: str = ""
    logs: list[str] = field(default_factory=list)
    created_at: str = field(default_factory=now)
    updated_at: str = field(default_factory=now)

    def log(self, line: str) -> None:
        self.logs.append(f"{now()} {line}")
        self.updated_at = now()

    def decision(self) -> dict[str, Any] | None:
        """The deciding stage's statistics: the dev split's (the held-out one only re-checks)."""
        for stage in reversed(self.stages):
            if stage.name != "heldout":
                return stage.decision
        return None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Iteration:
        data = dict(data)
        data["state"] = State(data["state"])
        data["stages"] = [Stage(**s) for s in data.get("stages", [])]
        return cls(**data)


@dataclass
class Version:
    """A scaffold version in the lineage tree."""

    name: str
    parent: str
    iteration: str  # the iteration that made it, "" for the root
    status: str  # "root", "candidate", "promoted", "rejected", "inconclusive", "rolled_back"
    created_at: str = field(default_factory=now)


@dataclass
class AnomalyRecord:
    id: str
    run_id: str
    anomaly: dict[str, Any]
    status: str = "open"  # "open", "approved", "dismissed"
    decided_by: str = ""
    outcome: str = ""  # what carrying out the approved action did
    created_at: str = field(default_factory=now)
