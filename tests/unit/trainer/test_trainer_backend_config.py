"""`trainer.moe_backend` / `trainer.attn_backend` in a run file (issue 19 item 6): the names are the
model's registries', bad values are refused with the key named, and a set backend reaches the model the
trainer builds from a preset, from init_checkpoint and from its saved state. Here with the torch
backends (`eager` attention, no Triton); tests/unit/kernels/test_trainer_kernels.py runs the Triton ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint
from forgerl.model.attention import ATTENTION_BACKENDS, KERNEL_BACKENDS, Attention, eager_attention, sdpa_attention
from forgerl.model.moe import MOE_KERNELS
from forgerl.model.tokenizer import load_tokenizer
from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import ATTN_BACKENDS, MOE_BACKENDS, model_overrides, run_config_from_dict

pytestmark = pytest.mark.unit

SHORT_RUN: dict[str, Any] = {
    "model_preset": "debug",
    "seed": 1,
    "sft": {"steps": 2, "batch_size": 2, "examples": 4},
    "rl": {"steps": 0},
}


def test_the_names_are_the_models() -> None:
    assert set(MOE_BACKENDS) == {"torch", *MOE_KERNELS}
    assert {"sdpa", "eager"} <= set(ATTENTION_BACKENDS)  # tests may register more at run time
    assert set(ATTN_BACKENDS) == {"sdpa", "eager", *KERNEL_BACKENDS}


def test_unset_changes_nothing_and_set_fields_override() -> None:
    assert model_overrides(run_config_from_dict({})) == {}
    config = run_config_from_dict({"trainer": {"moe_backend": "triton", "attn_backend": "tree"}})
    assert model_overrides(config) == {"moe_backend": "triton", "attn_backend": "tree"}
    assert model_overrides(run_config_from_dict({"trainer": {"attn_backend": "eager"}})) == {"attn_backend": "eager"}


def test_bad_values_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"trainer\.moe_backend 'cuda' is not one of \('torch', 'triton'\)"):
        run_config_from_dict({"trainer": {"moe_backend": "cuda"}})
    with pytest.raises(ValueError, match=r"trainer\.attn_backend 'flash' is not one of"):
        run_config_from_dict({"trainer": {"attn_backend": "flash"}})
    with pytest.raises(ValueError, match=r"trainer\.attn_backend 'msa' is causal only .* rl\.prefix_merge: false"):
        run_config_from_dict({"trainer": {"attn_backend": "msa"}})  # prefix_merge is on by default
    msa = run_config_from_dict({"trainer": {"attn_backend": "msa"}, "rl": {"prefix_merge": False}})
    assert model_overrides(msa) == {"attn_backend": "msa"}


def _attention_backends(model: MiniMaxM2ForCausalLM) -> set[object]:
    """The backends of every attention module (decoder layers and MTP modules)."""
    return {m.backend for m in model.modules() if isinstance(m, Attention)}


def _run(tmp: Path, tokenizer_dir: Path, data: dict[str, Any], run_id: str = "r") -> tuple[TrainingRun, list]:
    """A two-step SFT run (no RL, no evaluation); returns it and each step's (loss, grad norm)."""
    settings = TrainerSettings(
        runs_dir=tmp, eval_tasks=0, tokenizer_path=str(tokenizer_dir), local_episodes=True, max_new_tokens=4
    )
    steps: list[tuple[float, float]] = []

    def sink(stage: str, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            steps.append((values["loss"], values["grad_norm"]))

    run = TrainingRun(run_id, run_config_from_dict({**SHORT_RUN, **data}), settings, sink=sink)
    run.run()
    return run, steps


def test_the_backend_reaches_the_trained_model_from_a_preset(tmp_path: Path, tokenizer_dir: Path) -> None:
    default, default_steps = _run(tmp_path / "default", tokenizer_dir, {})
    assert _attention_backends(default.model) == {sdpa_attention}
    eager, eager_steps = _run(tmp_path / "eager", tokenizer_dir, {"trainer": {"attn_backend": "eager"}})
    assert eager.model.config.attn_backend == "eager"
    assert _attention_backends(eager.model) == {eager_attention}
    # The same two SFT steps either way: the attention kernel changes no figure beyond float32 rounding.
    assert len(eager_steps) == len(default_steps) == 2
    for got, want in zip(eager_steps, default_steps, strict=True):
        assert got == pytest.approx(want, rel=1e-5)


def test_the_backend_reaches_a_model_from_init_checkpoint_and_from_saved_state(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_checkpoint(MiniMaxM2ForCausalLM(ModelConfig(vocab_size=len(tokenizer))), tokenizer, init)
    assert '"attn_backend": "sdpa"' in (init / "config.json").read_text()  # what the checkpoint says
    run, _ = _run(
        tmp_path / "runs", tokenizer_dir, {"init_checkpoint": str(init), "trainer": {"attn_backend": "eager"}}
    )
    assert _attention_backends(run.model) == {eager_attention}
    # Resumed from its saved state (saved with eager) under a run config asking for sdpa: sdpa it is.
    resumed, steps = _run(
        tmp_path / "runs", tokenizer_dir, {"init_checkpoint": str(init), "trainer": {"attn_backend": "sdpa"}}
    )
    assert resumed.progress.sft_step == 2 and steps == []  # loaded, not trained again
    assert _attention_backends(resumed.model) == {sdpa_attention}
