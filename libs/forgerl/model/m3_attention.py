"""MiniMax-M3 attention: per-head Gemma QK-norm, partial RoPE, GQA, and on sparse layers the lightning
indexer that picks which key blocks each query attends (MiniMax Sparse Attention as shipped).

Shape legend: B batch, T query positions, S key positions (S == T: no KV cache in training), D hidden,
H query heads, G key/value heads (= indexer heads), K head_dim, I index_head_dim, R rotary width,
NB key blocks of `index_block_size` keys, N kept blocks per query (index_topk_blocks, fewer when NB is).

The indexer follows transformers 5.19's `MiniMaxM3VLIndexer` line by line (the parity test compares the
block indices it emits): its own q projection (G heads of I) and a single shared key head of I (no value
path), Gemma RMSNorm on both, RoPE on the first min(R, I) channels, scores q.k in float32 masked to the
visible keys, max-pooled over each block, the query's own and the `index_local_blocks - 1` preceding
blocks forced to +inf, the top N kept, and slots holding a block with no visible key set to -1. Since
the forced blocks sort first, the result is left-packed (valid indices, then -1) and duplicate-free: the
contract of a block-sparse kernel that counts the valid entries and reads them in order.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import torch
from torch import nn

from forgerl.model.attention import get_attention_backend
from forgerl.model.layers import RMSNorm, apply_rotary, compute_dtype
from forgerl.model.m3_config import SPARSE_ATTENTION, M3Config
from forgerl.model.m3_indexer_training import (
    DENSE_STAGE,
    IndexerObjective,
    check_stage,
    indexer_objective,
    kept_block_mask,
)

T = TypeVar("T")


class BlockSparseBackend(Protocol):
    """`mask_BTS` is bool [B, T, S], True where query t may attend key s, or None for causal; each query
    attends the keys it may see that lie in one of its GQA group's kept blocks `blocks_BGTN`."""

    def __call__(
        self,
        q_BHTK: torch.Tensor,
        k_BGSK: torch.Tensor,
        v_BGSK: torch.Tensor,
        mask_BTS: torch.Tensor | None,
        blocks_BGTN: torch.Tensor,
        block_size: int,
        scale: float,
    ) -> torch.Tensor: ...


