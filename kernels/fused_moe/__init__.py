"""Fused sigmoid-routed SwiGLU mixture of experts (forward and backward, float32 and bfloat16)."""

from forgerl.kernels.fused_moe.triton_moe import fused_moe

__all__ = ["fused_moe"]
