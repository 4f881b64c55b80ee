"""MSA as model backends.

M2 / ours: the index branch has no parameters of its own (it scores blocks with the attention's q and k), so
MSA fits the attention backend registry: `cfg.attn_backend = "msa"` builds `make_msa_backend` with the
config's `msa_block_size` and `msa_top_k` (through `msa_backend_for`). Rows of the batch become packed
sequences of equal length.
M3: the lightning indexer selects the blocks; `register_m3_msa()` lets `M3Config(msa_backend="triton",
index_backend="triton")` run its attention and its block scores on the Triton kernels."""

from __future__ import annotations

from collections.abc import Callable

import torch

from forgerl.kernels import require_runtime
from forgerl.kernels.msa.triton_index_m3 import index_block_scores
from forgerl.kernels.msa.triton_msa import msa_attention
from forgerl.kernels.msa.triton_msa_m3 import msa_m3_attention
from forgerl.model.attention import TreeMask
from forgerl.model.config import ModelConfig
from forgerl.model.m3_attention import register_index_scorer, register_msa_backend

Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | TreeMask | None, float], torch.Tensor]


def make_msa_backend(block: int = 64, top_k: int = 16) -> Backend:
    """An attention backend `(q_BHTK, k_BGSK, v_BGSK, mask_BTS, scale) -> o_BHTK` running MSA."""

    def msa_backend(
        q_BHTK: torch.Tensor,
        k_BGSK: torch.Tensor,
        v_BGSK: torch.Tensor,
        mask_BTS: torch.Tensor | TreeMask | None,
        scale: float,
    ) -> torch.Tensor:
        require_runtime(q_BHTK, "attn_backend 'msa'")
        if mask_BTS is not None:
            raise ValueError("the msa backend is causal only: got an attention mask (use 'sdpa' or 'tree' for masks)")
        b, h, t, d = q_BHTK.shape
        g = k_BGSK.shape[1]
        q_PHD = q_BHTK.transpose(1, 2).reshape(b * t, h, d)  # [B*T, H, D]: rows packed one after another
        k_PGD, v_PGD = (x.transpose(1, 2).reshape(b * t, g, d) for x in (k_BGSK, v_BGSK))
        cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=q_BHTK.device) * t
        out = msa_attention(q_PHD, k_PGD, v_PGD, cu_seqlens, cu_seqlens, block=block, top_k=top_k, scale=scale)
        return out.view(b, t, h, d).transpose(1, 2)

    return msa_backend


def msa_backend_for(cfg: ModelConfig) -> Backend:
    """attention.KERNEL_BACKENDS' factory for "msa"."""
    return make_msa_backend(block=cfg.msa_block_size, top_k=cfg.msa_top_k)


def msa_m3_backend(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    mask_BTS: torch.Tensor | None,
    blocks_BGTN: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """`forgerl.model.m3_attention.BlockSparseBackend` running the Triton kernel (causal batches only)."""
    require_runtime(q_BHTK, "msa_backend 'triton'")
    if mask_BTS is not None:
        raise ValueError(
            "the triton M3 MSA backend is causal only: got an attention mask (use msa_backend 'torch' for masks)"
        )
    return msa_m3_attention(q_BHTK, k_BGSK, v_BGSK, blocks_BGTN, block_size, scale)


def register_m3_msa(name: str = "triton") -> None:
    """Make `M3Config(msa_backend=name)` run the sparse layers' attention with the Triton kernel and
    `M3Config(index_backend=name)` their indexer's block scores."""
    register_msa_backend(name, msa_m3_backend)
    register_index_scorer(name, index_block_scores)