def causal_mask(b: int, t: int, device: torch.device) -> torch.Tensor:
    """bool [B, T, T], lower triangular."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril().expand(b, t, t)


def blocks_to_key_mask(blocks_BGTN: torch.Tensor, block_size: int, num_keys: int) -> torch.Tensor:
    """bool [B, G, T, S]: True where key s lies in one of query t's kept blocks (-1 slots keep nothing)."""
    kept_BGTB = kept_block_mask(blocks_BGTN, -(-num_keys // block_size))
    return kept_BGTB.repeat_interleave(block_size, dim=-1)[..., :num_keys]


def torch_block_sparse_attention(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    mask_BTS: torch.Tensor | None,
    blocks_BGTN: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Reference: dense softmax over keys that are both visible and in a kept block of the query's GQA
    group, in at least float32 (what transformers' eager path computes with its additive block mask)."""
    b, _, t, _ = q_BHTK.shape
    visible_BTS = causal_mask(b, t, q_BHTK.device) if mask_BTS is None else mask_BTS
    groups = q_BHTK.shape[1] // k_BGSK.shape[1]
    keep_BGTS = blocks_to_key_mask(blocks_BGTN, block_size, k_BGSK.shape[2]) & visible_BTS[:, None]
    keep_BHTS = keep_BGTS.repeat_interleave(groups, dim=1)
    k_BHSK = k_BGSK.repeat_interleave(groups, dim=1)
    v_BHSK = v_BGSK.repeat_interleave(groups, dim=1)
    scores_BHTS = (q_BHTK @ k_BHSK.transpose(-1, -2)) * scale
    scores_BHTS = scores_BHTS.masked_fill(~keep_BHTS, float("-inf"))
    probs_BHTS = torch.softmax(scores_BHTS, dim=-1, dtype=compute_dtype(scores_BHTS.dtype))
    # A query always keeps its own block, which holds itself: no row is empty unless the mask hides it.
    probs_BHTS = probs_BHTS.nan_to_num(0.0).to(q_BHTK.dtype)
    return probs_BHTS @ v_BHSK


MSA_BACKENDS: dict[str, BlockSparseBackend] = {"torch": torch_block_sparse_attention}


def register_msa_backend(name: str, backend: BlockSparseBackend) -> None:
    """The Triton kernel registers here (forgerl.kernels.msa.register_m3_msa): the model never imports it."""
    MSA_BACKENDS[name] = backend


def _registered(registry: dict[str, T], name: str, field: str) -> T:
    if name not in registry:
        raise ValueError(f"{field} {name!r} is not registered: choose one of {sorted(registry)}")
    return registry[name]


def get_msa_backend(name: str) -> BlockSparseBackend:
    return _registered(MSA_BACKENDS, name, "msa_backend")


class IndexScorer(Protocol):
    """Block scores float [B, G, T, NB] from the indexer's rotated q [B, G, T, I] and its one key head
    [B, 1, S, I]: per query and block, the largest q.k over the block's keys the query may see (`mask_BTS`
    as in BlockSparseBackend, None for causal), -inf for a block with none."""

    def __call__(
        self, q_BGTI: torch.Tensor, k_B1SI: torch.Tensor, mask_BTS: torch.Tensor | None, block_size: int
    ) -> torch.Tensor: ...


def torch_index_scores(
    q_BGTI: torch.Tensor, k_B1SI: torch.Tensor, mask_BTS: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    """Reference, as transformers' indexer: all [B, G, T, S] scores in at least float32, then the max-pool."""
    b, g, t, _ = q_BGTI.shape
    visible_BTS = causal_mask(b, t, q_BGTI.device) if mask_BTS is None else mask_BTS
    ct = compute_dtype(q_BGTI.dtype)
    scores_BGTS = (q_BGTI.to(ct) @ k_B1SI.to(ct).transpose(-1, -2)).masked_fill(~visible_BTS[:, None], -torch.inf)
    num_blocks = -(-t // block_size)
    scores_BGTS = nn.functional.pad(scores_BGTS, (0, num_blocks * block_size - t), value=-torch.inf)
    return scores_BGTS.view(b, g, t, num_blocks, block_size).amax(dim=-1)


INDEX_SCORERS: dict[str, IndexScorer] = {"torch": torch_index_scores}


def register_index_scorer(name: str, scorer: IndexScorer) -> None:
    INDEX_SCORERS[name] = scorer


def get_index_scorer(name: str) -> IndexScorer:
    return _registered(INDEX_SCORERS, name, "index_backend")


class LightningIndexer(nn.Module):
    """Per query and GQA group, the key blocks to attend: long [B, G, T, N], left-packed, -1 padded."""

    def __init__(self, cfg: M3Config) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.block_size, self.topk, self.local_blocks = (
            cfg.index_block_size,
            cfg.index_topk_blocks,
            cfg.index_local_blocks,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)  # one key head shared by all
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, unit_offset=True)
        self.scorer = get_index_scorer(cfg.index_backend)

    def block_scores(
        self, x_BTD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor], mask_BTS: torch.Tensor | None
    ) -> torch.Tensor:
        """float32 (float64 for a float64 model) [B, G, T, NB]: each block's best visible key score."""
        b, t, _ = x_BTD.shape
        q_BGTI = self.q_norm(self.q_proj(x_BTD).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        k_B1TI = self.k_norm(self.k_proj(x_BTD).view(b, t, 1, self.head_dim)).transpose(1, 2)
        # transformers slices the attention's cos/sin to the index width: min(R, I) channels rotate.
        cos_BTR, sin_BTR = (part[..., : self.head_dim] for part in rope_cos_sin)
        q_BGTI, k_B1TI = apply_rotary(q_BGTI, cos_BTR, sin_BTR), apply_rotary(k_B1TI, cos_BTR, sin_BTR)
        return self.scorer(q_BGTI, k_B1TI, mask_BTS, self.block_size)

    @torch.no_grad()
    def forward(
        self, x_BTD: torch.Tensor, rope_cos_sin: tuple[torch.Tensor, torch.Tensor], mask_BTS: torch.Tensor | None
    ) -> torch.Tensor:
        return self.select(self.block_scores(x_BTD, rope_cos_sin, mask_BTS))

    @torch.no_grad()
    def select(self, block_BGTB: torch.Tensor) -> torch.Tensor:
        """The kept blocks from block scores [B, G, T, NB] (left untouched)."""
        b, _, t, num_blocks = block_BGTB.shape
        if self.local_blocks > 0:
            # A query's own block (by slot; transformers uses the position id, equal for unpacked input) and
            # the local_blocks - 1 before it always win; clamping at 0 repeats block 0, a no-op scatter.
            own_T = torch.arange(t, device=block_BGTB.device) // self.block_size
            back_L = torch.arange(self.local_blocks, device=block_BGTB.device)
            local_TL = (own_T[:, None] - back_L[None, :]).clamp(min=0)
            block_BGTB = block_BGTB.scatter(-1, local_TL.expand(b, self.n_heads, t, -1), torch.inf)
        top_scores_BGTN, top_BGTN = block_BGTB.topk(min(self.topk, num_blocks), dim=-1)
        return top_BGTN.masked_fill(top_scores_BGTN == -torch.inf, -1)


class M3Attention(nn.Module):
    """q/k RMSNorm per head (Gemma style), partial RoPE, GQA; with an indexer on sparse layers. Parameter
    names follow transformers' MiniMaxM3VLAttention (q_proj ... o_proj, q_norm, k_norm, indexer.*)."""

    def __init__(self, cfg: M3Config, layer_idx: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, unit_offset=True)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, unit_offset=True)
        self.scale = self.head_dim**-0.5
        self.backend = get_attention_backend(cfg.attn_backend)
        self.indexer: LightningIndexer | None = None
        if cfg.layer_types[layer_idx] == SPARSE_ATTENTION:
            self.indexer = LightningIndexer(cfg)
            self.msa_backend = get_msa_backend(cfg.msa_backend)
            self.block_size = cfg.index_block_size

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_BTS: torch.Tensor | None,
        indexer_stage: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, IndexerObjective | None]:
        """Returns the output [B, T, D], on a sparse layer the kept blocks long [B, G, T, N], and with an
        `indexer_stage` ("dense" | "sparse", see m3_indexer_training) on a sparse layer the indexer's loss."""
        check_stage(indexer_stage)
        b, t, _ = x_BTD.shape
        q_BTHK = self.q_norm(self.q_proj(x_BTD).view(b, t, self.n_heads, self.head_dim))
        k_BTGK = self.k_norm(self.k_proj(x_BTD).view(b, t, self.n_kv_heads, self.head_dim))
        v_BGTK = self.v_proj(x_BTD).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos_BTR, sin_BTR = rope_cos_sin
        q_BHTK = apply_rotary(q_BTHK.transpose(1, 2), cos_BTR, sin_BTR)
        k_BGTK = apply_rotary(k_BTGK.transpose(1, 2), cos_BTR, sin_BTR)
        blocks_BGTN, objective = None, None
        if self.indexer is not None and indexer_stage is None:
            blocks_BGTN = self.indexer(x_BTD, rope_cos_sin, mask_BTS)
        elif self.indexer is not None and indexer_stage is not None:
            # The indexer's own objective: its input detached, so its loss reaches only its parameters.
            scores_BGTB = self.indexer.block_scores(x_BTD.detach(), rope_cos_sin, mask_BTS)
            blocks_BGTN = self.indexer.select(scores_BGTB.detach())
            visible_BTS = causal_mask(b, t, x_BTD.device) if mask_BTS is None else mask_BTS
            objective = indexer_objective(
                indexer_stage, q_BHTK, k_BGTK, visible_BTS, scores_BGTB, blocks_BGTN, self.block_size, self.scale
            )
        if blocks_BGTN is None or indexer_stage == DENSE_STAGE:
            o_BHTK = self.backend(q_BHTK, k_BGTK, v_BGTK, mask_BTS, self.scale)
        else:
            o_BHTK = self.msa_backend(q_BHTK, k_BGTK, v_BGTK, mask_BTS, blocks_BGTN, self.block_size, self.scale)
        o_BTD = o_BHTK.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # [B, T, H*K]
        return self.o_proj(o_BTD), blocks_BGTN, objective
