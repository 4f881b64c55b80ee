"""Aux-loss-free expert balancing (DeepSeek-V3 sec. 2.1.2, used by MiniMax-M2) and load metrics.

Shape legend: L MoE layers (main layers, then MTP blocks), E experts.

Every training forward adds the tokens routed to each expert to the layer's `tokens_per_expert` buffer.
After each optimizer step, `update_expert_bias` sums those counts over data-parallel ranks and moves every
layer's bias by  u * sign(mean_load - load_i): under-loaded experts become likelier to be chosen, over-loaded
ones less. The bias only changes *which* experts are chosen, never their weights (moe.route).
Activation checkpointing recounts a layer's tokens when it recomputes its forward; that doubles all of the
layer's counts alike, which the sign rule does not see.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from forgerl.model.moe import SparseMoeBlock


def moe_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The MoE blocks in module order (main layers first, then the MTP modules); sees through wrappers."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float, group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """One bias step from the counts gathered since the last call; resets the counts. Returns load metrics.

    Call it on every rank after `optimizer.step()`: the counts are all-reduced so every rank takes the same
    step and the (unsharded, unsynchronised) bias buffers stay equal."""
    blocks = moe_blocks(model)
    if not blocks:
        return {}
    load_LE = torch.stack([block.tokens_per_expert for block in blocks])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(load_LE, group=group)
    for block, load_E in zip(blocks, load_LE, strict=True):
        step_E = rate * torch.sign(load_E.mean() - load_E)
        block.e_score_correction_bias += step_E.to(block.e_score_correction_bias.dtype)
        block.tokens_per_expert.zero_()
    return expert_load_metrics(load_LE)


def register_bias_update(
    optimizer: torch.optim.Optimizer, model: nn.Module, rate: float, group: dist.ProcessGroup | None = None
) -> RemovableHandle:
    """Run update_expert_bias after every optimizer.step(); `.remove()` the returned handle to stop."""

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        update_expert_bias(model, rate, group)

    return optimizer.register_step_post_hook(hook)


def expert_load_metrics(load_LE: torch.Tensor) -> dict[str, float]:
    """Per-layer `moe/layer_{l}/max_violation` = (max_i load_i - mean) / mean (DeepSeek's MaxVio; 0 is
    perfect balance, E/K - 1 all tokens on K experts) and their mean `moe/max_violation`."""
    load_LE = load_LE.double()
    mean_L = load_LE.mean(dim=-1).clamp(min=1e-12)
    violation_L = (load_LE.max(dim=-1).values - mean_L) / mean_L
    metrics = {f"moe/layer_{layer}/max_violation": v for layer, v in enumerate(violation_L.tolist())}
    metrics["moe/max_violation"] = violation_L.mean().item()
    return metrics
