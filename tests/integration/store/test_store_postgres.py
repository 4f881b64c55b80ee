"""forgerl.store against the PostgreSQL server on 127.0.0.1:5432 (user postgres, trust auth).

A uniquely named database is created for the session and dropped at its end.
"""

from __future__ import annotations

import math
import os
import uuid

import pytest
from sqlalchemy import inspect

from forgerl.store import Store, create_engine, current_revision, downgrade, head_revision, upgrade
from forgerl.v1 import run_pb2

pytestmark = pytest.mark.integration

PG_ADMIN_URL = os.environ.get("FORGERL_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_url():
    psycopg = pytest.importorskip("psycopg")
    dsn = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:  # pragma: no cover - depends on the machine
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no PostgreSQL at {dsn}: {exc}")
    name = f"forgerl_test_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = dsn.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_migrations_up_and_down_on_postgres(pg_url):
    engine = create_engine(pg_url)
    try:
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        tables = set(inspect(engine).get_table_names())
        assert {"runs", "step_metrics", "checkpoints", "policy_versions", "evaluations"} <= tables
        downgrade(engine, "base")
        assert current_revision(engine) is None
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()


def test_repositories_on_postgres(pg_url):
    with Store.open(pg_url) as store:
        store.runs.create(run_pb2.Run(run_id="pg-run", config=run_pb2.RunConfig(name="pg")))
        store.metrics.add(run_pb2.StepMetrics(run_id="pg-run", stage="rl", step=1, values={"loss": 0.25}))
        store.checkpoints.add(run_pb2.Checkpoint(checkpoint_id="pg-ck", run_id="pg-run", step=1))
        store.policy_versions.publish("pg-run", 1, "pg-ck")
        it = store.iterations.create(run_pb2.EvolutionIteration(candidate_scaffolds=["a@1"]))
        store.evaluations.add(run_pb2.Evaluation(evaluation_id="pg-ev", iteration_id=it.iteration_id))
        assert store.runs.get("pg-run").policy_version == 1
        assert store.metrics.series("pg-run", "loss") == [(1, 0.25)]
        store.metrics.add(run_pb2.StepMetrics(run_id="pg-run", stage="rl", step=2, values={"loss": math.nan}))
        store.metrics.add(run_pb2.StepMetrics(run_id="pg-run", stage="rl", step=3, values={"loss": -math.inf}))
        (_, (step2, nan), (step3, neg_inf)) = store.metrics.series("pg-run", "loss")
        assert (step2, step3, neg_inf) == (2, 3, -math.inf) and math.isnan(nan)
        assert list(store.iterations.get(it.iteration_id).candidate_scaffolds) == ["a@1"]
        created = store.runs.get("pg-run").created_at.ToDatetime()
        assert created.year >= 2024
