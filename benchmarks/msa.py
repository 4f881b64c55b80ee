"""MiniMax-M3 sparse attention (MSA: lightning indexer + block-sparse attention) against dense attention,
prefill and decode at growing context: the cost curve.

Three kinds of figures, each labelled in the JSON:
- analytic, for one full layer of the minimax-m3-preview shape (64 query heads, 4 KV heads, head_dim 128;
  indexer: 4 heads of 128 sharing one key head, blocks of 128 keys, 16 kept per query incl. the local one):
  attention FLOPs and the bytes of K/V (and index keys) read, dense vs MSA. Exact counts, any machine.
- measured on a CUDA GPU (CUDA events, bf16, the full preview layer): our Triton kernels
  (kernels/msa: index_block_scores + the indexer's top-k + msa_m3_attention) against dense SDPA, and vLLM's
  MiniMax-M3 MSA Triton kernels where vLLM imports them. Our M3 kernels take S == T (no KV cache), so decode
  on the GPU times the torch path below, dense SDPA and vLLM's decode kernels.
- measured on the CPU (process CPU time on one torch thread, float32, ONE KV group of the preview shape:
  16 query heads, 1 KV head, 1 index head; every cost but the shared index key scan is linear in the
  number of groups): the torch path only. Triton's interpreter runs the kernels on the CPU for correctness,
  far slower than any compiled code: an interpreter time says nothing about the kernel, so none is printed.
  The torch MSA path is the model's own indexer (m3_attention.torch_index_scores + LightningIndexer.select)
  followed by attention on the kept blocks: key block by key block for all the queries that kept it
  (prefill, `k2q_block_attention`) or gathered per query (decode); both are checked in the same run against
  m3_attention.torch_block_sparse_attention, the model's torch backend, which scores every key and masks
  (a correctness reference that costs more than dense attention; timed too, prefill up to
  --reference-max-tokens). Baselines: causal SDPA for prefill; for decode a GQA matmul that reads each K/V
  once (CPU SDPA with enable_gqa, also printed, is 8x slower there). Prefill lengths stop when the
  predicted time (quadratic in the length) would pass --budget-s (wall seconds).

A small-shape check runs the Triton kernels (under TRITON_INTERPRET=1 on the CPU) against the float64 torch
reference: block scores, the selected blocks, the attention output and its gradients; max errors printed.

With --vllm-check (CPU) vLLM's M3 prefill kernels (vllm/models/minimax_m3/common/ops) run under the
interpreter on the same inputs as ours: block scores, selected blocks and outputs compared (slow).

Run: `python benchmarks/msa.py [--tokens 1024 2048 4096 8192 16384] [--budget-s 240] [--vllm-check]
[--out f.json]`. Prints the curve as a table, then ONE JSON object last.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

BF16_BYTES = 2  # serving keeps K, V and index keys in bf16 (vLLM optionally fp8/nvfp4: see kernels/README.md)


@dataclass(frozen=True)
class Shape:
    """One attention layer of MiniMax-M3 (the preview's numbers: M3_PRESETS["minimax-m3-preview"])."""

    heads: int = 64
    kv_heads: int = 4  # = index heads: one block selection per GQA group
    head_dim: int = 128
    index_head_dim: int = 128
    block: int = 128
    top_k: int = 16  # kept blocks per query, the forced local block included
    local_blocks: int = 1
    hidden: int = 6144

    def kept_keys(self, position: int) -> int:
        """Keys a query at `position` attends under MSA: its own block up to itself plus top_k - 1 earlier
        full blocks (all of its keys while the context fits in top_k blocks)."""
        return min(position + 1, (self.top_k - 1) * self.block + position % self.block + 1)


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    info["torch"] = torch.__version__
    with contextlib.suppress(OSError):
        info["load_average"] = [round(x, 1) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def analytic(tokens: int, shape: Shape) -> dict[str, Any]:
    """FLOPs (multiply-add = 2) and bytes read, dense vs MSA, for one full layer of `shape`.

    Prefill: all `tokens` queries, causal. Decode: one query at position tokens - 1 over a cache of `tokens`.
    MSA = the indexer's scan (G index heads x one shared key head over every visible key) + attention on the
    kept keys. The indexer's projections (2 * hidden * (G + 1) * index_head_dim per token) are listed apart;
    q/k/v/o projections, equal for both, are not counted."""
    h, g, d, i = shape.heads, shape.kv_heads, shape.head_dim, shape.index_head_dim
    visible = tokens * (tokens + 1) // 2  # sum over query positions of the keys each one sees
    kept = sum(shape.kept_keys(p) for p in range(tokens))
    dense_prefill = 4 * h * d * visible  # QK^T and PV
    index_prefill = 2 * g * i * visible
    msa_prefill = index_prefill + 4 * h * d * kept
    last_kept = shape.kept_keys(tokens - 1)
    dense_decode = 4 * h * d * tokens
    msa_decode = 2 * g * i * tokens + 4 * h * d * last_kept
    dense_bytes = 2 * g * d * tokens * BF16_BYTES  # K and V of every KV head
    msa_bytes = i * tokens * BF16_BYTES + 2 * g * d * last_kept * BF16_BYTES  # index keys + kept K/V
    return {
        "prefill": {
            "dense_gflop": round(dense_prefill / 1e9, 2),
            "msa_gflop": round(msa_prefill / 1e9, 2),
            "msa_indexer_gflop": round(index_prefill / 1e9, 2),
            "dense_over_msa": round(dense_prefill / msa_prefill, 3),
        },
        "decode_per_query": {
            "dense_mflop": round(dense_decode / 1e6, 2),
            "msa_mflop": round(msa_decode / 1e6, 2),
            "dense_kv_mib": round(dense_bytes / 2**20, 3),
            "msa_index_plus_kv_mib": round(msa_bytes / 2**20, 3),
            "kept_keys": last_kept,
            "flop_ratio": round(dense_decode / msa_decode, 3),
            "bytes_ratio": round(dense_bytes / msa_bytes, 3),
        },
    }


def cpu_ms(fn: Callable[[], object]) -> float:
    """Median CPU ms of the process (one torch thread: the CPU time of the work, which the other jobs of a
    shared box do not inflate the way they inflate wall time) over up to 5 runs, 1 when a run takes over a
    second, after an untimed first run when that is fast (allocations)."""
    start = time.process_time()
    fn()
    first = time.process_time() - start
    if first > 1.0:
        return first * 1e3
    runs: list[float] = []
    while len(runs) < 5 and sum(runs) < 2.0:
        start = time.process_time()
        fn()
        runs.append(time.process_time() - start)
    return statistics.median(runs) * 1e3


def cuda_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10) -> float:
    """Median of `reps` CUDA-event timings after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def make_indexer(shape: Shape) -> Any:
    """The model's LightningIndexer at `shape` (only its top-k `select` is used: the scores come in)."""
    from forgerl.model.m3_attention import LightningIndexer
    from forgerl.model.m3_config import M3Config

    cfg = M3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, index_n_heads=shape.kv_heads, index_head_dim=shape.index_head_dim,
        index_block_size=shape.block, index_topk_blocks=shape.top_k, index_local_blocks=shape.local_blocks,
    )  # fmt: skip
    return LightningIndexer(cfg)


