"""A small repository API over the run-metadata tables; it speaks forgerl.v1 run.proto messages.

    store = Store.open("sqlite:///runs/forgerl.db")     # creates, migrates to head
    store.runs.create(run_pb2.Run(run_id="r1", config=cfg))
    store.metrics.add(run_pb2.StepMetrics(run_id="r1", stage="rl", step=3, values={"loss": 0.1}))
    store.policy_versions.publish("r1", 4, checkpoint_id="ck-3")

Every method opens its own short transaction, so one Store is safe to share between threads.
"""

from __future__ import annotations

import builtins
import datetime as dt
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import Engine, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from forgerl.store import db
from forgerl.store.models import (
    CheckpointRow,
    EvaluationRow,
    EvolutionIterationRow,
    PolicyVersionRow,
    RunRow,
    ScaffoldVersionRow,
    StepMetricRow,
    utcnow,
)
from forgerl.v1 import run_pb2

P = TypeVar("P")  # the proto message a repository returns

__all__ = ["AlreadyExistsError", "NotFoundError", "Store", "StoreError"]


class StoreError(RuntimeError):
    pass


class NotFoundError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExistsError(StoreError):
    pass


def _ts(value: dt.datetime | None) -> Timestamp:
    ts = Timestamp()
    if value is not None:
        ts.FromDatetime(value.astimezone(dt.UTC))
    return ts


def _dt(ts: Timestamp | None) -> dt.datetime:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return utcnow()
    return ts.ToDatetime(tzinfo=dt.UTC)


def _state_name(enum: Any, value: int | str) -> str:
    return value if isinstance(value, str) else str(enum.Name(value))


class _Repo:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _insert(self, row: Any, to_proto: Callable[[Any], P], conflict: str) -> P:
        """Add `row` in its own transaction; AlreadyExistsError(conflict) when a key or reference clashes."""
        try:
            with self._tx() as s:
                s.add(row)
                s.flush()
                return to_proto(row)
        except IntegrityError as exc:
            raise AlreadyExistsError(conflict) from exc

    def _get(self, row_type: type[Any], key: str, to_proto: Callable[[Any], P], what: str) -> P:
        with self._tx() as s:
            row = s.get(row_type, key)
            if row is None:
                raise NotFoundError(f"{what} {key!r} not found")
            return to_proto(row)


class RunRepository(_Repo):
    @staticmethod
    def to_proto(row: RunRow) -> run_pb2.Run:
        run = run_pb2.Run(
            run_id=row.run_id,
            state=row.state,  # the enum name
            stage=row.stage,
            step=row.step,
            policy_version=row.policy_version,
            created_at=_ts(row.created_at),
            updated_at=_ts(row.updated_at),
            error=row.error,
        )
        json_format.ParseDict(row.config or {}, run.config, ignore_unknown_fields=True)
        return run

    def create(self, run: run_pb2.Run) -> run_pb2.Run:
        if not run.run_id:
            raise StoreError("run_id is required")
        created = _dt(run.created_at if run.HasField("created_at") else None)
        row = RunRow(
            run_id=run.run_id,
            name=run.config.name,
            config=json_format.MessageToDict(run.config, preserving_proto_field_name=True),
            state=_state_name(run_pb2.RunState, run.state or run_pb2.RUN_STATE_PENDING),
            stage=run.stage,
            step=run.step,
            policy_version=run.policy_version,
            error=run.error,
            created_at=created,
            updated_at=created,
        )
        return self._insert(row, self.to_proto, f"run {run.run_id!r} already exists")

    def get(self, run_id: str) -> run_pb2.Run:
        return self._get(RunRow, run_id, self.to_proto, "run")

    def find(self, run_id: str) -> run_pb2.Run | None:
        try:
            return self.get(run_id)
        except NotFoundError:
            return None

    def list(self, *, states: Sequence[int | str] = (), limit: int = 1000) -> list[run_pb2.Run]:
        with self._tx() as s:
            q = select(RunRow).order_by(RunRow.created_at.desc()).limit(limit)
            if states:
                q = q.where(RunRow.state.in_([_state_name(run_pb2.RunState, x) for x in states]))
            return [self.to_proto(r) for r in s.scalars(q)]

    def update(
        self,
        run_id: str,
        *,
        state: int | str | None = None,
        stage: str | None = None,
        step: int | None = None,
        policy_version: int | None = None,
        error: str | None = None,
    ) -> run_pb2.Run:
        """Change the given fields (None leaves a field as it is)."""
        with self._tx() as s:
            row = s.get(RunRow, run_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"run {run_id!r} not found")
            if state is not None:
                row.state = _state_name(run_pb2.RunState, state)
            if stage is not None:
                row.stage = stage
            if step is not None:
                row.step = step
            if policy_version is not None:
                row.policy_version = policy_version
            if error is not None:
                row.error = error
            row.updated_at = utcnow()
            s.flush()
            return self.to_proto(row)

    def delete(self, run_id: str) -> None:
        with self._tx() as s:
            s.execute(delete(RunRow).where(RunRow.run_id == run_id))


