"""UpdateWeights checks a checkpoint before it reaches vLLM (issue 24, item 5), on one CPU engine for the
module (~1 min to start): a truncated or corrupt file, a missing tensor, a wrong shape or dtype, or
non-finite values are INVALID_ARGUMENT naming the tensor, and version 1 keeps serving exactly what it
served when fresh; good updates after bad ones serve exactly the new weights; a dead engine is NOT_SERVING.

StreamWeights (issue 19, item 5) on the same engine: v2's weights streamed by the trainer's sender
(`stream_weight_buckets`, one process: every row on rank 0, as under DDP) in buckets small enough that
layers straddle them (vLLM fuses q/k/v and stacks the experts) serve exactly what a reload of v2's
checkpoint serves; a bad bucket half-way, a stream missing a bucket or one ending inside a bucket restore the
served checkpoint; over streamed weights, which have none, the engine refuses requests until an update.
The trainer's `trainer.publish: stream` (TrainingRun._publish -> InferencePublisher.stream) serves what its
checkpoint publication serves, and a refused stream falls back to UpdateWeights of that checkpoint.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from forgerl.distributed.parallelize import ParallelModel
from forgerl.distributed.weight_stream import stream_weight_buckets
from forgerl.inference.buckets import serialize_bucket, stream_requests
from forgerl.inference.testing import make_checkpoint, reference_greedy
from forgerl.model import load_checkpoint, save_checkpoint
from forgerl.runtime.fuzz import fuzz_service, requests
from forgerl.runtime.testing import serve_in_process
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.main import build
from forgerl.trainer.loop import TrainerSettings, TrainingRun
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.trainer.sources import InferencePublisher
from forgerl.v1 import inference_pb2 as pb
from forgerl.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROMPTS = [[(7 * i + 3) % 4096 for i in range(24)], [(11 * i + 5) % 4096 for i in range(40)]]
N = 10
ENGINE: dict[str, Any] = {"max_model_len": 256, "kv_cache_bytes": 16 * 1024 * 1024, "executor": "uni"}
SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"]
GATE = "model.layers.1.block_sparse_moe.gate.weight"
Served = tuple[list[int], list[float]]


@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v1", "debug", seed=0)


class Channel:
    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.address = address
        self.stub = pb_grpc.InferenceServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.fresh: list[Served] = []  # what the engine served on version 1 before any update

    async def greedy(self) -> list[Served]:
        served = []
        for prompt in PROMPTS:
            tokens: list[int] = []
            logprobs: list[float] = []
            async for r in self.stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt, sampling={"max_tokens": N})):
                tokens += r.token_ids
                logprobs += r.logprobs
            served.append((tokens, logprobs))
        return served

    async def update(self, path: Path, version: int) -> pb.UpdateWeightsResponse:
        return await self.stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_path=str(path), version=version))

    async def stream(self, messages: Iterator[pb.StreamWeightsRequest]) -> pb.StreamWeightsResponse:
        async def each() -> AsyncIterator[pb.StreamWeightsRequest]:
            for message in messages:
                yield message

        return await self.stub.StreamWeights(each())

    async def version(self) -> int:
        return int((await self.stub.GetStatus(pb.GetStatusRequest())).policy_version)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(v1: Path) -> AsyncIterator[Channel]:
    config = InferenceConfig(model_path=str(v1), log_format="console", **ENGINE)
    async with serve_in_process(build(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        served = Channel(channel, address)
        served.fresh = await served.greedy()
        yield served


def assert_same(served: list[Served], expected: list[Served]) -> None:
    for (tokens, logprobs), (want_tokens, want_logprobs) in zip(served, expected, strict=True):
        assert tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, rtol=0, atol=1e-6)


def rewritten(v1: Path, dst: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    shutil.copytree(v1, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def truncated(v1: Path, dst: Path) -> Path:
    shutil.copytree(v1, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return dst


def corrupt_header(v1: Path, dst: Path) -> Path:
    shutil.copytree(v1, dst)
    weights = dst / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    return dst


def set_gate(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t[GATE].view(-1).__setitem__(3, value)


BAD = {
    "truncated": (truncated, "is truncated: tensor '"),
    "corrupt header": (corrupt_header, "not a safetensors file"),
    "missing tensor": (lambda v1, d: rewritten(v1, d, lambda t: t.pop(GATE)), f"1 missing ['{GATE}']"),
    "wrong shape": (lambda v1, d: rewritten(v1, d, lambda t: t.update({GATE: t[GATE].T.contiguous()})), GATE),
    "wrong dtype": (lambda v1, d: rewritten(v1, d, lambda t: t.update({GATE: t[GATE].half()})), f"{GATE} F16"),
    "NaN": (lambda v1, d: rewritten(v1, d, set_gate(float("nan"))), f"tensor '{GATE}' holds 1 non-finite"),
    "infinity": (lambda v1, d: rewritten(v1, d, set_gate(float("-inf"))), f"tensor '{GATE}' holds 1 non-finite"),
}


# Generate requests the engine can run: prompts inside the vocabulary, sampling anywhere in or out of range.
GENERATE = st.builds(
    lambda prompt, sampling: pb.GenerateRequest(prompt_token_ids=prompt, sampling=sampling).SerializeToString(),
    st.lists(st.integers(0, 4095), min_size=1, max_size=40),
    st.builds(
        pb.SamplingParams,
        temperature=st.sampled_from([0.0, 0.7, 1.0, 2.0, 3.0, -1.0, float("nan"), float("inf")]),
        top_p=st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1, float("nan")]),
        top_k=st.integers(-5, 5000),
        max_tokens=st.integers(-2, 300),
        stop_token_ids=st.lists(st.integers(-3, 5000), max_size=3),
        seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    ),
)


@pytest.mark.parametrize("case", list(BAD))
async def test_a_bad_checkpoint_is_refused_and_version_1_keeps_serving(
    engine: Channel, v1: Path, tmp_path: Path, case: str
) -> None:
    write, message = BAD[case]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.update(write(v1, tmp_path / "bad"), version=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in (err.value.details() or "") and "policy version 1 keeps serving" in (err.value.details() or "")
    assert (await engine.stub.GetStatus(pb.GetStatusRequest())).policy_version == 1
    assert_same(await engine.greedy(), engine.fresh)


async def test_good_updates_after_bad_ones_serve_exactly_the_new_weights(
    engine: Channel, v1: Path, tmp_path: Path
) -> None:
    v2 = make_checkpoint(tmp_path / "v2", "debug", seed=1)
    assert (await engine.update(v2, version=2)).policy_version == 2
    # the PyTorch model on v2 (an independent implementation) decodes what the updated engine serves
    served = await engine.greedy()
    for (tokens, _), prompt in zip(served, PROMPTS, strict=True):
        assert tokens == reference_greedy(v2, prompt, N).token_ids
    # back to v1's weights: exactly what the fresh engine served on them, logprobs included
    assert (await engine.update(shutil.copytree(v1, tmp_path / "v3"), version=3)).policy_version == 3
    assert_same(await engine.greedy(), engine.fresh)


# --- StreamWeights -------------------------------------------------------------------------------------

BUCKET_BYTES = 96 * 1024  # the debug preset is 3.4 MB in float32: 18 buckets
PIECE_BYTES = 256 * 1024  # the 1 MiB embedding's bucket goes in 5 messages
Bucket = list[tuple[str, torch.Tensor]]


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "v2", "debug", seed=1)


@pytest.fixture(scope="module")
def v2_buckets(v2: Path) -> list[Bucket]:
    """v2's weights as the trainer streams them: loaded into the trainer's model, then bucketed."""
    model = load_checkpoint(v2, dtype=torch.float32)
    trainer = ParallelModel(model=model, train_model=model, meshes=None)  # type: ignore[arg-type]  # one rank: no mesh
    return list(stream_weight_buckets(trainer, BUCKET_BYTES))


def layer_of(name: str) -> str:
    return ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name


def changed(buckets: Sequence[Bucket], at: int, tensor: Callable[[torch.Tensor], torch.Tensor]) -> list[Bucket]:
    """`buckets` with the first tensor of bucket `at` replaced by tensor(a copy of it)."""
    out = [list(b) for b in buckets]
    name, old = out[at][0]
    out[at][0] = (name, tensor(old.clone()))
    return out


def nan_at_3(t: torch.Tensor) -> torch.Tensor:
    t.view(-1)[3] = float("nan")
    return t


def ends_inside_a_bucket(buckets: Sequence[Bucket], version: int) -> Iterator[pb.StreamWeightsRequest]:
    yield from stream_requests(buckets[:-1], version, piece_bytes=PIECE_BYTES)
    yield pb.StreamWeightsRequest(safetensors=serialize_bucket(buckets[-1])[:100], continued=True)


BAD_STREAMS = {
    "NaN in bucket 5": (lambda b, v: stream_requests(changed(b, 5, nan_at_3), v), "holds 1 non-finite values"),
    "wrong shape in bucket 5": (
        lambda b, v: stream_requests(changed(b, 5, lambda t: t.reshape(-1)[:-1].contiguous()), v),
        "the served model's is F32",
    ),
    "a tensor twice": (lambda b, v: stream_requests([*b[:6], b[4]], v), "came twice in the stream"),
    # Bucket 3 holds main-layer tensors (the last ones hold only the MTP module's, which are not served).
    "a bucket left out": (lambda b, v: stream_requests([*b[:3], *b[4:]], v), "the stream ended without"),
    "ends inside a bucket": (ends_inside_a_bucket, "the stream ended inside a bucket"),
}


async def test_the_buckets_split_layers(v2_buckets: list[Bucket]) -> None:
    """The premise of the stream tests: many buckets, and layers (fused/stacked in vLLM) across two."""
    layers = [{layer_of(name) for name, _ in bucket} for bucket in v2_buckets]
    straddling = set.union(*(a & b for a, b in itertools.pairwise(layers)))
    assert len(v2_buckets) >= 10 and len(straddling) >= 2, (len(v2_buckets), straddling)


@pytest.mark.parametrize("case", list(BAD_STREAMS))
async def test_a_bad_stream_leaves_the_served_version_serving(
    engine: Channel, v2_buckets: list[Bucket], case: str
) -> None:
    """Buckets 0-4 reach vLLM before bucket 5 is refused (or the stream ends): the served weights (v1's, from
    a checkpoint) are restored and serve exactly what the fresh engine served."""
    messages, expected = BAD_STREAMS[case]
    served = await engine.version()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.stream(messages(v2_buckets, served + 1))
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    assert expected in details and f"policy version {served} keeps serving" in details, details
    assert await engine.version() == served
    assert_same(await engine.greedy(), engine.fresh)


async def test_streamed_weights_serve_what_a_checkpoint_reload_serves(
    engine: Channel, v2: Path, v2_buckets: list[Bucket]
) -> None:
    version = await engine.version() + 1
    t0 = time.perf_counter()
    streamed = await engine.stream(stream_requests(v2_buckets, version, piece_bytes=PIECE_BYTES))
    stream_s = time.perf_counter() - t0
    assert (streamed.policy_version, streamed.buckets) == (version, len(v2_buckets))
    served = await engine.greedy()
    t0 = time.perf_counter()
    reloaded = await engine.update(v2, version + 1)
    reload_s = time.perf_counter() - t0
    assert_same(served, await engine.greedy())  # tokens and logprobs of vLLM's reload of v2's checkpoint
    for (tokens, _), prompt, (fresh, _) in zip(served, PROMPTS, engine.fresh, strict=True):
        assert tokens == reference_greedy(v2, prompt, N).token_ids  # the PyTorch model on v2
        assert tokens != fresh  # and not v1's any more
    print(
        f"sync of the debug preset ({streamed.bytes} B): StreamWeights {len(v2_buckets)} buckets {stream_s:.3f} s "
        f"(engine paused {streamed.reload_s:.3f} s); UpdateWeights from a checkpoint {reload_s:.3f} s "
        f"(paused {reloaded.reload_s:.3f} s)"
    )


async def test_a_failed_stream_over_streamed_weights_refuses_requests_until_an_update(
    engine: Channel, v1: Path, v2_buckets: list[Bucket], tmp_path: Path
) -> None:
    """Streamed weights have no checkpoint to restore: after a stream fails half-way over them, the engine
    refuses to serve the mix (UNAVAILABLE); a good update brings it back (v1's weights, for the tests below)."""
    version = await engine.version() + 1
    assert (await engine.stream(stream_requests(v2_buckets, version))).policy_version == version
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.stream(stream_requests(changed(v2_buckets, 5, nan_at_3), version + 1))
    assert err.value.code() == grpc.StatusCode.INTERNAL and "was streamed" in (err.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.greedy()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert (await engine.update(shutil.copytree(v1, tmp_path / "v1-again"), version + 1)).policy_version == version + 1
    assert_same(await engine.greedy(), engine.fresh)


async def test_the_trainers_streamed_publication_serves_what_its_checkpoint_publication_serves(
    engine: Channel, v1: Path, v2: Path, v2_buckets: list[Bucket], tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A TrainingRun on v2's weights publishes with `trainer.publish: stream` (stream_weight_buckets ->
    InferencePublisher.stream -> StreamWeights), then with the default (its checkpoint + UpdateWeights):
    both serve the same tokens and log-probabilities, v2's PyTorch greedy tokens. A stream the engine
    refuses over streamed weights (which leaves it serving nothing) is followed by UpdateWeights of the
    checkpoint, and every bucket is still pulled (the trainer's other ranks send them)."""
    init = shutil.copytree(v2, tmp_path / "init")
    shutil.copytree(tokenizer_dir, init, dirs_exist_ok=True)  # TrainingRun loads the tokenizer from init_checkpoint
    await engine.update(shutil.copytree(v1, tmp_path / "v1-first"), await engine.version() + 1)
    assert_same(await engine.greedy(), engine.fresh)  # v1 before each publication of v2
    served: dict[str, list[Served]] = {}
    for mode in ("stream", "checkpoint"):
        config = run_config_from_dict({"name": mode, "init_checkpoint": str(init), "trainer": {"publish": mode}})
        publisher = InferencePublisher(engine.address)
        run = TrainingRun(mode, config, TrainerSettings(runs_dir=tmp_path / "runs"), publisher=publisher)
        run._init_model()
        ckpt = await asyncio.to_thread(run._publish, "sft", 1)
        assert ckpt.policy_version == await engine.version()
        served[mode] = await engine.greedy()
        if mode == "stream":  # the streamed weights are no checkpoint's: the engine has no model path
            assert (await engine.stub.GetStatus(pb.GetStatusRequest())).model_path == ""
            pulled = 0

            def refused() -> Iterator[Bucket]:
                nonlocal pulled
                for bucket in changed(v2_buckets, 1, nan_at_3):
                    pulled += 1
                    yield bucket

            version, _ = await asyncio.to_thread(publisher.stream, refused(), ckpt.path, ckpt.policy_version + 1)
            assert (version, pulled) == (await engine.version(), len(v2_buckets))
            assert_same(await engine.greedy(), served["stream"])  # the fallback reloaded the checkpoint
            await engine.update(shutil.copytree(v1, tmp_path / "v1-between"), version + 1)
            assert_same(await engine.greedy(), engine.fresh)
        publisher.close()
    assert_same(served["stream"], served["checkpoint"])
    for (tokens, _), prompt, (fresh, _) in zip(served["stream"], PROMPTS, engine.fresh, strict=True):
        assert tokens == reference_greedy(v2, prompt, N).token_ids  # the PyTorch model on v2
        assert tokens != fresh
    await engine.update(shutil.copytree(v1, tmp_path / "v1-last"), await engine.version() + 1)  # for the tests below


async def test_grown_mtp_modules_update_an_engine_started_on_one(
    engine: Channel, v1: Path, v2: Path, tmp_path: Path
) -> None:
    """The engine started on one MTP module (v1); the trainer grew its model to three (`rl.grow_mtp_to`,
    grow_mtp: copies of module 1). Its checkpoint and its stream both update the engine, which serves v2's
    main layers (MTP modules are not served). Before, the check refused the two new layers' tensors, and
    past it vLLM's reload failed on them ("There is no module or parameter named 'layers.3'": the debug
    preset has 2 layers)."""
    model = load_checkpoint(v2, dtype=torch.float32)
    model.grow_mtp(3)
    grown = save_checkpoint(model, None, tmp_path / "v2-mtp3")
    assert any(name.startswith(f"model.layers.{model.config.num_hidden_layers + 2}.") for name in load_file(
        str(grown / "model.safetensors")))  # fmt: skip
    version = await engine.version() + 1
    assert (await engine.update(grown, version)).policy_version == version
    served = await engine.greedy()
    for (tokens, _), prompt, (fresh, _) in zip(served, PROMPTS, engine.fresh, strict=True):
        assert tokens == reference_greedy(v2, prompt, N).token_ids and tokens != fresh
    await engine.update(shutil.copytree(v1, tmp_path / "v1"), version + 1)
    trainer = ParallelModel(model=model, train_model=model, meshes=None)  # type: ignore[arg-type]  # one rank
    buckets = list(stream_weight_buckets(trainer, BUCKET_BYTES))
    streamed = await engine.stream(stream_requests(buckets, version + 2, piece_bytes=PIECE_BYTES))
    assert streamed.policy_version == version + 2
    assert_same(await engine.greedy(), served)
    await engine.update(shutil.copytree(v1, tmp_path / "v1-last"), version + 3)  # for the tests below


async def test_random_requests_get_clean_statuses(engine: Channel) -> None:
    """Hypothesis: random and mutated requests to every method; then the engine still serves exactly what
    the fresh engine served on the weights it now holds (v1's)."""

    def fuzz() -> collections.Counter[str]:
        generate = st.one_of(GENERATE, requests(pb.GenerateRequest.DESCRIPTOR))
        with grpc.insecure_channel(engine.address) as channel:
            return fuzz_service(channel, SERVICE, max_examples=60, timeout_s=60, overrides={"Generate": generate})

    seen = await asyncio.to_thread(fuzz)
    assert {"Generate OK", "Generate INVALID_ARGUMENT"} <= set(seen), seen
    assert_same(await engine.greedy(), engine.fresh)


def live_engine_cores() -> list[psutil.Process]:
    """vLLM engine core processes under this test process, skipping the zombies earlier engines' shutdowns
    left unreaped (reading a zombie's command line raises) and processes that exit while we look."""
    cores = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "EngineCore" in " ".join([*p.cmdline(), p.name()]):
                cores.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return cores


async def test_a_dead_engine_is_not_serving(engine: Channel) -> None:
    """Last in the module: kills the engine core process (vLLM's, a child of this test process)."""
    cores = live_engine_cores()
    assert cores, [p.pid for p in psutil.Process().children(recursive=True)]
    for core in cores:
        core.kill()
    deadline = time.monotonic() + 30
    while (
        await engine.health.Check(health_pb2.HealthCheckRequest())
    ).status != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health still SERVING 30 s after the engine core died"
        await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await engine.greedy()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine died" in (err.value.details() or "")
