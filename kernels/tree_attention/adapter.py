"""The tree-attention kernel as a `forgerl.model.attention.AttentionBackend`.

`cfg.attn_backend = "tree"` selects it (the model imports it through `tree_backend_for`, lazily);
`forgerl.rl.prefix_merge` then hands the model each pack's `TreeMask`
(subtree ends [B, T]), which goes to the kernel as is: no [T, T] mask is ever built.

A dense bool mask is accepted too (from `dense_ancestor_mask`, or a caller that builds its own): in a
preorder pack the queries that see key s are exactly [s, subtree_end[s]), so subtree_end is s plus the
count of column s. The mask is checked against that encoding, so a mask that is not an ancestor mask of
a preorder pack raises instead of being silently approximated.
"""

from __future__ import annotations

import torch

from forgerl.kernels import require_runtime
from forgerl.kernels.tree_attention.naive import ancestor_mask
from forgerl.kernels.tree_attention.triton_tree import tree_attention
from forgerl.model.attention import AttentionBackend, TreeMask
from forgerl.model.config import ModelConfig


def subtree_end_from_mask(mask_BTS: torch.Tensor) -> torch.Tensor:
    """int32 [B, T] subtree ends of a preorder ancestor mask; raises if the mask is not of that form."""
    t = mask_BTS.shape[-1]
    nodes = torch.arange(t, device=mask_BTS.device)
    subtree_end_BT = (nodes[None, :] + mask_BTS.sum(dim=1)).to(torch.int32)
    if not torch.equal(ancestor_mask(subtree_end_BT), mask_BTS):
        raise ValueError(
            "mask is not a preorder ancestor mask (query t sees key s iff s <= t < subtree_end[s]): "
            "use attn_backend 'sdpa' for general masks"
        )
    return subtree_end_BT


def tree_attention_backend(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    mask_BTS: torch.Tensor | TreeMask | None,
    scale: float,
) -> torch.Tensor:
    """AttentionBackend: `mask_BTS` None is causal, a `TreeMask` is used as is, a dense mask must be a
    preorder ancestor mask; returns [B, H, T, K]."""
    require_runtime(q_BHTK, "attn_backend 'tree'")
    b, _, t, _ = q_BHTK.shape
    if mask_BTS is None:
        subtree_end_BT = torch.full((b, t), t, dtype=torch.int32, device=q_BHTK.device)
    elif isinstance(mask_BTS, TreeMask):
        subtree_end_BT = mask_BTS.subtree_end_BT.expand(b, t)
    else:
        subtree_end_BT = subtree_end_from_mask(mask_BTS.expand(b, t, t))
    out_BTHK = tree_attention(
        q_BHTK.transpose(1, 2), k_BGSK.transpose(1, 2), v_BGSK.transpose(1, 2), subtree_end_BT, scale
    )
    return out_BTHK.transpose(1, 2)


def tree_backend_for(_cfg: ModelConfig) -> AttentionBackend:
    """attention.KERNEL_BACKENDS' factory for "tree" (the kernel takes no settings)."""
    return tree_attention_backend
