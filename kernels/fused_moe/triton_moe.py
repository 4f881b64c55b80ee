"""Fused MoE layer: Triton routing, gathered SwiGLU grouped GEMMs and a weighted un-permuting epilogue.

Shape legend: N tokens, D hidden, E experts, F expert FFN width, K experts per token, C slot capacity.
Forward: route (routing.py) -> align pairs by expert -> [x gathered] @ w1, w3 -> silu(a1) * a3 = h
(one kernel) -> h @ w2 scaled by the routing weight, written to the pair's row [N*K, D] -> sum over K.
Backward: dh' = [dy gathered] @ w2 (the unweighted path, so d weight = <dh', h> needs no stored output)
with SwiGLU's backward and d weight in its epilogue; dx = da1 @ w1 + da3 @ w3 in one K loop, summed back
per token; per-expert weight gradients dW[e] = sum_slots a^T b from the wgrad kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton

from forgerl.kernels import require_runtime
from forgerl.kernels.fused_moe.grouped_gemm import (
    Alignment,
    _grouped_gemm_kernel,
    _grouped_wgrad_kernel,
    align_by_expert,
    block_m_for,
    launch_config,
)
from forgerl.kernels.fused_moe.routing import route


def _gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, int, int],
    n_out: int,
    al: Alignment,
    *,
    gather: bool,
    w3: torch.Tensor | None = None,
    scatter_to: tuple[torch.Tensor, int] | None = None,
    scale: torch.Tensor | None = None,
    swiglu_bwd: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    second: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """out[slot] = a[token or slot] @ W[e]; returns (out, a1, a3) with a1/a3 only for SwiGLU (w3 given).

    `swiglu_bwd` = (a1, a3, da3 out, d weight out [C] float32 zeros): out becomes da1 (see the kernel).
    `second` = (a2, w2) with a's and W's layouts: out += a2[row] @ w2[e] in the same K loop."""
    capacity, k_in = al.token_of_slot.shape[0], a.shape[1]
    cfg = launch_config(a.dtype)
    out_rows = capacity if scatter_to is None else scatter_to[1]
    out = torch.empty(out_rows, n_out, dtype=a.dtype, device=a.device)
    a1 = torch.empty(capacity, n_out, dtype=a.dtype, device=a.device) if w3 is not None else out
    a3 = torch.empty_like(a1) if w3 is not None else out
    da3, d_weight = out, al.token_of_slot
    if swiglu_bwd is not None:
        a1, a3, da3, d_weight = swiglu_bwd
    a2, w_other = second if second is not None else (a, w if w3 is None else w3)  # the kernel's A2, W3
    grid = (capacity // al.block_m, triton.cdiv(n_out, cfg["BN"]))
    _grouped_gemm_kernel[grid](
        a, al.token_of_slot, w, w_other, out, a1, a3,
        al.token_of_slot if scale is None else scale, al.pair_of_slot, al.tile_expert, da3, d_weight, a2,
        n_out, k_in, a.stride(0), *w_strides, out.stride(0),
        GATHER=gather, SWIGLU=w3 is not None, SCATTER=scatter_to is not None, SWIGLU_BWD=swiglu_bwd is not None,
        DUAL=second is not None, BM=al.block_m, **cfg,
    )  # fmt: skip
    return out, (a1 if w3 is not None else None), (a3 if w3 is not None else None)


def _wgrad(
    a: torch.Tensor, b: torch.Tensor, al: Alignment, *, gather_a: bool, gather_b: bool, scale: torch.Tensor | None
) -> torch.Tensor:
    """dW [E, I_a, I_b] = per expert, sum over its slots of a[row]^T b[row]."""
    experts, m_out, n_out = al.counts.shape[0], a.shape[1], b.shape[1]
    cfg = launch_config(b.dtype)
    out = torch.empty(experts, m_out, n_out, dtype=b.dtype, device=b.device)
    grid = (triton.cdiv(m_out, al.block_m) * triton.cdiv(n_out, cfg["BN"]), experts)
    _grouped_wgrad_kernel[grid](
        a, al.token_of_slot, al.token_of_slot if scale is None else scale, b, al.token_of_slot, out,
        al.segment_start, al.counts, m_out, n_out, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        GATHER_A=gather_a, GATHER_B=gather_b, SCALE_A=scale is not None, BM=al.block_m, **cfg,
    )  # fmt: skip
    return out


def _strides(w: torch.Tensor, k_dim: int, n_dim: int) -> tuple[int, int, int]:
    return w.stride(0), w.stride(k_dim), w.stride(n_dim)


def experts_fwd(
    x_ND: torch.Tensor,
    weights_NK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    al: Alignment,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y [N, D] (x's dtype) plus h, a1, a3 [C, F] and the per-slot routing weight [C] for the backward."""
    n, d = x_ND.shape
    k = weights_NK.shape[1]
    valid_C = al.pair_of_slot >= 0
    weight_C = torch.where(valid_C, weights_NK.reshape(-1).float()[al.pair_of_slot.clamp(min=0)], 0.0)
    h_CF, a1_CF, a3_CF = _gemm(x_ND, w1_EFD, _strides(w1_EFD, 2, 1), w1_EFD.shape[1], al, gather=True, w3=w3_EFD)
    y_PD, _, _ = _gemm(
        h_CF, w2_EDF, _strides(w2_EDF, 2, 1), d, al, gather=False, scatter_to=(al.pair_of_slot, n * k), scale=weight_C
    )
    y_ND = y_PD.view(n, k, d).sum(1, dtype=torch.float32).to(x_ND.dtype)  # [N, K, D] -> [N, D]
    assert a1_CF is not None and a3_CF is not None
    return y_ND, h_CF, a1_CF, a3_CF, weight_C


