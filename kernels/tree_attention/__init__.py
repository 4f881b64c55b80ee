"""Tree attention for prefix-tree-merged training packs (forward and backward, GQA)."""

from forgerl.kernels.tree_attention.adapter import tree_attention_backend
from forgerl.kernels.tree_attention.triton_tree import tree_attention

__all__ = ["tree_attention", "tree_attention_backend"]
