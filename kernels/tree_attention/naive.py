"""Float32 reference for tree attention: a dense ancestor mask and a written-out softmax.

Encoding (the same one `forgerl.rl.prefix_tree.TreePack` produces): a pack is a forest of prefix trees
flattened in preorder, so every subtree is one contiguous range [s, subtree_end[s]). Query t may attend
key s exactly when s is t or an ancestor of t, i.e. s <= t < subtree_end[s]. One int per token encodes
the whole mask; subtree_end[s] = T everywhere is plain causal attention, subtree_end[s] = s hides key s
(padding) and a query that sees no key gets a zero output.
"""

from __future__ import annotations

import torch


def ancestor_mask(subtree_end_BT: torch.Tensor) -> torch.Tensor:
    """bool [B, T, T]: True where query t may attend key s (s <= t < subtree_end[s])."""
    t = subtree_end_BT.shape[-1]
    nodes = torch.arange(t, device=subtree_end_BT.device)
    return (nodes[None, :] <= nodes[:, None])[None] & (nodes[None, :, None] < subtree_end_BT[:, None, :])


def naive_tree_attention(
    q_BTHD: torch.Tensor,
    k_BTGD: torch.Tensor,
    v_BTGD: torch.Tensor,
    subtree_end_BT: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale masked to ancestors) v in float32; returns float32 [B, T, H, D]."""
    heads, kv_heads, head_dim = q_BTHD.shape[2], k_BTGD.shape[2], q_BTHD.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    q_BHTD = q_BTHD.float().transpose(1, 2)
    k_BHTD = k_BTGD.float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    v_BHTD = v_BTGD.float().transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores_BHTS = (q_BHTD @ k_BHTD.transpose(-1, -2)) * scale
    visible_B1TS = ancestor_mask(subtree_end_BT)[:, None]
    scores_BHTS = scores_BHTS.masked_fill(~visible_B1TS, float("-inf"))
    probs_BHTS = torch.softmax(scores_BHTS, dim=-1).nan_to_num(0.0)  # rows with no visible key -> zero
    return (probs_BHTS @ v_BHTD).transpose(1, 2)
