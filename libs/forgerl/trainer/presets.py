"""Model sizes for runs, on top of forgerl.model's PRESETS.

`tiny` is the size `make run` trains on a 2-core CPU: the debug preset's layout (2 layers of 8 experts,
top 2, one MTP module) at width 128 with full-width RoPE at base 10^4. The learnability experiment
(forgerl.trainer.learnability) found that the debug preset's partial RoPE (8 of 16 channels at base
5*10^6, M2's long-context setting) leaves too little relative-position signal for a two-layer model to
learn to copy numbers within a few hundred steps: 800 SFT steps reached 5% held-out success on the tool-use
suite, where `tiny` reached 25% after 600 steps. (To move into forgerl.model.config.PRESETS.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgerl.model import PRESETS, ModelConfig

EXTRA_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 128,
        "head_dim": 32,
        "rotary_dim": 32,
        "rope_theta": 10_000.0,
    },
}


def model_config(name: str, **overrides: Any) -> ModelConfig:
    """A preset of forgerl.model, or one of EXTRA_PRESETS (debug plus its changes)."""
    if name in PRESETS:
        return ModelConfig.from_preset(name, **overrides)
    if name in EXTRA_PRESETS:
        return ModelConfig.from_preset("debug", **{**EXTRA_PRESETS[name], **overrides})
    raise ValueError(f"unknown model preset {name!r}: choose one of {sorted({*PRESETS, *EXTRA_PRESETS})}")


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
