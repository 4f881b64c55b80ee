"""Weight sync from a sharded trainer: bucketed streaming vs the full gather, side by side, 2 gloo ranks.

    python benchmarks/weight_stream.py [--preset small] [--bucket-mb 16] [--rounds 3] [--dtype bfloat16]

For FSDP2 and FSDP2+EP2 (each in its own `torchrun --nproc-per-node 2`), the trainer side of a sync:
- bucketed: `stream_weight_buckets` -- each tensor's row blocks sent to rank 0, cast, split per expert
  under MiniMax-M2 names, yielded in buckets of --bucket-mb;
- full gather: `full_gather_tensors` -- the whole state dict gathered on every rank (`full_state_dict`),
  then named and split (what the trainer did before).
Rank 0 copies every tensor it gets into a buffer allocated beforehand (the stand-in for vLLM's
load_weights, which copies into its parameters). Per method: sync time (median of --rounds, after one
warm-up) and each rank's peak extra tensor memory (torch's profiler, PeakCpuMemory, in a separate
round: the profiler slows the work). The bound the stream keeps is one bucket + the largest tensor.
Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"fsdp2": {"dp_shard": 2}, "fsdp2_ep2": {"dp_shard": 2, "ep": 2}}


def _timed_and_measured(sync: Callable[[], None], rounds: int) -> tuple[float, int]:
    from forgerl.distributed.memory import PeakCpuMemory

    sync()  # warm-up
    times = []
    for _ in range(rounds):
        dist.barrier()
        started = time.perf_counter()
        sync()
        dist.barrier()
        times.append(time.perf_counter() - started)
    with PeakCpuMemory() as meter:
        sync()
    return statistics.median(times), meter.peak_bytes


def worker(args: argparse.Namespace) -> None:
    from forgerl.distributed import ParallelConfig, build_meshes
    from forgerl.distributed.materialize import build_parallel_model
    from forgerl.distributed.weight_stream import (
        full_gather_tensors,
        largest_tensor_bytes,
        plan_weight_stream,
        stream_weight_buckets,
    )
    from forgerl.model import ModelConfig
    from forgerl.model.checkpoint import name_table

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dtype = getattr(torch, args.dtype)
    cfg = ModelConfig.from_preset(args.preset, num_mtp_modules=0)
    layout = ParallelConfig.from_dict(LAYOUTS[args.layout]).resolve(dist.get_world_size(), cfg.num_local_experts)
    parallel = build_parallel_model(cfg, build_meshes(layout, "cpu"), seed=0, device=torch.device("cpu"))
    state = parallel.model.state_dict()
    received: dict[str, torch.Tensor] = {}
    if rank == 0:  # the receiving side's parameters, allocated once
        for ours, hf in name_table(cfg).items():
            whole = state[ours]
            rows = cfg.num_local_experts if ours in parallel.expert_params else whole.shape[0]
            names = [hf.format(e=e) for e in range(rows)] if "{e}" in hf else [hf]
            shape = tuple(whole.shape[1:]) if "{e}" in hf else (rows, *whole.shape[1:])
            received.update({name: torch.empty(shape, dtype=dtype) for name in names})
    bucket_bytes = int(args.bucket_mb * 2**20)
    plan = plan_weight_stream(parallel)

    def load(tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:
            received[name].copy_(tensor)

    def bucketed() -> None:
        for bucket in stream_weight_buckets(parallel, bucket_bytes, dtype, plan=plan):
            load(bucket)

    def full_gather() -> None:
        tensors = full_gather_tensors(parallel, dtype)
        if rank == 0:
            load(tensors)

    figures = []
    for sync in (bucketed, full_gather):
        seconds, peak = _timed_and_measured(sync, args.rounds)
        figures += [seconds, float(peak)]
    table = torch.tensor(figures, dtype=torch.float64)
    peaks = [torch.zeros_like(table) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, table)
    if rank == 0:
        result: dict[str, object] = {}
        for i, method in enumerate(("bucketed", "full_gather")):
            result[method] = {
                "sync_s": figures[2 * i],
                "peak_extra_bytes_per_rank": [int(p[2 * i + 1]) for p in peaks],
            }
        result["bucket_bytes"] = bucket_bytes
        result["largest_tensor_bytes"] = largest_tensor_bytes(parallel)
        result["model_bytes"] = sum(t.nbytes for t in received.values())
        args.out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--bucket-mb", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="what the server is sent (cast on the sender)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layout:
        worker(args)
        return
    from forgerl.distributed.launch import run_layouts

    flags = ["--preset", args.preset, "--bucket-mb", str(args.bucket_mb), "--rounds", str(args.rounds)]
    results = run_layouts(__file__, LAYOUTS, [*flags, "--dtype", args.dtype])
    for name, figures in results.items():
        stream, full = figures["bucketed"], figures["full_gather"]
        figures["time_ratio_bucketed_vs_full"] = stream["sync_s"] / full["sync_s"]
        figures["peak_ratio_bucketed_vs_full"] = max(stream["peak_extra_bytes_per_rank"]) / max(
            full["peak_extra_bytes_per_rank"]
        )
        figures["bound_bytes"] = (
            max(figures["bucket_bytes"], figures["largest_tensor_bytes"]) + figures["largest_tensor_bytes"]
        )
        print(f"{name}: {json.dumps(figures)}", file=sys.stderr)
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "gpu": None}
    print(json.dumps({"benchmark": "weight_stream", "preset": args.preset, "ranks": 2, "dtype": args.dtype,
                      "layouts": results, "machine": machine}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
