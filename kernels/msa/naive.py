"""Float32 reference for MiniMax Sparse Attention (MSA) as built here, one sequence at a time.

Shape legend: Tq/Tk query/key tokens of a sequence, H query heads, G KV heads (GROUP = H / G), D head_dim,
NB key blocks of `block` tokens, S = top_k + 2 selected blocks per (query block, KV group).

Queries sit at the end of their sequence (bottom-right causal: query i is at key position Tk - Tq + i),
so prefill (Tq == Tk) and decode (Tq == 1) are the same computation. Query block b holds the queries
whose positions fall in key block b.
Index branch (GQA-driven selection): a key block's summary is the mean of its keys per KV head; a query
block's summary is the mean of its queries over the tokens and the group's query heads; score(b, j) =
<q_summary(b, g), k_summary(j, g)>. Query block b keeps the first block, its own (local) block and the
top_k highest-scoring blocks among 1 .. b - 1; all heads of a group share the selection (one K/V load
serves the whole group). Attention is then causal softmax over the kept blocks' keys.
"""

from __future__ import annotations

import torch


def naive_select_blocks(q_THD: torch.Tensor, k_TGD: torch.Tensor, block: int, top_k: int) -> torch.Tensor:
    """long [G, NQ, S] kept key blocks per KV head and query block (NQ query blocks), -1 for none.

    Row order: first block, local block, then the top-k in descending score (unused slots -1)."""
    tq, heads, _ = q_THD.shape
    tk, kv_heads, _ = k_TGD.shape
    group, offset = heads // kv_heads, tk - tq
    first_qblock, last_qblock = offset // block, (tk - 1) // block
    selected = torch.full((kv_heads, last_qblock - first_qblock + 1, top_k + 2), -1, dtype=torch.long)
    for g in range(kv_heads):
        k_summary = [k_TGD[j * block : (j + 1) * block, g].float().mean(0) for j in range(last_qblock + 1)]
        for qb in range(first_qblock, last_qblock + 1):
            start, stop = max(qb * block, offset), min((qb + 1) * block, tk)
            q_rows = q_THD[start - offset : stop - offset, g * group : (g + 1) * group].float()
            q_summary = q_rows.reshape(-1, q_rows.shape[-1]).mean(0)
            row = selected[g, qb - first_qblock]
            row[0] = 0
            if qb > 0:
                row[1] = qb
            candidates = list(range(1, qb))
            if candidates:
                scores = torch.stack([q_summary @ k_summary[j] for j in candidates])
                best = torch.topk(scores, min(top_k, len(candidates))).indices
                row[2 : 2 + best.numel()] = torch.tensor(candidates)[best]
    return selected


def naive_msa(
    q_THD: torch.Tensor, k_TGD: torch.Tensor, v_TGD: torch.Tensor, selected_GNS: torch.Tensor, block: int, scale: float
) -> torch.Tensor:
    """float32 [Tq, H, D]: causal attention over each query block's selected key blocks."""
    tq, heads, _ = q_THD.shape
    tk, kv_heads, _ = k_TGD.shape
    group, offset = heads // kv_heads, tk - tq
    q_pos = torch.arange(tq) + offset
    k_pos = torch.arange(tk)
    qblock_row = q_pos // block - offset // block  # row of selected_GNS for each query
    out = torch.empty(tq, heads, q_THD.shape[-1])
    for g in range(kv_heads):
        kept_NB = torch.zeros(selected_GNS.shape[1], tk // block + 2, dtype=torch.bool)
        for row, blocks in enumerate(selected_GNS[g].tolist()):
            for j in blocks:
                if j >= 0:
                    kept_NB[row, j] = True
        visible_TS = (k_pos[None, :] <= q_pos[:, None]) & kept_NB[qblock_row][:, k_pos // block]
        for h in range(g * group, (g + 1) * group):
            scores = (q_THD[:, h].float() @ k_TGD[:, g].float().T) * scale
            probs = torch.softmax(scores.masked_fill(~visible_TS, float("-inf")), dim=-1)
            out[:, h] = probs @ v_TGD[:, g].float()
    return out