class StepMetricsRepository(_Repo):
    def add(self, metrics: run_pb2.StepMetrics) -> None:
        """Record one step's values; a value already recorded for the same key is replaced."""
        when = _dt(metrics.time if metrics.HasField("time") else None)
        with self._tx() as s:
            existing = {
                r.name: r
                for r in s.scalars(
                    select(StepMetricRow).where(
                        StepMetricRow.run_id == metrics.run_id,
                        StepMetricRow.stage == metrics.stage,
                        StepMetricRow.step == metrics.step,
                        StepMetricRow.name.in_(list(metrics.values)),
                    )
                )
            }
            for name, value in metrics.values.items():
                row = existing.get(name)
                if row is None:
                    s.add(
                        StepMetricRow(
                            run_id=metrics.run_id,
                            stage=metrics.stage,
                            step=metrics.step,
                            name=name,
                            value=float(value),
                            time=when,
                        )
                    )
                else:
                    row.value = float(value)
                    row.time = when

    def steps(
        self, run_id: str, *, stage: str | None = None, since_step: int = -1, limit: int = 100_000
    ) -> list[run_pb2.StepMetrics]:
        """StepMetrics per step (all names), ascending by step, for steps > since_step."""
        with self._tx() as s:
            q = (
                select(StepMetricRow)
                .where(StepMetricRow.run_id == run_id, StepMetricRow.step > since_step)
                .order_by(StepMetricRow.stage, StepMetricRow.step, StepMetricRow.name)
            )
            if stage is not None:
                q = q.where(StepMetricRow.stage == stage)
            out: dict[tuple[str, int], run_pb2.StepMetrics] = {}
            for r in s.scalars(q):
                key = (r.stage, r.step)
                m = out.get(key)
                if m is None:
                    if len(out) >= limit:
                        break
                    m = out[key] = run_pb2.StepMetrics(run_id=r.run_id, stage=r.stage, step=r.step, time=_ts(r.time))
                m.values[r.name] = r.value
            return sorted(out.values(), key=lambda m: (m.step, m.stage))

    def series(self, run_id: str, name: str, *, stage: str | None = None) -> list[tuple[int, float]]:
        """(step, value) of one metric, ascending by step."""
        with self._tx() as s:
            q = (
                select(StepMetricRow.step, StepMetricRow.value)
                .where(StepMetricRow.run_id == run_id, StepMetricRow.name == name)
                .order_by(StepMetricRow.step)
            )
            if stage is not None:
                q = q.where(StepMetricRow.stage == stage)
            return [(int(a), float(b)) for a, b in s.execute(q)]


class CheckpointRepository(_Repo):
    @staticmethod
    def to_proto(row: CheckpointRow) -> run_pb2.Checkpoint:
        return run_pb2.Checkpoint(
            checkpoint_id=row.checkpoint_id,
            run_id=row.run_id,
            step=row.step,
            policy_version=row.policy_version,
            path=row.path,
            stage=row.stage,
            created_at=_ts(row.created_at),
        )

    def add(self, ckpt: run_pb2.Checkpoint) -> run_pb2.Checkpoint:
        if not ckpt.checkpoint_id:
            raise StoreError("checkpoint_id is required")
        row = CheckpointRow(
            checkpoint_id=ckpt.checkpoint_id,
            run_id=ckpt.run_id,
            step=ckpt.step,
            policy_version=ckpt.policy_version,
            path=ckpt.path,
            stage=ckpt.stage,
            created_at=_dt(ckpt.created_at if ckpt.HasField("created_at") else None),
        )
        conflict = f"checkpoint {ckpt.checkpoint_id!r} exists or run {ckpt.run_id!r} is unknown"
        return self._insert(row, self.to_proto, conflict)

    def get(self, checkpoint_id: str) -> run_pb2.Checkpoint:
        return self._get(CheckpointRow, checkpoint_id, self.to_proto, "checkpoint")

    def list(self, run_id: str) -> list[run_pb2.Checkpoint]:
        with self._tx() as s:
            q = select(CheckpointRow).where(CheckpointRow.run_id == run_id).order_by(CheckpointRow.step)
            return [self.to_proto(r) for r in s.scalars(q)]

    def latest(self, run_id: str) -> run_pb2.Checkpoint | None:
        with self._tx() as s:
            q = (
                select(CheckpointRow)
                .where(CheckpointRow.run_id == run_id)
                .order_by(CheckpointRow.step.desc(), CheckpointRow.created_at.desc())
                .limit(1)
            )
            row = s.scalars(q).first()
            return self.to_proto(row) if row else None


