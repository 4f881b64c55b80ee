"""The trainer service's test config: in-process episodes, a tiny held-out evaluation, a debug model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint
from forgerl.model.tokenizer import load_tokenizer
from forgerl.services.trainer.config import TrainerConfig


@pytest.fixture
def config(tmp_path: Path, tokenizer_dir: Path) -> TrainerConfig:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    save_checkpoint(MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=len(tok))), tok, tmp_path / "init")
    return TrainerConfig(
        state_dir=tmp_path / "state",
        runs_dir=str(tmp_path / "runs"),
        inference_model_path=str(tmp_path / "init"),
        local_episodes=True,
        eval_tasks=4,
        eval_every=2,
        max_new_tokens=12,
    )
