"""The datapool service's configuration: settings, and a run's policy read from the run store."""

from __future__ import annotations

import pytest

from forgerl.runtime import load_config
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.servicer import RawFetchBatchResponse, settings_from_config, store_policy_lookup
from forgerl.store import Store
from forgerl.v1 import datapool_pb2, run_pb2, trajectory_pb2

pytestmark = pytest.mark.unit


def test_settings_from_env_and_flags():
    config = load_config(
        DatapoolConfig,
        "datapool",
        ["--max-staleness", "-1", "--runs", "a, b"],
        environ={"FORGERL_DATAPOOL_KAFKA_BOOTSTRAP": "127.0.0.1:1234", "FORGERL_DATAPOOL_FIFO_WINDOW": "0.5"},
    )
    settings = settings_from_config(config)
    assert settings.kafka.bootstrap == "127.0.0.1:1234"
    assert settings.default_policy.window == 0.5
    assert settings.default_policy.max_staleness is None
    assert settings.runs == ("a", "b")


def test_policy_from_the_run_store(tmp_path):
    url = f"sqlite:///{tmp_path / 'forgerl.db'}"
    with Store.open(url) as store:
        store.runs.create(
            run_pb2.Run(run_id="r1", config=run_pb2.RunConfig(rl=run_pb2.RlStage(fifo_window=0.5, max_staleness=3)))
        )
        store.runs.create(run_pb2.Run(run_id="r2", config=run_pb2.RunConfig(rl=run_pb2.RlStage(steps=3))))
        store.runs.create(run_pb2.Run(run_id="r3"))
    lookup = store_policy_lookup(DatapoolConfig(database_url=url, max_staleness=4, fifo_window=0.3))
    p1 = lookup("r1")
    assert p1 is not None and (p1.window, p1.max_staleness) == (0.5, 3)
    p2 = lookup("r2")
    assert p2 is not None and (p2.window, p2.max_staleness) == (0.3, 4)  # unset fields: the defaults
    assert lookup("r3") is None and lookup("nope") is None


def test_raw_fetch_response_is_a_fetch_batch_response():
    trajs = [
        trajectory_pb2.Trajectory(schema_version=1, trajectory_id=f"t{i}", run_id="r", turns=[trajectory_pb2.Turn()])
        for i in range(3)
    ]
    big = trajectory_pb2.Trajectory(trajectory_id="big", run_id="r")
    big.turns.add().generated_token_ids.extend(range(100_000))
    trajs.append(big)
    raw = RawFetchBatchResponse("b-1", [t.SerializeToString() for t in trajs], 2).SerializeToString()
    parsed = datapool_pb2.FetchBatchResponse.FromString(raw)
    assert parsed.batch_id == "b-1" and parsed.dropped_stale == 2
    assert list(parsed.trajectories) == trajs
