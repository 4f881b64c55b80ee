"""StreamWeights (issue 19, item 5): a trainer's weights streamed in small buckets into a running vLLM CPU
engine, through vLLM's own loader, serve exactly what a reload of the same weights from a checkpoint serves;
a bad bucket, a stream cut short or one that ends inside a bucket leave the served version serving. One
engine for the module (~1 min to start); the rest takes seconds.

The sender is `stream_weight_buckets` (forgerl.distributed.weight_stream) on a one-process trainer (every
row on rank 0, as under DDP: no process group needed), in buckets small enough that layers straddle
buckets: vLLM fuses q/k/v and stacks the experts, so a layer split over two loads is the case to get right.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import pytest_asyncio
import torch

from forgerl.distributed.parallelize import ParallelModel
from forgerl.distributed.weight_stream import stream_weight_buckets
from forgerl.inference.buckets import serialize_bucket, stream_requests
from forgerl.inference.testing import make_checkpoint, reference_greedy
from forgerl.model import load_checkpoint
from forgerl.runtime.testing import serve_in_process
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.main import build
from forgerl.v1 import inference_pb2 as pb
from forgerl.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROMPTS = [[(7 * i + 3) % 4096 for i in range(24)], [(11 * i + 5) % 4096 for i in range(40)]]
N = 10
ENGINE: dict[str, Any] = {"max_model_len": 256, "kv_cache_bytes": 16 * 1024 * 1024, "executor": "uni"}
BUCKET_BYTES = 96 * 1024  # the debug preset is 3.4 MB in float32: ~30 buckets
PIECE_BYTES = 256 * 1024  # the 1 MiB embedding's bucket goes in 5 messages
Served = list[tuple[list[int], list[float]]]
Bucket = list[tuple[str, torch.Tensor]]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {"v1": make_checkpoint(root / "v1", "debug", seed=0), "v2": make_checkpoint(root / "v2", "debug", seed=1)}


@pytest.fixture(scope="module")
def v2_buckets(ckpts: dict[str, Path]) -> list[Bucket]:
    """v2's weights as the trainer streams them: loaded into the trainer's model, then bucketed."""
    model = load_checkpoint(ckpts["v2"], dtype=torch.float32)
    trainer = ParallelModel(model=model, train_model=model, meshes=None)  # type: ignore[arg-type]  # one rank: no mesh
    return list(stream_weight_buckets(trainer, BUCKET_BYTES))


class Engine:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = pb_grpc.InferenceServiceStub(channel)
        self.fresh: Served = []  # what it served on v1 before any update

    async def greedy(self) -> Served:
        served = []
        for prompt in PROMPTS:
            tokens: list[int] = []
            logprobs: list[float] = []
            async for r in self.stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling={"max_tokens": N})):
                tokens += r.token_ids
                logprobs += r.logprobs
            served.append((tokens, logprobs))
        return served

    async def stream(self, messages: Iterator[pb.StreamWeightsRequest]) -> pb.StreamWeightsResponse:
        async def each() -> AsyncIterator[pb.StreamWeightsRequest]:
            for message in messages:
                yield message

        return await self.stub.StreamWeights(each())

    async def version(self) -> int:
        return int((await self.stub.GetStatus(pb.GetStatusRequest())).policy_version)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(ckpts: dict[str, Path]) -> AsyncIterator[Engine]:
    config = InferenceConfig(model_path=str(ckpts["v1"]), log_format="console", **ENGINE)
    async with serve_in_process(build(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        served = Engine(channel)
        served.fresh = await served.greedy()
        yield served


def assert_same(served: Served, expected: Served) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(served, expected, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-6)


def layer_of(name: str) -> str:
    return ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name


def changed(buckets: Sequence[Bucket], at: int, tensor: Any) -> list[Bucket]:
    """`buckets` with the first tensor of bucket `at` replaced by tensor(old)."""
    out = [list(b) for b in buckets]
    name, old = out[at][0]
    out[at][0] = (name, tensor(old.clone()))
    return out


def nan_at_3(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[3] = float("nan")
    return t


def ends_inside_a_bucket(buckets: Sequence[Bucket], version: int) -> Iterator[pb.StreamWeightsRequest]:
    data = serialize_bucket(buckets[0])
    yield from stream_requests(buckets[:-1], version, piece_bytes=PIECE_BYTES)
    yield pb.StreamWeightsRequest(safetensors=data[:100], continued=True)


BAD = {
    "NaN in bucket 5": (lambda b, v: stream_requests(changed(b, 5, nan_at_3), v), "holds 1 non-finite values"),
    "wrong shape in bucket 5": (
        lambda b, v: stream_requests(changed(b, 5, lambda t: t.reshape(-1)[:-1].contiguous()), v),
        "the served model's is F32",
    ),
    "a tensor twice": (lambda b, v: stream_requests([*b[:6], b[4]], v), "came twice in the stream"),
    "cut short": (lambda b, v: stream_requests(b[:-1], v), "the stream ended without"),
    "ends inside a bucket": (ends_inside_a_bucket, "the stream ended inside a bucket"),
}


async def test_the_buckets_split_layers(v2_buckets: list[Bucket]) -> None:
    """The premise of the other tests: several buckets, and layers (fused/stacked in vLLM) across two."""
    layers = [{layer_of(name) for name, _ in bucket} for bucket in v2_buckets]
    straddling = set.union(*(a & b for a, b in itertools.pairwise(layers)))
    assert len(v2_buckets) >= 10 and len(straddling) >= 2, (len(v2_buckets), straddling)


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_stream_leaves_version_1_serving(engine: Engine, v2_buckets: list[Bucket], case: str) -> None:
    """Buckets 0-4 reach vLLM before bucket 5 is refused (or the stream ends): the served weights are
    restored from v1's checkpoint and serve exactly what the fresh engine served."""
    messages, expected = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.stream(messages(v2_buckets, 2))
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details and "policy version 1 keeps serving" in details, details
    assert await engine.version() == 1
    assert_same(await engine.greedy(), engine.fresh)


