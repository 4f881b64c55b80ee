"""A run config's `trainer: {moe_backend: triton, attn_backend: tree}` reaches the model the trainer
trains (issue 19 item 6): every layer's experts run on kernels/fused_moe and its attention on the
tree-attention kernel. One trainer SFT step on the fused-MoE kernel (forward and backward) gives the loss
and grad norm of the same step on the torch experts within 1e-4; test_training_path.py checks whole steps
on the tree kernel. Under Triton's CPU interpreter (conftest): one step of one example takes ~30 s of CPU."""

from pathlib import Path
from typing import Any

import pytest
from kernel_cases import DEVICES

from forgerl.kernels.fused_moe import fused_experts
from forgerl.kernels.tree_attention.adapter import tree_attention_backend
from forgerl.model import MiniMaxM2ForCausalLM
from forgerl.model.attention import Attention
from forgerl.model.moe import Experts
from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import run_config_from_dict

STEP_TOLERANCE = 1e-4  # the bound for a step on the kernels


def _sft_run(tmp: Path, tokenizer_dir: Path, trainer: dict[str, Any], steps: int) -> tuple[TrainingRun, list]:
    """`steps` SFT steps of one example on the debug preset (no RL, no evaluation); each step's loss and
    grad norm."""
    data = {"seed": 2, "sft": {"steps": steps, "batch_size": 1, "examples": 1}, "rl": {"steps": 0}, "trainer": trainer}
    settings = TrainerSettings(runs_dir=tmp, eval_tasks=0, tokenizer_path=str(tokenizer_dir), local_episodes=True)
    figures: list[tuple[float, float]] = []

    def sink(stage: str, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            figures.append((values["loss"], values["grad_norm"]))

    run = TrainingRun("r", run_config_from_dict(data), settings, sink=sink)
    run.run()
    return run, figures


def _experts(model: MiniMaxM2ForCausalLM) -> list[Experts]:
    """Every Experts module: the decoder layers' and the MTP modules'."""
    return [m for m in model.modules() if isinstance(m, Experts)]


@pytest.mark.parametrize("device", DEVICES[:1])
def test_run_config_kernels_reach_the_trained_model(device: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    run, _ = _sft_run(tmp_path, tokenizer_dir, {"moe_backend": "triton", "attn_backend": "tree"}, steps=0)
    assert (run.model.config.moe_backend, run.model.config.attn_backend) == ("triton", "tree")
    layers = run.model.config.num_hidden_layers + run.model.config.num_mtp_modules
    assert [e.kernel for e in _experts(run.model)] == [fused_experts] * layers
    attentions = [m for m in run.model.modules() if isinstance(m, Attention)]
    assert [a.backend for a in attentions] == [tree_attention_backend] * layers


@pytest.mark.parametrize("device", DEVICES[:1])
def test_a_trainer_step_on_the_moe_kernel_equals_the_torch_step(
    device: str, tmp_path: Path, tokenizer_dir: Path
) -> None:
    kernel_run, kernel_steps = _sft_run(tmp_path / "kernel", tokenizer_dir, {"moe_backend": "triton"}, steps=1)
    torch_run, torch_steps = _sft_run(tmp_path / "torch", tokenizer_dir, {}, steps=1)
    assert {e.kernel for e in _experts(kernel_run.model)} == {fused_experts}
    assert {e.kernel for e in _experts(torch_run.model)} == {None}
    assert len(kernel_steps) == len(torch_steps) == 1
    (loss, norm), (ref_loss, ref_norm) = kernel_steps[0], torch_steps[0]
    assert loss == pytest.approx(ref_loss, abs=STEP_TOLERANCE)
    assert norm == pytest.approx(ref_norm, abs=STEP_TOLERANCE)
