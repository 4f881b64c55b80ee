"""MSA index branch on packed variable-length sequences: block summaries, scores, kept blocks.

Shape legend: N sequences, Tq/Tk packed query/key tokens, H query heads, G KV heads, D head_dim,
NQ/NK most query/key blocks of a sequence, S = top_k + 2. Semantics in naive.py. This is a batched
matmul and a top-k over NK <= Tk / block scores, a small fraction of the attention it steers
(NK = 2048 at 128K tokens and block 64), so it stays in torch; the kernels consume its output.
"""

from __future__ import annotations

import torch


def _segment_mean(values: torch.Tensor, segment: torch.Tensor, segments: int, weight: int) -> torch.Tensor:
    """Mean of `values` rows [R, ...] per segment id [R] (counting each row `weight` times): [segments, ...]."""
    total = torch.zeros(segments, *values.shape[1:], dtype=torch.float32, device=values.device)
    total.index_add_(0, segment, values.float())
    count = torch.bincount(segment, minlength=segments).clamp(min=1) * weight
    return total / count.view(-1, *[1] * (values.dim() - 1))


def select_blocks(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block: int,
    top_k: int,
) -> torch.Tensor:
    """int32 [N, G, NQ, S]: per sequence, KV head and query block, the kept key blocks (first, local,
    top-k by descending score; -1 for none or past the sequence's last query block)."""
    device = q_THD.device
    kv_heads, group = k_TGD.shape[1], q_THD.shape[1] // k_TGD.shape[1]
    len_q, len_k = cu_seqlens_q.diff().long(), cu_seqlens_k.diff().long()
    offset = len_k - len_q  # queries sit at the end of their sequence
    first_qblock = offset // block
    n_qblocks = (len_k - 1) // block - first_qblock + 1
    nq, nk, n = int(n_qblocks.max()), int(((len_k + block - 1) // block).max()), len_q.shape[0]
    seq_q = torch.repeat_interleave(torch.arange(n, device=device), len_q)
    local_q = torch.arange(q_THD.shape[0], device=device) - cu_seqlens_q[:-1].long()[seq_q]
    qblock = (local_q + offset[seq_q]) // block - first_qblock[seq_q]
    q_TGD = q_THD.view(q_THD.shape[0], kv_heads, group, -1).float().sum(2)  # [Tq, G, D]: heads of a group
    q_summary = _segment_mean(q_TGD, seq_q * nq + qblock, n * nq, group).view(n, nq, kv_heads, -1)
    seq_k = torch.repeat_interleave(torch.arange(n, device=device), len_k)
    kblock = (torch.arange(k_TGD.shape[0], device=device) - cu_seqlens_k[:-1].long()[seq_k]) // block
    k_summary = _segment_mean(k_TGD, seq_k * nk + kblock, n * nk, 1).view(n, nk, kv_heads, -1)
    scores_NGQK = torch.einsum("nqgd,nkgd->ngqk", q_summary, k_summary)
    own_block = (first_qblock[:, None] + torch.arange(nq, device=device)[None, :])[:, None, :, None]  # [N,1,NQ,1]
    key_block = torch.arange(nk, device=device)
    candidate = (key_block >= 1) & (key_block < own_block)
    scores_NGQK = scores_NGQK.masked_fill(~candidate, float("-inf"))
    best = torch.topk(scores_NGQK, min(top_k, nk), dim=-1)
    top = torch.where(best.values > float("-inf"), best.indices, -1)
    own = own_block.expand(n, kv_heads, nq, 1)
    kept = torch.cat([torch.zeros_like(own), torch.where(own > 0, own, -1), top], dim=-1)
    if top.shape[-1] < top_k:
        kept = torch.cat([kept, kept.new_full((*kept.shape[:-1], top_k - top.shape[-1]), -1)], dim=-1)
    real_qblock = torch.arange(nq, device=device)[None, :] < n_qblocks[:, None]  # [N, NQ]
    return torch.where(real_qblock[:, None, :, None], kept, -1).to(torch.int32)
