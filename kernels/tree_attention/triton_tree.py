"""Flash-attention over prefix-tree packs: online softmax, keys limited to each query's ancestors.

Shape legend: B batch, T tokens, H query heads, G key/value heads (H % G == 0), D head_dim.
Mask encoding (see naive.py): query t attends key s iff s <= t < subtree_end[s], with `subtree_end_BT`
int32/int64 [B, T]. Besides masking element-wise, the encoding prunes whole tiles: a key tile whose largest
subtree_end is <= the first query of a query tile is invisible to the tile and never loaded, and in the
backward a key tile only visits the query tiles in [tile start, max subtree_end) - a finished branch of the
tree costs its queries nothing.

Kernels: `_fwd_kernel` (O and the log-sum-exp per query row), `_bwd_dq_kernel` (one program per query tile
and head), `_bwd_dkdv_kernel` (one program per key tile and KV head, looping over the group's query heads
so GQA needs no atomics). The forward and dq load and score a key tile alike (`_key_tile`); all three
test visibility with `_visible`, the one place the encoding is written in the kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _visible(offs_m, offs_n, end):
    """[BM, BN] bool: query offs_m may attend key offs_n, i.e. key <= query < subtree_end[key]."""
    return (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < end[None, :])


@triton.jit
def _key_tile(
    q, K, V, end, b, g, offs_m, offs_n, offs_d,
    skb, skt, skh, T, head_dim, scale,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Key tile offs_n of KV head g against a query tile: its k and v [BN, BD], the scaled scores
    q k^T [BM, BN] and which of them the tree makes visible (the block the forward and dq share)."""
    kv_off = b * skb + offs_n[:, None] * skt + g * skh + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < head_dim)
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    return k, v, s, _visible(offs_m, offs_n, end)


@triton.jit
def _fwd_kernel(
    Q, K, V, END, OUT, LSE,
    sqb, sqt, sqh, skb, skt, skh, sob, sot, soh, seb,
    T, num_heads, head_dim, scale,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // num_heads, pid_bh % num_heads
    g = h // GROUP
    q_start = pid_m * BM
    offs_m = q_start + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sqb + offs_m[:, None] * sqt + h * sqh + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BD], tl.float32)
    for start_n in range(0, tl.minimum(q_start + BM, T), BN):
        offs_n = start_n + tl.arange(0, BN)
        end = tl.load(END + b * seb + offs_n, mask=offs_n < T, other=0)
        if tl.max(end, 0) > q_start:
            _, v, s, visible = _key_tile(q, K, V, end, b, g, offs_m, offs_n, offs_d, skb, skt, skh, T, head_dim,
                                         scale, UPCAST, PRECISION)  # fmt: skip
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(OUT + b * sob + offs_m[:, None] * sot + h * soh + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=(offs_m[:, None] < T) & d_ok[None, :])  # fmt: skip
    # +inf for a row with no visible key makes exp(s - lse) == 0 in the backward.
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, END, DO, LSE, DELTA, DQ,
    sqb, sqt, sqh, skb, skt, skh, seb,
    T, num_heads, head_dim, scale,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // num_heads, pid_bh % num_heads
    g = h // GROUP
    q_start = pid_m * BM
    offs_m = q_start + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < head_dim
    q_off = b * sqb + offs_m[:, None] * sqt + h * sqh + offs_d[None, :]
    q_mask = (offs_m[:, None] < T) & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    do = tl.load(DO + q_off, mask=q_mask, other=0.0)
    if UPCAST:
        q, do = q.to(tl.float32), do.to(tl.float32)
    lse = tl.load(LSE + pid_bh * T + offs_m, mask=offs_m < T, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    for start_n in range(0, tl.minimum(q_start + BM, T), BN):
        offs_n = start_n + tl.arange(0, BN)
        end = tl.load(END + b * seb + offs_n, mask=offs_n < T, other=0)
        if tl.max(end, 0) > q_start:
            k, v, s, visible = _key_tile(q, K, V, end, b, g, offs_m, offs_n, offs_d, skb, skt, skh, T, head_dim,
                                         scale, UPCAST, PRECISION)  # fmt: skip
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, END, DO, LSE, DELTA, DK, DV,
    sqb, sqt, sqh, skb, skt, skh, seb,
    T, num_heads, num_kv_heads, head_dim, scale,
    GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_n, pid_bg = tl.program_id(0), tl.program_id(1)
    b, g = pid_bg // num_kv_heads, pid_bg % num_kv_heads
    k_start = pid_n * BN
    offs_n = k_start + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < head_dim
    kv_off = b * skb + offs_n[:, None] * skt + g * skh + offs_d[None, :]
    kv_mask = (offs_n[:, None] < T) & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    end = tl.load(END + b * seb + offs_n, mask=offs_n < T, other=0)
    q_stop = tl.minimum(tl.max(end, 0), T)  # no query at or past the largest subtree end sees this tile
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BD], tl.float32)
    for h_in in range(GROUP):
        h = g * GROUP + h_in
        row = (b * num_heads + h) * T
        for start_m in range(k_start, q_stop, BM):
            offs_m = start_m + tl.arange(0, BM)
            q_off = b * sqb + offs_m[:, None] * sqt + h * sqh + offs_d[None, :]
            q_mask = (offs_m[:, None] < T) & d_ok[None, :]
            q = tl.load(Q + q_off, mask=q_mask, other=0.0)
            do = tl.load(DO + q_off, mask=q_mask, other=0.0)
            if UPCAST:
                q, do = q.to(tl.float32), do.to(tl.float32)
            lse = tl.load(LSE + row + offs_m, mask=offs_m < T, other=float("inf"))
            delta = tl.load(DELTA + row + offs_m, mask=offs_m < T, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(_visible(offs_m, offs_n, end), tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


def _launch_config(q: torch.Tensor) -> dict[str, object]:
    """Tile sizes and dot precision; the CPU interpreter gets small tiles and float32 dots (its bf16 dot
    is wrong), a GPU gets 64x64 tiles and IEEE float32 dots for float32 inputs (TF32 would cost ~1e-3)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    head_dim = q.shape[-1]
    tile = 16 if interpreted else 64
    return {
        "BM": tile,
        "BN": tile,
        "BD": max(16, triton.next_power_of_2(head_dim)),
        "UPCAST": interpreted and q.dtype != torch.float32,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, subtree_end: torch.Tensor) -> None:
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, T, G, D] to match q {tuple(q.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q {q.dtype}, k {k.dtype} and v {v.dtype} must share one dtype")
    if h % k.shape[2]:
        raise ValueError(f"num_heads {h} must be a multiple of num_kv_heads {k.shape[2]}")
    if subtree_end.shape != (b, t):
        raise ValueError(f"subtree_end {tuple(subtree_end.shape)} must be [B, T] = {(b, t)}")


def tree_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, subtree_end: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the output [B, T, H, D] (q's dtype) and the float32 log-sum-exp [B, H, T]."""
    b, t, h, d = q.shape
    cfg = _launch_config(q)
    out = torch.empty_like(q)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(t, cfg["BM"]), b * h)
    _fwd_kernel[grid](
        q, k, v, subtree_end, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), subtree_end.stride(0),
        t, h, d, scale, GROUP=h // k.shape[2], **cfg,
    )  # fmt: skip
    return out, lse