def gather_block_attention(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    blocks_BGTN: torch.Tensor,
    pos_T: torch.Tensor,
    block: int,
    scale: float,
    chunk: int = 256,
) -> torch.Tensor:
    """Attention of each query (at key position pos_T[t]) over the keys of its group's kept blocks only,
    gathering those blocks ([chunk, N, block, K] at a time) instead of scoring every key."""
    b, h, t, d = q_BHTK.shape
    g, s = k_BGSK.shape[1], k_BGSK.shape[2]
    nb = -(-s // block)
    # A view when S is a multiple of the block: padding would copy the whole cache on every decode step.
    k_BGNbK, v_BGNbK = (
        (x if nb * block == s else F.pad(x, (0, 0, 0, nb * block - s))).view(b, g, nb, block, d)
        for x in (k_BGSK, v_BGSK)
    )
    device = q_BHTK.device
    ib, ig = torch.arange(b, device=device)[:, None, None, None], torch.arange(g, device=device)[None, :, None, None]
    offsets = torch.arange(block, device=device)
    out_BHTK = torch.empty_like(q_BHTK)
    for lo in range(0, t, chunk):
        hi = min(lo + chunk, t)
        kept_BGcN = blocks_BGTN[:, :, lo:hi]
        safe = kept_BGcN.clamp(min=0)
        k_sel, v_sel = (x[ib, ig, safe].flatten(3, 4) for x in (k_BGNbK, v_BGNbK))  # [B, G, c, N*block, K]
        key_pos = (safe[..., None] * block + offsets).flatten(3)  # [B, G, c, N*block]
        ok = (kept_BGcN >= 0).repeat_interleave(block, dim=-1) & (key_pos <= pos_T[lo:hi, None])
        q_BGcQK = q_BHTK[:, :, lo:hi].unflatten(1, (g, h // g)).transpose(2, 3)  # [B, G, c, group, K]
        scores = (q_BGcQK @ k_sel.transpose(-1, -2)).float() * scale  # [B, G, c, group, N*block]
        probs = torch.softmax(scores.masked_fill(~ok[:, :, :, None], -torch.inf), dim=-1).to(q_BHTK.dtype)
        out_BHTK[:, :, lo:hi] = (probs @ v_sel).transpose(2, 3).flatten(1, 2)
    return out_BHTK


def k2q_block_attention(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    blocks_BGTN: torch.Tensor,
    block: int,
    scale: float,
) -> torch.Tensor:
    """Causal prefill attention (query t at key t) over each query's kept blocks, key block by key block:
    each block's K/V is read once, for all the queries that kept it (a key-to-query list, the layout of
    vLLM's SM100 MSA prefill), with an online softmax per query across its blocks. Gathering K/V per query
    instead copies 2 MiB per query at the preview shape, and ran ~15x slower than dense SDPA at 2K tokens."""
    b, h, t, d = q_BHTK.shape
    g, n = k_BGSK.shape[1], blocks_BGTN.shape[-1]
    group, device = h // g, q_BHTK.device
    out_BHTK = torch.empty_like(q_BHTK)
    query_of_slot = torch.arange(t, device=device).repeat_interleave(n)
    offsets = torch.arange(block, device=device)
    for bi, gi in itertools.product(range(b), range(g)):
        q_TQK = q_BHTK[bi, gi * group : (gi + 1) * group].transpose(0, 1)  # [T, group, K]
        kept = blocks_BGTN[bi, gi].flatten()  # [T * N]
        valid = kept >= 0
        key_block, order = kept[valid].sort(stable=True)
        queries = query_of_slot[valid][order]  # grouped by key block, ascending within a block
        bounds = torch.cumsum(torch.bincount(key_block, minlength=-(-t // block)), 0).tolist()
        m_TQ = torch.full((t, group), -torch.inf, device=device)
        l_TQ = torch.zeros(t, group, device=device)
        acc_TQK = torch.zeros(t, group, d, device=device)
        for kb, (lo, hi) in enumerate(zip([0, *bounds[:-1]], bounds, strict=True)):
            if lo == hi:
                continue
            qs = queries[lo:hi]
            k_bK, v_bK = k_BGSK[bi, gi, kb * block : (kb + 1) * block], v_BGSK[bi, gi, kb * block : (kb + 1) * block]
            scores = (q_TQK[qs] @ k_bK.T).float() * scale  # [n, group, keys of the block]
            # Only the queries inside block kb (the first ones: qs ascends) see part of it.
            inside = int(torch.searchsorted(qs, (kb + 1) * block))
            visible = kb * block + offsets[: k_bK.shape[0]] <= qs[:inside, None]
            scores[:inside] = scores[:inside].masked_fill(~visible[:, None], -torch.inf)
            m_old = m_TQ[qs]
            m_new = torch.maximum(m_old, scores.amax(-1))  # finite: a kept block has a key its query sees
            p = torch.exp(scores - m_new[..., None])
            alpha = torch.exp(m_old - m_new)
            l_TQ[qs] = l_TQ[qs] * alpha + p.sum(-1)
            acc_TQK[qs] = acc_TQK[qs] * alpha[..., None] + p.to(v_bK.dtype) @ v_bK
            m_TQ[qs] = m_new
        out_BHTK[bi, gi * group : (gi + 1) * group] = (acc_TQK / l_TQ[..., None]).transpose(0, 1).to(q_BHTK.dtype)
    return out_BHTK


def decode_select(indexer: Any, q_idx_BG1I: torch.Tensor, k_idx_B1SI: torch.Tensor, block: int) -> torch.Tensor:
    """The kept blocks [B, G, 1, N] of one query at position S - 1 over S cached index keys: the indexer's
    scan and LightningIndexer.select's rule (own block and local_blocks - 1 before it forced, then top-k,
    -1 for blocks with no key). select itself assumes query t sits at key t, so decode redoes its 5 lines;
    main() checks the result equals the prefill selection's last row."""
    s = k_idx_B1SI.shape[2]
    scores = (q_idx_BG1I.float() @ k_idx_B1SI.float().transpose(-1, -2)).squeeze(2)  # [B, G, S]
    nb = -(-s // block)
    block_BGNb = F.pad(scores, (0, nb * block - s), value=-torch.inf).view(*scores.shape[:2], nb, block).amax(-1)
    own = (s - 1) // block
    local = torch.arange(own, own - indexer.local_blocks, -1, device=scores.device).clamp(min=0)
    block_BGNb[..., local] = torch.inf
    top_scores, top = block_BGNb.topk(min(indexer.topk, nb), dim=-1)
    return top.masked_fill(top_scores == -torch.inf, -1)[:, :, None]


def randn(*shape: int, device: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, device=device).to(dtype)


def prefill_inputs(tokens: int, shape: Shape, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(tokens)
    h, g, d, i = shape.heads, shape.kv_heads, shape.head_dim, shape.index_head_dim
    return {
        "q": randn(1, h, tokens, d, device=device, dtype=dtype, gen=gen),
        "k": randn(1, g, tokens, d, device=device, dtype=dtype, gen=gen),
        "v": randn(1, g, tokens, d, device=device, dtype=dtype, gen=gen),
        "q_idx": randn(1, g, tokens, i, device=device, dtype=dtype, gen=gen) * i**-0.5,
        "k_idx": randn(1, 1, tokens, i, device=device, dtype=dtype, gen=gen),
    }


def cpu_prefill(tokens: int, shape: Shape, reference: bool) -> dict[str, Any]:
    """Dense causal SDPA vs the torch MSA path at one length, float32 on the CPU. Returns the figures and
    the seconds spent outside the reference (what the next length's prediction scales)."""
    from forgerl.model.m3_attention import torch_block_sparse_attention, torch_index_scores

    x = prefill_inputs(tokens, shape, "cpu", torch.float32)
    indexer, scale = make_indexer(shape), shape.head_dim**-0.5
    start, start_cpu = time.monotonic(), time.process_time()
    with torch.no_grad():
        result: dict[str, Any] = {
            "dense_sdpa_ms": cpu_ms(
                lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, enable_gqa=True)
            ),
            "msa_indexer_ms": cpu_ms(
                lambda: indexer.select(torch_index_scores(x["q_idx"], x["k_idx"], None, shape.block))
            ),
        }
        blocks = indexer.select(torch_index_scores(x["q_idx"], x["k_idx"], None, shape.block))
        result["msa_k2q_attention_ms"] = cpu_ms(
            lambda: k2q_block_attention(x["q"], x["k"], x["v"], blocks, shape.block, scale)
        )
        result["msa_torch_k2q_ms"] = result["msa_indexer_ms"] + result["msa_k2q_attention_ms"]
        # Wall over CPU seconds: how much the box's other work slows this one down (for the budget).
        result["wall_over_cpu"] = round((time.monotonic() - start) / max(time.process_time() - start_cpu, 1e-3), 2)
        if reference:
            ref = torch_block_sparse_attention(x["q"], x["k"], x["v"], None, blocks, shape.block, scale)
            ours = k2q_block_attention(x["q"], x["k"], x["v"], blocks, shape.block, scale)
            result["k2q_vs_reference_max_abs_err"] = float((ours - ref).abs().max())
            del ref, ours
            result["msa_torch_reference_ms"] = result["msa_indexer_ms"] + cpu_ms(
                lambda: torch_block_sparse_attention(x["q"], x["k"], x["v"], None, blocks, shape.block, scale)
            )
    result["dense_over_msa_torch_k2q"] = round(result["dense_sdpa_ms"] / result["msa_torch_k2q_ms"], 3)
    if reference:
        result["dense_over_msa_torch_reference"] = round(result["dense_sdpa_ms"] / result["msa_torch_reference_ms"], 3)
    return {key: round(value, 2) if key.endswith("_ms") else value for key, value in result.items()}


def decode_inputs(tokens: int, batch: int, shape: Shape, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(tokens + 1)
    h, g, d, i = shape.heads, shape.kv_heads, shape.head_dim, shape.index_head_dim
    return {
        "q": randn(batch, h, 1, d, device=device, dtype=dtype, gen=gen),
        "k": randn(batch, g, tokens, d, device=device, dtype=dtype, gen=gen),
        "v": randn(batch, g, tokens, d, device=device, dtype=dtype, gen=gen),
        "q_idx": randn(batch, g, 1, i, device=device, dtype=dtype, gen=gen) * i**-0.5,
        "k_idx": randn(batch, 1, tokens, i, device=device, dtype=dtype, gen=gen),
    }


def decode_providers(x: dict[str, torch.Tensor], shape: Shape, indexer: Any) -> dict[str, Callable[[], torch.Tensor]]:
    """One new token per sequence over a cache of S: dense (GQA matmul, the baseline; SDPA), the torch MSA
    path (gather, reference)."""
    from forgerl.model.m3_attention import torch_block_sparse_attention

    scale, s = shape.head_dim**-0.5, x["k"].shape[2]
    pos = torch.tensor([s - 1], device=x["q"].device)
    visible = torch.ones(x["q"].shape[0], 1, s, dtype=torch.bool, device=x["q"].device)

    def gather() -> torch.Tensor:
        blocks = decode_select(indexer, x["q_idx"], x["k_idx"], shape.block)
        return gather_block_attention(x["q"], x["k"], x["v"], blocks, pos, shape.block, scale)

    def reference() -> torch.Tensor:
        blocks = decode_select(indexer, x["q_idx"], x["k_idx"], shape.block)
        return torch_block_sparse_attention(x["q"], x["k"], x["v"], visible, blocks, shape.block, scale)

    def dense_gqa_matmul() -> torch.Tensor:
        """Each K/V read once for its group's heads; torch 2.13's CPU SDPA with enable_gqa took 8x longer
        (248 vs 31 ms, batch 8 x 16K, one thread)."""
        b, h, _, d = x["q"].shape
        q_BGQK = x["q"].view(b, shape.kv_heads, h // shape.kv_heads, d)  # [B, G, group, K]
        probs = torch.softmax((q_BGQK @ x["k"].transpose(-1, -2)).float() * scale, dim=-1).to(x["v"].dtype)
        return (probs @ x["v"]).view(b, h, 1, d)

    return {
        "dense_gqa_matmul": dense_gqa_matmul,
        "dense_sdpa": lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=True),
        "msa_torch_gather": gather,
        "msa_torch_reference": reference,
    }


def cpu_decode(tokens: int, batch: int, shape: Shape) -> dict[str, Any]:
    x = decode_inputs(tokens, batch, shape, "cpu", torch.float32)
    providers = decode_providers(x, shape, make_indexer(shape))
    with torch.no_grad():
        result: dict[str, Any] = {"batch": batch}
        result.update({f"{name}_ms": round(cpu_ms(fn), 3) for name, fn in providers.items()})
        err = (providers["msa_torch_gather"]() - providers["msa_torch_reference"]()).abs().max()
    result["gather_vs_reference_max_abs_err"] = float(err)
    result["dense_over_msa_torch_gather"] = round(result["dense_gqa_matmul_ms"] / result["msa_torch_gather_ms"], 3)
    return result


def selection_checks(shape: Shape, tokens: int) -> dict[str, bool]:
    """On the model's prefill selection at `tokens`: decode_select for the last query equals its last row,
    and Shape.kept_keys (the analytic count) equals the keys each query attends (kept and visible)."""
    from forgerl.model.m3_attention import blocks_to_key_mask, causal_mask, torch_index_scores

    x = prefill_inputs(tokens, shape, "cpu", torch.float32)
    indexer = make_indexer(shape)
    blocks = indexer.select(torch_index_scores(x["q_idx"], x["k_idx"], None, shape.block))
    decode = decode_select(indexer, x["q_idx"][:, :, -1:], x["k_idx"], shape.block)
    attended_T = (blocks_to_key_mask(blocks, shape.block, tokens) & causal_mask(1, tokens, blocks.device)[:, None]).sum(
        -1
    )
    analytic_T = torch.tensor([shape.kept_keys(p) for p in range(tokens)])
    return {
        "decode_selection_equals_prefill_last_row": bool(
            torch.equal(blocks[:, :, -1:].sort(-1).values, decode.sort(-1).values)
        ),
        "analytic_kept_keys_equal_selection": bool((attended_T == analytic_T).all()),
    }


def kernel_check(device: str) -> dict[str, Any]:
    """Our Triton kernels at a small odd shape against the float64 torch reference (the model's torch
    index scorer and block-sparse backend): scores, selection, output, dq/dk/dv. float32 inputs."""
    from forgerl.kernels.msa import index_block_scores, msa_m3_attention
    from forgerl.model.m3_attention import torch_block_sparse_attention, torch_index_scores

    shape = Shape(heads=6, kv_heads=2, head_dim=24, index_head_dim=16, block=8, top_k=4, hidden=64)
    tokens, indexer, scale = 53, make_indexer(shape), 24**-0.5
    start = time.perf_counter()
    x = prefill_inputs(tokens, shape, device, torch.float32)
    scores = index_block_scores(x["q_idx"], x["k_idx"], None, shape.block)
    scores_ref = torch_index_scores(x["q_idx"].double(), x["k_idx"].double(), None, shape.block)
    finite = torch.isfinite(scores_ref)
    blocks, blocks_ref = indexer.select(scores), indexer.select(scores_ref)
    q, k, v = (x[name].clone().requires_grad_() for name in ("q", "k", "v"))
    out = msa_m3_attention(q, k, v, blocks_ref, shape.block, scale)
    grad = torch.randn(out.shape, generator=torch.Generator(device=device).manual_seed(0), device=device)
    out.backward(grad)
    q64, k64, v64 = (x[name].double().requires_grad_() for name in ("q", "k", "v"))
    out_ref = torch_block_sparse_attention(q64, k64, v64, None, blocks_ref, shape.block, scale)
    out_ref.backward(grad.double())

    def err(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b).abs().max())

    grads = (q.grad, k.grad, v.grad)
    assert all(g is not None for g in grads)
    return {
        "shape": {"batch": 1, "tokens": tokens, **asdict(shape)},
        "mode": "TRITON_INTERPRET=1 (correctness only)" if device == "cpu" else "compiled on the GPU",
        "index_scores_max_abs_err": err(scores[finite], scores_ref[finite]),
        "index_scores_same_empty_blocks": bool(torch.equal(torch.isfinite(scores), finite)),
        "selected_blocks_equal": bool(torch.equal(blocks, blocks_ref)),
        "blocks_dropped_per_query_max": int(-(-tokens // shape.block) - shape.top_k),
        "attention_out_max_abs_err": err(out.detach(), out_ref.detach()),
        "dq_dk_dv_max_abs_err": [err(g, r) for g, r in zip(grads, (q64.grad, k64.grad, v64.grad), strict=True)],  # type: ignore[arg-type]
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_cpu(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    shape = replace(Shape(), heads=Shape().heads // Shape().kv_heads, kv_heads=1)
    report["measured_shape"] = {**asdict(shape), "dtype": "float32", "note": "one KV group of the preview layer"}
    report["selection_checks"] = {"tokens": 3000, **selection_checks(shape, 3000)}
    curve: list[dict[str, Any]] = []
    start, last = time.monotonic(), None  # last: the last point whose prefill was measured
    for tokens in sorted(args.tokens):
        point: dict[str, Any] = {"tokens": tokens, "analytic_full_layer": analytic(tokens, Shape())}
        point["cpu_decode"] = cpu_decode(tokens, args.decode_batch, shape)
        if last is not None:
            # One run each of dense and MSA at the last length, scaled quadratically, times the load's slow-down.
            prev = last["cpu_prefill"]
            single_runs_s = (prev["dense_sdpa_ms"] + prev["msa_torch_k2q_ms"]) / 1e3
            predicted = single_runs_s * (tokens / last["tokens"]) ** 2 * prev["wall_over_cpu"]
            if time.monotonic() - start + predicted > args.budget_s:
                point["cpu_prefill"] = {"skipped": f"time budget {args.budget_s} s (predicted {predicted:.0f} s)"}
                curve.append(point)
                print_row(point)
                continue
        point["cpu_prefill"] = cpu_prefill(tokens, shape, tokens <= args.reference_max_tokens)
        last = point
        curve.append(point)
        print_row(point)
    return curve


def print_row(point: dict[str, Any]) -> None:
    pre, dec, ana = point.get("cpu_prefill", {}), point.get("cpu_decode", {}), point["analytic_full_layer"]
    print(
        f"T={point['tokens']:>6}  analytic prefill dense/msa {ana['prefill']['dense_over_msa']:>6}  "
        f"decode flop {ana['decode_per_query']['flop_ratio']:>6} bytes {ana['decode_per_query']['bytes_ratio']:>6}  |  "
        f"cpu prefill ms dense {pre.get('dense_sdpa_ms', '-')} msa(k2q) {pre.get('msa_torch_k2q_ms', '-')} "
        f"msa(ref) {pre.get('msa_torch_reference_ms', '-')}  |  "
        f"cpu decode ms dense {dec.get('dense_gqa_matmul_ms', '-')} msa(gather) {dec.get('msa_torch_gather_ms', '-')}",
        flush=True,
    )


def guarded(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One GPU case or the vLLM check; a failure (out of memory, vLLM absent or its API moved) is recorded
    beside the others."""
    try:
        return fn()
    except Exception as error:  # reported in the JSON, not swallowed
        return {"error": f"{type(error).__name__}: {error}"[:400]}
    finally:
        torch.cuda.empty_cache()


def paged(x_BGSK: torch.Tensor, page: int) -> torch.Tensor:
    """[B, G, S, K] -> vLLM's page layout [B * S / page, G, page, K] (S a multiple of page)."""
    b, g, s, d = x_BGSK.shape
    return x_BGSK.view(b, g, s // page, page, d).permute(0, 2, 1, 3, 4).reshape(b * s // page, g, page, d)


def gpu_prefill(tokens: int, shape: Shape) -> dict[str, Any]:
    from forgerl.kernels.msa import index_block_scores, msa_m3_attention

    x = prefill_inputs(tokens, shape, "cuda", torch.bfloat16)
    indexer, scale = make_indexer(shape), shape.head_dim**-0.5
    with torch.no_grad():
        blocks = indexer.select(index_block_scores(x["q_idx"], x["k_idx"], None, shape.block))
        result: dict[str, Any] = {
            "dense_sdpa_ms": cuda_ms(
                lambda: F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, enable_gqa=True)
            ),
            "ours_indexer_ms": cuda_ms(
                lambda: indexer.select(index_block_scores(x["q_idx"], x["k_idx"], None, shape.block))
            ),
            "ours_attention_ms": cuda_ms(lambda: msa_m3_attention(x["q"], x["k"], x["v"], blocks, shape.block, scale)),
        }
        result["ours_ms"] = result["ours_indexer_ms"] + result["ours_attention_ms"]
        result["dense_over_ours"] = result["dense_sdpa_ms"] / result["ours_ms"]
        ours = msa_m3_attention(x["q"], x["k"], x["v"], blocks, shape.block, scale)
        result["vllm"] = guarded(lambda: vllm_prefill(x, shape, scale, ours))
        if "ms" in result["vllm"]:
            result["dense_over_vllm"] = result["dense_sdpa_ms"] / result["vllm"]["ms"]
    return result


def vllm_m3_ops(interpret: bool = False) -> tuple[ModuleType, ModuleType]:
    """vLLM's M3 Triton ops modules (index_topk, sparse_attn), loaded by file: importing them as
    vllm.models.minimax_m3.common.ops runs vllm.models.minimax_m3's __init__, which imports the vision
    model and with it torchvision (not installed here). They take `triton` from vllm.triton_utils, which
    in vLLM's CPU build (the one installed here) is a placeholder unless Triton has a CPU backend: then the
    real Triton is put there first. With `interpret` (Triton's CPU interpreter, no driver to time configs
    with) every autotuned kernel keeps one config, the smallest tile."""
    import triton
    import triton.language as tl
    import vllm
    import vllm.triton_utils as vllm_triton
    from triton.runtime.autotuner import Autotuner, Heuristics

    if not vllm_triton.HAS_TRITON:
        vllm_triton.triton, vllm_triton.tl = triton, tl
    base = Path(vllm.__file__).parent / "models" / "minimax_m3" / "common" / "ops"
    modules = []
    for name in ("index_topk", "sparse_attn"):
        spec = importlib.util.spec_from_file_location(f"vllm_minimax_m3_ops_{name}", base / f"{name}.py")
        if spec is None or spec.loader is None:
            raise ImportError(f"vLLM's MiniMax-M3 op file {base / name}.py is missing")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for kernel in vars(module).values() if interpret else ():
            tuner = kernel.fn if isinstance(kernel, Heuristics) else kernel  # @heuristics wraps @autotune
            if isinstance(tuner, Autotuner):
                tuner.configs = tuner.configs[-1:]
        modules.append(module)
    return modules[0], modules[1]


def vllm_prefill_call(
    x: dict[str, torch.Tensor], shape: Shape, scale: float, ops: tuple[ModuleType, ModuleType]
) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """vLLM's M3 prefill path (index_score, index_topk, sparse_attn) on one sequence (batch 1) put into its
    paged caches (page = sparse block = 128 tokens): `run() -> (scores [G, T, >= NB], top-k [G, T, N])`
    writing the output [T, H, K] into the returned buffer."""
    index_ops, attention_ops = ops
    t, g, page = x["q"].shape[2], shape.kv_heads, 128
    device = x["q"].device
    kv_cache = torch.cat([paged(x["k"], page), paged(x["v"], page)], dim=-1).contiguous()
    index_cache = paged(x["k_idx"], page)[:, 0].contiguous()  # [pages, 128, I]
    table = torch.arange(t // page, dtype=torch.int32, device=device)[None]
    cu = torch.tensor([0, t], dtype=torch.int32, device=device)
    lens, prefix = cu[1:].clone(), torch.zeros(1, dtype=torch.int32, device=device)
    q_THK = x["q"][0].transpose(0, 1).contiguous()
    q_idx = x["q_idx"][0].transpose(0, 1).contiguous()  # [T, G, I]
    out = torch.empty_like(q_THK)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        score = index_ops.minimax_m3_index_score(q_idx, index_cache, table, cu, lens, prefix, t, t, g)
        topk = index_ops.minimax_m3_index_topk(score, cu, prefix, t, shape.top_k, 0, shape.local_blocks)
        attention_ops.minimax_m3_sparse_attn(q_THK, kv_cache, topk, table, cu, lens, prefix, t, g, scale, out)
        return score, topk

    return run, out


def vllm_prefill(x: dict[str, torch.Tensor], shape: Shape, scale: float, ours_BHTK: torch.Tensor) -> dict[str, Any]:
    """Time vLLM's M3 prefill and give its output's largest difference from ours (bf16 both; ties in the
    top-k may pick different blocks)."""
    run, out = vllm_prefill_call(x, shape, scale, vllm_m3_ops())
    ms = cuda_ms(run)
    diff = float((out.float() - ours_BHTK[0].transpose(0, 1).float()).abs().max())
    return {"ms": ms, "max_abs_diff_vs_ours": diff, "kernels": "vllm/models/minimax_m3/common/ops (Triton)"}


def vllm_interpret_check() -> dict[str, Any]:
    """vLLM's M3 prefill kernels and ours on the same inputs under Triton's CPU interpreter (float32, 3
    blocks of 128 keys, 2 kept): block scores, selected blocks, attention output."""
    from forgerl.kernels.msa import index_block_scores, msa_m3_attention

    shape = Shape(heads=4, kv_heads=2, head_dim=32, index_head_dim=32, block=128, top_k=2, hidden=64)
    tokens, scale, start = 384, 32**-0.5, time.perf_counter()
    x = prefill_inputs(tokens, shape, "cpu", torch.float32)
    run, vllm_out = vllm_prefill_call(x, shape, scale, vllm_m3_ops(interpret=True))
    vllm_scores, vllm_topk = run()
    scores = index_block_scores(x["q_idx"], x["k_idx"], None, shape.block)[0]  # [G, T, NB]
    blocks = make_indexer(shape).select(scores[None])[0]  # [G, T, N]
    ours = msa_m3_attention(x["q"], x["k"], x["v"], blocks[None], shape.block, scale)[0].transpose(0, 1)
    finite = torch.isfinite(scores)
    same = vllm_topk.long().sort(-1).values == blocks.sort(-1).values
    return {
        "shape": {"batch": 1, "tokens": tokens, **asdict(shape)},
        "mode": "TRITON_INTERPRET=1 (correctness only)",
        "index_scores_max_abs_diff": float(
            (vllm_scores[:, :, : scores.shape[-1]][finite] - scores[finite]).abs().max()
        ),
        "selected_blocks_equal_fraction": float(same.all(-1).float().mean()),
        "attention_out_max_abs_diff": float((vllm_out - ours).abs().max()),
        "seconds": round(time.perf_counter() - start, 1),
    }


def gpu_decode(tokens: int, batch: int, shape: Shape) -> dict[str, Any]:
    x = decode_inputs(tokens, batch, shape, "cuda", torch.bfloat16)
    providers = decode_providers(x, shape, make_indexer(shape))
    del providers["msa_torch_reference"]  # scores every key: nothing to learn from its GPU time
    with torch.no_grad():
        result: dict[str, Any] = {"batch": batch}
        result.update({f"{name}_ms": cuda_ms(fn) for name, fn in providers.items()})
        result["ours_triton"] = "not run: msa_m3_attention and index_block_scores take S == T (no KV cache)"
        result["vllm"] = guarded(lambda: vllm_decode(x, shape))
    return result


def vllm_decode(x: dict[str, torch.Tensor], shape: Shape) -> dict[str, Any]:
    """vLLM's M3 decode path: split-K index scores + top-k, then split-K sparse attention with a merge."""
    index_ops, attention_ops = vllm_m3_ops()
    b, g, s, _ = x["k"].shape
    page = 128
    kv_cache = torch.cat([paged(x["k"], page), paged(x["v"], page)], dim=-1).contiguous()
    index_cache = paged(x["k_idx"], page)[:, 0].contiguous()
    table = torch.arange(b * s // page, dtype=torch.int32, device="cuda").view(b, s // page)
    lens = torch.full((b,), s, dtype=torch.int32, device="cuda")
    q = x["q"][:, :, 0].contiguous()  # [B, H, K]
    q_idx = x["q_idx"][:, :, 0].contiguous()  # [B, G, I]
    out = torch.empty_like(q)
    scale = shape.head_dim**-0.5

    def run() -> None:
        topk = index_ops.minimax_m3_index_decode(
            q_idx, index_cache, table, lens, s, shape.top_k, 0, shape.local_blocks, g, 1, 1
        )
        attention_ops.minimax_m3_sparse_attn_decode(q, kv_cache, topk, table, lens, g, scale, out, 1)

    return {"ms": cuda_ms(run), "kernels": "vllm/models/minimax_m3/common/ops (Triton, split-K)"}


def run_gpu(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    shape = Shape()
    report["measured_shape"] = {**asdict(shape), "dtype": "bfloat16", "note": "one full preview layer"}
    curve = []
    for tokens in sorted(args.tokens):
        point: dict[str, Any] = {"tokens": tokens, "analytic_full_layer": analytic(tokens, shape)}
        point["gpu_prefill"] = guarded(lambda t=tokens: gpu_prefill(t, shape))  # type: ignore[misc]
        point["gpu_decode"] = guarded(lambda t=tokens: gpu_decode(t, args.decode_batch, shape))  # type: ignore[misc]
        print(json.dumps(point), flush=True)
        curve.append(point)
    return curve


CPU_NOTE = (
    "No CUDA GPU: the Triton kernels ran only under TRITON_INTERPRET=1 for the correctness check (interpreter "
    "times are not kernel figures and are not reported). CPU times are process CPU ms on one thread of the "
    "torch path: the model's indexer + attention on the kept blocks (key-to-query for prefill, per-query "
    "gather for decode), and the model's dense-masked torch reference, vs dense attention, float32, one KV "
    "group; the analytic figures are for a full preview layer. The GPU path (our Triton kernels, dense SDPA "
    "and vLLM's M3 MSA kernels, CUDA events) is written but did not run here."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help="context lengths (multiples of 128 on a GPU)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="CPU: wall seconds for the timed curve")
    parser.add_argument("--reference-max-tokens", type=int, default=4096, help="CPU: longest dense-masked run")
    parser.add_argument("--decode-batch", type=int, default=8)
    parser.add_argument(
        "--vllm-check",
        action="store_true",
        help="CPU: vLLM's M3 kernels vs ours under the interpreter (slow: 455 s on a loaded 2-core box)",
    )
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ["TRITON_INTERPRET"] = "1"  # before forgerl.kernels (triton.jit) is imported
        torch.set_num_threads(1)  # cpu_ms measures CPU time: one thread keeps it comparable to wall time
    args.tokens = args.tokens or ([4096, 16384, 65536, 131072] if gpu else [1024, 2048, 4096, 8192, 16384])
    report: dict[str, Any] = {"benchmark": "msa", "machine": machine()}
    report["gpu"] = torch.cuda.get_device_name() if gpu else None
    report["baseline"] = (
        "dense attention at the same shapes: prefill causal scaled_dot_product_attention (enable_gqa); "
        "decode a GQA matmul reading each K/V once (dense_gqa_matmul)"
    )
    if not gpu:
        report["note"] = CPU_NOTE
    report["kernel_check"] = kernel_check("cuda" if gpu else "cpu")
    if args.vllm_check and not gpu:
        report["vllm_kernel_check"] = guarded(vllm_interpret_check)
    start = time.monotonic()
    report["curve"] = run_gpu(args, report) if gpu else run_cpu(args, report)
    report["curve_seconds"] = round(time.monotonic() - start, 1)
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
