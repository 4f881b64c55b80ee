"""SQLAlchemy 2.x models of the run metadata; they mirror forgerl/v1/run.proto.

The schema is owned by the Alembic migrations in forgerl/store/migrations: change a model, then add a
revision there (tests/unit/store checks the two agree).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base",
    "CheckpointRow",
    "EvaluationRow",
    "EvolutionIterationRow",
    "PolicyVersionRow",
    "RunRow",
    "ScaffoldVersionRow",
    "StepMetricRow",
    "utcnow",
]

# Stable constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class MetricFloat(TypeDecorator[float]):
    """Floats that keep NaN on every backend. sqlite3 binds NaN as NULL (a NOT NULL failure: a diverged
    run's loss could not be recorded), so on SQLite a NaN is stored as the text 'nan', which a REAL column
    keeps as text; +-inf are REAL there already, and PostgreSQL's double precision holds all three."""

    impl = Float
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Callable[[float | None], float | str | None] | None:
        to_float = super().bind_processor(dialect)  # SQLite's would turn the text back into NaN
        if dialect.name != "sqlite":
            return to_float

        def process(value: float | None) -> float | str | None:
            if value is not None and math.isnan(value):
                return "nan"
            return to_float(value) if to_float is not None else value

        return process

    def process_result_value(self, value: float | str | None, dialect: Any) -> float | None:
        return None if value is None else float(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RunRow(Base):
    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    # RunConfig as protobuf JSON (json_format, proto field names).
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # RunState enum name, e.g. "RUN_STATE_RUNNING".
    state: Mapped[str] = mapped_column(String(32), default="RUN_STATE_PENDING", index=True)
    stage: Mapped[str] = mapped_column(String(16), default="")
    step: Mapped[int] = mapped_column(BigInteger, default=0)
    policy_version: Mapped[int] = mapped_column(BigInteger, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class StepMetricRow(Base):
    """One named value of one training step (StepMetrics.values, one row per key)."""

    __tablename__ = "step_metrics"
    __table_args__ = (
        UniqueConstraint("run_id", "stage", "step", "name", name="uq_step_metrics_key"),
        Index("ix_step_metrics_run_name_step", "run_id", "name", "step"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(128), ForeignKey("runs.run_id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(16), default="")
    step: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(256))
    value: Mapped[float] = mapped_column(MetricFloat)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (Index("ix_checkpoints_run_step", "run_id", "step"),)

    checkpoint_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(128), ForeignKey("runs.run_id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(BigInteger, default=0)
    policy_version: Mapped[int] = mapped_column(BigInteger, default=0)
    path: Mapped[str] = mapped_column(Text, default="")
    stage: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class PolicyVersionRow(Base):
    __tablename__ = "policy_versions"

    run_id: Mapped[str] = mapped_column(String(128), ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    checkpoint_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("checkpoints.checkpoint_id", ondelete="SET NULL"), nullable=True
    )
    published_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ScaffoldVersionRow(Base):
    __tablename__ = "scaffold_versions"

    scaffold_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    # "scaffold_id@version" of the parent, "" for a root.
    parent: Mapped[str] = mapped_column(String(256), default="")
    config_yaml: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class EvolutionIterationRow(Base):
    __tablename__ = "evolution_iterations"

    iteration_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    index: Mapped[int] = mapped_column(BigInteger, unique=True)
    base_scaffold: Mapped[str] = mapped_column(String(256), default="")
    candidate_scaffolds: Mapped[list[str]] = mapped_column(JSON, default=list)
    # IterationState enum name.
    state: Mapped[str] = mapped_column(String(40), default="ITERATION_STATE_PROPOSING")
    diagnosis: Mapped[str] = mapped_column(Text, default="")
    selected_scaffold: Mapped[str] = mapped_column(String(256), default="")
    approved_by: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_scaffold_suite", "scaffold_version", "suite", "split"),)

    evaluation_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    # "" when the evaluation belongs to no evolution iteration (e.g. a baseline).
    iteration_id: Mapped[str | None] = mapped_column(
        String(128),
        ForeignKey("evolution_iterations.iteration_id", ondelete="CASCADE"),
        nullable=True,
        index=True,
    )
    scaffold_version: Mapped[str] = mapped_column(String(256), default="")
    suite: Mapped[str] = mapped_column(String(128), default="")
    split: Mapped[str] = mapped_column(String(64), default="")
    episodes: Mapped[int] = mapped_column(Integer, default=0)
    success_rate: Mapped[float] = mapped_column(Float, default=0.0)
    mean_reward: Mapped[float] = mapped_column(Float, default=0.0)
    mean_wall_clock_s: Mapped[float] = mapped_column(Float, default=0.0)
