"""Checkpoints and reference outputs for tests and benchmarks of the inference service.

`make_checkpoint` writes a checkpoint of our own model (forgerl.model) with weights drawn at a scale that
makes greedy decoding non-degenerate; `reference_greedy` decodes it with the PyTorch model, the reference
vLLM must match (tokens, logprobs, routed experts).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def make_checkpoint(path: str | Path, preset: str = "debug", seed: int = 0, **overrides: Any) -> Path:
    """A float32 checkpoint of forgerl.model's `preset`, random but deterministic for `seed`."""
    import torch

    from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint

    generator = torch.Generator().manual_seed(seed)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset(preset, **overrides))
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return save_checkpoint(model, None, path)


def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """The same weights in another directory (a 'new' version with known outputs)."""
    return Path(shutil.copytree(src, dst))


@dataclass(frozen=True)
class Reference:
    token_ids: list[int]
    logprobs: list[float]
    # [num_tokens, num_layers, top_k]: the experts of the forward pass that produced each token
    routed_experts: Any


def reference_greedy(path: str | Path, prompt: list[int], max_tokens: int) -> Reference:
    """Greedy decoding with the PyTorch model of forgerl.model, full recompute at every step (fp32)."""
    import torch

    from forgerl.model import load_checkpoint

    model = load_checkpoint(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    tokens: list[int] = []
    logprobs: list[float] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            out = model(ids)
            lp = torch.log_softmax(out.logits[0, -1].double(), -1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    routed = out.routed_experts[0, len(prompt) - 1 :].numpy()
    return Reference(tokens, logprobs, routed)