async def test_streamed_weights_serve_what_a_checkpoint_reload_serves(
    engine: Engine, ckpts: dict[str, Path], v2_buckets: list[Bucket]
) -> None:
    t0 = time.perf_counter()
    streamed = await engine.stream(stream_requests(v2_buckets, 2, piece_bytes=PIECE_BYTES))
    stream_s = time.perf_counter() - t0
    assert (streamed.policy_version, streamed.buckets) == (2, len(v2_buckets))
    served = await engine.greedy()
    t0 = time.perf_counter()
    reloaded = await engine.stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_path=str(ckpts["v2"]), version=3))
    reload_s = time.perf_counter() - t0
    assert reloaded.policy_version == 3
    assert_same(served, await engine.greedy())  # tokens and logprobs of vLLM's reload of v2's checkpoint
    for (tokens, _), prompt, (fresh, _) in zip(served, PROMPTS, engine.fresh, strict=True):
        assert tokens == reference_greedy(ckpts["v2"], prompt, N).token_ids  # the PyTorch model on v2
        assert tokens != fresh  # and not v1's any more
    print(
        f"sync of the debug preset ({streamed.bytes} B): StreamWeights {len(v2_buckets)} buckets {stream_s:.3f} s "
        f"(engine paused {streamed.reload_s:.3f} s); UpdateWeights from a checkpoint {reload_s:.3f} s "
        f"(paused {reloaded.reload_s:.3f} s)"
    )


async def test_a_failed_stream_over_streamed_weights_refuses_requests_until_an_update(
    engine: Engine, ckpts: dict[str, Path], v2_buckets: list[Bucket]
) -> None:
    """Streamed weights have no checkpoint to restore: after a stream fails half-way over them, the engine
    refuses to serve the mix (UNAVAILABLE) rather than serve it; a good update brings it back."""
    assert (await engine.stream(stream_requests(v2_buckets, 4))).policy_version == 4
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.stream(stream_requests(changed(v2_buckets, 5, nan_at_3), 5))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "was streamed" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.greedy()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    update = pb.UpdateWeightsRequest(checkpoint_path=str(ckpts["v1"]), version=5)
    assert (await engine.stub.UpdateWeights(update)).policy_version == 5
    assert_same(await engine.greedy(), engine.fresh)
