"""MiniMax-M3 lightning indexer's block scores without the [B, G, T, S] score matrix.

Shape legend: B batch, G index heads (= KV heads), T query positions, S key positions (S == T), I
index_head_dim, NB key blocks of `block_size` keys.

transformers' indexer (and m3_attention.torch_index_scores) computes every q.k score in float32, then
max-pools them per block: 4 * B * G * T^2 bytes, 2 GiB for G = 4 at T = 16k. Here one program takes one
query position of one batch row with all G index heads stacked as the rows of its tile (they share the
single index key head, so each key block is loaded once for all of them), walks the causal key blocks
0 .. t // block_size and writes only each block's maximum: B * G * T * NB floats. The top-k and the
forced local blocks stay in torch (LightningIndexer.forward) on these scores. Forward only: the top-k
has no gradient. Float32 dots (IEEE) so the selection matches the float32 reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_scores_kernel(
    Q, K, OUT,
    sqb, sqg, sqt, skb, skt, sob, sog, sot,
    n_heads, head_dim, block_size,
    GP: tl.constexpr, BSP: tl.constexpr, BI: tl.constexpr,
):  # fmt: skip
    t, b = tl.program_id(0), tl.program_id(1)
    rows = tl.arange(0, GP)
    row_ok = rows < n_heads
    offs_i = tl.arange(0, BI)
    i_ok = offs_i < head_dim
    q_off = b * sqb + rows[:, None] * sqg + t * sqt + offs_i[None, :]
    q = tl.load(Q + q_off, mask=row_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
    j = tl.arange(0, BSP)
    for kb in range(0, t // block_size + 1):
        kpos = kb * block_size + j
        key_ok = (j < block_size) & (kpos <= t)
        k_off = b * skb + kpos[:, None] * skt + offs_i[None, :]
        k = tl.load(K + k_off, mask=key_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        best = tl.max(tl.where(key_ok[None, :], scores, float("-inf")), 1)
        tl.store(OUT + b * sob + rows * sog + t * sot + kb, best, mask=row_ok)


def index_block_scores(
    q_BGTI: torch.Tensor, k_B1SI: torch.Tensor, mask_BTS: torch.Tensor | None, block_size: int
) -> torch.Tensor:
    """`forgerl.model.m3_attention.IndexScorer`: float32 [B, G, T, NB], causal only.

    Args:
        q_BGTI: [B, G, T, I] rotated index queries; k_B1SI: [B, 1, T, I] the rotated index key head.
        mask_BTS: must be None (causal); block_size: keys per block.
    """
    if mask_BTS is not None:
        raise ValueError(
            "the triton index scorer is causal only: got an attention mask (use index_backend 'torch' for masks)"
        )
    b, g, t, dim = q_BGTI.shape
    if tuple(k_B1SI.shape) != (b, 1, t, dim):
        raise ValueError(f"k_B1SI {tuple(k_B1SI.shape)} must be [B, 1, T, I] = {(b, 1, t, dim)}")
    q, k = q_BGTI.contiguous(), k_B1SI.contiguous()
    num_blocks = triton.cdiv(t, block_size)
    # Blocks after the query's own are never visited: they keep -inf, as in the reference.
    out = torch.full((b, g, t, num_blocks), float("-inf"), dtype=torch.float32, device=q.device)
    _block_scores_kernel[(t, b)](
        q, k, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(2), out.stride(0), out.stride(1), out.stride(2),
        g, dim, block_size,
        GP=max(16, triton.next_power_of_2(g)), BSP=max(16, triton.next_power_of_2(block_size)),
        BI=max(16, triton.next_power_of_2(dim)),
    )  # fmt: skip
    return out
