"""forgerl.inference.requests: what a Generate request is checked for before it reaches vLLM."""

from __future__ import annotations

import pytest

from forgerl.inference.requests import (
    GenerationRequest,
    InvalidRequest,
    ModelLimits,
    Sampling,
    check_request,
    sampling_kwargs,
)

pytestmark = pytest.mark.unit

LIMITS = ModelLimits(vocab_size=100, max_model_len=64)


def req(prompt: tuple[int, ...] = (1, 2, 3), **sampling: object) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_token_ids=prompt, sampling=Sampling(**sampling))  # type: ignore[arg-type]


def test_defaults_mean_greedy_up_to_the_context() -> None:
    request = req()
    max_tokens = check_request(request, LIMITS)
    assert max_tokens == 64 - 3
    kwargs = sampling_kwargs(request, max_tokens)
    assert kwargs == {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "max_tokens": 61,
        "logprobs": 0,
        "stop_token_ids": [],
    }


def test_explicit_sampling_is_passed_through() -> None:
    request = req(temperature=0.7, top_p=0.9, top_k=5, max_tokens=10, stop_token_ids=(7,), seed=3)
    kwargs = sampling_kwargs(request, check_request(request, LIMITS))
    assert kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9 and kwargs["top_k"] == 5
    assert kwargs["max_tokens"] == 10 and kwargs["stop_token_ids"] == [7] and kwargs["seed"] == 3


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(()), "empty"),
        (req((1, 100)), "outside the vocabulary [0, 100): 100"),
        (req((-1, 5)), "outside the vocabulary"),
        (req(tuple(range(64))), "max_model_len=64"),
        (req(temperature=-0.1), "temperature"),
        (req(temperature=float("nan")), "temperature"),
        (req(temperature=3.0), "temperature"),
        (req(top_p=1.5), "top_p"),
        (req(top_p=-0.5), "top_p"),
        (req(top_k=1000), "top_k"),
        (req(max_tokens=-1), "max_tokens"),
        (req(max_tokens=62), "at most 61"),
        (req(stop_token_ids=(5, 200)), "stop_token_ids"),
    ],
)
def test_bad_requests_are_named(request_: GenerationRequest, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        check_request(request_, LIMITS)


def test_longest_prompt_leaves_one_token() -> None:
    assert check_request(req(tuple(range(63))), LIMITS) == 1
