"""MiniMax-M2: a decoder-only sparse-MoE transformer, single-device (parallel wrappers live in sharding.py).

Shape legend: B batch, T positions, D hidden, V vocab, L main layers, E experts, K experts per token.

Module and parameter names are those of the Hugging Face MiniMax-M2 checkpoint
(`model.layers.N.self_attn.q_proj.weight`, `model.layers.N.block_sparse_moe.gate.weight`, ...), except
that each layer's experts are stacked ([E, F, D]) and the MTP modules live in `mtp`; checkpoint.py's
table maps both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from forgerl.model.attention import TreeMask
from forgerl.model.block import DecoderLayer
from forgerl.model.config import ModelConfig
from forgerl.model.layers import RMSNorm, rotary_cos_sin
from forgerl.model.moe import SparseMoeBlock
from forgerl.model.mtp import MTPLossMixin, MTPModule


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V], model dtype
    hidden_states: torch.Tensor  # [B, T, D], last layer's output before the final norm (MTP input)
    expert_load: torch.Tensor  # [L, E] float: tokens routed to each expert in this forward
    routed_experts: torch.Tensor  # long [B, T, L, K]: the expert ids used (chosen or replayed)
    aux_loss: torch.Tensor  # scalar: seq_aux_loss_coef * sequence balance loss summed over layers (0 if off)


class MiniMaxM2Model(nn.Module):
    """Embedding, L decoder layers, final norm (the HF checkpoint's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniMaxM2ForCausalLM(nn.Module, MTPLossMixin):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = MiniMaxM2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.num_mtp_modules))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every matrix (as transformers' MiniMaxM2 does), ones for norms,
        zeros for the routing bias."""
        std = self.config.initializer_range
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std)
        for module in self.modules():
            if isinstance(module, SparseMoeBlock):
                module.e_score_correction_bias.zero_()
                module.tokens_per_expert.zero_()

    @property
    def prefix_merge_exact(self) -> bool:
        """A prefix-tree pack's forward gives each row its own logits (forgerl.rl.prefix_merge)."""
        return True

    def rope(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(position_ids_BT, self.config.rotary_dim, self.config.rope_theta, dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | TreeMask | None = None,
        routed_experts: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] long; position_ids [B, T] (None: 0..T-1); attention_mask bool [B, T, T],
        True where query t may attend key s (None: causal), or a prefix-tree pack's `TreeMask` (handed to
        the attention backend as is); routed_experts long [B, T, L, K] to replay the rollout's routing
        instead of routing afresh."""
        cfg = self.config
        b, t = input_ids.shape
        _check_inputs(cfg, b, t, position_ids, attention_mask, routed_experts)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        x_BTD = self.model.embed_tokens(input_ids)
        rope_cos_sin = self.rope(position_ids, x_BTD.dtype)
        expert_ids, loads, balance_losses = [], [], []
        for i, layer in enumerate(self.model.layers):
            replay_BTK = None if routed_experts is None else routed_experts[:, :, i]
            out = layer(x_BTD, rope_cos_sin, attention_mask, replay_BTK)
            x_BTD = out.x_BTD
            expert_ids.append(out.expert_ids_BTK)
            loads.append(out.load_E)
            if out.balance_loss is not None:
                balance_losses.append(out.balance_loss)
        logits_BTV = self.lm_head(self.model.norm(x_BTD))
        aux_loss = x_BTD.new_zeros(())
        if balance_losses:
            aux_loss = cfg.seq_aux_loss_coef * torch.stack(balance_losses).sum()
        return ModelOutput(
            logits=logits_BTV,
            hidden_states=x_BTD,
            expert_load=torch.stack(loads),  # [L, E]
            routed_experts=torch.stack(expert_ids, dim=2),  # [B, T, L, K]
            aux_loss=aux_loss,
        )

    @torch.no_grad()
    def grow_mtp(self, num_modules: int) -> None:
        """Add MTP modules as copies of module 1 (the report grows K from 1 to 3 this way to avoid a loss
        spike). Rebuild the optimizer afterwards: the new parameters are not in it."""
        if not 1 <= len(self.mtp) <= num_modules:
            raise ValueError(f"grow_mtp({num_modules}): have {len(self.mtp)} modules; need 1 <= have <= wanted")
        first = self.mtp[0]
        reference = self.lm_head.weight  # new modules take the model's device and dtype
        for _ in range(len(self.mtp), num_modules):
            module = MTPModule(self.config).to(device=reference.device, dtype=reference.dtype)
            module.load_state_dict(first.state_dict())
            self.mtp.append(module)
        self.config = self.config.replace(num_mtp_modules=num_modules)


def _check_inputs(
    cfg: ModelConfig,
    b: int,
    t: int,
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | TreeMask | None,
    routed_experts: torch.Tensor | None,
) -> None:
    if position_ids is not None and tuple(position_ids.shape) != (b, t):
        raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}; expected [B, T] = {(b, t)}")
    if isinstance(attention_mask, TreeMask):
        ends = attention_mask.subtree_end_BT
        if tuple(ends.shape) != (b, t) or ends.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"TreeMask.subtree_end_BT is {ends.dtype} {tuple(ends.shape)}; expected int32/int64 [B, T] = {(b, t)}"
            )
    elif attention_mask is not None and (
        tuple(attention_mask.shape) != (b, t, t) or attention_mask.dtype != torch.bool
    ):
        raise ValueError(
            f"attention_mask is {attention_mask.dtype} {tuple(attention_mask.shape)}; expected bool [B, T, T] = "
            f"{(b, t, t)}, True where query t may attend key s"
        )
    expected = (b, t, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    if routed_experts is not None and tuple(routed_experts.shape) != expected:
        raise ValueError(f"routed_experts has shape {tuple(routed_experts.shape)}; expected [B, T, L, K] = {expected}")
