"""forgerl.store on a throw-away SQLite file: migrations, the models/migrations agreement, repositories."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from forgerl.store import (
    AlreadyExistsError,
    NotFoundError,
    Store,
    create_engine,
    current_revision,
    default_url,
    downgrade,
    head_revision,
    upgrade,
)
from forgerl.store.models import Base
from forgerl.v1 import run_pb2

pytestmark = pytest.mark.unit

TABLES = {
    "runs",
    "step_metrics",
    "checkpoints",
    "policy_versions",
    "scaffold_versions",
    "evolution_iterations",
    "evaluations",
}


@pytest.fixture
def store(tmp_path):
    s = Store.open(f"sqlite:///{tmp_path / 'forgerl.db'}")
    yield s
    s.close()


def _run(run_id: str = "run-1") -> run_pb2.Run:
    return run_pb2.Run(
        run_id=run_id,
        config=run_pb2.RunConfig(
            name="tiny",
            model_preset="debug",
            suite="toy",
            rl=run_pb2.RlStage(steps=10, batch_size=8, loss="cispo", fifo_window=0.3, max_staleness=2),
        ),
        stage="rl",
    )


def test_upgrade_and_downgrade_empty_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path / 'sub' / 'm.db'}"
    engine = create_engine(url)
    upgrade(engine)
    assert current_revision(engine) == head_revision()
    assert set(inspect(engine).get_table_names()) >= TABLES
    upgrade(engine)  # idempotent
    downgrade(engine, "base")
    assert current_revision(engine) is None
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(url)  # and back up, by URL
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_migrations_match_models(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == [], f"models and migrations differ; add an Alembic revision: {diff}"


def test_default_url_under_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FORGERL_DATABASE_URL", raising=False)
    assert default_url(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'forgerl.db'}"
    monkeypatch.setenv("FORGERL_DATABASE_URL", "postgresql://postgres@127.0.0.1/x")
    assert default_url(tmp_path) == "postgresql://postgres@127.0.0.1/x"


def test_runs(store):
    created = store.runs.create(_run())
    assert created.state == run_pb2.RUN_STATE_PENDING
    assert created.config.rl.max_staleness == 2
    assert created.config.rl.fifo_window == pytest.approx(0.3)
    with pytest.raises(AlreadyExistsError):
        store.runs.create(_run())
    updated = store.runs.update("run-1", state=run_pb2.RUN_STATE_RUNNING, step=5)
    assert updated.state == run_pb2.RUN_STATE_RUNNING and updated.step == 5
    assert updated.updated_at.ToDatetime() >= created.updated_at.ToDatetime()
    assert store.runs.get("run-1").config.name == "tiny"
    assert [r.run_id for r in store.runs.list(states=[run_pb2.RUN_STATE_RUNNING])] == ["run-1"]
    assert store.runs.list(states=["RUN_STATE_FAILED"]) == []
    assert store.runs.find("nope") is None
    with pytest.raises(NotFoundError):
        store.runs.update("nope", step=1)


def test_step_metrics(store):
    store.runs.create(_run())
    for step in range(3):
        store.metrics.add(
            run_pb2.StepMetrics(run_id="run-1", stage="rl", step=step, values={"loss": 1.0 / (step + 1), "x": step})
        )
    store.metrics.add(run_pb2.StepMetrics(run_id="run-1", stage="rl", step=2, values={"loss": 9.0}))
    assert store.metrics.series("run-1", "loss") == [(0, 1.0), (1, 0.5), (2, 9.0)]
    steps = store.metrics.steps("run-1", since_step=0)
    assert [m.step for m in steps] == [1, 2]
    assert dict(steps[1].values) == {"loss": 9.0, "x": 2.0}


def test_step_metrics_keep_non_finite_values(store):
    """A diverged run's NaN must reach the diagnosis; sqlite3 alone would bind it as NULL."""
    store.runs.create(_run())
    values = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "tiny": 5e-324, "big": 1.7e308}
    store.metrics.add(run_pb2.StepMetrics(run_id="run-1", stage="rl", step=4, values=values))
    (step,) = store.metrics.steps("run-1")
    assert math.isnan(step.values["nan"]) and math.isnan(store.metrics.series("run-1", "nan")[0][1])
    assert {k: v for k, v in step.values.items() if k != "nan"} == {k: v for k, v in values.items() if k != "nan"}
    store.metrics.add(run_pb2.StepMetrics(run_id="run-1", stage="rl", step=4, values={"nan": 2.0}))
    assert store.metrics.series("run-1", "nan") == [(4, 2.0)]


