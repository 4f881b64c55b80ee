"""One rank of the weight-stream check (test_weight_stream.py runs it under torchrun, gloo, CPU).

For each layout given: build layout_case's model under it, then on every rank measure (PeakCpuMemory,
torch's profiler) the tensor memory that streaming the weights in --bucket-bytes buckets adds, and then
what the full gather adds. The sender (rank 0) copies each streamed tensor into a buffer allocated
before the measurement (so keeping the result costs the meter nothing) and records the bucket sizes.
Rank 0 writes {layout: {"tensors", "buckets", "peaks", "bounds", "full_gather_peaks"}} to --out.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.distributed.memory import PeakCpuMemory
from forgerl.distributed.weight_stream import (
    full_gather_tensors,
    largest_tensor_bytes,
    plan_weight_stream,
    stream_weight_buckets,
)
from forgerl.model.checkpoint import checkpoint_tensors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket-bytes", type=int, required=True)
    parser.add_argument("--dtypes", required=True, help='JSON-free: "layout=float32,layout2=bfloat16"')
    args, layouts = case.start_worker(parser)
    dtypes = dict(item.split("=") for item in args.dtypes.split(","))
    # Where the sender puts what it receives: shapes of the unsharded export, allocated before measuring.
    results = {}
    for name, values in layouts.items():
        dtype = getattr(torch, dtypes[name])
        parallel, _ = case.parallel_model(values)
        received = {hf: torch.empty(t.shape, dtype=dtype) for hf, t in checkpoint_tensors(case.build_model())}
        buckets: list[tuple[int, int]] = []  # (tensors, bytes) per bucket
        plan = plan_weight_stream(parallel)  # once per run, not per sync
        with PeakCpuMemory() as stream_meter:
            for bucket in stream_weight_buckets(parallel, args.bucket_bytes, dtype, plan=plan):
                buckets.append((len(bucket), sum(t.nbytes for _, t in bucket)))
                for hf, tensor in bucket:
                    received[hf].copy_(tensor)
                del bucket, tensor
        with PeakCpuMemory() as full_meter:
            gathered = full_gather_tensors(parallel, dtype)
            del gathered
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, (stream_meter.peak_bytes, full_meter.peak_bytes))
        results[name] = {
            "tensors": received,
            "buckets": buckets,
            "peaks": [p[0] for p in peaks],
            "full_gather_peaks": [p[1] for p in peaks],
            "largest_tensor_bytes": largest_tensor_bytes(parallel),
        }
    case.write_results(results, args.out)


if __name__ == "__main__":
    main()
