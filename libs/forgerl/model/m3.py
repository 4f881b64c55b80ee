"""MiniMax-M3 text backbone: dense first layers, MoE layers with a shared expert, MiniMax Sparse Attention.

Shape legend: B batch, T positions, D hidden, V vocab, E experts, K experts per token, M MoE layers,
F an MLP's width, G KV heads, N kept key blocks per query.

Shares M2's router (`moe.route`), expert implementation (`moe.Experts`, here with SwiGLU-OAI), norms and
RoPE. Module and parameter names are those of transformers' `MiniMaxM3VLForCausalLM` (`model.layers.N.mlp.
gate.weight`, `model.layers.N.self_attn.indexer.q_proj.weight`, ...) except that the routed experts keep
M2's split w1 / w3 and the routing bias sits on the MoE block; m3_checkpoint.py's table maps both. MTP
modules (`mtp`, forgerl.model.mtp.MTPModule around an MoE + sparse-attention layer) follow vLLM's
MiniMaxM3MTP, since transformers' M3 has none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from forgerl.model.config import ModelConfig
from forgerl.model.layers import RMSNorm, rotary_cos_sin
from forgerl.model.m3_attention import M3Attention
from forgerl.model.m3_config import SPARSE_ATTENTION, SPARSE_MLP, M3Config
from forgerl.model.m3_indexer_training import IndexerObjective
from forgerl.model.model import ModelOutput
from forgerl.model.model import _check_inputs as check_m2_inputs
from forgerl.model.moe import GluActivation, Routing, SparseMoeBlock, sequence_balance_loss, swiglu_oai
from forgerl.model.mtp import MTPLossMixin, MTPModule


class GatedMLP(nn.Module):
    """down(act(gate, up)) with gate and up fused in one [2F, D] projection (gate the first F rows), as
    transformers' MiniMaxM3VLDenseMLP stores it: the dense layers' MLP and the MoE layers' shared expert."""

    def __init__(self, hidden_size: int, width: int, activation: GluActivation) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * width, bias=False)
        self.down_proj = nn.Linear(width, hidden_size, bias=False)
        self.activation = activation

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        gate_BTF, up_BTF = self.gate_up_proj(x_BTD).chunk(2, dim=-1)
        return self.down_proj(self.activation(gate_BTF, up_BTF))


