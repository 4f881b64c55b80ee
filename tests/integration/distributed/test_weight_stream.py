"""Weight sync from a sharded trainer (issue 19, item 5): 2 gloo ranks stream layout_case's model in
small buckets under FSDP2, FSDP2 + EP2 (cast to bfloat16 on the way) and DDP. The sender receives
exactly the tensors, under exactly the names, of the unsharded model's Hugging Face export
(`checkpoint_tensors`, computed here in one process); no bucket passes the limit unless one tensor
does; and on every rank the tensor memory the stream adds (torch's profiler, PeakCpuMemory) stays
within one bucket plus the largest tensor (the other rank allocates nothing: it only sends its
shards), while the full gather adds more than the whole model on every rank.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import layout_case as case

from forgerl.model.checkpoint import checkpoint_tensors

pytestmark = pytest.mark.integration

BUCKET_BYTES = 128 * 2**10  # a quarter of the tiny preset's largest tensor (an expert stack, 512 KiB)
LAYOUTS = {"fsdp": {"dp_shard": 2}, "fsdp_ep2": {"dp_shard": 2, "ep": 2}, "ddp": {}}
DTYPES = {"fsdp": "float32", "fsdp_ep2": "bfloat16", "ddp": "float32"}


def test_streamed_buckets_equal_the_export_within_the_memory_bound(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "stream.pt"
    worker = Path(__file__).parent / "weight_stream_worker.py"
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", str(worker)]
    cmd += ["--layouts", json.dumps(LAYOUTS), "--bucket-bytes", str(BUCKET_BYTES)]
    cmd += ["--dtypes", ",".join(f"{k}={v}" for k, v in DTYPES.items()), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out, weights_only=False)
    expected = dict(checkpoint_tensors(case.build_model()))
    model_bytes = sum(t.nbytes for t in expected.values())
    for name, record in got.items():
        dtype = getattr(torch, DTYPES[name])
        assert list(record["tensors"]) == list(expected), name  # the export's names, in its order
        for hf, tensor in expected.items():
            assert torch.equal(record["tensors"][hf], tensor.to(dtype)), (name, hf)
        sizes = [size for _, size in record["buckets"]]
        assert sum(sizes) == sum(t.to(dtype).nbytes for t in expected.values()), name
        assert all(size <= BUCKET_BYTES or count == 1 for count, size in record["buckets"]), name
        assert len(sizes) > 10, name
        if name != "ddp":  # the sender gathered a whole tensor (under DDP it holds them all already)
            assert record["peaks"][0] >= record["largest_tensor_bytes"], name
        bound = max(BUCKET_BYTES, max(sizes)) + record["largest_tensor_bytes"]
        for rank, (peak, full) in enumerate(zip(record["peaks"], record["full_gather_peaks"], strict=True)):
            assert peak <= bound, f"{name} rank {rank}: stream peak {peak} B > bound {bound} B"
            assert full > model_bytes * (0.5 if dtype == torch.bfloat16 else 1.0), (name, rank, full)
