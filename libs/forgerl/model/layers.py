"""Building blocks: RMSNorm and partial rotary position embedding.

Shape legend: B batch, T query positions, H heads, K head_dim, R rotary_dim, D any normalised width.

Both compute in the promoted type of float32 and the input's dtype: bf16 inputs get float32 maths (as the
reference implementations do), float64 inputs stay float64 so that a float64 model is exact end to end.
"""

from __future__ import annotations

import torch
from torch import nn


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: float32 for bf16/fp16/fp32, float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """x / rms(x) * weight (M2), or with `unit_offset` the Gemma form x / rms(x) * (1 + weight) that every
    MiniMax-M3 norm uses (transformers' MiniMaxM3VLRMSNorm): weight starts at zeros and the product is taken
    in the compute dtype before the cast back, where M2 casts first (the two differ in bf16 only)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x_D: torch.Tensor) -> torch.Tensor:
        x = x_D.to(compute_dtype(x_D.dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.to(x.dtype))).to(x_D.dtype)
        # Cast back before the weight, as transformers' MiniMaxM2RMSNorm does (matters in bf16 only).
        return self.weight * x.to(x_D.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


def rotary_cos_sin(
    position_ids_BT: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, R] for `dtype` activations (NeoX layout: the R/2 frequencies twice).

    Angles are computed in compute_dtype(dtype); computing them per forward (not from a cached table)
    costs B*T*R/2 multiplies and lets any position id, such as a prefix tree's depth, be used.
    """
    ct = compute_dtype(dtype)
    exponent_R2 = torch.arange(0, rotary_dim, 2, dtype=ct, device=position_ids_BT.device) / rotary_dim
    inv_freq_R2 = 1.0 / (theta**exponent_R2)
    angles_BTR2 = position_ids_BT[..., None].to(ct) * inv_freq_R2
    angles_BTR = torch.cat((angles_BTR2, angles_BTR2), dim=-1)
    return angles_BTR.cos().to(dtype), angles_BTR.sin().to(dtype)


def _rotate_half(x_R: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_R.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x_BHTK: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R channels of every head; the other K - R channels pass through."""
    rotary_dim = cos_BTR.shape[-1]
    cos_B1TR, sin_B1TR = cos_BTR[:, None], sin_BTR[:, None]
    x_rot, x_pass = x_BHTK[..., :rotary_dim], x_BHTK[..., rotary_dim:]
    x_rot = x_rot * cos_B1TR + _rotate_half(x_rot) * sin_B1TR
    return torch.cat((x_rot, x_pass), dim=-1)
