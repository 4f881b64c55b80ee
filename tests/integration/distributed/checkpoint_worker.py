"""One rank of the distributed-checkpoint check (test_checkpoint.py runs it under torchrun, gloo, CPU).

--save DIR --save-at N: train layout_case's steps 0..N-1 in the one layout given, save a DCP checkpoint,
then train on to the end (the uninterrupted run). --load DIR: for each layout given, build a fresh model,
load the checkpoint (saved by another layout, on another number of ranks) and train the remaining steps.
Rank 0 writes {layout name: record} to --out.
"""

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.distributed import full_state_dict
from forgerl.distributed.checkpoint import load_training_state, save_training_state
from forgerl.distributed.export import export_hf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save", type=Path)
    parser.add_argument("--save-at", type=int, default=3)
    parser.add_argument("--load", type=Path)
    parser.add_argument("--export", type=Path, help="also export each layout's final weights to DIR/<layout>")
    args, layouts = case.start_worker(parser)
    results = {}
    for name, values in layouts.items():
        parallel, _ = case.parallel_model(values)
        opt = case.optimizer(parallel.model)
        record = {}
        if args.load:
            extra = load_training_state(args.load, parallel, opt)
            torch.set_rng_state(extra["torch_rng"])
            random.setstate(extra["python_rng"])
            first = extra["step"]
        else:
            first = 0
            before = case.run_steps(parallel.train_model, parallel.model, opt, range(args.save_at))
            extra = {"step": args.save_at, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
            save_training_state(args.save, parallel, opt, extra)
            record["before"] = before
            first = args.save_at
        record.update(case.run_steps(parallel.train_model, parallel.model, opt, range(first, case.STEPS)))
        record["first"] = first
        record["state"] = full_state_dict(parallel)
        if args.export:  # small files: every writer rank writes several
            export_hf(parallel, args.export / name, dtype=torch.float32, max_shard_bytes=2**20)
        results[name] = record
    case.write_results(results, args.out)


if __name__ == "__main__":
    main()
