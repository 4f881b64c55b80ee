"""forgerl.inference.buckets and the servicer's joining of pieces: what a StreamWeights sender sends and what
the engine refuses before a bucket reaches vLLM (no engine needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from forgerl.inference.buckets import BucketCheck, serialize_bucket, stream_requests
from forgerl.inference.checkpoint import CheckpointError, CheckpointInfo
from forgerl.inference.requests import InvalidRequest
from forgerl.services.inference.servicer import _buckets
from forgerl.v1 import inference_pb2 as pb

pytestmark = pytest.mark.unit

SERVED = CheckpointInfo(Path("unused"), {}, {"a": ("F32", (2, 3)), "b": ("BF16", (4,)), "c": ("F32", (5,))})


def bucket_a_b() -> list[tuple[str, torch.Tensor]]:
    return [("a", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(4, dtype=torch.bfloat16))]


async def joined(messages: list[pb.StreamWeightsRequest]) -> list[bytes]:
    async def rest() -> AsyncIterator[pb.StreamWeightsRequest]:
        for m in messages[1:]:
            yield m

    return [data async for data in _buckets(messages[0], rest())]


async def test_pieces_join_back_into_the_buckets() -> None:
    tied = torch.zeros(5)
    buckets = [bucket_a_b(), [("c", tied), ("d", tied)]]  # d shares c's storage, as tied weights do
    messages = list(stream_requests(buckets, version=7, in_flight=pb.IN_FLIGHT_POLICY_ABORT, piece_bytes=50))
    assert [(m.version, m.in_flight) for m in messages[:2]] == [(7, pb.IN_FLIGHT_POLICY_ABORT), (0, 0)]
    assert max(len(m.safetensors) for m in messages) == 50 and len(messages) > len(buckets)
    data = await joined(messages)
    assert len(data) == 2
    for sent, got in zip(buckets, data, strict=True):
        tensors = load(got)
        assert set(tensors) == {n for n, _ in sent}
        for name, tensor in sent:
            assert torch.equal(tensors[name], tensor)


def test_a_bucket_reads_back_with_safetensors_every_dtype_and_shape() -> None:
    g = torch.Generator().manual_seed(0)
    bucket = [
        (f"t{i}", t)
        for i, t in enumerate(
            [
                torch.randn(3, 5, generator=g).to(dtype)
                for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn)
            ]
            + [torch.tensor(2.5), torch.zeros(0, 4), torch.arange(7), torch.tensor([True, False, True])]
            + [torch.randn(6, 4, generator=g).T]  # not contiguous
        )
    ]
    tensors = load(serialize_bucket(bucket))
    assert set(tensors) == {name for name, _ in bucket}
    for name, tensor in bucket:
        assert tensors[name].dtype == tensor.dtype and tensors[name].shape == tensor.shape
        assert torch.equal(tensors[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


async def test_a_stream_ending_inside_a_bucket_is_refused() -> None:
    messages = list(stream_requests([bucket_a_b()], version=2, piece_bytes=40))
    with pytest.raises(InvalidRequest, match="ended inside a bucket"):
        await joined(messages[:-1])


BAD = {
    "unknown": ({"z": torch.zeros(1)}, "'z' is not a tensor of the served model"),
    "shape": ({"a": torch.zeros(3, 2)}, "'a' is F32 [3, 2]: the served model's is F32 [2, 3]"),
    "dtype": ({"a": torch.zeros(2, 3, dtype=torch.float64)}, "'a' is F64 [2, 3]"),
    "NaN": ({"c": torch.tensor([0, 1, float("nan"), 2, 3])}, "'c' holds 1 non-finite values"),
    "infinity": ({"b": torch.tensor([0, float("inf"), 1, 1], dtype=torch.bfloat16)}, "'b' holds 1 non-finite"),
    "empty": ({}, "holds no tensor"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_buckets_are_refused_naming_the_tensor(case: str) -> None:
    tensors, message = BAD[case]
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BucketCheck(SERVED).check(save(tensors))


def test_garbage_twice_and_incomplete_streams_are_refused() -> None:
    check = BucketCheck(SERVED)
    for garbage in (b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}12345", b"\xff" * 64):
        with pytest.raises(CheckpointError, match="not a safetensors file"):
            check.check(garbage)
    assert check.check(save(dict(bucket_a_b()))) == 2
    with pytest.raises(CheckpointError, match="'a' came twice"):
        check.check(save({"a": torch.zeros(2, 3)}))
    with pytest.raises(CheckpointError, match=r"ended without 1 .*\['c'\]"):
        check.check_complete()
    check.check(save({"c": torch.zeros(5)}))
    check.check_complete()


async def test_the_engine_refuses_a_stream_before_touching_vllm() -> None:
    """No vLLM engine here (`_llm` is None): anything that reached it would fail otherwise."""
    from forgerl.inference.engine import EngineSettings, InferenceEngine

    async def buckets(*data: bytes) -> AsyncIterator[bytes]:
        for d in data:
            yield d

    e = InferenceEngine(EngineSettings(model_path="unused"))
    e._served = SERVED
    with pytest.raises(InvalidRequest, match="'finish' or 'abort'"):
        await e.stream_weights(2, buckets(), "later")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="not newer"):
        await e.stream_weights(1, buckets(save(dict(bucket_a_b()))))
    with pytest.raises(InvalidRequest, match="got no bucket"):
        await e.stream_weights(2, buckets())
    with pytest.raises(CheckpointError, match="'a' is F32 \\[3, 2\\]"):
        await e.stream_weights(2, buckets(save({"a": torch.zeros(3, 2)}), save({"c": torch.zeros(5)})))
    assert e.version == 1
