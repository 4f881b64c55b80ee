"""The trainer killed mid-RL in a running local topology, then `forgerl restart trainer`: through the real
services (rollout -> gateway -> vLLM -> Kafka -> data pool -> trainer) the run finishes; no trajectory is
trained twice, and every batch the data pool served was acknowledged or served again (none lost)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from short_run import pid_of, wait_for

from forgerl.local.topology import LocalTopology
from forgerl.runtime.client import insecure_channel
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]
RL_STEPS = 6


def _forgerl(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([*FORGERL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"forgerl {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _progress(runs: Path, run_id: str) -> dict[str, Any] | None:
    path = runs / run_id / "state" / "progress.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


def test_trainer_killed_mid_rl_resumes_through_the_services(topology_file: Path, tmp_path: Path) -> None:
    topology = LocalTopology.load(topology_file)
    runs = tmp_path / "runs"
    env = {
        **os.environ,
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "FORGERL_TRAINER_RUNS_DIR": str(runs),
        "FORGERL_TRAINER_EVAL_TASKS": "8",
    }
    config = {
        "name": "restart",
        "model_preset": "debug",
        "init_checkpoint": str(topology.initial_model_path.resolve()),
        "seed": 0,
        "checkpoint_every": 1,
        "sft": {"steps": 4, "batch_size": 4, "learning_rate": 3e-3},
        "rl": {"steps": RL_STEPS, "batch_size": 16, "group_size": 4, "episodes_in_flight": 16, "max_staleness": 4},
    }
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config))
    try:
        _forgerl(env, "up", "--detach", "--config", str(topology_file), timeout=600)
        started = _forgerl(env, "run", "start", str(config_path), "--topology", str(topology_file), "--detach")
        match = re.search(r"run (\S+) started", started)
        assert match, started
        run_id = match.group(1)

        wait_for("two RL steps", lambda: (_progress(runs, run_id) or {}).get("rl_step", 0) >= 2, 600)
        os.killpg(pid_of(topology, "trainer"), signal.SIGKILL)
        killed_at = _progress(runs, run_id)
        assert killed_at is not None and 2 <= killed_at["rl_step"] < RL_STEPS, killed_at

        _forgerl(env, "restart", "trainer", "--config", str(topology_file), timeout=300)
        trainer = trainer_pb2_grpc.TrainerServiceStub(insecure_channel(topology.address("trainer")))

        def finished() -> run_pb2.Run | None:
            run = trainer.GetRun(trainer_pb2.GetRunRequest(run_id=run_id), timeout=10).run
            assert run.state not in (run_pb2.RUN_STATE_FAILED, run_pb2.RUN_STATE_STOPPED), run.error
            return run if run.state == run_pb2.RUN_STATE_SUCCEEDED else None

        wait_for("the resumed run to finish", finished, 600, every_s=2.0)
        datapool = datapool_pb2_grpc.DatapoolServiceStub(insecure_channel(topology.address("datapool")))
        stats = datapool.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id), timeout=10)
    finally:
        subprocess.run([*FORGERL, "down", "--config", str(topology_file)], capture_output=True, timeout=120, env=env)

    final = _progress(runs, run_id)
    assert final is not None and final["stage"] == "done" and final["rl_step"] == RL_STEPS
    trained = final["trained_trajectory_ids"]
    assert len(trained) == len(set(trained)) == final["trained_trajectories"] > 0  # none twice
    assert len(final["trained_batches"]) == len(set(final["trained_batches"])) == RL_STEPS
    # None lost: nothing is left served-but-unacknowledged, and every served trajectory was acknowledged
    # (trained, or skipped as already trained) or served again after the dead trainer's batch expired.
    assert stats.in_flight == 0, stats
    assert stats.served == stats.acknowledged + stats.redelivered, stats
    assert stats.acknowledged >= len(trained), stats
    log = (topology.logs_dir / "trainer.log").read_text()
    assert f"resumed run {run_id}" in log
