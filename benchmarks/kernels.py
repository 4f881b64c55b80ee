"""Triton kernels against their PyTorch baselines, measured side by side in one run.

- fused_moe at MiniMax-M2's shape (hidden 3072, 256 experts, top-8, expert FFN 1536), 4K-64K tokens, bf16:
  forward and forward+backward TFLOP/s against the model's own grouped implementation
  (`forgerl.model.moe`: torch.grouped_mm) and, where vLLM is importable, vLLM's fused_experts (forward).
- tree_attention at MiniMax-M2's attention shape (48 query heads, 8 KV heads, head_dim 128), bf16, on a
  prefix forest (a shared prompt and branching completions) against SDPA with the dense ancestor mask and
  against SDPA causal on the unmerged sequences (what prefix merging replaces).
- msa (MiniMax Sparse Attention, index branch included) prefill on one sequence and decode (one query per
  sequence over a KV cache) at 32K and 128K tokens, against dense causal SDPA (flash) at the same shapes.

Run: `python benchmarks/kernels.py [--moe-tokens 4096 16384 65536] [--tree-tokens 8192 32768]
[--msa-tokens 32768 131072] [--out f.json]`.
Without a CUDA GPU it prints a JSON object saying so and exits 0; `--smoke` instead runs tiny shapes on
CPU under Triton's interpreter (checks the script, the numbers mean nothing). Prints ONE JSON object last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    info: dict[str, Any] = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        import triton

        info["triton"] = triton.__version__
    return info


def timed_ms(fn: Callable[[], object], device: str) -> float:
    """Median ms: triton's do_bench on CUDA (flushes L2, syncs), one perf_counter run in smoke mode."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_gib(fn: Callable[[], object], device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def measure(fn: Callable[[], object], flops: float | None, device: str) -> dict[str, Any]:
    """Time, TFLOP/s (when the useful FLOPs are known) and peak memory of one call of fn."""
    ms = timed_ms(fn, device)
    result: dict[str, Any] = {"ms": round(ms, 4), "peak_gib": peak_gib(fn, device)}
    if flops is not None:
        result["tflops"] = round(flops / ms / 1e9, 2)
    return result


