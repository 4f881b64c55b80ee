"""Block-sparse attention on MiniMax-M3's contract: per query token and KV group, the lightning indexer's
kept key blocks, left-packed with -1 padding (forward and backward, causal; batch-major or packed variable-length).

Shape legend: B batch, H query heads, G KV heads, GROUP = H / G, T query positions, S key positions
(S == T: training and prefill), K head_dim, N kept-block slots per query; packed input: Tq tokens of all
sequences laid end to end (cu_seqlens), D = K.

One program handles one query token of one KV group: it stacks the GROUP query heads (padded to a power
of two >= 16, the smallest tl.dot tile) into the rows of its tile, so every kept K/V block is loaded once
for the whole group -- the reason M3 selects per GQA group. It walks the N slots in order and skips -1
slots; a block's keys past the query are masked (the query's own block is always kept and is partial).
The backward recomputes probabilities from the float32 log-sum-exp; dq stays in registers, dk/dv are
accumulated with float32 atomics because a key block receives gradient from every query that kept it.
Packed sequences run the same kernels on a [1, H, Tq, K] strided view of q [Tq, H, K] (no copy) with
each token's sequence start: the start shifts the key base, and causality and block ids are relative to
it, as transformers' indexer sees a sequence whose position ids restart at 0.
Loads are cast to float32 before tl.dot: the interpreter's bf16 dot is wrong, and on a GPU this trades
tensor-core bf16 speed for exactness (IEEE float32 dots) until a timed GPU run says otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(
    Q, SEQ_START, kv_heads, sqb, sqh, sqt, skb, sks, lseb, lseh, head_dim,
    GROUP: tl.constexpr, HP: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    """Program (t, b * G + g): rows r < GROUP of its tile are query heads g * GROUP + r at row t. Returns
    b, g, t, the query's position in its sequence, the sequence's key base offset, the float32 q tile, its
    offsets and masks (shared with dO, O, dQ) and the LSE offsets."""
    t, bg = tl.program_id(0), tl.program_id(1)
    b, g = bg // kv_heads, bg % kv_heads
    start = 0
    if VARLEN:
        start = tl.load(SEQ_START + t)
    kv_base = b * skb + start * sks
    rows = tl.arange(0, HP)
    row_ok = rows < GROUP
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < head_dim
    q_off = b * sqb + (g * GROUP + rows)[:, None] * sqh + t * sqt + offs_d[None, :]
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + q_off, mask=q_mask, other=0.0).to(tl.float32)
    lse_off = b * lseb + (g * GROUP + rows) * lseh + t
    return b, g, t, t - start, kv_base, q, q_off, q_mask, row_ok, offs_d, d_ok, lse_off


@triton.jit
def _kept_block(
    q, K, V, kb, kv_base, g, pos, offs_d, d_ok, skh, sks, block_size, scale, BSP: tl.constexpr
):  # fmt: skip
    """Key block kb (of the query's sequence) of KV head g: float32 k, v [BSP, BD], offsets, mask, scaled
    scores and the causal in-block key mask (the part the forward and backward share). Keys past the
    query's position are never read, so no block id reaches into the next sequence."""
    j = tl.arange(0, BSP)
    kpos = kb * block_size + j
    key_ok = (j < block_size) & (kpos <= pos)
    kv_off = kv_base + g * skh + kpos[:, None] * sks + offs_d[None, :]
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    v = tl.load(V + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return k, v, kv_off, kv_mask, scores, key_ok


@triton.jit
def _fwd_kernel(
    Q, K, V, SEL, SEQ_START, OUT, LSE,
    sqb, sqh, sqt, skb, skh, sks, selb, selg, selt, lseb, lseh,
    kv_heads, head_dim, scale, n_slots, block_size,
    GROUP: tl.constexpr, HP: tl.constexpr, BSP: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    tile = _tile(Q, SEQ_START, kv_heads, sqb, sqh, sqt, skb, sks, lseb, lseh, head_dim, GROUP, HP, BD, VARLEN)
    b, g, t, pos, kv_base, q, q_off, q_mask, row_ok, offs_d, d_ok, lse_off = tile
    m_i = tl.full([HP], -1.0e30, tl.float32)
    l_i = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, BD], tl.float32)
    for slot in range(n_slots):
        kb = tl.load(SEL + b * selb + g * selg + t * selt + slot)
        if kb >= 0:
            _, v, _, _, scores, key_ok = _kept_block(
                q, K, V, kb, kv_base, g, pos, offs_d, d_ok, skh, sks, block_size, scale, BSP
            )
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            m_i = m_new
    seen = l_i > 0
    tl.store(OUT + q_off, (acc / tl.where(seen, l_i, 1.0)[:, None]).to(OUT.dtype.element_ty), mask=q_mask)
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + lse_off, lse, mask=row_ok)


