"""A training run as a standalone (multi-process) job: `torchrun` starts one of these per rank.

    torchrun --nproc-per-node 2 -m forgerl.trainer.worker examples/tiny-tool-use.yaml --run-id r1 \\
        --local-episodes                                   # in-process episodes (no services)
    torchrun --nproc-per-node 2 -m forgerl.trainer.worker run.yaml --run-id r1 \\
        --rollout 127.0.0.1:50054 --datapool 127.0.0.1:50052 --inference 127.0.0.1:50051

The process group is gloo on CPU and NCCL on GPU. The run file's `trainer.parallel` picks the layout
(TrainingRun): unset, every rank holds the model whole under DDP; with dp_shard > 1 or ep > 1 the meshes
are built from it and the model is built on the meta device, split (experts over ep ranks, FSDP2 over the
rest) and materialised from init_checkpoint's rows or seeded values (forgerl.trainer.sharded), its
state saved with torch.distributed.checkpoint and its published weights written from the shards. Rank 0
talks to the services and broadcasts each batch; every rank trains on its share of the rows and the
gradients are averaged in backward. Started again with the same --run-id, it resumes.

    # examples/tiny-tool-use-fsdp-ep.yaml: trainer.parallel {dp_shard: 2, ep: 2}
    torchrun --nproc-per-node 2 -m forgerl.trainer.worker examples/tiny-tool-use-fsdp-ep.yaml --run-id r2 \\
        --rollout 127.0.0.1:50054 --datapool 127.0.0.1:50052 --inference 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import load_run_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m forgerl.trainer.worker")
    p.add_argument("config", type=Path)
    p.add_argument("--run-id", required=True)
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-tasks", type=int, default=TrainerSettings.eval_tasks)
    p.add_argument("--eval-every", type=int, default=TrainerSettings.eval_every)
    p.add_argument("--tokenizer", default=None, help="Tokenizer directory when the config has no init_checkpoint.")
    p.add_argument("--local-episodes", action="store_true")
    p.add_argument("--rollout", default="127.0.0.1:50054")
    p.add_argument("--datapool", default="127.0.0.1:50052")
    p.add_argument("--inference", default="127.0.0.1:50051")
    args = p.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if distributed else 0
    settings = TrainerSettings(
        runs_dir=args.runs_dir,
        threads=args.threads,
        eval_tasks=args.eval_tasks,
        eval_every=args.eval_every,
        tokenizer_path=args.tokenizer,
        local_episodes=args.local_episodes,
    )
    episodes = publisher = None
    if rank == 0 and not args.local_episodes:
        from forgerl.trainer.sources import InferencePublisher, ServiceEpisodes

        episodes = ServiceEpisodes(args.rollout, args.datapool)
        publisher = InferencePublisher(args.inference)
    log_path = args.runs_dir / args.run_id / "metrics.jsonl"

    def sink(stage: str, step: int, values: dict[str, float]) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")

    run = TrainingRun(
        args.run_id, load_run_config(args.config), settings, episodes=episodes, publisher=publisher, sink=sink
    )
    try:
        progress = run.run()
        if rank == 0:
            summary = {"run_id": args.run_id, "stage": progress.stage, "rl_step": progress.rl_step}
            summary.update(sft_heldout=progress.sft_heldout, final_heldout=progress.final_heldout)
            print(json.dumps(summary))
        if distributed:  # every rank leaves its last collective before any tears the group down
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
    if distributed:
        # Under load, a rank sometimes aborts in interpreter teardown ("terminate called without an active
        # exception": a C++ thread of the process group still joinable) after everything above is done and
        # durable. Leave without running C++ static destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
