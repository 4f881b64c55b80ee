"""kill -9 of the trainer service mid-run, then a new trainer process: the run resumes from its saved
state and finishes; no batch is trained twice and none is lost (in-process episodes; the data-pool side of
the same contract is tests/integration/datapool's redelivery tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint
from forgerl.model.tokenizer import load_tokenizer
from forgerl.runtime.client import health_status, insecure_channel
from forgerl.runtime.testing import free_port
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.integration

RUN = {
    "name": "kill",
    "seed": 0,
    "checkpoint_every": 2,
    "sft": {"steps": 4, "batch_size": 4, "learning_rate": 3e-3},
    "rl": {"steps": 6, "batch_size": 8, "group_size": 4},
}


def _start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "forgerl.services.trainer.main"]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_serving(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the trainer exited"
        if health_status(address) == "SERVING":
            return
        time.sleep(0.5)
    raise TimeoutError("trainer not SERVING")


def test_kill_and_restart(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    save_checkpoint(MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=len(tok))), tok, tmp_path / "init")
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "FORGERL_TRAINER_PORT": str(port),
        "FORGERL_TRAINER_STATE_DIR": str(tmp_path / "state"),
        "FORGERL_TRAINER_RUNS_DIR": str(tmp_path / "runs"),
        "FORGERL_TRAINER_INFERENCE_MODEL_PATH": str(tmp_path / "init"),
        "FORGERL_TRAINER_LOCAL_EPISODES": "true",
        "FORGERL_TRAINER_EVAL_TASKS": "4",
        "FORGERL_TRAINER_MAX_NEW_TOKENS": "12",
    }
    log = tmp_path / "trainer.log"
    proc = _start(env, log)
    try:
        _wait_serving(address, proc)
        stub = trainer_pb2_grpc.TrainerServiceStub(insecure_channel(address))
        run = stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(RUN)), timeout=30).run
        for resp in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run.run_id), timeout=300):
            if resp.metrics.stage == "rl" and resp.metrics.step >= 6 and "loss" in resp.metrics.values:
                break  # two RL steps trained
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        killed_at = json.loads((tmp_path / "runs" / run.run_id / "state" / "progress.json").read_text())["rl_step"]
        assert 2 <= killed_at < 6

        proc = _start(env, log)  # resumes the RUNNING run from the store
        _wait_serving(address, proc)
        stub = trainer_pb2_grpc.TrainerServiceStub(insecure_channel(address))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                done = stub.GetRun(trainer_pb2.GetRunRequest(run_id=run.run_id), timeout=10).run
            except grpc.RpcError:
                done = None
            if done is not None and done.state != run_pb2.RUN_STATE_RUNNING:
                break
            time.sleep(1)
        assert done is not None and done.state == run_pb2.RUN_STATE_SUCCEEDED, done and done.error
        progress = json.loads((tmp_path / "runs" / run.run_id / "state" / "progress.json").read_text())
        assert progress["rl_step"] == 6 and progress["stage"] == "done"
        trained = progress["trained_trajectory_ids"]
        assert len(trained) == len(set(trained)) == 6 * 8  # every batch trained exactly once
        steps = [
            r.metrics.step
            for r in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run.run_id), timeout=60)
            if r.metrics.stage == "rl" and "loss" in r.metrics.values
        ]
        assert steps == [5, 6, 7, 8, 9, 10]  # every RL step once in the store, none lost, none twice
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
