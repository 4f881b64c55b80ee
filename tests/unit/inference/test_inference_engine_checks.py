"""forgerl.inference.engine: what is refused before a request reaches vLLM (no engine needed)."""

from __future__ import annotations

import pytest

from forgerl.inference.engine import EngineSettings, FeatureDisabled, InferenceEngine
from forgerl.inference.requests import GenerationRequest, InvalidRequest, ModelLimits

pytestmark = pytest.mark.unit


def engine(routing_replay: bool = False) -> InferenceEngine:
    e = InferenceEngine(EngineSettings(model_path="unused", routing_replay=routing_replay))
    e._limits = ModelLimits(vocab_size=4096, max_model_len=512)
    return e


async def test_routed_experts_need_routing_replay() -> None:
    with pytest.raises(FeatureDisabled, match="routing_replay=true"):
        async for _ in engine().generate(GenerationRequest("r", (1, 2), return_routed_experts=True)):
            pass


async def test_bad_request_is_refused_before_the_engine() -> None:
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        async for _ in engine().generate(GenerationRequest("r", (1, 5000))):
            pass


async def test_update_checks_policy_and_version_first() -> None:
    e = engine()
    with pytest.raises(InvalidRequest, match="'finish' or 'abort'"):
        await e.update_weights("x", 2, "later")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="not newer"):
        await e.update_weights("x", 1)
