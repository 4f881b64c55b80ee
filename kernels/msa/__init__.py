"""MiniMax Sparse Attention: GQA-driven block selection and block-sparse flash attention (varlen)."""

from forgerl.kernels.msa.triton_msa import msa_attention

__all__ = ["msa_attention"]
