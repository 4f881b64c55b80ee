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

    python benchmarks/weight_stream.py --into-vllm [--preset small] [--bucket-mb 16] [--rounds 3]

The receiving side, into a running vLLM CPU engine (the inference service in this process, behind gRPC on
127.0.0.1; float32 as it serves): from a trainer's weights in memory (one rank) to the first token of the new
version, (a) the publication before StreamWeights: the checkpoint written (`save_checkpoint`), then
UpdateWeights reloads it from the path, against (b) StreamWeights: `stream_weight_buckets` in buckets of
--bucket-mb, each loaded into vLLM's loader as it arrives. Per way: the median time over --rounds and the
peak RSS growth of vLLM's processes (engine core and worker, psutil sampled every 2 ms) over what they held
before. After each round both ways must serve the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
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


class _ChildRssPeak:
    """Peak RSS growth of each of this process's children (vLLM's engine core and worker), sampled."""

    def __enter__(self) -> _ChildRssPeak:
        import threading

        import psutil

        self._children = psutil.Process().children(recursive=True)
        self.base = self._rss()
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> list[int]:
        return [c.memory_info().rss for c in self._children]

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = [max(p, now) for p, now in zip(self.peak, self._rss(), strict=True)]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = [max(p, now) for p, now in zip(self.peak, self._rss(), strict=True)]

    @property
    def growth(self) -> dict[str, int]:
        """Process title (VLLM::EngineCore, VLLM::Worker) -> bytes."""
        return {c.name(): p - b for c, p, b in zip(self._children, self.peak, self.base, strict=True)}


async def _into_vllm(args: argparse.Namespace, root: Path) -> dict[str, object]:
    import grpc

    from forgerl.distributed.parallelize import ParallelModel
    from forgerl.distributed.weight_stream import stream_weight_buckets
    from forgerl.inference.buckets import stream_requests
    from forgerl.inference.testing import make_checkpoint
    from forgerl.model import load_checkpoint, save_checkpoint
    from forgerl.runtime.client import CHANNEL_OPTIONS
    from forgerl.runtime.testing import serve_in_process
    from forgerl.services.inference.config import InferenceConfig
    from forgerl.services.inference.main import build
    from forgerl.v1 import inference_pb2 as pb
    from forgerl.v1 import inference_pb2_grpc as pb_grpc

    v1 = make_checkpoint(root / "v1", args.preset, seed=0)
    config = InferenceConfig(model_path=str(v1), max_model_len=512, kv_cache_bytes=64 * 2**20, log_level="warning")
    spec = build(config)
    async with (
        serve_in_process(spec, config) as address,
        grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)

        async def first_tokens(version: int) -> list[int]:
            request = pb.GenerateRequest(prompt_token_ids=list(range(1, 17)), sampling=pb.SamplingParams(max_tokens=8))
            tokens: list[int] = []
            async for response in stub.Generate(request):
                assert response.policy_version == version
                tokens += response.token_ids
            return tokens

        async def pieces(messages: Iterable[pb.StreamWeightsRequest]) -> AsyncIterator[pb.StreamWeightsRequest]:
            for message in messages:
                yield message

        times: dict[str, list[float]] = {"checkpoint_then_update": [], "stream": []}
        paused: dict[str, list[float]] = {way: [] for way in times}  # the service's reload_s: engine paused
        peaks: dict[str, list[dict[str, int]]] = {way: [] for way in times}
        version, buckets = 1, 0
        for r in range(args.rounds + 1):  # round 0 warms up
            model = load_checkpoint(make_checkpoint(root / f"src{r}", args.preset, seed=r + 2), dtype=torch.float32)
            trainer = ParallelModel(model=model, train_model=model, meshes=None)  # type: ignore[arg-type]  # one rank
            served = []
            for way in times:
                version += 1
                with _ChildRssPeak() as meter:
                    started = time.perf_counter()
                    if way == "stream":
                        messages = stream_requests(stream_weight_buckets(trainer, int(args.bucket_mb * 2**20)), version)
                        streamed = await stub.StreamWeights(pieces(messages))
                        buckets, reload_s = streamed.buckets, streamed.reload_s
                    else:
                        path = save_checkpoint(model, None, root / f"published{version}")
                        request = pb.UpdateWeightsRequest(checkpoint_path=str(path), version=version)
                        reload_s = (await stub.UpdateWeights(request)).reload_s
                    served.append(await first_tokens(version))
                    elapsed = time.perf_counter() - started
                if r:
                    times[way].append(elapsed)
                    paused[way].append(reload_s)
                    peaks[way].append(meter.growth)
            assert served[0] == served[1], f"round {r}: the two ways serve different tokens {served}"
    result: dict[str, object] = {
        way: {
            "to_first_token_s": statistics.median(times[way]),
            "engine_paused_s": statistics.median(paused[way]),
            "vllm_peak_rss_growth_bytes": {name: max(p[name] for p in peaks[way]) for name in peaks[way][0]},
        }
        for way in times
    }
    result["buckets"] = buckets
    result["model_bytes"] = sum(f.stat().st_size for f in v1.glob("*.safetensors"))
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--bucket-mb", type=float, default=16.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", help="what the server is sent (cast on the sender)")
    p.add_argument("--into-vllm", action="store_true", help="the receiving side: into a vLLM CPU engine")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.layout:
        worker(args)
        return
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "gpu": None}
    if args.into_vllm:
        import asyncio
        import tempfile

        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory(prefix="forgerl-weight-stream-") as tmp:
            figures = asyncio.run(_into_vllm(args, Path(tmp)))
        head = {"benchmark": "weight_stream_into_vllm", "preset": args.preset, "dtype": "float32"}
        print(json.dumps({**head, "bucket_mb": args.bucket_mb, "rounds": args.rounds, **figures, "machine": machine}))
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
    print(json.dumps({"benchmark": "weight_stream", "preset": args.preset, "ranks": 2, "dtype": args.dtype,
                      "layouts": results, "machine": machine}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
