"""Grouped GEMMs over (token, expert) pairs laid out by expert in tiles of BM slots.

Shape legend: N tokens, K experts per token, E experts, P = N*K pairs, C slot capacity (P + E*(BM-1),
rounded to BM), I/O a GEMM's inner/outer widths.

Layout (`align_by_expert`, as vLLM's moe_align_block_size): each expert's pairs take a run of slots padded
to a multiple of BM, so every BM-row tile belongs to one expert (`tile_expert`, -1 past the end) and a
tile is one dense GEMM against that expert's weight. Slots keep the token they read (`token_of_slot`,
-1 for padding): the input is gathered inside the kernel instead of materialising x[token] ([P, D]).

`_grouped_gemm_kernel`: out[slot] = a[row(slot)] @ W[e(slot)] with W[e] read through strides (so w1
[E, F, D] serves as D->F and w2 [E, D, F] as F->D without copies); SWIGLU reads w1 and w3 in the same K
loop (x is loaded once for both) and writes silu(a1) * a3 plus a1, a3 for the backward; SCATTER scales
by the routing weight and writes to the pair's row, un-permuting in the epilogue.
DUAL adds a second product in the same loop (dx = da1 @ w1 + da3 @ w3); SWIGLU_BWD (the backward's
dy @ w2) ends in SwiGLU's backward and the routing weights' gradient instead.
`_grouped_wgrad_kernel`: dW[e] = sum over the expert's slots of a[slot]^T b[slot] (one program per
output tile and expert).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Alignment:
    token_of_slot: torch.Tensor  # [C] int64: token a slot reads, -1 for padding
    pair_of_slot: torch.Tensor  # [C] int64: pair (n * K + k) a slot computes, -1 for padding
    tile_expert: torch.Tensor  # [C / BM] int32: expert of each tile, -1 past the last expert
    segment_start: torch.Tensor  # [E] int32: first slot of each expert
    counts: torch.Tensor  # [E] int32: pairs routed to each expert
    block_m: int


def align_by_expert(expert_ids_NK: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sorts pairs by expert into BM-padded segments; no host sync (the capacity is an upper bound)."""
    n, k = expert_ids_NK.shape
    pairs = n * k
    flat_P = expert_ids_NK.reshape(-1)
    counts_E = torch.bincount(flat_P, minlength=num_experts)
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    segment_start_E = padded_E.cumsum(0) - padded_E
    order_P = flat_P.argsort(stable=True)  # pairs sorted by expert
    sorted_expert_P = flat_P[order_P]
    rank_P = torch.arange(pairs, device=flat_P.device) - (counts_E.cumsum(0) - counts_E)[sorted_expert_P]
    num_tiles = triton.cdiv(pairs, block_m) + num_experts
    pair_of_slot = torch.full((num_tiles * block_m,), -1, dtype=torch.int64, device=flat_P.device)
    pair_of_slot[segment_start_E[sorted_expert_P] + rank_P] = order_P
    token_of_slot = torch.where(pair_of_slot >= 0, pair_of_slot // k, -1)
    tile_start = torch.arange(num_tiles, device=flat_P.device) * block_m
    tile_expert = torch.searchsorted(padded_E.cumsum(0), tile_start, right=True)
    tile_expert = torch.where(tile_expert < num_experts, tile_expert, -1).to(torch.int32)
    return Alignment(
        token_of_slot, pair_of_slot, tile_expert, segment_start_E.to(torch.int32), counts_E.to(torch.int32), block_m
    )


def launch_config(dtype: torch.dtype) -> dict[str, object]:
    """Interpreter: small tiles, float32 dots (its bf16 dot is wrong). GPU: 64-wide tiles, IEEE float32."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return {
        "BN": 16 if interpreted else 64,
        "BK": 16 if interpreted else 64,
        "UPCAST": interpreted and dtype != torch.float32,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def block_m_for(dtype: torch.dtype) -> int:
    return 16 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 64


@triton.jit
def _swiglu_bwd_epilogue(dh_unweighted, slots, offs_n, n_ok, so_m, A1, A3, WEIGHT, DA3, DWEIGHT):
    """From dh' = dy @ w2 (before the routing weight w): d w += <dh', h> (atomics: a row's F columns span
    several programs), dh = w dh', then SwiGLU's backward with h = silu(a1) a3 recomputed in float32.
    Stores da3 and returns da1."""
    off = slots[:, None] * so_m + offs_n[None, :]
    a1 = tl.load(A1 + off, mask=n_ok[None, :], other=0.0).to(tl.float32)
    a3 = tl.load(A3 + off, mask=n_ok[None, :], other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-a1))
    tl.atomic_add(DWEIGHT + slots, tl.sum(dh_unweighted * a1 * sig * a3, 1))
    dh = dh_unweighted * tl.load(WEIGHT + slots)[:, None]
    tl.store(DA3 + off, (dh * a1 * sig).to(DA3.dtype.element_ty), mask=n_ok[None, :])
    return dh * a3 * sig * (1.0 + a1 * (1.0 - sig))  # d silu(a) / da = sig(a) (1 + a (1 - sig(a)))


@triton.jit
def _grouped_gemm_kernel(
    A, ROWS, W, W3, OUT, A1OUT, A3OUT, SCALE, OUT_ROWS, TILE_EXPERT, DA3, DWEIGHT, A2,
    n_out, k_in, sa_m, sw_e, sw_k, sw_n, so_m,
    GATHER: tl.constexpr, SWIGLU: tl.constexpr, SCATTER: tl.constexpr, SWIGLU_BWD: tl.constexpr, DUAL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(TILE_EXPERT + pid_m)
    if expert >= 0:
        slots = pid_m * BM + tl.arange(0, BM)
        rows = tl.load(ROWS + slots) if GATHER else slots
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < n_out
        acc = tl.zeros([BM, BN], tl.float32)
        acc3 = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, k_in, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_ok = offs_k < k_in
            a_mask = (rows[:, None] >= 0) & k_ok[None, :]
            a = tl.load(A + rows[:, None] * sa_m + offs_k[None, :], mask=a_mask, other=0.0)
            w_off = expert * sw_e + offs_k[:, None] * sw_k + offs_n[None, :] * sw_n
            w = tl.load(W + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=PRECISION)
            if SWIGLU:
                w3 = tl.load(W3 + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    w3 = w3.to(tl.float32)
                acc3 += tl.dot(a, w3, input_precision=PRECISION)
            if DUAL:
                a2 = tl.load(A2 + rows[:, None] * sa_m + offs_k[None, :], mask=a_mask, other=0.0)
                w3 = tl.load(W3 + w_off, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a2, w3 = a2.to(tl.float32), w3.to(tl.float32)
                acc += tl.dot(a2, w3, input_precision=PRECISION)
        out_rows = slots
        if SWIGLU:
            out_off = slots[:, None] * so_m + offs_n[None, :]
            tl.store(A1OUT + out_off, acc.to(A1OUT.dtype.element_ty), mask=n_ok[None, :])
            tl.store(A3OUT + out_off, acc3.to(A3OUT.dtype.element_ty), mask=n_ok[None, :])
            acc = acc / (1.0 + tl.exp(-acc)) * acc3
        if SWIGLU_BWD:
            acc = _swiglu_bwd_epilogue(acc, slots, offs_n, n_ok, so_m, A1OUT, A3OUT, SCALE, DA3, DWEIGHT)
        if SCATTER:
            acc = acc * tl.load(SCALE + slots)[:, None]
            out_rows = tl.load(OUT_ROWS + slots)
        tl.store(OUT + out_rows[:, None] * so_m + offs_n[None, :], acc.to(OUT.dtype.element_ty),
                 mask=(out_rows[:, None] >= 0) & n_ok[None, :])  # fmt: skip


@triton.jit
def _grouped_wgrad_kernel(
    A, A_ROWS, A_SCALE, B, B_ROWS, OUT, SEGMENT_START, COUNTS,
    m_out, n_out, sa_m, sb_m, so_e, so_m,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, SCALE_A: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid, expert = tl.program_id(0), tl.program_id(1)
    tiles_n = tl.cdiv(n_out, BN)
    offs_m = (pid // tiles_n) * BM + tl.arange(0, BM)
    offs_n = (pid % tiles_n) * BN + tl.arange(0, BN)
    m_ok, n_ok = offs_m < m_out, offs_n < n_out
    start = tl.load(SEGMENT_START + expert)
    stop = start + tl.load(COUNTS + expert)
    acc = tl.zeros([BM, BN], tl.float32)
    for s0 in range(start, stop, BK):
        slots = s0 + tl.arange(0, BK)
        s_ok = slots < stop
        rows_a = tl.load(A_ROWS + slots, mask=s_ok, other=-1) if GATHER_A else tl.where(s_ok, slots, -1)
        rows_b = tl.load(B_ROWS + slots, mask=s_ok, other=-1) if GATHER_B else tl.where(s_ok, slots, -1)
        a_mask = (rows_a[:, None] >= 0) & m_ok[None, :]
        b_mask = (rows_b[:, None] >= 0) & n_ok[None, :]
        a = tl.load(A + rows_a[:, None] * sa_m + offs_m[None, :], mask=a_mask, other=0.0)
        b = tl.load(B + rows_b[:, None] * sb_m + offs_n[None, :], mask=b_mask, other=0.0)
        if SCALE_A:
            a = (a.to(tl.float32) * tl.load(A_SCALE + slots, mask=s_ok, other=0.0)[:, None]).to(b.dtype)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc += tl.dot(tl.trans(a), b, input_precision=PRECISION)
    tl.store(OUT + expert * so_e + offs_m[:, None] * so_m + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])  # fmt: skip
