"""Block-sparse flash attention for MSA on packed variable-length sequences (prefill and decode).

Shape legend: N sequences, Tq/Tk packed tokens, H query heads, G KV heads, GROUP = H / G, D head_dim,
NQ query blocks, S kept key blocks per (query block, KV head) from index.py.

One program handles one query block of one KV group, or of a chunk of its heads (see _launch_config): it
stacks those query heads into a [HEADS * BLOCK, D] tile, so each kept K/V block is loaded once for all of
them (the reason the index branch selects per group, not per head). Queries sit at the end of their
sequence (bottom-right causal), so decode is the Tq = 1 case of the same kernel. The backward recomputes
probabilities from the log-sum-exp; dq stays in registers, dk/dv are accumulated with float32 atomics
because a key block receives gradient from every query block that kept it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from forgerl.kernels.msa.index import select_blocks


@triton.jit
def _tile_setup(
    CU_Q, CU_K, pid_q, pid_ngc, kv_heads, chunks, BLOCK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr
):
    """Program (n, g, c) takes heads c * HEADS .. of KV group g; row r of its tile is query head
    g * GROUP + c * HEADS + r // BLOCK at key position blk * BLOCK + r % BLOCK (heads past GROUP masked)."""
    n, g, c = pid_ngc // (kv_heads * chunks), (pid_ngc // chunks) % kv_heads, pid_ngc % chunks
    q0, k0 = tl.load(CU_Q + n), tl.load(CU_K + n)
    len_q, len_k = tl.load(CU_Q + n + 1) - q0, tl.load(CU_K + n + 1) - k0
    offset = len_k - len_q
    blk = offset // BLOCK + pid_q
    rows = tl.arange(0, HEADS * BLOCK)
    head_in_group = c * HEADS + rows // BLOCK
    head = g * GROUP + head_in_group
    pos = blk * BLOCK + rows % BLOCK
    row_ok = (pos >= offset) & (pos < len_k) & (head_in_group < GROUP)
    return n, g, q0 + pos - offset, k0, len_k, head, pos, row_ok, blk * BLOCK < len_k


@triton.jit
def _query_tile(Q, q_row, head, row_ok, sqt, sqh, head_dim, BD: tl.constexpr, UPCAST: tl.constexpr):
    """The program's query rows [HEADS * BLOCK, BD], their offsets and mask (shared with dO, O and dQ)."""
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < head_dim
    q_off = q_row[:, None] * sqt + head[:, None] * sqh + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return q, q_off, q_mask, offs_d, d_ok


