"""Weight sync latency of the inference service: from a new checkpoint on disk to the first token of the
new policy version. Prints one JSON object.

    python benchmarks/weight_sync.py [--quick] [--presets debug,small] [--rounds 5] [--out FILE]

For each model preset the service (vLLM CPU, in this process, behind gRPC on 127.0.0.1) starts on version 1;
then, each round, a new checkpoint of our model is written to disk (not timed: the trainer's part), and the
clock runs from the moment it is complete to the first generated token that carries the new version:
UpdateWeights (pause, reload, prefix-cache reset, resume) + one Generate. `reload_s` is the service's own
figure for the reload alone. Figures are the median and the max over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from forgerl.inference.testing import make_checkpoint
from forgerl.runtime.testing import serve_in_process
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.main import build
from forgerl.v1 import inference_pb2 as pb
from forgerl.v1 import inference_pb2_grpc as pb_grpc


async def bench_preset(preset: str, rounds: int, root: Path) -> dict[str, Any]:
    v1 = make_checkpoint(root / preset / "v1", preset, seed=0)
    config = InferenceConfig(model_path=str(v1), max_model_len=512, kv_cache_bytes=64 * 2**20, log_level="warning")
    t0 = time.perf_counter()
    async with serve_in_process(build(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        start_s = time.perf_counter() - t0
        stub = pb_grpc.InferenceServiceStub(channel)
        totals, reloads, firsts = [], [], []
        for version in range(2, rounds + 2):
            path = make_checkpoint(root / preset / f"v{version}", preset, seed=version)
            t = time.perf_counter()  # the checkpoint is complete on disk
            update = await stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_path=str(path), version=version))
            t_updated = time.perf_counter()
            request = pb.GenerateRequest(
                request_id=f"sync-{version}", prompt_token_ids=[1, 2, 3, 4], sampling=pb.SamplingParams(max_tokens=1)
            )
            async for response in stub.Generate(request):
                if response.token_ids:
                    assert response.policy_version == version
                    break
            done = time.perf_counter()
            totals.append(done - t)
            reloads.append(update.reload_s)
            firsts.append(done - t_updated)
    size = sum(f.stat().st_size for f in v1.glob("*.safetensors"))
    return {
        "checkpoint_mb": round(size / 2**20, 2),
        "engine_start_s": round(start_s, 1),
        "rounds": rounds,
        "checkpoint_to_first_token_s": {"median": round(statistics.median(totals), 4), "max": round(max(totals), 4)},
        "reload_s": {"median": round(statistics.median(reloads), 4), "max": round(max(reloads), 4)},
        "first_token_after_update_s": {"median": round(statistics.median(firsts), 4)},
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="forgerl-weight-sync-") as tmp:
        for preset in args.presets.split(","):
            results[preset] = await bench_preset(preset, args.rounds, Path(tmp))
    return {
        "benchmark": "weight_sync",
        "engine": "vllm-cpu",
        "dtype": "float32",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "presets": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="debug,small")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
