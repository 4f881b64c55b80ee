"""The inference service on vLLM (CPU), driven through gRPC: one engine for the module (~1 min to start).

Checkpoints are written by our own model code (forgerl.model, debug preset), and the PyTorch model is the
reference: greedy tokens equal, logprobs within 1e-4, routed experts equal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forgerl.inference.engine import EngineSettings, InferenceEngine
from forgerl.inference.requests import GenerationRequest, Sampling
from forgerl.inference.testing import Reference, copy_checkpoint, make_checkpoint, reference_greedy
from forgerl.runtime.testing import serve_in_process
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.main import build
from forgerl.v1 import inference_pb2 as pb
from forgerl.v1 import inference_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

PROMPT = [(7 * i + 3) % 4096 for i in range(24)]
N = 8
LOGPROB_TOL = 1e-4
ENGINE = {"max_model_len": 512, "kv_cache_bytes": 32 * 1024 * 1024, "executor": "uni"}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    v1 = make_checkpoint(root / "v1", "debug", seed=0)
    return {
        "v1": v1,
        "v2": make_checkpoint(root / "v2", "debug", seed=1),
        "v3": copy_checkpoint(v1, root / "v3"),
        "wide": make_checkpoint(root / "wide", "debug", seed=0, hidden_size=128),
    }


@pytest.fixture(scope="module")
def refs(ckpts: dict[str, Path]) -> dict[str, Reference]:
    return {name: reference_greedy(ckpts[name], PROMPT, N) for name in ("v1", "v2")}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stub(ckpts: dict[str, Path]) -> AsyncIterator[pb_grpc.InferenceServiceStub]:
    config = InferenceConfig(model_path=str(ckpts["v1"]), routing_replay=True, log_format="console", **ENGINE)
    async with serve_in_process(build(config), config) as address, grpc.aio.insecure_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # warmed up before SERVING
        yield pb_grpc.InferenceServiceStub(channel)


async def generate(
    stub: pb_grpc.InferenceServiceStub, rid: str, prompt: list[int], max_tokens: int = N, routed: bool = False
) -> tuple[list[int], list[float], list[pb.GenerateResponse]]:
    tokens: list[int] = []
    logprobs: list[float] = []
    responses = []
    request = pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=pb.SamplingParams(max_tokens=max_tokens),
        return_routed_experts=routed,
    )
    async for response in stub.Generate(request):
        tokens += response.token_ids
        logprobs += response.logprobs
        responses.append(response)
    return tokens, logprobs, responses


async def read_to_end(call: object, last: pb.GenerateResponse) -> pb.GenerateResponse:
    """The last message of a streaming call already read from with read() (which cannot mix with async for)."""
    while (response := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        last = response
    return last


def assert_matches(tokens: list[int], logprobs: list[float], ref: Reference) -> None:
    assert tokens == ref.token_ids
    assert np.max(np.abs(np.array(logprobs) - np.array(ref.logprobs))) <= LOGPROB_TOL


async def test_parity_with_our_pytorch_model(stub: pb_grpc.InferenceServiceStub, refs: dict[str, Reference]) -> None:
    tokens, logprobs, responses = await generate(stub, "parity", PROMPT, routed=True)
    assert_matches(tokens, logprobs, refs["v1"])
    last = responses[-1]
    assert last.finish_reason == "length"
    assert all(r.finish_reason == "" for r in responses[:-1])
    assert {r.policy_version for r in responses} == {1}
    routed = last.routed_experts
    ids = np.array(routed.expert_ids).reshape(N, routed.num_layers, routed.top_k)
    assert np.array_equal(np.sort(ids, -1), np.sort(refs["v1"].routed_experts[:N], -1))


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ([1, 2, 4096], {}, "outside the vocabulary"),
        ([1] * 512, {}, "max_model_len=512"),
        ([1, 2], {"max_tokens": 600}, "exceeds the context"),
        ([1, 2], {"temperature": -1.0}, "temperature"),
        ([1, 2], {"top_p": 2.0}, "top_p"),
        ([1, 2], {"stop_token_ids": [99999]}, "stop_token_ids"),
    ],
)
async def test_bad_requests_get_invalid_argument_and_the_engine_keeps_serving(
    stub: pb_grpc.InferenceServiceStub, refs: dict[str, Reference], prompt: list[int], sampling: dict, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Generate(
            pb.GenerateRequest(prompt_token_ids=prompt, sampling=pb.SamplingParams(**sampling))
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    tokens, logprobs, _ = await generate(stub, f"after-{message}", PROMPT)
    assert_matches(tokens, logprobs, refs["v1"])


async def test_shared_prefix_is_cached(stub: pb_grpc.InferenceServiceStub) -> None:
    before = await stub.GetStatus(pb.GetStatusRequest())
    prefix = [(5 * i + 1) % 4096 for i in range(300)]  # two full 128-token blocks
    _, _, first = await generate(stub, "prefix-a", [*prefix, 11, 12], max_tokens=2)
    _, _, second = await generate(stub, "prefix-b", [*prefix, 13, 14, 15], max_tokens=2)
    assert first[-1].cached_prompt_tokens == 0
    assert second[-1].cached_prompt_tokens >= 256
    status = await stub.GetStatus(pb.GetStatusRequest())
    assert status.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens >= 256
    assert status.prefix_cache_queried_tokens > before.prefix_cache_queried_tokens
    assert 0 < status.prefix_cache_hit_rate <= 1
    assert status.policy_version == 1 and status.running_requests == 0


async def test_abort(stub: pb_grpc.InferenceServiceStub) -> None:
    request = pb.GenerateRequest(request_id="long", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=480))
    call = stub.Generate(request)
    first = await call.read()
    assert first.token_ids
    assert (await stub.Abort(pb.AbortRequest(request_ids=["long", "unknown"]))).aborted == 1
    last = await read_to_end(call, first)
    assert last.finish_reason == "abort"


async def test_bad_updates_leave_version_1_serving(
    stub: pb_grpc.InferenceServiceStub, ckpts: dict[str, Path], refs: dict[str, Reference], tmp_path: Path
) -> None:
    cases = [
        (str(tmp_path / "missing"), 2, grpc.StatusCode.NOT_FOUND, "does not exist"),
        (str(ckpts["wide"]), 2, grpc.StatusCode.INVALID_ARGUMENT, "hidden_size: 128 (served: 64)"),
        (str(ckpts["v2"]), 1, grpc.StatusCode.INVALID_ARGUMENT, "not newer"),
    ]
    for path, version, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.UpdateWeights(pb.UpdateWeightsRequest(checkpoint_path=path, version=version))
        assert err.value.code() == code and message in err.value.details()
        assert "policy version 1 keeps serving" in err.value.details() or "not newer" in message
    tokens, logprobs, responses = await generate(stub, "still-v1", PROMPT)
    assert_matches(tokens, logprobs, refs["v1"])
    assert responses[-1].policy_version == 1


async def test_update_to_version_2_while_a_request_runs(
    stub: pb_grpc.InferenceServiceStub, ckpts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    in_flight = asyncio.create_task(generate(stub, "in-flight", PROMPT))
    await asyncio.sleep(0.05)
    update = await stub.UpdateWeights(
        pb.UpdateWeightsRequest(checkpoint_path=str(ckpts["v2"]), version=2, in_flight=pb.IN_FLIGHT_POLICY_FINISH)
    )
    assert update.policy_version == 2 and update.reload_s > 0
    tokens, logprobs, responses = await in_flight
    # admitted under version 1: it finished on version 1's weights, and says so
    assert_matches(tokens, logprobs, refs["v1"])
    assert {r.policy_version for r in responses} == {1}
    tokens, logprobs, responses = await generate(stub, "on-v2", PROMPT, routed=True)
    assert_matches(tokens, logprobs, refs["v2"])
    assert {r.policy_version for r in responses} == {2}
    routed = responses[-1].routed_experts
    ids = np.array(routed.expert_ids).reshape(N, routed.num_layers, routed.top_k)
    assert np.array_equal(np.sort(ids, -1), np.sort(refs["v2"].routed_experts[:N], -1))
    assert (await stub.GetStatus(pb.GetStatusRequest())).policy_version == 2


async def test_updated_engine_equals_a_fresh_engine_on_version_2(
    stub: pb_grpc.InferenceServiceStub, ckpts: dict[str, Path]
) -> None:
    prompts = [PROMPT, [(11 * i + 5) % 4096 for i in range(40)]]
    served = [await generate(stub, f"served-{i}", p, max_tokens=12) for i, p in enumerate(prompts)]
    fresh = InferenceEngine(EngineSettings(model_path=str(ckpts["v2"]), policy_version=2, **ENGINE))
    await fresh.start()
    try:
        for i, prompt in enumerate(prompts):
            tokens: list[int] = []
            logprobs: list[float] = []
            request = GenerationRequest(f"fresh-{i}", tuple(prompt), Sampling(max_tokens=12))
            async for chunk in fresh.generate(request):
                tokens += chunk.token_ids
                logprobs += chunk.logprobs
                assert chunk.policy_version == 2
            assert tokens == served[i][0]
            np.testing.assert_allclose(logprobs, served[i][1], rtol=0, atol=1e-6)
    finally:
        await fresh.stop()


async def test_update_with_abort_policy(stub: pb_grpc.InferenceServiceStub, ckpts: dict[str, Path]) -> None:
    request = pb.GenerateRequest(
        request_id="doomed", prompt_token_ids=PROMPT, sampling=pb.SamplingParams(max_tokens=480)
    )
    call = stub.Generate(request)
    first = await call.read()
    assert first.policy_version == 2
    update = await stub.UpdateWeights(
        pb.UpdateWeightsRequest(checkpoint_path=str(ckpts["v3"]), version=3, in_flight=pb.IN_FLIGHT_POLICY_ABORT)
    )
    assert update.policy_version == 3
    last = await read_to_end(call, first)
    assert last.finish_reason == "abort" and last.policy_version == 2
    _, _, responses = await generate(stub, "on-v3", PROMPT)
    assert responses[-1].policy_version == 3