@triton.jit
def _bwd_kernel(
    Q, K, V, SEL, SEQ_START, DO, LSE, DELTA, DQ, DK, DV,
    sqb, sqh, sqt, skb, skh, sks, selb, selg, selt, lseb, lseh,
    kv_heads, head_dim, scale, n_slots, block_size,
    GROUP: tl.constexpr, HP: tl.constexpr, BSP: tl.constexpr, BD: tl.constexpr, VARLEN: tl.constexpr,
):  # fmt: skip
    tile = _tile(Q, SEQ_START, kv_heads, sqb, sqh, sqt, skb, sks, lseb, lseh, head_dim, GROUP, HP, BD, VARLEN)
    b, g, t, pos, kv_base, q, q_off, q_mask, row_ok, offs_d, d_ok, lse_off = tile
    do = tl.load(DO + q_off, mask=q_mask, other=0.0).to(tl.float32)
    lse = tl.load(LSE + lse_off, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    dq = tl.zeros([HP, BD], tl.float32)
    for slot in range(n_slots):
        kb = tl.load(SEL + b * selb + g * selg + t * selt + slot)
        if kb >= 0:
            k, v, kv_off, kv_mask, scores, key_ok = _kept_block(
                q, K, V, kb, kv_base, g, pos, offs_d, d_ok, skh, sks, block_size, scale, BSP
            )
            p = tl.where(key_ok[None, :] & row_ok[:, None], tl.exp(scores - lse[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(v), input_precision="ieee") - delta[:, None])
            dq += tl.dot(ds, k, input_precision="ieee")
            tl.atomic_add(DV + kv_off, tl.dot(tl.trans(p), do, input_precision="ieee"), mask=kv_mask)
            tl.atomic_add(DK + kv_off, tl.dot(tl.trans(ds), q, input_precision="ieee") * scale, mask=kv_mask)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _meta(q: torch.Tensor, kv_heads: int, block_size: int, varlen: bool) -> dict[str, int]:
    group = q.shape[1] // kv_heads
    return {
        "GROUP": group,
        "HP": max(16, triton.next_power_of_2(group)),
        "BSP": max(16, triton.next_power_of_2(block_size)),
        "BD": max(16, triton.next_power_of_2(q.shape[-1])),
        "VARLEN": varlen,
    }


def _launch(kernel: triton.JITFunction, q: torch.Tensor, k: torch.Tensor, sel: torch.Tensor, lse: torch.Tensor,
            seq_start: torch.Tensor | None, tensors: tuple[torch.Tensor, ...], block_size: int,
            scale: float) -> None:  # fmt: skip
    """Both kernels share the grid (T, B * G) and the stride list; q, dO, O and dQ share strides, k, v,
    dK and dV theirs, LSE and delta theirs. seq_start: int32 [T] per-row sequence start (packed input)."""
    b, _, t, head_dim = q.shape
    kv_heads = k.shape[1]
    varlen = seq_start is not None
    kernel[(t, b * kv_heads)](
        *tensors[:4], seq_start if varlen else sel, *tensors[4:],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        sel.stride(0), sel.stride(1), sel.stride(2), lse.stride(0), lse.stride(1),
        kv_heads, head_dim, scale, sel.shape[-1], block_size, **_meta(q, kv_heads, block_size, varlen),
    )  # fmt: skip


class _MsaM3Function(torch.autograd.Function):
    """On [B, H, T, K] / [B, G, T, K] tensors of any strides (the packed path passes views, B = 1)."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocks: torch.Tensor,
        seq_start: torch.Tensor | None,
        block_size: int,
        scale: float,
    ) -> torch.Tensor:
        if k.stride() != v.stride():
            v = torch.empty_like(k).copy_(v)
        out = torch.empty_like(q)  # keeps q's strides
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # [B, H, T]
        _launch(_fwd_kernel, q, k, blocks, lse, seq_start, (q, k, v, blocks, out, lse), block_size, scale)
        ctx.save_for_backward(q, k, v, blocks, out, lse)
        ctx.seq_start, ctx.block_size, ctx.scale = seq_start, block_size, scale  # type: ignore[attr-defined]
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, blocks, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        seq_start = ctx.seq_start  # type: ignore[attr-defined]
        if grad_out.stride() != q.stride():
            grad_out = torch.empty_like(q).copy_(grad_out)
        delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [B, H, T]: rowsum(dO * O), lse's strides
        dq = torch.empty_like(q)
        dk32, dv32 = torch.zeros_like(k, dtype=torch.float32), torch.zeros_like(k, dtype=torch.float32)
        tensors = (q, k, v, blocks, grad_out, lse, delta, dq, dk32, dv32)
        _launch(_bwd_kernel, q, k, blocks, lse, seq_start, tensors, ctx.block_size, ctx.scale)  # type: ignore[attr-defined]
        return dq, dk32.to(k.dtype), dv32.to(v.dtype), None, None, None, None


def msa_m3_attention(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    blocks_BGTN: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of each query over the keys of its GQA group's kept blocks.

    Args:
        q_BHTK: [B, H, T, K] queries; k_BGSK, v_BGSK: [B, G, T, K] keys and values, H % G == 0.
        blocks_BGTN: [B, G, T, N] int key-block indices per query and KV group, left-packed, -1 padded
            (`LightningIndexer`'s output); block j holds keys j * block_size ... (j + 1) * block_size - 1.
        scale: default K ** -0.5.
    Returns:
        [B, H, T, K] in q's dtype; differentiable in q, k and v (the selection is discrete).
    """
    b, h, t, head_dim = q_BHTK.shape
    if k_BGSK.shape != v_BGSK.shape or k_BGSK.shape[0] != b or k_BGSK.shape[2:] != (t, head_dim):
        raise ValueError(f"q {tuple(q_BHTK.shape)} must be [B, H, T, K] and k, v {tuple(k_BGSK.shape)} [B, G, T, K]")
    g = k_BGSK.shape[1]
    if h % g or tuple(blocks_BGTN.shape[:3]) != (b, g, t) or blocks_BGTN.dtype.is_floating_point:
        raise ValueError(
            f"heads {h} must be a multiple of KV heads {g} and blocks_BGTN {blocks_BGTN.dtype} "
            f"{tuple(blocks_BGTN.shape)} an int [B, G, T, N] = [{b}, {g}, {t}, N]"
        )
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v = (x.contiguous() for x in (q_BHTK, k_BGSK, v_BGSK))
    return _MsaM3Function.apply(q, k, v, blocks_BGTN.contiguous(), None, block_size, scale)


def msa_m3_attention_varlen(
    q_THD: torch.Tensor,
    k_TGD: torch.Tensor,
    v_TGD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    blocks_GTN: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """`msa_m3_attention` over packed variable-length sequences (training or prefill: S == T per sequence).

    Args:
        q_THD: [Tq, H, D] queries of all sequences, packed; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1].
        k_TGD, v_TGD: [Tq, G, D] keys and values, packed the same way; H % G == 0.
        cu_seqlens: [num_seqs + 1] int cumulative lengths, 0 first and Tq last.
        blocks_GTN: [G, Tq, N] int key-block indices per KV group and query, left-packed, -1 padded, relative
            to the query's own sequence: block j holds its keys j * block_size ... (j + 1) * block_size - 1
            (what the indexer selects for each sequence alone, its positions restarting at 0).
        scale: default D ** -0.5.
    Returns:
        [Tq, H, D] in q's dtype; differentiable in q, k and v. Each query sees only its own sequence.
    """
    tq, h, head_dim = q_THD.shape
    if k_TGD.shape != v_TGD.shape or k_TGD.shape[0] != tq or k_TGD.shape[2] != head_dim:
        raise ValueError(f"q {tuple(q_THD.shape)} must be [Tq, H, D] and k, v {tuple(k_TGD.shape)} [Tq, G, D]")
    g = k_TGD.shape[1]
    if h % g or tuple(blocks_GTN.shape[:2]) != (g, tq) or blocks_GTN.dim() != 3 or blocks_GTN.dtype.is_floating_point:
        raise ValueError(
            f"heads {h} must be a multiple of KV heads {g} and blocks_GTN {blocks_GTN.dtype} "
            f"{tuple(blocks_GTN.shape)} an int [G, Tq, N] = [{g}, {tq}, N]"
        )
    lengths = cu_seqlens.diff()
    if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != tq or bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens {cu_seqlens.tolist()} must rise from 0 to Tq = {tq}")
    starts = cu_seqlens[:-1].to(device=q_THD.device, dtype=torch.int32)
    seq_start = starts.repeat_interleave(lengths.to(q_THD.device), output_size=tq)  # [Tq]
    scale = head_dim**-0.5 if scale is None else scale
    # [Tq, H, D] -> [1, H, Tq, D] strided views: the batch-major kernel with B = 1 and row t's sequence start.
    q, k, v = (x.contiguous().transpose(0, 1).unsqueeze(0) for x in (q_THD, k_TGD, v_TGD))
    out = _MsaM3Function.apply(q, k, v, blocks_GTN.contiguous().unsqueeze(0), seq_start, block_size, scale)
    return out.squeeze(0).transpose(0, 1)  # [Tq, H, D]
