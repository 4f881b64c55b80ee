"""Sigmoid routing with a selection-only bias, as one Triton kernel per token tile.

Shape legend: N tokens, E experts, K experts per token. The kernel reads router logits [N, E], takes
sigmoid, picks the top-k of scores + bias by K rounds of arg-max (K <= 8 at MiniMax-M2's shape, so this
beats a sort over 256 experts), and writes the ids in descending biased-score order and the unbiased
scores of the chosen experts renormalised to one. The backward is closed-form: w_k = s_k / sum_j s_j and
ds/dlogit = s (1 - s), so dlogit_k = s_k (1 - s_k) (g_k - sum_j g_j w_j) / sum_j s_j on chosen experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(
    LOGITS, BIAS, IDS, WEIGHTS, SELECTED, N, E, K,
    BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    kcols = tl.arange(0, BK)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols[None, :] < E)
    logits = tl.load(LOGITS + rows[:, None] * E + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logits))
    bias = tl.load(BIAS + cols, mask=cols < E, other=0.0).to(tl.float32)
    biased = tl.where(ok, scores + bias[None, :], float("-inf"))
    chosen = tl.zeros([BT, BK], tl.float32)
    for kk in range(K):
        best = tl.argmax(biased, 1)  # [BT]
        hit = cols[None, :] == best[:, None]
        score = tl.sum(tl.where(hit, scores, 0.0), 1)
        tl.store(IDS + rows * K + kk, best.to(tl.int64), mask=row_ok)
        chosen = tl.where(kcols[None, :] == kk, score[:, None], chosen)
        biased = tl.where(hit, float("-inf"), biased)
    total = tl.sum(chosen, 1)
    k_ok = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(SELECTED + rows[:, None] * K + kcols[None, :], chosen, mask=k_ok)
    tl.store(WEIGHTS + rows[:, None] * K + kcols[None, :], chosen / total[:, None], mask=k_ok)


def route_fwd(
    logits_NE: torch.Tensor, bias_E: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [N, K] int64, weights [N, K] float32, chosen unbiased scores [N, K] float32."""
    n, e = logits_NE.shape
    logits_NE = logits_NE.contiguous()
    ids = torch.empty(n, top_k, dtype=torch.int64, device=logits_NE.device)
    weights = torch.empty(n, top_k, dtype=torch.float32, device=logits_NE.device)
    selected = torch.empty_like(weights)
    block_tokens = 16
    _route_kernel[(triton.cdiv(n, block_tokens),)](
        logits_NE, bias_E.contiguous(), ids, weights, selected, n, e, top_k,
        BT=block_tokens, BE=triton.next_power_of_2(e), BK=max(2, triton.next_power_of_2(top_k)),
    )  # fmt: skip
    return ids, weights, selected


class _RouteFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, logits_NE: torch.Tensor, bias_E: torch.Tensor, top_k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, weights, selected = route_fwd(logits_NE, bias_E, top_k)
        ctx.save_for_backward(ids, weights, selected)
        ctx.logits_shape, ctx.logits_dtype = logits_NE.shape, logits_NE.dtype  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(ids)
        return ids, weights

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, _grad_ids: torch.Tensor | None, grad_weights: torch.Tensor
    ) -> tuple[torch.Tensor | None, None, None]:
        ids, weights, selected = ctx.saved_tensors  # type: ignore[attr-defined]
        grad_weights = grad_weights.float()
        centred = grad_weights - (grad_weights * weights).sum(-1, keepdim=True)
        grad_selected = centred / selected.sum(-1, keepdim=True)
        grad_chosen_logits = grad_selected * selected * (1.0 - selected)
        grad_logits = torch.zeros(ctx.logits_shape, dtype=torch.float32, device=ids.device)  # type: ignore[attr-defined]
        grad_logits.scatter_(1, ids, grad_chosen_logits)
        return grad_logits.to(ctx.logits_dtype), None, None  # type: ignore[attr-defined]


def route(logits_NE: torch.Tensor, bias_E: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [N, K] and renormalised float32 weights [N, K] from router logits [N, E]."""
    ids, weights = _RouteFunction.apply(logits_NE, bias_E, top_k)
    return ids, weights
