"""A whole run in-process (SFT, then RL on in-process episodes), and resume: a run stopped mid-way and
started again produces exactly the losses of an uninterrupted run (fixed seeds, CPU), and never trains a
batch twice. RL grows the MTP modules from 1 to 2 and trains them: the MTP loss is in every RL step's
metrics, and resuming after the growth is exact too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import run_config_from_dict

pytestmark = pytest.mark.integration

CONFIG = {
    "name": "resume-test",
    "model_preset": "debug",
    "suite": "tooluse",
    "seed": 3,
    "checkpoint_every": 2,
    # Schedules in both stages: a resumed run must pick up each step's rate where it stopped.
    "sft": {
        "steps": 4,
        "batch_size": 4,
        "learning_rate": 3e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "examples": 40,
    },
    "rl": {
        "steps": 4,
        "batch_size": 8,
        "group_size": 4,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "mtp_loss_weight": 0.1,
        "grow_mtp_to": 2,
    },
}


def _settings(tmp: Path, tokenizer_dir: Path) -> TrainerSettings:
    return TrainerSettings(
        runs_dir=tmp, eval_tasks=4, eval_every=2, max_new_tokens=12,
        tokenizer_path=str(tokenizer_dir), local_episodes=True,
    )  # fmt: skip


def _run(tmp: Path, tokenizer_dir: Path, stop_at: tuple[str, int] | None = None) -> tuple[TrainingRun, list]:
    losses: list[tuple[str, int, float]] = []
    holder: dict[str, TrainingRun] = {}

    def sink(stage: str, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            losses.append((stage, step, values["loss"]))
            if stage == "rl":
                losses.append((stage, step, values["mtp/loss_2"]))
            if stop_at == (stage, step):
                holder["run"].stop()

    run = TrainingRun("r1", run_config_from_dict(CONFIG), _settings(tmp, tokenizer_dir), sink=sink)
    holder["run"] = run
    run.run()
    return run, losses


@pytest.mark.parametrize("stop_at", [("sft", 2), ("rl", 6)])
def test_resumed_run_equals_uninterrupted(tmp_path: Path, tokenizer_dir: Path, stop_at: tuple[str, int]) -> None:
    full, full_losses = _run(tmp_path / "full", tokenizer_dir)
    assert full.progress.stage == "done" and full.progress.rl_step == 4
    assert full.progress.sft_heldout is not None and full.progress.final_heldout is not None

    first, first_losses = _run(tmp_path / "split", tokenizer_dir, stop_at=stop_at)
    assert first.progress.stage != "done"
    second, second_losses = _run(tmp_path / "split", tokenizer_dir)
    assert second.progress.stage == "done"
    assert first_losses + second_losses == full_losses  # bit for bit
    trained = second.progress.trained_trajectory_ids
    assert len(trained) == len(set(trained)) == 4 * 8
    progress = json.loads((tmp_path / "split" / "r1" / "state" / "progress.json").read_text())
    assert progress["unacked"] == [] or progress["stage"] == "done"
    checkpoints = sorted(p.name for p in (tmp_path / "split" / "r1" / "checkpoints").iterdir())
    assert checkpoints == ["rl-00002", "rl-00004", "sft-00004"]
    assert (tmp_path / "split" / "r1" / "checkpoints" / "rl-00004" / "model.safetensors").exists()
    config = json.loads((tmp_path / "split" / "r1" / "checkpoints" / "rl-00004" / "config.json").read_text())
    assert config["num_mtp_modules"] == 2 and len(second.model.mtp) == 2