def tree_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv for tree_attention_fwd; grad_out must have q's strides, k and v the same strides."""
    b, t, h, d = q.shape
    g = k.shape[2]
    cfg = _launch_config(q)
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, T]: rowsum(dO * O)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), subtree_end.stride(0))
    _bwd_dq_kernel[(triton.cdiv(t, cfg["BM"]), b * h)](
        q, k, v, subtree_end, grad_out, lse, delta, dq, *strides, t, h, d, scale, GROUP=h // g, **cfg
    )
    _bwd_dkdv_kernel[(triton.cdiv(t, cfg["BN"]), b * g)](
        q, k, v, subtree_end, grad_out, lse, delta, dk, dv, *strides, t, h, g, d, scale, GROUP=h // g, **cfg
    )
    return dq, dk, dv


class _TreeAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        subtree_end: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        out, lse = tree_attention_fwd(q, k, v, subtree_end, scale)
        ctx.save_for_backward(q, k, v, subtree_end, out, lse)
        ctx.scale = scale  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, subtree_end, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        if grad_out.stride() != q.stride():  # the kernels address dO with q's strides
            grad_out = torch.empty_like(q).copy_(grad_out)
        dq, dk, dv = tree_attention_bwd(q, k, v, subtree_end, out, lse, grad_out, ctx.scale)  # type: ignore[attr-defined]
        return dq, dk, dv, None, None


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    subtree_end: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of every token over its ancestors in a preorder-packed prefix forest.

    Args:
        q: [B, T, H, D] queries (float32, bfloat16 or float16).
        k, v: [B, T, G, D] keys and values, H % G == 0 (GQA: query head h reads KV head h // (H // G)).
        subtree_end: [B, T] int: one past the last token of each token's subtree, so query t attends key s
            iff s <= t < subtree_end[s] (`TreePack.subtree_end()`; all T is causal; s itself hides key s).
        scale: softmax scale, default D ** -0.5.
    Returns:
        [B, T, H, D] in q's dtype; a query with no visible key gets zeros.
    """
    _check(q, k, v, subtree_end)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if k.stride() != v.stride():  # the kernels address k, v (and dk, dv) with one set of strides
        k, v = k.contiguous(), v.contiguous()
    return _TreeAttentionFunction.apply(q, k, v, subtree_end.contiguous(), scale)
