"""Training the lightning indexer: an objective of its own, since its top-k has no gradient.

Shape legend: B batch, G key/value heads (= indexer heads), h query heads per GQA group, T queries, S keys,
NB key blocks, N kept blocks per query.

The objective is DeepSeek-V3.2's (DeepSeek-V3.2-Exp report, sec. 2.1 "continued pre-training"), moved from
tokens to M3's key blocks: per query and GQA group the target is the main attention's probability mass on
each key block, summed over the group's h heads and renormalised (the group shares one selection, so its
heads' mass is what the selection must cover), and the indexer is trained to minimise
    KL(target || softmax(indexer block scores))
over the query's visible blocks. Why this one: the attention's own mass is exactly what the top-k should
keep (keeping the heaviest blocks is what makes sparse attention close to dense), it needs no labels, and
it is cheap next to the attention. A ranking loss on the top-k alone would ignore how much lighter the
dropped blocks are; distilling the attention's scores themselves would tie the indexer to the
attention's scale, while the KL only asks its softmax to rank and weigh blocks the same way.

Two stages, as DeepSeek's:
  - "dense" (warm-up): the attention runs dense; the indexer learns from the dense attention's mass over
    every visible block. The top-k is still computed (and its recall reported) but does not act.
  - "sparse": the attention runs on the selected blocks; the target is that sparse attention's mass over
    the selected blocks, and the indexer's softmax is taken over the same selected blocks.

The indexer's loss does not reach the main model: its input hidden states and the attention's q and k
enter detached (DeepSeek detaches the indexer's input too). The main model learns from the LM loss alone;
letting the KL move the trunk would pull the attention toward whatever the indexer can already predict.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from forgerl.model.layers import compute_dtype

DENSE_STAGE, SPARSE_STAGE = "dense", "sparse"
INDEXER_STAGES = (DENSE_STAGE, SPARSE_STAGE)


class IndexerObjective(NamedTuple):
    loss: torch.Tensor  # scalar: KL(attention mass || indexer), mean over queries with a visible key
    recall: torch.Tensor  # scalar: see block_recall (nan where no query has more blocks than it keeps)


def check_stage(stage: str | None) -> None:
    if stage is not None and stage not in INDEXER_STAGES:
        raise ValueError(f"indexer_stage {stage!r}: choose one of {INDEXER_STAGES} or None (no indexer training)")


def block_sum(x_BGTS: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, G, T, S] -> [B, G, T, NB]: the sum over each block of `block_size` keys (the last one padded)."""
    b, g, t, s = x_BGTS.shape
    num_blocks = -(-s // block_size)
    padded = F.pad(x_BGTS, (0, num_blocks * block_size - s))
    return padded.view(b, g, t, num_blocks, block_size).sum(dim=-1)


@torch.no_grad()
def attention_block_mass(
    q_BHTK: torch.Tensor, k_BGSK: torch.Tensor, keep_BGTS: torch.Tensor, block_size: int, scale: float
) -> torch.Tensor:
    """float32 (float64 for float64 inputs) [B, G, T, NB]: the attention's probability mass per key block
    over the keys `keep_BGTS` allows (the visible ones; in the sparse stage, visible and in a kept block),
    summed over the GQA group's heads and renormalised to sum to 1 per query (0 for a query with no key)."""
    b, n_heads, t, d = q_BHTK.shape
    g = k_BGSK.shape[1]
    ct = compute_dtype(q_BHTK.dtype)
    q_BGhTK = q_BHTK.to(ct).view(b, g, n_heads // g, t, d)
    scores_BGhTS = (q_BGhTK @ k_BGSK.to(ct)[:, :, None].transpose(-1, -2)) * scale
    probs_BGhTS = torch.softmax(scores_BGhTS.masked_fill(~keep_BGTS[:, :, None], -torch.inf), dim=-1)
    mass_BGTB = block_sum(probs_BGhTS.nan_to_num(0.0).sum(dim=2), block_size)
    return mass_BGTB / mass_BGTB.sum(dim=-1, keepdim=True).clamp(min=1e-30)


def indexer_kl(target_BGTB: torch.Tensor, scores_BGTB: torch.Tensor, allowed_BGTB: torch.Tensor) -> torch.Tensor:
    """Mean over queries with any target mass of KL(target || softmax(scores over the allowed blocks)).
    `target_BGTB` sums to 1 over allowed blocks (0 elsewhere); `scores_BGTB` float, -inf allowed where not
    allowed."""
    log_q_BGTB = torch.log_softmax(scores_BGTB.masked_fill(~allowed_BGTB, -torch.inf), dim=-1)
    p_BGTB = target_BGTB.to(log_q_BGTB.dtype)
    terms_BGTB = torch.where(p_BGTB > 0, p_BGTB * (p_BGTB.clamp(min=1e-30).log() - log_q_BGTB), 0.0)
    valid_BGT = p_BGTB.sum(dim=-1) > 0
    return terms_BGTB.sum(dim=-1)[valid_BGT].sum() / valid_BGT.sum().clamp(min=1)


@torch.no_grad()
def block_recall(mass_BGTB: torch.Tensor, blocks_BGTN: torch.Tensor, visible_BGTB: torch.Tensor) -> torch.Tensor:
    """Over the queries with more visible blocks than the indexer keeps (N): the fraction of the N blocks
    heaviest by attention mass that the indexer kept. nan if there is no such query."""
    n = blocks_BGTN.shape[-1]
    heavy_BGTN = mass_BGTB.topk(n, dim=-1).indices
    hit_BGTN = (heavy_BGTN[..., :, None] == blocks_BGTN[..., None, :]).any(dim=-1)
    dropping_BGT = visible_BGTB.sum(dim=-1) > n
    if not dropping_BGT.any():
        return mass_BGTB.new_tensor(float("nan"))
    return hit_BGTN[dropping_BGT].float().mean()


def kept_block_mask(blocks_BGTN: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """bool [B, G, T, NB]: True on the blocks a query kept (-1 slots keep nothing)."""
    safe_BGTN = blocks_BGTN.masked_fill(blocks_BGTN < 0, num_blocks)
    kept = torch.zeros(*blocks_BGTN.shape[:-1], num_blocks + 1, dtype=torch.bool, device=blocks_BGTN.device)
    return kept.scatter_(-1, safe_BGTN, True)[..., :num_blocks]


def indexer_objective(
    stage: str,
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    visible_BTS: torch.Tensor,
    scores_BGTB: torch.Tensor,
    blocks_BGTN: torch.Tensor,
    block_size: int,
    scale: float,
) -> IndexerObjective:
    """The indexer's loss for one layer. q/k are the attention's (normed, rotated; detached here),
    `scores_BGTB` the indexer's block scores with their gradient, `blocks_BGTN` its selection."""
    num_keys = k_BGSK.shape[2]
    g = k_BGSK.shape[1]
    visible_BGTS = visible_BTS[:, None].expand(-1, g, -1, -1)
    visible_BGTB = block_sum(visible_BGTS.float(), block_size) > 0
    kept_BGTB = kept_block_mask(blocks_BGTN, scores_BGTB.shape[-1])
    q_BHTK, k_BGSK = q_BHTK.detach(), k_BGSK.detach()
    dense_mass_BGTB = attention_block_mass(q_BHTK, k_BGSK, visible_BGTS, block_size, scale)
    recall = block_recall(dense_mass_BGTB, blocks_BGTN, visible_BGTB)
    if stage == DENSE_STAGE:
        return IndexerObjective(indexer_kl(dense_mass_BGTB, scores_BGTB, visible_BGTB), recall)
    kept_keys_BGTS = kept_BGTB.repeat_interleave(block_size, dim=-1)[..., :num_keys] & visible_BGTS
    sparse_mass_BGTB = attention_block_mass(q_BHTK, k_BGSK, kept_keys_BGTS, block_size, scale)
    return IndexerObjective(indexer_kl(sparse_mass_BGTB, scores_BGTB, kept_BGTB & visible_BGTB), recall)
