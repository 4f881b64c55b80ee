"""One rank of the layout-equivalence check (test_layouts.py runs it under torchrun, gloo, CPU).

For each layout given (JSON list of trainer.parallel mappings), in one process group: build the tiny
model from the seed, apply the layout, train layout_case's 5 steps, gather the full parameters and
buffers; then build the layout again on the meta device, materialise it (seeded_init_) and gather that
too, with the most parameter bytes any rank held. Rank 0 writes {layout name: record} to --out.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.distributed import full_state_dict
from forgerl.distributed.materialize import build_parallel_model, local_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    args, layouts = case.start_worker(parser)
    results = {}
    for name, values in layouts.items():
        parallel, meshes = case.parallel_model(values)
        record = case.run_steps(parallel.train_model, parallel.model, case.optimizer(parallel.model))
        record["state"] = full_state_dict(parallel)
        # The same layout built on the meta device and materialised shard by shard.
        fresh = build_parallel_model(case.model_config(), meshes, case.SEED, torch.device("cpu"))
        record["meta_init"] = full_state_dict(fresh)
        held = torch.tensor([float(local_bytes(fresh.model))])
        dist.all_reduce(held, op=dist.ReduceOp.MAX)
        record["max_rank_bytes"] = float(held)
        results[name] = record
    case.write_results(results, args.out)


if __name__ == "__main__":
    main()