class SharedExpertMoeBlock(SparseMoeBlock):
    """M2's routed experts scaled by routed_scaling_factor (2.0 in M3) plus one always-on shared expert."""

    def __init__(self, cfg: M3Config, activation: GluActivation) -> None:
        super().__init__(cfg, activation)
        self.shared_experts = GatedMLP(cfg.hidden_size, cfg.shared_intermediate_size, activation)
        self.routed_scaling_factor = cfg.routed_scaling_factor

    def forward(
        self, x_BTD: torch.Tensor, replay_ids_BTK: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        routed_BTD, routing, load_E = super().forward(x_BTD, replay_ids_BTK)
        return routed_BTD * self.routed_scaling_factor + self.shared_experts(x_BTD), routing, load_E


class M3LayerOutput(NamedTuple):
    """A NamedTuple, not a dataclass: FSDP2 finds the output tensors to hook for backward through pytree."""

    x_BTD: torch.Tensor
    blocks_BGTN: torch.Tensor | None  # sparse-attention layers: the indexer's kept key blocks
    expert_ids_BTK: torch.Tensor | None = None  # MoE layers: the experts used
    load_E: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    indexer: IndexerObjective | None = None  # sparse-attention layers with an indexer_stage


@dataclass
class M3Output(ModelOutput):
    # Per sparse-attention layer index, the indexer's kept key blocks: long [B, G, T, N], -1 padded.
    block_indices: dict[int, torch.Tensor]
    # With an indexer_stage: the indexers' KL summed over sparse layers (gradient into the indexers only)
    # and their recall of the dense attention's heaviest blocks averaged over layers; None otherwise.
    indexer_loss: torch.Tensor | None = None
    indexer_recall: torch.Tensor | None = None


class M3DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)) with a dense MLP or the MoE block."""

    def __init__(self, cfg: M3Config, layer_idx: int) -> None:
        super().__init__()
        activation = functools.partial(swiglu_oai, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.self_attn = M3Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)
        self.mlp: nn.Module
        if cfg.mlp_layer_types[layer_idx] == SPARSE_MLP:
            self.mlp = SharedExpertMoeBlock(cfg, activation)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.dense_intermediate_size, activation)
        self.with_balance_loss = cfg.seq_aux_loss_coef > 0

    @classmethod
    def mtp_block(cls, cfg: ModelConfig) -> M3DecoderLayer:
        """An MTP module's layer: MoE with sparse attention whatever the main layers' pattern, as vLLM's
        MiniMaxM3MultiTokenPredictorLayer builds it (force_sparse_attn, force_moe)."""
        if not isinstance(cfg, M3Config):
            raise TypeError(f"M3's MTP block needs an M3Config, got {type(cfg).__name__}")
        return cls(cfg.replace(num_hidden_layers=1, mlp_layer_types=(SPARSE_MLP,), layer_types=(SPARSE_ATTENTION,)), 0)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_BTS: torch.Tensor | None,
        replay_ids_BTK: torch.Tensor | None = None,
        indexer_stage: str | None = None,
    ) -> M3LayerOutput:
        attn_BTD, blocks_BGTN, indexer = self.self_attn(
            self.input_layernorm(x_BTD), rope_cos_sin, mask_BTS, indexer_stage
        )
        h_BTD = x_BTD + attn_BTD
        if not isinstance(self.mlp, SharedExpertMoeBlock):
            return M3LayerOutput(h_BTD + self.mlp(self.post_attention_layernorm(h_BTD)), blocks_BGTN, indexer=indexer)
        mlp_BTD, routing, load_E = self.mlp(self.post_attention_layernorm(h_BTD), replay_ids_BTK)
        b, t, _ = x_BTD.shape
        expert_ids_BTK = routing.expert_ids_NK.view(b, t, -1)
        balance_loss = None
        if self.with_balance_loss and self.training:
            balance_loss = sequence_balance_loss(routing.scores_NE.view(b, t, -1), expert_ids_BTK)
        return M3LayerOutput(h_BTD + mlp_BTD, blocks_BGTN, expert_ids_BTK, load_E, balance_loss, indexer)


class MiniMaxM3Model(nn.Module):
    """Embedding, L decoder layers, final norm (the HF checkpoint's `model.` prefix)."""

    def __init__(self, cfg: M3Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(M3DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True)


class MiniMaxM3ForCausalLM(nn.Module, MTPLossMixin):
    def __init__(self, cfg: M3Config) -> None:
        super().__init__()
        self.config = cfg
        self.model = MiniMaxM3Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Names and structure as vLLM's MiniMaxM3MTP (m3_config.py, num_mtp_modules); transformers has none.
        self.mtp = nn.ModuleList(
            MTPModule(cfg, M3DecoderLayer.mtp_block, unit_offset=True) for _ in range(cfg.num_mtp_modules)
        )
        self.reset_parameters()

    @property
    def prefix_merge_exact(self) -> bool:
        """False with a sparse-attention layer: in a prefix-tree pack the indexer's key blocks and forced local
        blocks are runs of pack slots, not of the row's own positions, so a packed row attends other keys
        than its own forward would (measured: log-probabilities 1.9 apart on minimax-m3-tiny at 26-33
        tokens). Rows are trained one by one (rl.prefix_merge false)."""
        return SPARSE_ATTENTION not in self.config.layer_types

    def rope(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_cos_sin(position_ids_BT, self.config.rotary_dim, self.config.rope_theta, dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for every matrix, zeros for the (1 + w) norms and the routing bias, as
        transformers' MiniMaxM3VLPreTrainedModel._init_weights."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.zero_()
            elif isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std)
            elif isinstance(module, SharedExpertMoeBlock):
                module.experts.w1.normal_(0.0, std)
                module.experts.w2.normal_(0.0, std)
                module.experts.w3.normal_(0.0, std)
                module.e_score_correction_bias.zero_()
                module.tokens_per_expert.zero_()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        routed_experts: torch.Tensor | None = None,
        indexer_stage: str | None = None,
    ) -> M3Output:
        """input_ids [B, T] long; position_ids [B, T] (None: 0..T-1); attention_mask bool [B, T, T], True
        where query t may attend key s (None: causal); routed_experts long [B, T, M, K] to replay a routing
        on the M MoE layers; indexer_stage "dense" | "sparse" to train the indexers (m3_indexer_training;
        "dense" also runs the sparse layers' attention dense)."""
        cfg = self.config
        b, t = input_ids.shape
        # M2's checks of the positions and the mask; routed_experts spans the M MoE layers here, not all L.
        check_m2_inputs(cfg, b, t, position_ids, attention_mask, None)
        expected = (b, t, cfg.sparse_layer_count, cfg.num_experts_per_tok)
        if routed_experts is not None and tuple(routed_experts.shape) != expected:
            raise ValueError(
                f"routed_experts has shape {tuple(routed_experts.shape)}; expected [B, T, M, K] = {expected}"
            )
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        x_BTD = self.model.embed_tokens(input_ids)
        rope_cos_sin = self.rope(position_ids, x_BTD.dtype)
        expert_ids: list[torch.Tensor] = []
        loads: list[torch.Tensor] = []
        balance_losses: list[torch.Tensor] = []
        blocks: dict[int, torch.Tensor] = {}
        indexers: list[IndexerObjective] = []
        for i, layer in enumerate(self.model.layers):
            replay_BTK = None if routed_experts is None else routed_experts[:, :, len(loads)]
            out = layer(x_BTD, rope_cos_sin, attention_mask, replay_BTK, indexer_stage)
            x_BTD = out.x_BTD
            if out.blocks_BGTN is not None:
                blocks[i] = out.blocks_BGTN
            if out.expert_ids_BTK is not None and out.load_E is not None:
                expert_ids.append(out.expert_ids_BTK)
                loads.append(out.load_E)
            if out.indexer is not None:
                indexers.append(out.indexer)
            if out.balance_loss is not None:
                balance_losses.append(out.balance_loss)
        logits_BTV = self.lm_head(self.model.norm(x_BTD))
        k = cfg.num_experts_per_tok
        return M3Output(
            logits=logits_BTV,
            hidden_states=x_BTD,
            expert_load=torch.stack(loads) if loads else x_BTD.new_zeros(0, cfg.num_local_experts),  # [M, E]
            routed_experts=torch.stack(expert_ids, dim=2) if expert_ids else input_ids.new_zeros(b, t, 0, k),
            aux_loss=cfg.seq_aux_loss_coef * torch.stack(balance_losses).sum()
            if balance_losses
            else x_BTD.new_zeros(()),
            block_indices=blocks,
            indexer_loss=torch.stack([i.loss for i in indexers]).sum() if indexers else None,
            indexer_recall=torch.stack([i.recall for i in indexers]).nanmean() if indexers else None,
        )
