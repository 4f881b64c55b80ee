"""MiniMax Sparse Attention: GQA-driven block selection and block-sparse flash attention (varlen)."""

from forgerl.kernels.msa.adapter import make_msa_backend, msa_m3_backend, register_m3_msa
from forgerl.kernels.msa.triton_index_m3 import index_block_scores
from forgerl.kernels.msa.triton_msa import msa_attention
from forgerl.kernels.msa.triton_msa_m3 import msa_m3_attention, msa_m3_attention_varlen

__all__ = [
    "index_block_scores",
    "make_msa_backend",
    "msa_attention",
    "msa_m3_attention",
    "msa_m3_attention_varlen",
    "msa_m3_backend",
    "register_m3_msa",
]