def experts_bwd(
    grad_ND: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    al: Alignment,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx [N, D], d weights [N, K] (float32), dw1, dw2, dw3."""
    x_ND, w1_EFD, w2_EDF, w3_EFD, h_CF, a1_CF, a3_CF, weight_C = saved
    n, d = x_ND.shape
    valid_C = al.pair_of_slot >= 0
    pair_V = al.pair_of_slot[valid_C]
    da3_CF = torch.empty_like(a3_CF)
    d_weight_C = torch.zeros_like(weight_C)
    da1_CF, _, _ = _gemm(
        grad_ND, w2_EDF, _strides(w2_EDF, 1, 2), w2_EDF.shape[2], al, gather=True, scale=weight_C,
        swiglu_bwd=(a1_CF, a3_CF, da3_CF, d_weight_C),
    )  # fmt: skip
    grad_weights = torch.zeros(n * top_k, dtype=torch.float32, device=x_ND.device)
    grad_weights[pair_V] = d_weight_C[valid_C]
    dx_CD, _, _ = _gemm(da1_CF, w1_EFD, _strides(w1_EFD, 1, 2), d, al, gather=False, second=(da3_CF, w3_EFD))
    dx_ND = torch.zeros(n, d, dtype=torch.float32, device=x_ND.device)
    dx_ND.index_add_(0, al.token_of_slot[valid_C], dx_CD[valid_C].float())
    dw1 = _wgrad(da1_CF, x_ND, al, gather_a=False, gather_b=True, scale=None)
    dw3 = _wgrad(da3_CF, x_ND, al, gather_a=False, gather_b=True, scale=None)
    dw2 = _wgrad(grad_ND, h_CF, al, gather_a=True, gather_b=False, scale=weight_C)
    return dx_ND.to(x_ND.dtype), grad_weights.view(n, top_k), dw1, dw2, dw3


class _ExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_ND: torch.Tensor,
        weights_NK: torch.Tensor,
        w1_EFD: torch.Tensor,
        w2_EDF: torch.Tensor,
        w3_EFD: torch.Tensor,
        expert_ids_NK: torch.Tensor,
    ) -> torch.Tensor:
        al = align_by_expert(expert_ids_NK, w1_EFD.shape[0], block_m_for(x_ND.dtype))
        y_ND, h_CF, a1_CF, a3_CF, weight_C = experts_fwd(x_ND, weights_NK, w1_EFD, w2_EDF, w3_EFD, al)
        ctx.save_for_backward(x_ND, w1_EFD, w2_EDF, w3_EFD, h_CF, a1_CF, a3_CF, weight_C)
        ctx.alignment, ctx.top_k = al, expert_ids_NK.shape[1]  # type: ignore[attr-defined]
        ctx.weights_dtype = weights_NK.dtype  # type: ignore[attr-defined]
        return y_ND

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        dx, d_weights, dw1, dw2, dw3 = experts_bwd(grad_ND.contiguous(), saved, ctx.alignment, ctx.top_k)  # type: ignore[attr-defined]
        return dx, d_weights.to(ctx.weights_dtype), dw1, dw2, dw3, None  # type: ignore[attr-defined]


def fused_experts(
    x_ND: torch.Tensor,
    expert_ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
) -> torch.Tensor:
    """The routed experts alone, as `forgerl.model.moe.Experts.forward` with moe_backend "triton" (the
    router stays the model's, so its scores, loads and routing replay are unchanged). Forward and
    backward are the Triton kernels above; the backward is checked against the torch Experts' autograd.

    Args:
        x_ND: [N, D] tokens; w1_EFD, w3_EFD [E, F, D], w2_EDF [E, D, F] in x's dtype.
        expert_ids_NK: [N, K] long; weights_NK: [N, K] routing weights (any float dtype; gradients come
            back in it).
    Returns:
        y [N, D] in x's dtype: sum_k weight_k * w2[e_k] (silu(w1[e_k] x) * w3[e_k] x).
    """
    require_runtime(x_ND, "moe_backend 'triton'")
    if x_ND.shape[0] == 0:  # an EP rank sent no rows: still a (zero) gradient for every weight, as torch's
        return x_ND + 0.0 * (w1_EFD.sum() + w2_EDF.sum() + w3_EFD.sum() + weights_NK.sum())
    x_ND, w1_EFD, w2_EDF, w3_EFD = (t.contiguous() for t in (x_ND, w1_EFD, w2_EDF, w3_EFD))
    y_ND: torch.Tensor = _ExpertsFunction.apply(x_ND, weights_NK, w1_EFD, w2_EDF, w3_EFD, expert_ids_NK)
    return y_ND


def fused_moe(
    x_ND: torch.Tensor,
    gate_ED: torch.Tensor,
    bias_E: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    top_k: int,
    replay_ids_NK: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid-routed SwiGLU mixture of experts (forgerl.model.moe semantics), differentiable in x, the
    gate and the three expert weights.

    Args:
        x_ND: [N, D] tokens (float32 or bfloat16).
        gate_ED: [E, D] router weight; the router runs in float32.
        bias_E: [E] selection-only correction bias (picks experts, never weights them).
        w1_EFD, w3_EFD: [E, F, D] gate and up projections; w2_EDF: [E, D, F] down projection.
        top_k: experts per token.
        replay_ids_NK: [N, K] experts to use instead of the router's choice (routing replay).
    Returns:
        y [N, D] in x's dtype, expert ids [N, K], renormalised float32 weights [N, K].
    """
    if not x_ND.dtype == w1_EFD.dtype == w2_EDF.dtype == w3_EFD.dtype:
        raise ValueError(
            f"x {x_ND.dtype} and expert weights {w1_EFD.dtype}/{w2_EDF.dtype}/{w3_EFD.dtype} must share one dtype: "
            "cast the weights to the activation dtype (tl.dot takes equal operand types)"
        )
    x_ND, w1_EFD, w2_EDF, w3_EFD = (t.contiguous() for t in (x_ND, w1_EFD, w2_EDF, w3_EFD))
    logits_NE = F.linear(x_ND.float(), gate_ED.float())
    if replay_ids_NK is None:
        expert_ids_NK, weights_NK = route(logits_NE, bias_E.float(), top_k)
    else:
        expert_ids_NK = replay_ids_NK
        chosen_NK = logits_NE.sigmoid().gather(1, replay_ids_NK)
        weights_NK = chosen_NK / chosen_NK.sum(-1, keepdim=True)
    y_ND = _ExpertsFunction.apply(x_ND, weights_NK, w1_EFD, w2_EDF, w3_EFD, expert_ids_NK)
    return y_ND, expert_ids_NK, weights_NK
