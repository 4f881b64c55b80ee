"""The trainer's model, MiniMax-M2 or MiniMax-M3: its config from a preset or a checkpoint, and loading and
saving it with its own architecture's classes.

Which one a run trains is decided once (run_config.is_m3_run: init_checkpoint's config.json, else
model_preset). M2 checkpoints are forgerl.model.checkpoint's (what vLLM's MiniMaxM2ForCausalLM serves);
M3 checkpoints are m3_checkpoint's (what transformers' MiniMaxM3VLForCausalLM loads), with the tokenizer's
files beside them in both cases.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from forgerl.model import (
    M3_PRESETS,
    M3Config,
    MiniMaxM2ForCausalLM,
    MiniMaxM3ForCausalLM,
    ModelConfig,
    load_checkpoint,
    load_m3_checkpoint,
    save_checkpoint,
    save_m3_checkpoint,
)
from forgerl.model.checkpoint import config_from_hf
from forgerl.model.m3_checkpoint import config_from_hf as m3_config_from_hf
from forgerl.trainer.run_config import is_m3_hf_config

PolicyNet = MiniMaxM2ForCausalLM | MiniMaxM3ForCausalLM


def config_from_checkpoint(hf: dict[str, Any], overrides: Mapping[str, Any]) -> ModelConfig:
    """The model config of a checkpoint's config.json, M3Config for an M3 one, with `overrides` applied."""
    cfg = m3_config_from_hf(hf) if is_m3_hf_config(hf) else config_from_hf(hf)
    return cfg.replace(**overrides)


def config_from_preset(preset: str, tokenizer: Any, overrides: Mapping[str, Any], with_mtp: bool) -> ModelConfig:
    """A fresh model's config at the tokenizer's size. An M3 preset has no MTP module (transformers' shape);
    with_mtp (the run trains an MTP loss) gives it one, the number vLLM's M3 config defaults to. Its eos and
    pad ids are the tokenizer's, as save_checkpoint fills them for M2."""
    if preset not in M3_PRESETS:
        return ModelConfig.from_preset(preset, vocab_size=len(tokenizer), **overrides)
    return M3Config.from_preset(
        preset,
        vocab_size=len(tokenizer),
        num_mtp_modules=1 if with_mtp else 0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def build_policy(cfg: ModelConfig) -> PolicyNet:
    return MiniMaxM3ForCausalLM(cfg) if isinstance(cfg, M3Config) else MiniMaxM2ForCausalLM(cfg)


def load_policy(path: str | Path, overrides: Mapping[str, Any], *, strict: bool = True) -> PolicyNet:
    """The float32 model of a checkpoint directory, with its architecture's loader. `strict` is M2's (missing
    MTP tensors keep their initialisation); the M3 loader always requires every tensor its config names."""
    hf = json.loads(Path(path, "config.json").read_text())
    if is_m3_hf_config(hf):
        return load_m3_checkpoint(path, dtype=torch.float32, overrides=overrides)
    return load_checkpoint(path, dtype=torch.float32, strict=strict, overrides=overrides)


def save_policy(model: PolicyNet, tokenizer: Any, path: Path) -> Path:
    """Write the model (with its architecture's names and config.json) and the tokenizer's files to `path`.
    M2: every rank calls it under torch.distributed (rank 0 writes); M3 runs are one process."""
    if not isinstance(model, MiniMaxM3ForCausalLM):
        return save_checkpoint(model, tokenizer, path)
    from forgerl.model.tokenizer import save_tokenizer  # transformers: imported when needed (~3.5 s)

    save_m3_checkpoint(model, path)
    save_tokenizer(tokenizer, path)
    return path
