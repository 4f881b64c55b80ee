"""Checks on a generation request before it reaches vLLM, and its translation into vLLM's terms.

vLLM started with `skip_tokenizer_init` does not check prompt token ids at all: an id past the vocabulary
reaches the embedding and kills the engine core for every request. Everything a client can get wrong is
therefore checked here, with a message that says what was wrong and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class InvalidRequest(ValueError):
    """The request cannot be served as sent; the message is meant for the client."""


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against: the served model's vocabulary and the engine's context."""

    vocab_size: int
    max_model_len: int


@dataclass(frozen=True)
class Sampling:
    """The proto's SamplingParams with its zero values made explicit.

    temperature 0 is greedy; top_p 0 means 1 (no cut); top_k <= 0 means no cut; max_tokens 0 means "up to
    the context" (max_model_len - prompt length).
    """

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    max_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: Sampling = field(default_factory=Sampling)
    return_routed_experts: bool = False


MAX_TEMPERATURE = 2.0  # vLLM's own bound


def check_request(request: GenerationRequest, limits: ModelLimits) -> int:
    """Raise InvalidRequest for anything vLLM would reject or crash on; return the max_tokens to use."""
    if not request.prompt_token_ids:
        raise InvalidRequest("prompt_token_ids is empty: send at least one token id")
    _check_ids(request.prompt_token_ids, limits, "prompt_token_ids")
    prompt_len = len(request.prompt_token_ids)
    if prompt_len >= limits.max_model_len:
        raise InvalidRequest(
            f"the prompt has {prompt_len} tokens but the context is max_model_len={limits.max_model_len} "
            f"tokens, which must hold the prompt and at least one generated token: shorten the prompt to at "
            f"most {limits.max_model_len - 1} tokens"
        )
    s = request.sampling
    if not math.isfinite(s.temperature) or not 0.0 <= s.temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(f"sampling.temperature={s.temperature}: must be in [0, {MAX_TEMPERATURE}] (0 = greedy)")
    if not math.isfinite(s.top_p) or not 0.0 <= s.top_p <= 1.0:
        raise InvalidRequest(f"sampling.top_p={s.top_p}: must be in (0, 1], or 0 for no cut")
    if s.top_k > limits.vocab_size:
        raise InvalidRequest(
            f"sampling.top_k={s.top_k} is larger than the vocabulary ({limits.vocab_size}): use <= 0 for no cut"
        )
    if s.max_tokens < 0:
        raise InvalidRequest(f"sampling.max_tokens={s.max_tokens}: must be >= 1, or 0 for up to the context")
    room = limits.max_model_len - prompt_len
    if s.max_tokens > room:
        raise InvalidRequest(
            f"the prompt ({prompt_len} tokens) plus sampling.max_tokens={s.max_tokens} exceeds the context "
            f"max_model_len={limits.max_model_len}: ask for at most {room} tokens, or 0 for up to the context"
        )
    _check_ids(s.stop_token_ids, limits, "sampling.stop_token_ids")
    if s.seed is not None and not -(2**63) <= s.seed < 2**63:
        raise InvalidRequest(f"sampling.seed={s.seed} does not fit in 64 bits")
    return s.max_tokens or room


def _check_ids(ids: Sequence[int], limits: ModelLimits, what: str) -> None:
    bad = [i for i in ids if not 0 <= i < limits.vocab_size]
    if bad:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise InvalidRequest(f"{what} has {len(bad)} id(s) outside the vocabulary [0, {limits.vocab_size}): {shown}")


def sampling_kwargs(request: GenerationRequest, max_tokens: int) -> dict[str, Any]:
    """Keyword arguments for `vllm.SamplingParams`: one logprob (the sampled token's) per token."""
    s = request.sampling
    kwargs: dict[str, Any] = {
        "temperature": s.temperature,
        "top_p": s.top_p if s.top_p > 0 else 1.0,
        "top_k": s.top_k if s.top_k > 0 else 0,
        "max_tokens": max_tokens,
        "logprobs": 0,
        "stop_token_ids": list(s.stop_token_ids),
    }
    if s.seed is not None:
        kwargs["seed"] = s.seed
    return kwargs