class PolicyVersionRepository(_Repo):
    @staticmethod
    def to_proto(row: PolicyVersionRow) -> run_pb2.PolicyVersion:
        return run_pb2.PolicyVersion(
            run_id=row.run_id,
            version=row.version,
            checkpoint_id=row.checkpoint_id or "",
            published_at=_ts(row.published_at),
        )

    def publish(self, run_id: str, version: int, checkpoint_id: str = "") -> run_pb2.PolicyVersion:
        """Record a published policy version; versions of a run must increase."""
        with self._tx() as s:
            last = s.scalar(select(func.max(PolicyVersionRow.version)).where(PolicyVersionRow.run_id == run_id))
            if last is not None and version <= last:
                raise AlreadyExistsError(
                    f"policy version {version} of run {run_id!r} is not newer than the latest ({last})"
                )
            row = PolicyVersionRow(run_id=run_id, version=version, checkpoint_id=checkpoint_id or None)
            s.add(row)
            run = s.get(RunRow, run_id)
            if run is None:
                raise NotFoundError(f"run {run_id!r} not found")
            run.policy_version = version
            run.updated_at = utcnow()
            s.flush()
            return self.to_proto(row)

    def latest(self, run_id: str) -> run_pb2.PolicyVersion | None:
        with self._tx() as s:
            q = (
                select(PolicyVersionRow)
                .where(PolicyVersionRow.run_id == run_id)
                .order_by(PolicyVersionRow.version.desc())
                .limit(1)
            )
            row = s.scalars(q).first()
            return self.to_proto(row) if row else None

    def list(self, run_id: str) -> list[run_pb2.PolicyVersion]:
        with self._tx() as s:
            q = select(PolicyVersionRow).where(PolicyVersionRow.run_id == run_id).order_by(PolicyVersionRow.version)
            return [self.to_proto(r) for r in s.scalars(q)]


class ScaffoldRepository(_Repo):
    @staticmethod
    def to_proto(row: ScaffoldVersionRow) -> run_pb2.ScaffoldVersion:
        return run_pb2.ScaffoldVersion(
            scaffold_id=row.scaffold_id,
            version=row.version,
            parent=row.parent,
            config_yaml=row.config_yaml,
            created_by=row.created_by,
            created_at=_ts(row.created_at),
        )

    @staticmethod
    def parse_ref(ref: str) -> tuple[str, int]:
        """ "scaffold_id@version" -> (scaffold_id, version)."""
        scaffold_id, sep, version = ref.rpartition("@")
        if not sep or not scaffold_id or not version.isdigit():
            raise StoreError(f"scaffold reference {ref!r} is not of the form 'scaffold_id@version'")
        return scaffold_id, int(version)

    def add(self, scaffold: run_pb2.ScaffoldVersion) -> run_pb2.ScaffoldVersion:
        """Store a scaffold version; version 0 means "next version of this scaffold_id"."""
        if not scaffold.scaffold_id:
            raise StoreError("scaffold_id is required")
        with self._tx() as s:
            version = scaffold.version
            if version <= 0:
                last = s.scalar(
                    select(func.max(ScaffoldVersionRow.version)).where(
                        ScaffoldVersionRow.scaffold_id == scaffold.scaffold_id
                    )
                )
                version = (last or 0) + 1
            if scaffold.parent:
                pid, pver = self.parse_ref(scaffold.parent)
                if s.get(ScaffoldVersionRow, (pid, pver)) is None:
                    raise NotFoundError(f"parent scaffold {scaffold.parent!r} not found")
            if s.get(ScaffoldVersionRow, (scaffold.scaffold_id, version)) is not None:
                raise AlreadyExistsError(f"scaffold {scaffold.scaffold_id}@{version} already exists")
            row = ScaffoldVersionRow(
                scaffold_id=scaffold.scaffold_id,
                version=version,
                parent=scaffold.parent,
                config_yaml=scaffold.config_yaml,
                created_by=scaffold.created_by,
                created_at=_dt(scaffold.created_at if scaffold.HasField("created_at") else None),
            )
            s.add(row)
            s.flush()
            return self.to_proto(row)

    def get(self, ref_or_id: str, version: int | None = None) -> run_pb2.ScaffoldVersion:
        """get("base@3"), get("base", 3), or get("base") for the latest version."""
        if version is None and "@" in ref_or_id:
            ref_or_id, version = self.parse_ref(ref_or_id)
        with self._tx() as s:
            if version is None:
                q = (
                    select(ScaffoldVersionRow)
                    .where(ScaffoldVersionRow.scaffold_id == ref_or_id)
                    .order_by(ScaffoldVersionRow.version.desc())
                    .limit(1)
                )
                row = s.scalars(q).first()
            else:
                row = s.get(ScaffoldVersionRow, (ref_or_id, version))
            if row is None:
                what = ref_or_id if version is None else f"{ref_or_id}@{version}"
                raise NotFoundError(f"scaffold {what!r} not found")
            return self.to_proto(row)

    def list(self, scaffold_id: str | None = None) -> list[run_pb2.ScaffoldVersion]:
        with self._tx() as s:
            q = select(ScaffoldVersionRow).order_by(ScaffoldVersionRow.scaffold_id, ScaffoldVersionRow.version)
            if scaffold_id is not None:
                q = q.where(ScaffoldVersionRow.scaffold_id == scaffold_id)
            return [self.to_proto(r) for r in s.scalars(q)]

    def lineage(self, ref: str) -> builtins.list[run_pb2.ScaffoldVersion]:
        """The scaffold and its ancestors, newest first."""
        out: builtins.list[run_pb2.ScaffoldVersion] = []
        seen: set[str] = set()
        current: str = ref
        while current and current not in seen:
            seen.add(current)
            sv = self.get(current)
            out.append(sv)
            current = sv.parent
        return out


