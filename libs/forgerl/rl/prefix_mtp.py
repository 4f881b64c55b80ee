"""Multi-token prediction on prefix-tree packs, equal to the MTP loss of the unmerged sequences.

MTP module k at position i of a sequence combines the state h^{k-1}_i with the embedding of token i+k
and predicts token i+k+1 (forgerl.model.mtp); its block attends to positions 0..i of the same sequence.
So h^k_i depends on the sequence's tokens 0..i+k: it is a function of the trie node of token i+k, not of
the node of token i. Two branches that share token i but part before i+k have different h^k_i, one per
node of token i+k. Module k therefore runs on the trie with its top k levels cut off
(`TreePack.without_top_levels`): one position per node of depth >= k, that node's token as the embedding
input, module k-1's state at the node's parent as the state input, position id depth - k, and attention
to the ancestors down to depth k. Its output at a node predicts each child's token, read per sequence as
the main log-probabilities are (at the parent). Every (sequence, position) term of the unmerged loss is
computed exactly once this way, with the same inputs: the merged loss equals the unmerged one (to
rounding; tests/unit/rl/test_prefix_mtp.py checks 1e-10 in float64).

Shape legend: T nodes of a pack, N nodes of a cut pack, S its sequences, L their padded length,
D hidden, V vocab, B batch rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from forgerl.model.layers import compute_dtype
from forgerl.model.mtp import mtp_metrics, shared_embedding, shared_head
from forgerl.model.policy import PolicyModel
from forgerl.rl.prefix_merge import TreeAttention, tree_attention_for
from forgerl.rl.prefix_tree import PrefixForest, TreePack


def mtp_loss_merged(
    model: PolicyModel,
    forest: PrefixForest,
    pack_hidden: Sequence[Tensor],
    loss_mask_BL: Tensor,
    *,
    tree_attention: TreeAttention | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Mean over modules of each module's masked cross-entropy (unweighted), and `mtp/loss_k`, `mtp/loss`.

    `pack_hidden`: the main model's hidden states of each pack ([T, D], `forward_merged(...,
    with_hidden=True).pack_hidden`); `loss_mask_BL` marks the tokens of the batch rows that are trained
    targets, as for `forgerl.model.mtp.mtp_loss`. Module k is counted when the longest row has a position
    with a target (length >= k + 2), as the unmerged loss counts it on the padded batch.
    """
    losses, _ = mtp_module_losses_merged(model, forest, pack_hidden, loss_mask_BL, tree_attention=tree_attention)
    if not losses:
        return pack_hidden[0].new_zeros(()), {}
    return torch.stack(losses).mean(), mtp_metrics(losses)


def mtp_module_losses_merged(
    model: PolicyModel,
    forest: PrefixForest,
    pack_hidden: Sequence[Tensor],
    loss_mask_BL: Tensor,
    *,
    tree_attention: TreeAttention | None = None,
    train_trunk: bool = True,
) -> tuple[list[Tensor], list[float]]:
    """Each counted module's masked cross-entropy (mean over its trained targets) and how many targets it
    has: the counts let a data-parallel step weigh every rank's mean by its share of the targets.
    `train_trunk` False: only the MTP modules get gradients (forgerl.model.mtp)."""
    if len(pack_hidden) != len(forest.packs):
        raise ValueError(f"pack_hidden has {len(pack_hidden)} entries; the forest has {len(forest.packs)} packs")
    if tree_attention is None:
        tree_attention = tree_attention_for(model)
    longest = int(forest.lengths.max())
    depth = sum(1 for k in range(1, len(model.mtp) + 1) if longest - k >= 2)
    if depth == 0:
        return [], []
    sums: list[Tensor] = [pack_hidden[0].new_zeros((), dtype=compute_dtype(pack_hidden[0].dtype))] * depth
    counts = [0.0] * depth
    for pack, hidden_TD in zip(forest.packs, pack_hidden, strict=True):
        hidden_TD = hidden_TD if train_trunk else hidden_TD.detach()
        module_sums = _pack_module_sums(model, pack, hidden_TD, loss_mask_BL, depth, tree_attention, train_trunk)
        for k, (ce_sum, count) in enumerate(module_sums):
            sums[k] = sums[k] + ce_sum
            counts[k] += count
    losses = [ce_sum / max(count, 1.0) for ce_sum, count in zip(sums, counts, strict=True)]
    return losses, counts


def _pack_module_sums(
    model: PolicyModel,
    pack: TreePack,
    hidden_TD: Tensor,
    loss_mask_BL: Tensor,
    depth: int,
    tree_attention: TreeAttention,
    train_trunk: bool,
) -> list[tuple[Tensor, float]]:
    """For modules 1..depth: the sum of the masked cross-entropies of this pack's sequences and how many
    targets they have (a module the pack is too short for adds nothing)."""
    out: list[tuple[Tensor, float]] = []
    prev, h_prev = pack, hidden_TD
    for k, module in enumerate(model.mtp[:depth], start=1):
        cut = prev.without_top_levels(1)  # module k's tree = module (k-1)'s without its roots
        if cut is None:
            break
        cur, kept_N = cut
        # A kept node has depth >= 1 in the previous tree, so its parent is a node there (index >= 0).
        h_in_ND = h_prev[prev.parent[kept_N]]
        emb_ND = shared_embedding(model, cur.input_ids, train_trunk)
        rope = model.rope(cur.position_ids[None], h_in_ND.dtype)
        h_1ND, normed_1ND = module(h_in_ND[None], emb_ND[None], rope, **tree_attention(cur))
        out.append(_masked_ce_sum(shared_head(model, normed_1ND[0], train_trunk), cur, loss_mask_BL, k))
        prev, h_prev = cur, h_1ND[0]
    zero = hidden_TD.new_zeros((), dtype=compute_dtype(hidden_TD.dtype))
    return out + [(zero, 0.0)] * (depth - len(out))


def _masked_ce_sum(logits_NV: Tensor, cur: TreePack, loss_mask_BL: Tensor, k: int) -> tuple[Tensor, float]:
    """Sum over (sequence s, position l) of module k's cross-entropy at node l predicting node l+1's
    token, where the target (token l+k+1 of row `cur.sequence_rows[s]`) is trained."""
    logits_NV = logits_NV.to(compute_dtype(logits_NV.dtype))
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    width = cur.node_index.shape[1] - 1
    if width < 1:
        return lse_N.new_zeros(()), 0.0
    here_SL = cur.node_index[:, :-1]  # [S, L - 1]
    target_SL = cur.input_ids[cur.node_index[:, 1:]]
    ce_SL = lse_N[here_SL] - logits_NV[here_SL, target_SL]
    steps = torch.arange(width, device=here_SL.device)
    valid_SL = steps[None, :] < (cur.lengths[:, None] - 1)
    columns = (steps + k + 1).clamp(max=loss_mask_BL.shape[1] - 1)
    mask_SL = loss_mask_BL[cur.sequence_rows][:, columns].bool() & valid_SL
    weight_SL = mask_SL.to(ce_SL.dtype)
    return (ce_SL * weight_SL).sum(), float(weight_SL.sum())


__all__ = ["mtp_loss_merged", "mtp_module_losses_merged"]