def moe_case(tokens: int, dims: dict[str, int], device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    d, e, f = dims["hidden"], dims["experts"], dims["ffn"]
    gen = torch.Generator(device=device).manual_seed(tokens)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return {
        "x": randn(tokens, d, scale=1.0),
        "gate": randn(e, d, scale=d**-0.5).float(),
        "bias": torch.zeros(e, device=device),
        "w1": randn(e, f, d, scale=d**-0.5),
        "w2": randn(e, d, f, scale=f**-0.5),
        "w3": randn(e, f, d, scale=d**-0.5),
        "grad": randn(tokens, d, scale=1.0),
    }


def torch_grouped_moe(dims: dict[str, int], case: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's own layer (forgerl.model.moe: torch.grouped_mm), built on the meta device then filled."""
    from forgerl.model.config import ModelConfig
    from forgerl.model.moe import Experts, route

    cfg = ModelConfig(
        hidden_size=dims["hidden"], intermediate_size=dims["ffn"],
        num_local_experts=dims["experts"], num_experts_per_tok=dims["top_k"],
    )  # fmt: skip
    with torch.device("meta"):
        experts = Experts(cfg)
    for name in ("w1", "w2", "w3"):
        setattr(experts, name, torch.nn.Parameter(case[name].clone()))

    def forward(x: torch.Tensor) -> torch.Tensor:
        routing = route(x, case["gate"], case["bias"], dims["top_k"])
        counts = torch.bincount(routing.expert_ids_NK.reshape(-1), minlength=dims["experts"])
        return experts(x, routing.expert_ids_NK, routing.weights_NK, counts)

    return forward


def vllm_forward(dims: dict[str, int], case: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor] | str:
    try:
        from vllm.model_executor.layers.fused_moe import fused_experts
    except Exception as error:  # vLLM absent or built without CUDA kernels: reported, not fatal
        return f"unavailable: {type(error).__name__}: {error}"[:200]
    from forgerl.kernels.fused_moe.naive import naive_route

    ids, weights = naive_route(case["x"], case["gate"], case["bias"], dims["top_k"])
    w13 = torch.cat([case["w1"], case["w3"]], dim=1)  # vLLM: silu on the first half, times the second
    return lambda: fused_experts(case["x"], w13, case["w2"], weights, ids)


def bench_fused_moe(tokens: int, dims: dict[str, int], device: str, backward: bool) -> dict[str, Any]:
    from forgerl.kernels.fused_moe import fused_moe

    case = moe_case(tokens, dims, device, torch.bfloat16)
    gemm_flops = 2.0 * tokens * dims["top_k"] * dims["hidden"] * dims["ffn"]
    top_k = dims["top_k"]

    def ours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return fused_moe(x, case["gate"], case["bias"], case["w1"], case["w2"], case["w3"], top_k)

    baseline = torch_grouped_moe(dims, case)
    result: dict[str, Any] = {"tokens": tokens}
    with torch.no_grad():
        result["forward"] = {
            "triton": measure(lambda: ours(case["x"]), 3 * gemm_flops, device),
            "torch_grouped_mm": measure(lambda: baseline(case["x"]), 3 * gemm_flops, device),
        }
        vllm = vllm_forward(dims, case) if device == "cuda" else "not run on CPU"
        result["forward"]["vllm"] = vllm if isinstance(vllm, str) else measure(vllm, 3 * gemm_flops, device)
    if backward:
        for name in ("gate", "w1", "w2", "w3"):
            case[name].requires_grad_()
        x_leaf = case["x"].detach().requires_grad_()

        def ours_step() -> None:
            ours(x_leaf)[0].backward(case["grad"])

        def torch_step() -> None:
            baseline(x_leaf).backward(case["grad"])

        result["forward_backward"] = {
            "triton": measure(ours_step, 9 * gemm_flops, device),
            "torch_grouped_mm": measure(torch_step, 9 * gemm_flops, device),
        }
    for phase in ("forward", "forward_backward"):
        if phase in result:
            result[phase]["speedup_vs_torch"] = round(
                result[phase]["torch_grouped_mm"]["ms"] / result[phase]["triton"]["ms"], 3
            )
    return result


def prefix_forest(prompt: int, branches: int, branch_len: int, device: str) -> torch.Tensor:
    """subtree_end [1, T] of one shared prompt followed by `branches` completions (T = P + B * L)."""
    total = prompt + branches * branch_len
    end = torch.full((total,), total, dtype=torch.int32)
    for b in range(branches):
        start = prompt + b * branch_len
        end[start : start + branch_len] = start + branch_len
    return end[None].to(device)


def bench_tree_attention(tokens: int, dims: dict[str, int], device: str) -> dict[str, Any]:
    """A rollout group: a prompt of T/4 tokens and 8 completions sharing it, merged into one pack of T."""
    import torch.nn.functional as F

    from forgerl.kernels.tree_attention import tree_attention
    from forgerl.kernels.tree_attention.naive import ancestor_mask

    heads, kv_heads, head_dim, branches = dims["heads"], dims["kv_heads"], dims["head_dim"], 8
    prompt = tokens // 4
    branch_len = (tokens - prompt) // branches
    end = prefix_forest(prompt, branches, branch_len, device)
    total = end.shape[1]
    gen = torch.Generator(device=device).manual_seed(total)
    q, k, v = (
        torch.randn(1, total, n, head_dim, generator=gen, device=device, dtype=torch.bfloat16, requires_grad=True)
        for n in (heads, kv_heads, kv_heads)
    )
    mask = ancestor_mask(end)[:, None]  # [1, 1, T, T]: the dense mask SDPA needs
    visible = float(mask.sum())
    fwd_flops = 4.0 * heads * head_dim * visible
    grad = torch.randn_like(q)
    groups = heads // kv_heads
    # SDPA's baselines get K/V expanded to all heads, outside the timed region: with enable_gqa a masked call
    # may fall back to the math kernel, which materialises [H, T, T] scores.
    qt = q.detach().transpose(1, 2).requires_grad_()
    kt, vt = (t.detach().transpose(1, 2).repeat_interleave(groups, dim=1).requires_grad_() for t in (k, v))
    # Unmerged: each completion with its own copy of the prompt, causal.
    seqs = torch.randn(branches, heads, prompt + branch_len, head_dim, device=device, dtype=torch.bfloat16)
    unmerged_flops = 4.0 * heads * head_dim * branches * (prompt + branch_len) ** 2 / 2

    def sdpa_dense() -> torch.Tensor:
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)

    result: dict[str, Any] = {"tokens": total, "prompt": prompt, "branches": branches, "branch_len": branch_len}
    with torch.no_grad():
        result["forward"] = {
            "triton": measure(lambda: tree_attention(q, k, v, end), fwd_flops, device),
            "sdpa_dense_mask": measure(sdpa_dense, fwd_flops, device),
            "sdpa_causal_unmerged": measure(
                lambda: F.scaled_dot_product_attention(seqs, seqs, seqs, is_causal=True),
                unmerged_flops, device,
            ),
        }  # fmt: skip
    result["forward_backward"] = {
        "triton": measure(lambda: tree_attention(q, k, v, end).backward(grad), 3.5 * fwd_flops, device),
        "sdpa_dense_mask": measure(lambda: sdpa_dense().backward(grad.transpose(1, 2)), 3.5 * fwd_flops, device),
    }
    for phase in ("forward", "forward_backward"):
        result[phase]["speedup_vs_sdpa_dense"] = round(
            result[phase]["sdpa_dense_mask"]["ms"] / result[phase]["triton"]["ms"], 3
        )
    return result


def bench_msa(tokens: int, dims: dict[str, int], device: str) -> dict[str, Any]:
    """Forward only: prefill of one `tokens`-long sequence, and decode of `decode_batch` such sequences."""
    import torch.nn.functional as F

    from forgerl.kernels.msa import msa_attention

    heads, kv_heads, head_dim, block, top_k = (dims[k] for k in ("heads", "kv_heads", "head_dim", "block", "top_k"))
    batch = dims["decode_batch"]
    gen = torch.Generator(device=device).manual_seed(tokens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    q, k, v = randn(tokens, heads, head_dim), randn(tokens, kv_heads, head_dim), randn(tokens, kv_heads, head_dim)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    groups = heads // kv_heads  # SDPA gets K/V expanded to all heads (see bench_tree_attention)
    q_sdpa = q.transpose(0, 1)[None]
    k_sdpa, v_sdpa = (t.transpose(0, 1)[None].repeat_interleave(groups, dim=1) for t in (k, v))
    cache_k, cache_v = randn(batch * tokens, kv_heads, head_dim), randn(batch * tokens, kv_heads, head_dim)
    q_dec = randn(batch, heads, head_dim)
    cu_k = torch.arange(batch + 1, dtype=torch.int32, device=device) * tokens
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
    k_dec, v_dec = (
        t.view(batch, tokens, kv_heads, head_dim).transpose(1, 2).repeat_interleave(groups, dim=1)
        for t in (cache_k, cache_v)
    )
    kept_keys = min(tokens, (top_k + 2) * block)
    result: dict[str, Any] = {"tokens": tokens, "block": block, "top_k": top_k, "kept_keys_per_query": kept_keys}
    with torch.no_grad():
        result["prefill"] = {
            "msa": measure(lambda: msa_attention(q, k, v, cu, cu, block=block, top_k=top_k), None, device),
            "sdpa_causal_dense": measure(
                lambda: F.scaled_dot_product_attention(q_sdpa, k_sdpa, v_sdpa, is_causal=True),
                2.0 * heads * head_dim * tokens**2, device,
            ),
        }  # fmt: skip
        result["decode"] = {
            "batch": batch,
            "msa": measure(
                lambda: msa_attention(q_dec, cache_k, cache_v, cu_q, cu_k, block=block, top_k=top_k), None, device
            ),
            "sdpa_dense": measure(
                lambda: F.scaled_dot_product_attention(q_dec[:, :, None], k_dec, v_dec), None, device
            ),
        }
    for phase, dense in (("prefill", "sdpa_causal_dense"), ("decode", "sdpa_dense")):
        result[phase]["speedup_vs_dense"] = round(result[phase][dense]["ms"] / result[phase]["msa"]["ms"], 3)
    return result


def guarded(bench: Callable[..., dict[str, Any]], tokens: int, *args: Any) -> dict[str, Any]:
    """One case; a failure (out of memory at 64K tokens, a kernel that does not compile) is recorded in the
    JSON beside the cases that ran instead of losing the whole run."""
    try:
        return bench(tokens, *args)
    except Exception as error:  # reported in the output, never swallowed silently
        return {"tokens": tokens, "error": f"{type(error).__name__}: {error}"[:500]}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--moe-tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--moe-backward-max-tokens", type=int, default=16384)
    parser.add_argument("--tree-tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--msa-tokens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--msa-block", type=int, default=64)
    parser.add_argument("--msa-top-k", type=int, default=16)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "kernels", "machine": machine()}
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels (and triton.jit) are imported
        device = "cpu"
        moe_dims = {"hidden": 48, "experts": 8, "top_k": 2, "ffn": 32}
        attn_dims = {"heads": 4, "kv_heads": 2, "head_dim": 32}
        args.moe_tokens, args.tree_tokens, args.moe_backward_max_tokens = [40], [72], 40
        args.msa_tokens, args.msa_block, args.msa_top_k = [90], 16, 2
    elif torch.cuda.is_available():
        device = "cuda"
        moe_dims = {"hidden": 3072, "experts": 256, "top_k": 8, "ffn": 1536}  # MiniMax-M2
        attn_dims = {"heads": 48, "kv_heads": 8, "head_dim": 128}  # MiniMax-M2
    else:
        report["gpu"] = False
        report["skipped"] = "no CUDA GPU found: these benchmarks need one (use --smoke to check the script on CPU)"
        print(json.dumps(report))
        return
    report["gpu"] = device == "cuda"
    msa_dims = {**attn_dims, "block": args.msa_block, "top_k": args.msa_top_k, "decode_batch": 8}
    report["fused_moe"] = [
        guarded(bench_fused_moe, n, moe_dims, device, n <= args.moe_backward_max_tokens) for n in args.moe_tokens
    ]
    report["tree_attention"] = [guarded(bench_tree_attention, n, attn_dims, device) for n in args.tree_tokens]
    report["msa"] = [guarded(bench_msa, n, msa_dims, device) for n in args.msa_tokens]
    text = json.dumps(report)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
