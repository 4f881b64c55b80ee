"""The guard, the hash-chained audit log, the memory notes and the run-diagnosis detectors."""

import hashlib
import json
import math
from pathlib import Path

import pytest

from forgerl.evolution import guard
from forgerl.evolution.audit import AuditLog
from forgerl.evolution.diagnosis import diagnose
from forgerl.evolution.guard import Proposal
from forgerl.evolution.memory import Memory
from forgerl.rollout.scaffold_config import DEFAULT

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "path",
    ["graders.tooluse.tolerance", "tests/test_answer.py", "datasets.tooluse.split", "budget.rounds", "agent"],
)
def test_changes_to_what_measures_the_agent_are_refused(path: str) -> None:
    result = guard.check(Proposal({path: 1, "sampling.temperature": 0.5}, "sneaky", "model"))
    assert not result.allowed
    assert path in result.reason
    with pytest.raises(ValueError, match="refused by the guard"):
        guard.apply(DEFAULT, Proposal({path: 1}, "", "model"), "x")


def test_an_allowed_change_makes_a_child_version_whose_diff_is_exactly_the_change() -> None:
    proposal = Proposal({"sampling.temperature": 0.5, "max_turns_by_suite.tooluse": 3}, "why", "mutation")
    assert guard.check(proposal).allowed
    child = guard.apply(DEFAULT, proposal, "default-e1")
    assert (child.version, child.parent) == ("default-e1", "default")
    assert child.sampling.temperature == 0.5 and child.turn_budget("tooluse") == 3
    assert guard.diff(DEFAULT, child) == [
        {"path": "max_turns_by_suite.tooluse", "before": 4, "after": 3},
        {"path": "sampling.temperature", "before": 1.0, "after": 0.5},
    ]


def test_an_invalid_value_is_refused_by_the_scaffold_schema() -> None:
    with pytest.raises(ValueError):
        guard.apply(DEFAULT, Proposal({"sampling.top_p": 7}, "", "model"), "bad")


def test_the_audit_chain_verifies_and_a_tampered_entry_is_detected(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append("event", "controller", {"i": i})
    assert log.verify() == []
    assert AuditLog(log.path).append("later", "op", {})["seq"] == 5  # reopening continues the chain
    lines = log.path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["data"]["i"] = 99  # an edit after the fact
    lines[2] = json.dumps(entry, sort_keys=True)
    log.path.write_text("\n".join(lines) + "\n")
    assert [p.seq for p in log.verify()] == [2]  # its content no longer matches its hash
    entry["hash"] = hashlib.sha256(
        json.dumps({k: v for k, v in entry.items() if k != "hash"}, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()  # a forger who also rewrites the hash breaks the next entry's link instead
    lines[2] = json.dumps(entry, sort_keys=True)
    log.path.write_text("\n".join(lines) + "\n")
    assert [(p.seq, p.problem) for p in log.verify()] == [(3, "does not link to the previous entry's hash")]
    del lines[4]  # dropping an entry breaks the sequence and the link
    log.path.write_text("\n".join(lines) + "\n")
    assert 4 in {p.seq for p in log.verify()}


def test_memory_keeps_the_last_rounds(tmp_path: Path) -> None:
    memory = Memory(tmp_path / "memory.md")
    assert memory.recent() == ""
    for i in range(1, 8):
        memory.record(i, f"round {i}", [f"note {i}"])
    recent = memory.recent(3)
    assert recent.startswith("## Round 5: round 5") and "note 7" in recent and "note 4" not in recent


def clean_metrics(steps: int = 40) -> dict[str, list[tuple[int, float]]]:
    return {
        "loss": [(s, 1.0 - 0.01 * s + 0.02 * math.sin(s)) for s in range(steps)],
        "entropy": [(s, 2.0 - 0.005 * s) for s in range(steps)],
        "reward/mean": [(s, 0.5 + 0.1 * math.sin(s / 3)) for s in range(steps)],
        "response_length": [(s, 60 + 3 * math.cos(s)) for s in range(steps)],
        "staleness/mean": [(s, 1.0 + 0.5 * (s % 2)) for s in range(steps)],
    }


def test_clean_metrics_raise_no_anomaly() -> None:
    assert diagnose(clean_metrics()) == []


def test_an_injected_nan_raises_a_critical_anomaly_with_evidence() -> None:
    metrics = clean_metrics()
    metrics["loss"][17] = (17, float("nan"))
    anomalies = diagnose(metrics)
    assert [(a.kind, a.metric, a.step, a.action) for a in anomalies] == [("non_finite", "loss", 17, "stop")]
    assert "nan" in anomalies[0].evidence


@pytest.mark.parametrize(
    ("metric", "edit", "kind"),
    [
        ("loss", lambda s, v: v * 10 if s == 30 else v, "loss_spike"),
        ("entropy", lambda s, v: 0.1 if s >= 20 else v, "entropy_collapse"),
        ("reward/mean", lambda s, v: v - 0.4 if s >= 20 else v, "drift"),
        ("response_length", lambda s, v: v * 3 if s >= 20 else v, "drift"),
        ("staleness/mean", lambda s, v: float(s) if s >= 30 else v, "staleness_growth"),
    ],
)
def test_each_detector_fires_on_its_planted_fault(metric: str, edit: object, kind: str) -> None:
    metrics = clean_metrics()
    metrics[metric] = [(s, edit(s, v)) for s, v in metrics[metric]]  # type: ignore[operator]
    assert [(a.kind, a.metric) for a in diagnose(metrics)] == [(kind, metric)]
