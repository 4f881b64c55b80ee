"""What the local topology needs before it starts: an initial checkpoint for inference to serve."""

from __future__ import annotations

from pathlib import Path


def ensure_initial_checkpoint(path: Path, preset: str = "debug", seed: int = 0) -> Path:
    """Create a freshly initialised checkpoint of `preset` (with a tokenizer trained on the built-in
    corpus) at `path` unless one is there already; return `path`."""
    if (path / "config.json").exists():
        return path
    # Imported here: torch and transformers take seconds to import and most CLI commands need neither.
    import torch

    from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint
    from forgerl.model.tokenizer import train_tokenizer

    config = ModelConfig.from_preset(preset)
    tokenizer = train_tokenizer(vocab_size=config.vocab_size)
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(config)
    partial = path.with_name(path.name + ".partial")
    save_checkpoint(model, tokenizer, partial)
    partial.rename(path)  # a crash half-way never leaves something that looks complete
    return path
