"""Training-step throughput and per-rank memory of DDP, FSDP2 and FSDP2+EP2 side by side, 2 gloo ranks.

    python benchmarks/parallel_step.py [--preset small] [--rows 4] [--seq 128] [--steps 3]

Each layout runs in its own `torchrun --nproc-per-node 2` (so that a process's peak RSS is its own):
next-token loss, backward, the layout-aware clip, AdamW, on the same random batches. Per layout: global
tokens/s over the timed steps (after one warm-up step), the parameter + gradient + AdamW bytes a rank
holds (exact, from its tensors) and the rank's peak RSS. Prints one JSON object last, with the ratios to
DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from forgerl.distributed.launch import run_layouts

LAYOUTS = {"ddp": {}, "fsdp2": {"dp_shard": 2}, "fsdp2_ep2": {"dp_shard": 2, "ep": 2}}


def _local_bytes(tensors: list[torch.Tensor]) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def worker(args: argparse.Namespace) -> None:
    from forgerl.distributed import ParallelConfig, build_meshes, clip_grad_norm_
    from forgerl.distributed.materialize import build_parallel_model
    from forgerl.model import ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig.from_preset(args.preset, num_mtp_modules=0)
    layout = ParallelConfig.from_dict(LAYOUTS[args.layout]).resolve(world, cfg.num_local_experts)
    parallel = build_parallel_model(cfg, build_meshes(layout, "cpu"), seed=0, device=torch.device("cpu"))
    opt = torch.optim.AdamW(parallel.model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1 + rank)
    elapsed = 0.0
    for step in range(args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (args.rows, args.seq), generator=g)
        started = time.perf_counter()
        logits = parallel.train_model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(parallel.model.parameters(), 1.0)
        opt.step()
        dist.barrier()
        if step:  # step 0 warms up (allocations, FSDP2 lazy init)
            elapsed += time.perf_counter() - started
    params = list(parallel.model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for state in opt.state.values() for v in state.values() if v.dim() > 0]
    figures = torch.tensor(
        [
            _local_bytes(params),
            _local_bytes(grads),
            _local_bytes(moments),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(figures, op=dist.ReduceOp.MAX)
    if rank == 0:
        tokens = args.steps * args.rows * args.seq * world
        result = dict(
            zip(("param_bytes", "grad_bytes", "optimizer_bytes", "peak_rss_bytes"), figures.tolist(), strict=True)
        )
        result["tokens_per_s"] = tokens / elapsed
        args.out.write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, default=4, help="rows per rank per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layout:
        worker(args)
        return
    flags = ["--preset", args.preset, "--rows", str(args.rows), "--seq", str(args.seq), "--steps", str(args.steps)]
    results = run_layouts(__file__, LAYOUTS, flags)
    base = results["ddp"]
    for figures in results.values():
        figures["tokens_per_s_vs_ddp"] = figures["tokens_per_s"] / base["tokens_per_s"]
        state = figures["param_bytes"] + figures["grad_bytes"] + figures["optimizer_bytes"]
        figures["state_bytes_vs_ddp"] = state / (base["param_bytes"] + base["grad_bytes"] + base["optimizer_bytes"])
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__}
    print(json.dumps({"preset": args.preset, "ranks": 2, "layouts": results, "machine": machine}, indent=1))


if __name__ == "__main__":
    main()
