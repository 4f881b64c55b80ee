"""Model presets for runs: `model_config` (forgerl.model's PRESETS, with overrides) and the initial
checkpoint a local topology serves before the first training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgerl.model import ModelConfig


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset of forgerl.model (`debug`, `tiny`, `small`, `minimax-m2`, ...) with overrides."""
    return ModelConfig.from_preset(name, **overrides)


def ensure_initial_checkpoint(path: Path, preset: str, seed: int = 0) -> Path:
    """forgerl.local.bootstrap.ensure_initial_checkpoint for any preset of `model_config`: fresh weights
    and the tokenizer trained on the built-in corpus, written atomically; kept if already there."""
    if (path / "config.json").exists():
        return path
    import torch

    from forgerl.model import MiniMaxM2ForCausalLM, save_checkpoint
    from forgerl.model.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(vocab_size=4096)
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(model_config(preset, vocab_size=len(tokenizer)))
    partial = path.with_name(path.name + ".partial")
    save_checkpoint(model, tokenizer, partial)
    partial.rename(path)
    return path