def test_checkpoints_and_policy_versions(store):
    store.runs.create(_run())
    for step in (10, 20):
        store.checkpoints.add(
            run_pb2.Checkpoint(checkpoint_id=f"ck-{step}", run_id="run-1", step=step, policy_version=step // 10)
        )
    assert store.checkpoints.latest("run-1").checkpoint_id == "ck-20"
    assert [c.step for c in store.checkpoints.list("run-1")] == [10, 20]
    with pytest.raises(AlreadyExistsError):
        store.checkpoints.add(run_pb2.Checkpoint(checkpoint_id="ck-x", run_id="no-such-run"))
    store.policy_versions.publish("run-1", 1, "ck-10")
    store.policy_versions.publish("run-1", 2, "ck-20")
    with pytest.raises(AlreadyExistsError):
        store.policy_versions.publish("run-1", 2)
    assert store.policy_versions.latest("run-1").version == 2
    assert store.runs.get("run-1").policy_version == 2
    assert [p.checkpoint_id for p in store.policy_versions.list("run-1")] == ["ck-10", "ck-20"]


def test_scaffolds_lineage(store):
    root = store.scaffolds.add(run_pb2.ScaffoldVersion(scaffold_id="base", config_yaml="a: 1"))
    assert root.version == 1
    child = store.scaffolds.add(run_pb2.ScaffoldVersion(scaffold_id="base", parent="base@1", config_yaml="a: 2"))
    assert child.version == 2
    other = store.scaffolds.add(run_pb2.ScaffoldVersion(scaffold_id="fork", version=7, parent="base@2"))
    assert [f"{s.scaffold_id}@{s.version}" for s in store.scaffolds.lineage("fork@7")] == [
        "fork@7",
        "base@2",
        "base@1",
    ]
    assert store.scaffolds.get("base").version == 2
    assert store.scaffolds.get("base", 1).config_yaml == "a: 1"
    assert other.created_at.ToDatetime(tzinfo=dt.UTC) <= dt.datetime.now(dt.UTC)
    with pytest.raises(NotFoundError):
        store.scaffolds.add(run_pb2.ScaffoldVersion(scaffold_id="x", parent="base@9"))


def test_iterations_and_evaluations(store):
    it = store.iterations.create(
        run_pb2.EvolutionIteration(base_scaffold="base@1", candidate_scaffolds=["base@2", "base@3"])
    )
    assert it.index == 1 and it.iteration_id == "iter-00001"
    assert it.state == run_pb2.ITERATION_STATE_PROPOSING
    it2 = store.iterations.create(run_pb2.EvolutionIteration(base_scaffold="base@2"))
    assert it2.index == 2
    store.iterations.update(
        it.iteration_id,
        state=run_pb2.ITERATION_STATE_PROMOTED,
        selected_scaffold="base@3",
        approved_by="alice",
    )
    got = store.iterations.get(it.iteration_id)
    assert got.state == run_pb2.ITERATION_STATE_PROMOTED and got.approved_by == "alice"
    assert list(got.candidate_scaffolds) == ["base@2", "base@3"]
    assert store.iterations.latest().iteration_id == it2.iteration_id

    store.evaluations.add(
        run_pb2.Evaluation(
            evaluation_id="ev-1",
            iteration_id=it.iteration_id,
            scaffold_version="base@2",
            suite="toy",
            split="dev",
            episodes=16,
            success_rate=0.5,
        )
    )
    store.evaluations.add(run_pb2.Evaluation(evaluation_id="ev-0", scaffold_version="base@1", suite="toy"))
    assert [e.evaluation_id for e in store.evaluations.list(iteration_id=it.iteration_id)] == ["ev-1"]
    assert [e.evaluation_id for e in store.evaluations.list(iteration_id="")] == ["ev-0"]
    assert store.evaluations.get("ev-1").success_rate == 0.5
    with pytest.raises(AlreadyExistsError):
        store.evaluations.add(run_pb2.Evaluation(evaluation_id="ev-2", iteration_id="nope"))
