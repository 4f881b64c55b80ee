"""Fused sigmoid-routed SwiGLU mixture of experts (forward and backward, float32 and bfloat16)."""

from forgerl.kernels.fused_moe.triton_moe import fused_experts, fused_moe

__all__ = ["fused_experts", "fused_moe"]
