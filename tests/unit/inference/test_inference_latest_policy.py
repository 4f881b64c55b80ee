"""An inference engine that replaces a dead one serves the policy the running run published last (read
from the run store), never the initial checkpoint: with the initial one every new trajectory would be
dropped as stale and the run would never take another step."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.main import with_latest_policy
from forgerl.store import Store, default_url
from forgerl.v1 import run_pb2

pytestmark = pytest.mark.unit


def _checkpoint(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def _publish(store: Store, run_id: str, version: int, path: Path) -> None:
    ckpt = run_pb2.Checkpoint(checkpoint_id=f"{run_id}/v{version}", run_id=run_id, step=version, path=str(path))
    store.checkpoints.add(ckpt)
    store.policy_versions.publish(run_id, version, ckpt.checkpoint_id)


def test_the_running_runs_latest_version_is_served(tmp_path: Path) -> None:
    config = InferenceConfig(state_dir=tmp_path, model_path=str(_checkpoint(tmp_path, "init")))
    with Store.open(default_url(tmp_path)) as store:
        for run_id, state in (("old", run_pb2.RUN_STATE_SUCCEEDED), ("live", run_pb2.RUN_STATE_RUNNING)):
            store.runs.create(run_pb2.Run(run_id=run_id, state=state))
        _publish(store, "old", 9, _checkpoint(tmp_path, "old-9"))
        _publish(store, "live", 2, _checkpoint(tmp_path, "live-2"))
        _publish(store, "live", 5, _checkpoint(tmp_path, "live-5"))

    resumed = with_latest_policy(config)
    assert (resumed.model_path, resumed.policy_version) == (str(tmp_path / "live-5"), 5)

    fresh = with_latest_policy(config.model_copy(update={"resume_latest_policy": False}))
    assert (fresh.model_path, fresh.policy_version) == (str(tmp_path / "init"), 1)


def test_without_a_store_or_a_running_run_the_model_path_is_served(tmp_path: Path) -> None:
    config = InferenceConfig(state_dir=tmp_path / "nothing-yet", model_path=str(_checkpoint(tmp_path, "init")))
    assert with_latest_policy(config) == config
    with Store.open(default_url(tmp_path)) as store:
        store.runs.create(run_pb2.Run(run_id="done", state=run_pb2.RUN_STATE_SUCCEEDED))
        _publish(store, "done", 3, _checkpoint(tmp_path, "done-3"))
    assert with_latest_policy(config.model_copy(update={"state_dir": tmp_path})).model_path == str(tmp_path / "init")