@triton.jit
def _key_block(
    q, K, V, kb, k0, g, pos, len_k, offs_d, d_ok, skt, skh, scale,
    BLOCK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Kept key block kb of KV head g: its k and v [BLOCK, BD], their offsets and mask, the scaled scores
    q k^T and which of them are causal and in the sequence (the block the forward and backward share)."""
    kpos = kb * BLOCK + tl.arange(0, BLOCK)
    kv_off = (k0 + kpos)[:, None] * skt + g * skh + offs_d[None, :]
    kv_mask = (kpos[:, None] < len_k) & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
    if UPCAST:
        k, v = k.to(tl.float32), v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    visible = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < len_k)
    return k, v, kv_off, kv_mask, scores, visible


@triton.jit
def _msa_fwd_kernel(
    Q, K, V, SEL, CU_Q, CU_K, OUT, LSE,
    sqt, sqh, skt, skh, sot, soh, sel_n, sel_g, sel_q, lse_h,
    kv_heads, chunks, head_dim, scale, S,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_q, pid_ng = tl.program_id(0), tl.program_id(1)
    tile = _tile_setup(CU_Q, CU_K, pid_q, pid_ng, kv_heads, chunks, BLOCK, GROUP, HEADS)
    n, g, q_row, k0, len_k, head, pos, row_ok, live = tile
    if live:
        q, _, q_mask, offs_d, d_ok = _query_tile(Q, q_row, head, row_ok, sqt, sqh, head_dim, BD, UPCAST)
        m_i = tl.full([HEADS * BLOCK], -1.0e30, tl.float32)
        l_i = tl.zeros([HEADS * BLOCK], tl.float32)
        acc = tl.zeros([HEADS * BLOCK, BD], tl.float32)
        for s_idx in range(S):
            kb = tl.load(SEL + n * sel_n + g * sel_g + pid_q * sel_q + s_idx)
            if kb >= 0:
                _, v, _, _, scores, visible = _key_block(
                    q, K, V, kb, k0, g, pos, len_k, offs_d, d_ok, skt, skh, scale, BLOCK, UPCAST, PRECISION
                )
                scores = tl.where(visible, scores, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(scores, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(scores - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                m_i = m_new
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        o_off = q_row[:, None] * sot + head[:, None] * soh + offs_d[None, :]
        tl.store(OUT + o_off, out.to(OUT.dtype.element_ty), mask=q_mask)
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
        tl.store(LSE + head * lse_h + q_row, lse, mask=row_ok)


@triton.jit
def _msa_bwd_kernel(
    Q, K, V, SEL, CU_Q, CU_K, DO, LSE, DELTA, DQ, DK, DV,
    sqt, sqh, skt, skh, sel_n, sel_g, sel_q, lse_h,
    kv_heads, chunks, head_dim, scale, S,
    BLOCK: tl.constexpr, GROUP: tl.constexpr, HEADS: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_q, pid_ng = tl.program_id(0), tl.program_id(1)
    tile = _tile_setup(CU_Q, CU_K, pid_q, pid_ng, kv_heads, chunks, BLOCK, GROUP, HEADS)
    n, g, q_row, k0, len_k, head, pos, row_ok, live = tile
    if live:
        q, q_off, q_mask, offs_d, d_ok = _query_tile(Q, q_row, head, row_ok, sqt, sqh, head_dim, BD, UPCAST)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)
        if UPCAST:
            do = do.to(tl.float32)
        lse = tl.load(LSE + head * lse_h + q_row, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + head * lse_h + q_row, mask=row_ok, other=0.0)
        dq = tl.zeros([HEADS * BLOCK, BD], tl.float32)
        for s_idx in range(S):
            kb = tl.load(SEL + n * sel_n + g * sel_g + pid_q * sel_q + s_idx)
            if kb >= 0:
                k, v, kv_off, kv_mask, scores, visible = _key_block(
                    q, K, V, kb, k0, g, pos, len_k, offs_d, d_ok, skt, skh, scale, BLOCK, UPCAST, PRECISION
                )
                p = tl.where(visible & row_ok[:, None], tl.exp(scores - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
                dv_blk = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
                dk_blk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
                tl.atomic_add(DV + kv_off, dv_blk, mask=kv_mask)
                tl.atomic_add(DK + kv_off, dk_blk, mask=kv_mask)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _launch_config(q: torch.Tensor, kv_heads: int, block: int) -> dict[str, object]:
    """A program stacks HEADS of its group's query heads (a power of two) into one [HEADS * BLOCK, D] tile:
    every K/V block it loads serves them all, and at most 128 rows keep the float32 accumulator in
    registers (M2's 6-head groups at block 64 would be 512 rows). The interpreter caps tiles at 32 rows so
    that the tests cover both several heads per program and several programs per group. Float32 dots there
    (its bf16 dot is wrong); IEEE float32 dots for float32 inputs on a GPU."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    group = q.shape[1] // kv_heads
    heads = min(triton.next_power_of_2(group), max(1, (32 if interpreted else 128) // block))
    return {
        "GROUP": group,
        "HEADS": heads,
        "BD": max(16, triton.next_power_of_2(q.shape[-1])),
        "UPCAST": interpreted and q.dtype != torch.float32,
        "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def msa_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output [Tq, H, D] in q's dtype and the float32 log-sum-exp [H, Tq]."""
    tq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    n, _, nq, s = selected.shape
    out = torch.empty_like(q)
    lse = torch.empty(heads, tq, dtype=torch.float32, device=q.device)
    cfg = _launch_config(q, kv_heads, block)
    chunks = triton.cdiv(cfg["GROUP"], cfg["HEADS"])
    _msa_fwd_kernel[(nq, n * kv_heads * chunks)](
        q, k, v, selected, cu_seqlens_q, cu_seqlens_k, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        selected.stride(0), selected.stride(1), selected.stride(2), lse.stride(0),
        kv_heads, chunks, head_dim, scale, s, BLOCK=block, **cfg,
    )  # fmt: skip
    return out, lse


def msa_bwd(
    saved: tuple[torch.Tensor, ...], grad_out: torch.Tensor, block: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, selected, cu_seqlens_q, cu_seqlens_k, out, lse = saved
    kv_heads, head_dim = k.shape[1], q.shape[-1]
    n, _, nq, s = selected.shape
    delta = (grad_out.float() * out.float()).sum(-1).T.contiguous()  # [H, Tq]: rowsum(dO * O)
    dq = torch.empty_like(q)
    dk32, dv32 = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(v, dtype=torch.float32)
    cfg = _launch_config(q, kv_heads, block)
    chunks = triton.cdiv(cfg["GROUP"], cfg["HEADS"])
    _msa_bwd_kernel[(nq, n * kv_heads * chunks)](
        q, k, v, selected, cu_seqlens_q, cu_seqlens_k, grad_out, lse, delta, dq, dk32, dv32,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        selected.stride(0), selected.stride(1), selected.stride(2), lse.stride(0),
        kv_heads, chunks, head_dim, scale, s, BLOCK=block, **cfg,
    )  # fmt: skip
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


class _MsaFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        selected: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        block: int,
        scale: float,
    ) -> torch.Tensor:
        out, lse = msa_fwd(q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block, scale)
        ctx.save_for_backward(q, k, v, selected, cu_seqlens_q, cu_seqlens_k, out, lse)
        ctx.block, ctx.scale = block, scale  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        dq, dk, dv = msa_bwd(ctx.saved_tensors, grad_out.contiguous(), ctx.block, ctx.scale)  # type: ignore[attr-defined]
        return dq, dk, dv, None, None, None, None, None


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> None:
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} must be [Tq, H, D] and k, v {tuple(k.shape)} [Tk, G, D]")
    if q.shape[1] % k.shape[1] or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"num_heads {q.shape[1]} must be a multiple of num_kv_heads {k.shape[1]}, one dtype")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block {block}: must be a power of two >= 16 (tl.dot tiles)")


def msa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    block: int = 64,
    top_k: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """MiniMax Sparse Attention over packed variable-length sequences (prefill, decode, or a mix).

    Args:
        q: [Tq, H, D] queries of all sequences, packed; sequence i's are q[cu_seqlens_q[i]:cu_seqlens_q[i+1]]
            and sit at the end of its keys (prefill: the same lengths as the keys; decode: one each).
        k, v: [Tk, G, D] keys and values (or the KV cache), packed by cu_seqlens_k; H % G == 0.
        cu_seqlens_q, cu_seqlens_k: [N + 1] int32 cumulative lengths.
        block: key/query block size (power of two >= 16); top_k: blocks kept by the index branch besides the
            first and the local block; scale: default D ** -0.5.
    Returns:
        [Tq, H, D] in q's dtype; differentiable in q, k and v (the block choice is a discrete selection).
    """
    _check(q, k, v, block)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
    with torch.no_grad():
        selected = select_blocks(q, k, cu_seqlens_q, cu_seqlens_k, block, top_k)
    return _MsaFunction.apply(q, k, v, selected, cu_seqlens_q, cu_seqlens_k, block, scale)
