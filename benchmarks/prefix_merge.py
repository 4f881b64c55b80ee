"""Prefix-tree merging: tokens before/after and measured forward+backward time, merged vs unmerged (JSON).

Cases (the issue's two shapes of agentic batches):
  group      8 samples sharing a 1,024-token prompt, 128-token answers
  multiturn  2 agent trajectories of 8 turns sharing a 256-token task; turn k's sample is the history
             (task, earlier actions and tool outputs) plus its 64-token action, and the history grows by
             the action and a 64-token tool output, so each turn's sample is a prefix of the next one's

Unmerged runs each sequence alone (no padding, causal); merged runs one call per pack of the forest with
the dense ancestor mask, mask construction included. Each measurement is loss = sum of the per-token
log-probabilities, forward and backward; the runs alternate merged / unmerged so that load from other
processes hits both alike, and the medians of wall-clock and of process CPU time are reported (CPU time
is the steadier of the two on a shared machine). speedup / token_ratio is the target (>= 0.8).

The model: the CPU stand-in for MiniMax-M2 proportions ("bench", below) by default, or `--preset small`.
A width-scaled model overweights attention (its cost shrinks with width, the expert matmuls' with width
squared), and merged attention with a dense mask costs (merged tokens)^2 where unmerged causal attention
costs about sum(length^2)/2, so the config keeps M2's ratio of matmul work to attention work. Per token
and layer M2 spends ~158 M multiply-adds in projections, router and top-8 experts (3072 x 14336 + 8 x 3 x
3072 x 1536) and 12.3 K per key of context (48 heads x 128 x 2): the two break even at 12.8 K tokens of
context. "bench" spends 1.6 M and 128 per key: even at 12.5 K.

Run: `python benchmarks/prefix_merge.py [--repeats 3] [--preset small] [--threads 1] [--out results.json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.rl.prefix_merge import forward_merged, forward_unmerged
from forgerl.rl.prefix_tree import PrefixForest

BENCH_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "rotary_dim": 16,
    "intermediate_size": 512,
    "num_local_experts": 32,
    "num_experts_per_tok": 8,  # M2's top-8
    "num_mtp_modules": 0,
}


def group_case(vocab: int, gen: torch.Generator) -> list[torch.Tensor]:
    prompt = torch.randint(0, vocab, (1024,), generator=gen)
    return [torch.cat([prompt, torch.randint(0, vocab, (128,), generator=gen)]) for _ in range(8)]


def multiturn_case(vocab: int, gen: torch.Generator) -> list[torch.Tensor]:
    task = torch.randint(0, vocab, (256,), generator=gen)
    samples = []
    for _ in range(2):
        history = task
        for _ in range(8):
            action = torch.randint(0, vocab, (64,), generator=gen)
            samples.append(torch.cat([history, action]))
            history = torch.cat([samples[-1], torch.randint(0, vocab, (64,), generator=gen)])
    return samples


CASES: dict[str, Callable[[int, torch.Generator], list[torch.Tensor]]] = {
    "group": group_case,
    "multiturn": multiturn_case,
}


def _timed(step: Callable[[], torch.Tensor], model: torch.nn.Module) -> tuple[float, float]:
    """(wall-clock seconds, process CPU seconds) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    step().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_case(model: MiniMaxM2ForCausalLM, seqs: list[torch.Tensor], repeats: int) -> dict:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    tic = time.perf_counter()
    forest = PrefixForest.build(ids, lengths)
    build_s = time.perf_counter() - tic

    def merged() -> torch.Tensor:
        return forward_merged(model, forest).logprobs.sum()

    def unmerged() -> torch.Tensor:
        return sum((forward_unmerged(model, s[None]).logprobs.sum() for s in seqs), torch.zeros(()))

    _timed(merged, model), _timed(unmerged, model)  # warm-up: allocator, kernels' first-call set-up
    merged_runs, unmerged_runs = [], []
    for _ in range(repeats):
        merged_runs.append(_timed(merged, model))
        unmerged_runs.append(_timed(unmerged, model))
    token_ratio = forest.num_input_tokens / forest.num_packed_tokens
    result: dict[str, Any] = {
        "sequences": len(seqs),
        "tokens_unmerged": forest.num_input_tokens,
        "tokens_merged": forest.num_packed_tokens,
        "token_ratio": token_ratio,
        "forest_build_s": build_s,
    }
    for clock, index in (("wall", 0), ("cpu", 1)):
        merged_s = statistics.median(run[index] for run in merged_runs)
        unmerged_s = statistics.median(run[index] for run in unmerged_runs)
        result |= {
            f"unmerged_{clock}_s": unmerged_s,
            f"merged_{clock}_s": merged_s,
            f"speedup_{clock}": unmerged_s / merged_s,
            f"speedup_{clock}_over_token_ratio": unmerged_s / merged_s / token_ratio,
        }
    result["runs_s"] = {"merged": merged_runs, "unmerged": unmerged_runs}
    return result


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, torch, and the load from other processes."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, help="a ModelConfig preset instead of the bench config")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", default=sorted(CASES), choices=sorted(CASES))
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: on a shared 2-core machine, two OpenMP threads spin against other processes and
    # inflate the many small ops of the unmerged runs most (seen: 4.6 s CPU at 1 thread, 16-27 s at 2).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset(args.preset) if args.preset else ModelConfig(**BENCH_CONFIG)
    model = MiniMaxM2ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(args.seed)
    report = {
        "benchmark": "prefix_merge",
        "model": args.preset or {"preset": "bench", **BENCH_CONFIG},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype),
        "machine": machine(),
        "results": {name: run_case(model, CASES[name](cfg.vocab_size, gen), args.repeats) for name in args.cases},
    }
    report["load_average_1m_after"] = os.getloadavg()[0]
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
