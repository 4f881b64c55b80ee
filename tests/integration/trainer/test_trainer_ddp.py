"""The trainer under torchrun: two CPU processes (gloo), DDP, SFT then RL on in-process episodes; RL grows
the MTP modules to 2 and trains them (computed outside DDP's forward, their gradients still reach DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration


def test_two_ranks_train_and_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> None:
    config = {
        "name": "ddp",
        "model_preset": "debug",
        "seed": 1,
        "checkpoint_every": 2,
        "sft": {"steps": 2, "batch_size": 4, "learning_rate": 3e-3},
        "rl": {
            "steps": 2,
            "batch_size": 8,
            "group_size": 4,
            "learning_rate": 1e-3,
            "mtp_loss_weight": 0.1,
            "grow_mtp_to": 2,
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    from forgerl.runtime.testing import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "forgerl.trainer.worker", str(path), "--run-id", "ddp1", "--runs-dir", str(tmp_path / "runs"),
        "--eval-tasks", "4", "--tokenizer", str(tokenizer_dir), "--local-episodes",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=480, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stage"] == "done" and result["rl_step"] == 2
    run_dir = tmp_path / "runs" / "ddp1"
    assert (run_dir / "checkpoints" / "rl-00002" / "model.safetensors").exists()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["stage"] == "rl" and "loss" in m] == [3, 4]
    assert [m["step"] for m in lines if m["stage"] == "rl" and "mtp/loss_2" in m] == [3, 4]
    saved = json.loads((run_dir / "checkpoints" / "rl-00002" / "config.json").read_text())
    assert saved["num_mtp_modules"] == 2
