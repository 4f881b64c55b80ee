"""forgerl.services.inference.servicer: proto <-> engine types, and config -> engine settings."""

from __future__ import annotations

import numpy as np
import pytest

from forgerl.inference.engine import GenerationChunk, RoutedRows
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.servicer import engine_settings, to_request, to_response
from forgerl.v1 import inference_pb2 as pb

pytestmark = pytest.mark.unit


def test_request_zero_values_and_optional_seed() -> None:
    plain = to_request(pb.GenerateRequest(request_id="a", prompt_token_ids=[1, 2]))
    assert plain.prompt_token_ids == (1, 2) and plain.sampling.seed is None and plain.sampling.max_tokens == 0
    seeded = to_request(
        pb.GenerateRequest(
            prompt_token_ids=[3],
            sampling=pb.SamplingParams(temperature=0.5, top_k=4, seed=0, stop_token_ids=[9]),
            return_routed_experts=True,
        )
    )
    assert seeded.sampling.seed == 0 and seeded.sampling.top_k == 4 and seeded.sampling.stop_token_ids == (9,)
    assert seeded.return_routed_experts


def test_response_carries_version_cache_and_flattened_routing() -> None:
    ids = np.arange(2 * 3 * 2, dtype=np.int16).reshape(2, 3, 2)
    chunk = GenerationChunk("r", [5, 6], [-0.5, -1.5], "length", 7, 128, RoutedRows(3, 2, ids))
    response = to_response(chunk)
    assert list(response.token_ids) == [5, 6] and list(response.logprobs) == [-0.5, -1.5]
    assert (response.finish_reason, response.policy_version, response.cached_prompt_tokens) == ("length", 7, 128)
    assert response.routed_experts.num_layers == 3 and response.routed_experts.top_k == 2
    assert list(response.routed_experts.expert_ids) == list(range(12))
    assert not to_response(GenerationChunk("r", [1], [-0.1], "", 7, 0)).HasField("routed_experts")


def test_config_reaches_the_engine() -> None:
    config = InferenceConfig(
        model_path="/m",
        policy_version=3,
        in_flight="abort",
        routing_replay=True,
        max_model_len=64,
        tensor_parallel_size=4,
    )
    settings = engine_settings(config)
    assert (settings.model_path, settings.policy_version, settings.in_flight) == ("/m", 3, "abort")
    assert settings.tensor_parallel_size == 4 and engine_settings(InferenceConfig()).tensor_parallel_size == 1
    assert settings.routing_replay and settings.max_model_len == 64 and settings.dtype == "float32"
