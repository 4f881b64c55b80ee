"""The self-evolution controller: propose -> guard -> staged evaluation -> decide -> (approve) -> remember.

One round improves on the incumbent scaffold: the proposer reads the memory notes and the incumbent's failed
episodes and proposes a change; the guard refuses changes outside the scaffold; candidate and incumbent run
on a small subset, then the full dev split, `seeds` episodes per task; the paired-difference rule decides;
a promotion is re-checked on the sealed held-out tasks (whose episodes the proposer never sees) and, when
configured, waits for the operator. Every step lands in the audit log and as an event for the console.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forgerl.evolution import guard, stats
from forgerl.evolution.audit import AuditLog
from forgerl.evolution.diagnosis import Anomaly
from forgerl.evolution.evaluation import Evaluator
from forgerl.evolution.ledger import BudgetLedger, BudgetLimits
from forgerl.evolution.memory import Memory
from forgerl.evolution.proposers import Failure, ProposalContext, Proposer
from forgerl.evolution.records import FINAL_STATES, AnomalyRecord, Iteration, Stage, State, Version, now
from forgerl.rollout.scaffold_config import ScaffoldRegistry

log = logging.getLogger("forgerl.evolution")


class NotJudged(Exception):
    """A stage whose episodes the infrastructure lost: no comparison, the iteration ends inconclusive."""


@dataclass(frozen=True)
class Settings:
    suite: str
    split: str  # the suite's split the three task sets are drawn from
    subset_tasks: tuple[str, ...]
    dev_tasks: tuple[str, ...]
    heldout_tasks: tuple[str, ...]
    seeds: int = stats.MIN_SEEDS
    margin: float = 0.0
    confidence: float = 0.95
    require_approval: bool = True

    def __post_init__(self) -> None:
        if self.seeds < stats.MIN_SEEDS:
            raise ValueError(f"seeds {self.seeds}: the decision rule needs >= {stats.MIN_SEEDS} per task")
        if set(self.heldout_tasks) & (set(self.dev_tasks) | set(self.subset_tasks)):
            raise ValueError("held-out tasks overlap the dev tasks: the held-out split must be sealed")
        if not self.dev_tasks or not self.heldout_tasks:
            raise ValueError("dev and held-out task sets must both be non-empty")


class Controller:
    def __init__(
        self,
        settings: Settings,
        evaluator: Evaluator,
        proposer: Proposer,
        registry: ScaffoldRegistry,
        limits: BudgetLimits,
        state_dir: Path,
        incumbent: str = "default",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.evaluator = evaluator
        self.proposer = proposer
        self.registry = registry
        self.ledger = BudgetLedger(limits) if clock is None else BudgetLedger(limits, clock)
        self.state_dir = state_dir
        self.audit = AuditLog(state_dir / "audit.jsonl")
        self.memory = Memory(state_dir / "memory.md")
        self.iterations: list[Iteration] = []
        self.versions: dict[str, Version] = {}
        self.anomalies: list[AnomalyRecord] = []
        self.incumbent = incumbent
        self.status = "idle"  # idle, running, paused, halted, finished
        self.halt_reason = ""
        self._failures: list[Failure] = []  # the incumbent's failed dev episodes, for the next proposal
        self._candidate_failures: list[Failure] = []
        self._running = asyncio.Event()
        self._running.set()
        self._approvals: dict[str, asyncio.Future[tuple[bool, str, str]]] = {}
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._task: asyncio.Task[None] | None = None
        self._load()
        if incumbent not in self.versions:
            self.registry.get(incumbent)  # raises naming the known versions
            self.versions[incumbent] = Version(incumbent, "", "", "root")

    # -- persistence and events --------------------------------------------------------------------

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load(self) -> None:
        if not self._state_file.exists():
            return
        data = json.loads(self._state_file.read_text())
        self.iterations = [Iteration.from_json(i) for i in data["iterations"]]
        self.versions = {v["name"]: Version(**v) for v in data["versions"]}
        self.anomalies = [AnomalyRecord(**a) for a in data["anomalies"]]
        self.incumbent = data["incumbent"]
        # An iteration cut off by a restart has no evaluation to resume from; it ends inconclusive.
        for it in self.iterations:
            if it.state not in FINAL_STATES:
                it.state = State.INCONCLUSIVE
                it.log("the service restarted during this iteration; it ended without a decision")

    def _save(self) -> None:
        data = {
            "incumbent": self.incumbent,
            "iterations": [i.to_json() for i in self.iterations],
            "versions": [asdict(v) for v in self.versions.values()],
            "anomalies": [asdict(a) for a in self.anomalies],
        }
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self._state_file)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._subscribers.discard(queue)

    def _changed(self, kind: str, actor: str, data: dict[str, Any]) -> None:
        """Persist, audit, and tell the console."""
        self._save()
        entry = self.audit.append(kind, actor, data)
        event = {"kind": kind, "seq": entry["seq"], "data": data, "status": self.status}
        for queue in list(self._subscribers):
            if queue.full():  # a console that stopped reading loses its stream, not the controller's time
                self._subscribers.discard(queue)
            else:
                queue.put_nowait(event)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self, actor: str = "operator") -> None:
        if self._task is not None and not self._task.done():
            raise RuntimeError(f"evolution is already {self.status}; pause, resume or halt it instead")
        self.status, self.halt_reason = "running", ""
        self._running.set()
        self._task = asyncio.create_task(self._loop())
        self._changed("started", actor, {"incumbent": self.incumbent, "budget": self.ledger.view().to_json()})

    def pause(self, actor: str) -> None:
        self._require_active("pause")
        self._running.clear()
        self.status = "paused"
        self._changed("paused", actor, {})

    def resume(self, actor: str) -> None:
        self._require_active("resume")
        self._running.set()
        self.status = "running"
        self._changed("resumed", actor, {})

    def halt(self, actor: str, reason: str) -> None:
        self.status, self.halt_reason = "halted", reason
        self._running.set()
        if self._task is not None:
            self._task.cancel()
        self._changed("halted", actor, {"reason": reason})

    async def wait(self) -> None:
        """Until the loop ends (budget spent, halted, or failed)."""
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                if self.status != "halted":
                    raise

    def _require_active(self, what: str) -> None:
        if self.status not in ("running", "paused"):
            raise RuntimeError(f"cannot {what}: evolution is {self.status}; start it first")

    async def _loop(self) -> None:
        try:
            while True:
                await self._running.wait()
                spent = self.ledger.view().exhausted
                if spent:
                    self.status, self.halt_reason = "finished", spent
                    self._changed("budget_spent", "controller", {"reason": spent})
                    return
                await self.round()
                await asyncio.sleep(0)  # an evaluator that never awaits must not starve the console's requests
        except Exception as exc:
            log.exception("evolution round failed")
            self.status, self.halt_reason = "halted", f"round failed: {exc}"
            self._changed("failed", "controller", {"error": str(exc)})

    # -- one round ---------------------------------------------------------------------------------

    async def round(self) -> Iteration:
        self.ledger.charge_round()
        it = Iteration(id=uuid.uuid4().hex[:12], index=len(self.iterations) + 1, base=self.incumbent)
        self.iterations.append(it)
        self._changed("iteration_started", "controller", {"iteration": it.id, "base": it.base})
        context = ProposalContext(
            incumbent=self.registry.get(self.incumbent),
            suite=self.settings.suite,
            memory=self.memory.recent(),
            failures=list(self._failures),
            budget=self.ledger.view(),
            round_index=it.index,
            tried=frozenset(i.operator for i in self.iterations if i.base == self.incumbent and i.operator),
        )
        try:
            proposal = await self.proposer.propose(context)
        except Exception as exc:
            return self._finish(it, State.INCONCLUSIVE, f"the proposer failed: {exc}")
        it.proposer, it.operator, it.rationale = proposal.proposer, proposal.operator, proposal.rationale
        it.changes = dict(proposal.changes)
        verdict = guard.check(proposal)
        if not verdict.allowed:
            self.audit.append("guard_rejected", proposal.proposer, {"iteration": it.id, "violations": verdict.reason})
            return self._finish(it, State.REJECTED, f"guard refused the change: {verdict.reason}")
        try:
            candidate = guard.apply(context.incumbent, proposal, f"{self._root()}-e{it.index}")
        except ValueError as exc:
            return self._finish(it, State.REJECTED, f"the change is not a valid scaffold: {exc}")
        self.registry.put(candidate)
        it.candidate, it.diff = candidate.version, guard.diff(context.incumbent, candidate)
        self.versions[candidate.version] = Version(candidate.version, self.incumbent, it.id, "candidate")
        it.state = State.EVALUATING
        it.log(f"proposed {candidate.version} by {proposal.proposer}/{proposal.operator}: {proposal.rationale}")
        self._changed("candidate_proposed", proposal.proposer, {"iteration": it.id, "candidate": candidate.version})
        return await self._evaluate_and_decide(it)

    def _root(self) -> str:
        name = self.incumbent
        while self.versions.get(name) and self.versions[name].parent:
            name = self.versions[name].parent
        return name

    async def _stage(self, it: Iteration, name: str, tasks: Sequence[str]) -> Stage | None:
        """Both versions on `tasks`; None when the budget cannot pay for it."""
        s = self.settings
        cost = 2 * len(tasks) * s.seeds
        if cost > self.ledger.episodes_left():
            it.log(f"{name}: needs {cost} episodes, {self.ledger.episodes_left()} left in the budget")
            return None
        self.ledger.charge_episodes(cost)
        split = s.split
        cand, inc = await asyncio.gather(
            self.evaluator.evaluate(it.candidate, s.suite, split, tasks, s.seeds),
            self.evaluator.evaluate(it.base, s.suite, split, tasks, s.seeds),
        )
        lost = cand.infra_failures + inc.infra_failures
        if lost:
            raise NotJudged(
                f"{name}: {len(lost)} of {cost} episodes failed in the infrastructure, so the versions were not "
                f"compared (first: {lost[0].task_id}: {lost[0].message[:200]})"
            )
        if name != "heldout":  # the held-out split stays sealed: its failures never reach the proposer
            # The next round builds on the incumbent, or on the candidate if promoted: read that one's failures.
            self._failures, self._candidate_failures = inc.failures[:50], cand.failures[:50]
        diffs = stats.paired_differences(cand.scores, inc.scores, s.seeds)
        decision = stats.decide(diffs, margin=s.margin, confidence=s.confidence, seed=it.index, seeds=s.seeds)
        stage = Stage.of(name, split, s.seeds, cand.scores, inc.scores, decision)
        it.stages.append(stage)
        it.log(
            f"{name}: {len(tasks)} tasks x {s.seeds} seeds, candidate {stage.candidate_rate:.1%} vs incumbent "
            f"{stage.incumbent_rate:.1%}, mean difference {decision.mean_difference:+.3f} "
            f"[{decision.ci_low:+.3f}, {decision.ci_high:+.3f}] -> {decision.verdict.value}"
        )
        self._changed("stage_finished", "controller", {"iteration": it.id, "stage": name, **decision.to_json()})
        return stage

    async def _evaluate_and_decide(self, it: Iteration) -> Iteration:
        s = self.settings
        stages = (("subset", s.subset_tasks), ("dev", s.dev_tasks)) if s.subset_tasks else (("dev", s.dev_tasks),)
        try:
            return await self._compare(it, stages)
        except NotJudged as exc:
            return self._finish(it, State.INCONCLUSIVE, str(exc))

    async def _compare(self, it: Iteration, stages: Sequence[tuple[str, Sequence[str]]]) -> Iteration:
        s = self.settings
        for name, tasks in stages:
            stage = await self._stage(it, name, tasks)
            if stage is None:
                return self._finish(it, State.INCONCLUSIVE, "the episode budget ran out before a decision")
            if stage.decision["verdict"] == stats.Verdict.REJECT:
                return self._finish(it, State.REJECTED, f"{name}: the interval lies at or below the margin")
        assert stage is not None  # each stage above returned when it was None
        if stage.decision["verdict"] == stats.Verdict.INCONCLUSIVE:
            return self._finish(it, State.INCONCLUSIVE, "dev: the interval straddles the margin")
        heldout = await self._stage(it, "heldout", s.heldout_tasks)
        if heldout is None:
            return self._finish(it, State.INCONCLUSIVE, "the episode budget ran out before the held-out re-check")
        if heldout.decision["mean_difference"] <= s.margin:
            return self._finish(it, State.INCONCLUSIVE, "held-out re-check: the gain did not carry over")
        if s.require_approval:
            return await self._await_approval(it)
        return self._promote(it, "controller", "promoted without an approval gate (require_approval off)")

    async def _await_approval(self, it: Iteration) -> Iteration:
        it.state = State.AWAITING_APPROVAL
        it.log("dev and held-out agree: waiting for the operator's approval")
        future: asyncio.Future[tuple[bool, str, str]] = asyncio.get_running_loop().create_future()
        self._approvals[it.id] = future
        self._changed("awaiting_approval", "controller", {"iteration": it.id, "candidate": it.candidate})
        try:
            approved, operator, note = await future
        finally:
            self._approvals.pop(it.id, None)
        it.approved_by, it.note = operator, note
        if approved:
            return self._promote(it, operator, f"approved by {operator}" + (f": {note}" if note else ""))
        return self._finish(it, State.REJECTED, f"rejected by {operator}" + (f": {note}" if note else ""), operator)

    def _promote(self, it: Iteration, actor: str, why: str) -> Iteration:
        self.incumbent = it.candidate
        self._failures = self._candidate_failures
        return self._finish(it, State.PROMOTED, why, actor)

    def _finish(self, it: Iteration, state: State, why: str, actor: str = "controller") -> Iteration:
        it.state, it.verdict = state, state.value
        it.log(why)
        if it.candidate in self.versions:
            self.versions[it.candidate].status = state.value
        decision = it.decision()
        lines = [f"change: {it.rationale or '(none)'} ({it.operator or it.proposer or 'no proposer'})", why]
        if decision is not None:
            lines.append(
                f"dev mean difference {decision['mean_difference']:+.3f}, "
                f"{decision['confidence']:.0%} interval [{decision['ci_low']:+.3f}, {decision['ci_high']:+.3f}]"
            )
        self.memory.record(it.index, f"{state.value} {it.candidate or '(no candidate)'}", lines)
        self._changed("iteration_finished", actor, {"iteration": it.id, "state": state.value, "why": why})
        return it

    # -- operator actions --------------------------------------------------------------------------

    def iteration(self, iteration_id: str) -> Iteration:
        for it in self.iterations:
            if it.id == iteration_id:
                return it
        raise KeyError(f"unknown iteration {iteration_id!r}; list them with `forgerl evolve status`")

    def approve(self, iteration_id: str, approve: bool, operator: str, note: str = "") -> Iteration:
        it = self.iteration(iteration_id)
        future = self._approvals.get(iteration_id)
        if it.state != State.AWAITING_APPROVAL or future is None or future.done():
            raise ValueError(f"iteration {iteration_id} is {it.state.value}, not awaiting approval")
        if not operator:
            raise ValueError("name the operator who approves (--operator)")
        future.set_result((approve, operator, note))
        return it

    def rollback(self, version: str, actor: str) -> str:
        """Make an earlier promoted version (or the root) the incumbent again."""
        target = self.versions.get(version)
        if target is None or target.status not in ("root", "promoted"):
            raise ValueError(f"cannot roll back to {version!r}: only the root or a promoted version")
        lineage = []
        name = self.incumbent
        while name and name != version:
            lineage.append(name)
            name = self.versions[name].parent
        if name != version:
            raise ValueError(f"{version} is not an ancestor of the incumbent {self.incumbent}")
        for undone in lineage:
            self.versions[undone].status = "rolled_back"
            for it in self.iterations:
                if it.candidate == undone and it.state == State.PROMOTED:
                    it.state = State.ROLLED_BACK
                    it.log(f"rolled back to {version} by {actor}")
        previous, self.incumbent = self.incumbent, version
        self._changed("rolled_back", actor, {"from": previous, "to": version, "undone": lineage})
        return version

    def report_anomalies(self, run_id: str, anomalies: Sequence[Anomaly]) -> list[AnomalyRecord]:
        """Record new anomalies (one open record per run, kind, metric) for the operator."""
        known = {(a.run_id, a.anomaly["kind"], a.anomaly["metric"]) for a in self.anomalies}
        new = [
            AnomalyRecord(uuid.uuid4().hex[:12], run_id, a.to_json())
            for a in anomalies
            if (run_id, a.kind, a.metric) not in known
        ]
        if new:
            self.anomalies.extend(new)
            self._changed("anomalies", "diagnosis", {"run_id": run_id, "new": [a.id for a in new]})
        return new

    def decide_anomaly(self, anomaly_id: str, approve: bool, operator: str) -> AnomalyRecord:
        for record in self.anomalies:
            if record.id == anomaly_id:
                if record.status != "open":
                    raise ValueError(f"anomaly {anomaly_id} is already {record.status}")
                record.status, record.decided_by = ("approved" if approve else "dismissed"), operator
                data = {"anomaly": anomaly_id, "status": record.status, "action": record.anomaly["action"]}
                self._changed("anomaly_decided", operator, data)
                return record
        raise KeyError(f"unknown anomaly {anomaly_id!r}")

    def anomaly_outcome(self, record: AnomalyRecord, outcome: str, actor: str) -> None:
        record.outcome = outcome
        self._changed("anomaly_action", actor, {"anomaly": record.id, "outcome": outcome})

    def snapshot(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "halt_reason": self.halt_reason,
            "incumbent": self.incumbent,
            "suite": self.settings.suite,
            "require_approval": self.settings.require_approval,
            "budget": self.ledger.view().to_json(),
            "iterations": len(self.iterations),
            "awaiting_approval": [i.id for i in self.iterations if i.state == State.AWAITING_APPROVAL],
            "open_anomalies": sum(a.status == "open" for a in self.anomalies),
            "time": now(),
        }