class IterationRepository(_Repo):
    @staticmethod
    def to_proto(row: EvolutionIterationRow) -> run_pb2.EvolutionIteration:
        return run_pb2.EvolutionIteration(
            iteration_id=row.iteration_id,
            index=row.index,
            base_scaffold=row.base_scaffold,
            candidate_scaffolds=list(row.candidate_scaffolds or []),
            state=row.state,  # the enum name
            diagnosis=row.diagnosis,
            selected_scaffold=row.selected_scaffold,
            approved_by=row.approved_by,
            created_at=_ts(row.created_at),
            updated_at=_ts(row.updated_at),
        )

    def create(self, it: run_pb2.EvolutionIteration) -> run_pb2.EvolutionIteration:
        """Store a new iteration; index 0 with no id means "the next index"."""
        with self._tx() as s:
            index = it.index
            if index <= 0:
                index = (s.scalar(select(func.max(EvolutionIterationRow.index))) or 0) + 1
            iteration_id = it.iteration_id or f"iter-{index:05d}"
            if s.get(EvolutionIterationRow, iteration_id) is not None:
                raise AlreadyExistsError(f"iteration {iteration_id!r} already exists")
            now = utcnow()
            row = EvolutionIterationRow(
                iteration_id=iteration_id,
                index=index,
                base_scaffold=it.base_scaffold,
                candidate_scaffolds=list(it.candidate_scaffolds),
                state=_state_name(run_pb2.IterationState, it.state or run_pb2.ITERATION_STATE_PROPOSING),
                diagnosis=it.diagnosis,
                selected_scaffold=it.selected_scaffold,
                approved_by=it.approved_by,
                created_at=now,
                updated_at=now,
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError as exc:
                raise AlreadyExistsError(f"iteration index {index} already exists") from exc
            return self.to_proto(row)

    def get(self, iteration_id: str) -> run_pb2.EvolutionIteration:
        return self._get(EvolutionIterationRow, iteration_id, self.to_proto, "iteration")

    def list(self, *, limit: int = 1000) -> list[run_pb2.EvolutionIteration]:
        with self._tx() as s:
            q = select(EvolutionIterationRow).order_by(EvolutionIterationRow.index).limit(limit)
            return [self.to_proto(r) for r in s.scalars(q)]

    def latest(self) -> run_pb2.EvolutionIteration | None:
        with self._tx() as s:
            q = select(EvolutionIterationRow).order_by(EvolutionIterationRow.index.desc()).limit(1)
            row = s.scalars(q).first()
            return self.to_proto(row) if row else None

    def update(
        self,
        iteration_id: str,
        *,
        state: int | str | None = None,
        candidate_scaffolds: Iterable[str] | None = None,
        diagnosis: str | None = None,
        selected_scaffold: str | None = None,
        approved_by: str | None = None,
    ) -> run_pb2.EvolutionIteration:
        with self._tx() as s:
            row = s.get(EvolutionIterationRow, iteration_id, with_for_update=True)
            if row is None:
                raise NotFoundError(f"iteration {iteration_id!r} not found")
            if state is not None:
                row.state = _state_name(run_pb2.IterationState, state)
            if candidate_scaffolds is not None:
                row.candidate_scaffolds = list(candidate_scaffolds)
            if diagnosis is not None:
                row.diagnosis = diagnosis
            if selected_scaffold is not None:
                row.selected_scaffold = selected_scaffold
            if approved_by is not None:
                row.approved_by = approved_by
            row.updated_at = utcnow()
            s.flush()
            return self.to_proto(row)


class EvaluationRepository(_Repo):
    @staticmethod
    def to_proto(row: EvaluationRow) -> run_pb2.Evaluation:
        return run_pb2.Evaluation(
            evaluation_id=row.evaluation_id,
            iteration_id=row.iteration_id or "",
            scaffold_version=row.scaffold_version,
            suite=row.suite,
            split=row.split,
            episodes=row.episodes,
            success_rate=row.success_rate,
            mean_reward=row.mean_reward,
            mean_wall_clock_s=row.mean_wall_clock_s,
        )

    def add(self, ev: run_pb2.Evaluation) -> run_pb2.Evaluation:
        if not ev.evaluation_id:
            raise StoreError("evaluation_id is required")
        row = EvaluationRow(
            evaluation_id=ev.evaluation_id,
            iteration_id=ev.iteration_id or None,
            scaffold_version=ev.scaffold_version,
            suite=ev.suite,
            split=ev.split,
            episodes=ev.episodes,
            success_rate=ev.success_rate,
            mean_reward=ev.mean_reward,
            mean_wall_clock_s=ev.mean_wall_clock_s,
        )
        conflict = f"evaluation {ev.evaluation_id!r} exists or iteration {ev.iteration_id!r} is unknown"
        return self._insert(row, self.to_proto, conflict)

    def get(self, evaluation_id: str) -> run_pb2.Evaluation:
        return self._get(EvaluationRow, evaluation_id, self.to_proto, "evaluation")

    def list(
        self,
        *,
        iteration_id: str | None = None,
        scaffold_version: str | None = None,
        suite: str | None = None,
        split: str | None = None,
    ) -> list[run_pb2.Evaluation]:
        with self._tx() as s:
            q = select(EvaluationRow).order_by(EvaluationRow.evaluation_id)
            if iteration_id is not None:
                q = q.where(EvaluationRow.iteration_id == (iteration_id or None))
            if scaffold_version is not None:
                q = q.where(EvaluationRow.scaffold_version == scaffold_version)
            if suite is not None:
                q = q.where(EvaluationRow.suite == suite)
            if split is not None:
                q = q.where(EvaluationRow.split == split)
            return [self.to_proto(r) for r in s.scalars(q)]


class Store:
    """The run-metadata database: one engine and a repository per table family."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self.runs = RunRepository(self.sessions)
        self.metrics = StepMetricsRepository(self.sessions)
        self.checkpoints = CheckpointRepository(self.sessions)
        self.policy_versions = PolicyVersionRepository(self.sessions)
        self.scaffolds = ScaffoldRepository(self.sessions)
        self.iterations = IterationRepository(self.sessions)
        self.evaluations = EvaluationRepository(self.sessions)

    @classmethod
    def open(cls, url: str | None = None, *, migrate: bool = True, **engine_kwargs: Any) -> Store:
        """Connect to `url` (default: db.default_url()) and, unless migrate=False, upgrade it to head."""
        engine = db.create_engine(url, **engine_kwargs)
        if migrate:
            db.upgrade(engine)
        return cls(engine)

    def latest_policy(self, states: Sequence[int | str] = (run_pb2.RUN_STATE_RUNNING,)) -> run_pb2.Checkpoint | None:
        """The checkpoint of the newest policy version that the newest run in `states` published, with that
        version in `policy_version`; None when no such run published one. What an inference engine that
        replaces a dead one serves, so that the run's trajectories are not all stale."""
        for run in self.runs.list(states=states, limit=1):
            version = self.policy_versions.latest(run.run_id)
            if version is not None and version.checkpoint_id:
                checkpoint = self.checkpoints.get(version.checkpoint_id)
                checkpoint.policy_version = version.version
                return checkpoint
        return None

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
