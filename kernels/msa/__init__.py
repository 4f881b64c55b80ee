"""MiniMax Sparse Attention: GQA-driven block selection and block-sparse flash attention (varlen)."""

from forgerl.kernels.msa.adapter import make_msa_backend
from forgerl.kernels.msa.triton_msa import msa_attention

__all__ = ["make_msa_backend", "msa_attention"]
