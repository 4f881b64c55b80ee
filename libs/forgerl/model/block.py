"""One decoder layer of MiniMax-M2 (shared by the main stack and the MTP modules).

Shape legend: B batch, T positions, S key positions, D hidden, K experts per token, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from forgerl.model.attention import TreeMask, build_attention
from forgerl.model.config import ModelConfig
from forgerl.model.layers import RMSNorm
from forgerl.model.moe import SparseMoeBlock, sequence_balance_loss


class LayerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: FSDP2 finds the output tensors to hook for backward through pytree."""

    x_BTD: torch.Tensor
    expert_ids_BTK: torch.Tensor
    load_E: torch.Tensor
    balance_loss: torch.Tensor | None


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + moe(norm(h))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.block_sparse_moe = SparseMoeBlock(cfg)
        self.with_balance_loss = cfg.seq_aux_loss_coef > 0

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_BTS: torch.Tensor | TreeMask | None,
        replay_ids_BTK: torch.Tensor | None = None,
    ) -> LayerOutput:
        h_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope_cos_sin, mask_BTS)
        moe_BTD, routing, load_E = self.block_sparse_moe(self.post_attention_layernorm(h_BTD), replay_ids_BTK)
        b, t, _ = x_BTD.shape
        expert_ids_BTK = routing.expert_ids_NK.view(b, t, -1)
        balance_loss = None
        if self.with_balance_loss and self.training:
            balance_loss = sequence_balance_loss(routing.scores_NE.view(b, t, -1), expert_ids_BTK)
        return LayerOutput(h_BTD + moe_BTD, expert_ids_BTK, load_E, balance_loss)
