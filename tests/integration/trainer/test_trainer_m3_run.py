"""A whole run of MiniMax-M3 (issue 20 item 5): TrainingRun on a minimax-m3-tiny init checkpoint with one MTP
module, SFT then CISPO steps on in-process episodes (the trainer's own model samples them; vLLM's M3 path
needs a GPU), held-out evaluation, checkpoints published, and resume. The published checkpoint loads in
transformers' MiniMaxM3VLForCausalLM with the trainer model's logits, at a length where the indexer drops
key blocks; a run stopped after its first RL step and started again gives the uninterrupted run's losses."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_m3

from forgerl.model import M3Config, MiniMaxM3ForCausalLM, load_m3_checkpoint, save_m3_checkpoint
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer
from forgerl.trainer import worker
from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import run_config_from_dict

pytestmark = pytest.mark.integration

CONFIG: dict[str, Any] = {
    "name": "m3-local",
    "suite": "tooluse",
    "seed": 5,
    "checkpoint_every": 2,
    "sft": {"steps": 8, "batch_size": 8, "learning_rate": 1e-2, "examples": 40},
    "rl": {
        "steps": 3,
        "batch_size": 8,
        "group_size": 4,
        "learning_rate": 1e-3,
        "prefix_merge": False,  # refused for M3 (test_trainer_m3_config.py)
        "mtp_loss_weight": 0.1,
    },
}


@pytest.fixture(scope="module")
def m3_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A fresh minimax-m3-tiny with one MTP module, written as m3_checkpoint writes it, tokenizer beside it."""
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    cfg = M3Config.from_preset("minimax-m3-tiny", vocab_size=len(tokenizer), num_mtp_modules=1)
    path = save_m3_checkpoint(MiniMaxM3ForCausalLM(cfg), tmp_path_factory.mktemp("m3-init"))
    save_tokenizer(tokenizer, path)
    return path


def _run(runs: Path, init: Path, stop_after: tuple[str, int] | None = None) -> tuple[TrainingRun, list, list]:
    """The run's losses (SFT; RL's CISPO + MTP and MTP alone) and its RL steps' metrics."""
    losses: list[tuple[str, int, float]] = []
    rl_metrics: list[dict[str, float]] = []
    holder: dict[str, TrainingRun] = {}

    def sink(stage: str, step: int, values: dict[str, float]) -> None:
        if "loss" not in values:
            return
        losses.append((stage, step, values["loss"]))
        if stage == "rl":
            losses.append((stage, step, values["mtp/loss_1"]))
            rl_metrics.append(values)
        if stop_after == (stage, step):
            holder["run"].stop()

    settings = TrainerSettings(runs_dir=runs, eval_tasks=2, eval_every=3, max_new_tokens=12, local_episodes=True)
    run = TrainingRun("m3", run_config_from_dict({**CONFIG, "init_checkpoint": str(init)}), settings, sink=sink)
    holder["run"] = run
    run.run()
    return run, losses, rl_metrics


def test_m3_run_trains_publishes_and_resumes(tmp_path: Path, m3_checkpoint: Path) -> None:
    run, losses, rl_metrics = _run(tmp_path / "full", m3_checkpoint)
    assert isinstance(run.model, MiniMaxM3ForCausalLM)
    assert run.progress.stage == "done" and run.progress.rl_step == 3
    assert run.progress.sft_heldout is not None and run.progress.final_heldout is not None
    sft = [loss for stage, _, loss in losses if stage == "sft"]
    assert len(sft) == 8 and sft[-1] < 0.7 * sft[0], sft
    assert len(rl_metrics) == 3 and all(math.isfinite(loss) for _, _, loss in losses)
    # CISPO had something to learn (groups with unequal rewards), and the in-process sampler's log-probs
    # are the training forward's (ratio 1: the uncached M3 sampler reads the same logits).
    assert any(m["advantage/abs_mean"] > 0 and m["policy/loss"] != 0 for m in rl_metrics)
    assert all(abs(m["cispo/approx_kl"]) < 1e-6 and m["mtp/loss_1"] > 0 for m in rl_metrics)
    published = sorted(p.name for p in (run.dir / "checkpoints").iterdir())
    assert published == ["rl-00002", "rl-00003", "sft-00008"]

    # The last published checkpoint in transformers' M3, against the trainer's model, 40 tokens (the indexer
    # keeps 3 blocks of 4 keys: it drops blocks from position 12 on).
    final = run.dir / "checkpoints" / "rl-00003"
    assert json.loads((final / "config.json").read_text())["model_type"] == "minimax_m3_vl_text"
    reference = hf_m3.MiniMaxM3VLForCausalLM.from_pretrained(final, dtype=torch.float32, attn_implementation="eager")
    probe = torch.randint(0, run.model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    model = run.model.eval()
    with torch.no_grad():
        ours, theirs = model(probe), reference.eval()(probe).logits
    assert all(((blocks >= 0).sum(-1) < 10).any() for blocks in ours.block_indices.values())  # 10 visible
    assert (ours.logits - theirs).abs().max().item() <= 1e-5
    reloaded = load_m3_checkpoint(final).state_dict()  # MTP module and routing bias included
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name

    # Stopped after RL step 1 (global step 9) and started again: the same losses, bit for bit.
    first, first_losses, _ = _run(tmp_path / "split", m3_checkpoint, stop_after=("rl", 9))
    assert first.progress.stage == "rl" and first.progress.rl_step == 1
    second, second_losses, _ = _run(tmp_path / "split", m3_checkpoint)
    assert second.progress.stage == "done"
    assert first_losses + second_losses == losses


def test_worker_refuses_m3_through_the_services(tmp_path: Path, m3_checkpoint: Path) -> None:
    """Without --local-episodes the worker publishes to vLLM: refused before any model is built."""
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({**CONFIG, "init_checkpoint": str(m3_checkpoint)}))
    with pytest.raises(ValueError, match="vLLM's M3 path needs a GPU"):
        worker.main([str(config), "--run-id", "m3", "--runs-dir", str(tmp_path / "runs")])
    assert not (tmp_path / "runs" / "m3" / "state").exists()
