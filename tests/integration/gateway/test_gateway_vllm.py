"""The gateway on the real inference service (vLLM CPU, a debug checkpoint of forgerl.model with the
ForgeRL tokenizer): the openai SDK and mini-swe-agent run episodes, and every recorded turn is what the
engine generates for the recorded prompt, token for token (replayed greedily on the engine directly).

One engine for the module (about a minute to start)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import pytest_asyncio
from gateway_services import run_mini_swe_agent, running_gateway

from forgerl.inference.testing import make_checkpoint
from forgerl.model.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from forgerl.runtime.testing import serve_in_process
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.inference.main import build as build_inference
from forgerl.v1 import gateway_pb2, inference_pb2, inference_pb2_grpc

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ENGINE = {"max_model_len": 4096, "kv_cache_bytes": 64 * 1024 * 1024, "executor": "uni"}
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "description": "Look a word up", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("gateway-vllm") / "ckpt", "debug", seed=0)
    save_tokenizer(train_tokenizer(), path)  # the gateway reads the tokenizer from the served model path
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def inference(checkpoint: Path) -> AsyncIterator[str]:
    config = InferenceConfig(model_path=str(checkpoint), log_format="console", **ENGINE)
    async with serve_in_process(build_inference(config), config) as address:
        yield address


async def replay(address: str, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """Greedy generation of `n` tokens straight from the inference service."""
    tokens: list[int] = []
    logprobs: list[float] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            request_id=f"replay-{len(prompt)}-{n}",
            prompt_token_ids=prompt,
            sampling=inference_pb2.SamplingParams(temperature=0.0, max_tokens=n, stop_token_ids=[2]),
        )
        async for response in stub.Generate(request):
            tokens += response.token_ids
            logprobs += response.logprobs
    return tokens, logprobs


async def chat(client: openai.AsyncOpenAI, messages: list[dict], stream: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": "forgerl",
        "messages": messages,
        "tools": [TOOL],
        "temperature": 0.0,
        "max_tokens": 12,
        "logprobs": True,
    }
    if not stream:
        response = await client.chat.completions.create(**kwargs)
        message = response.choices[0].message.model_dump(exclude_none=True)
        tokens = response.choices[0].logprobs.content
        assert len(tokens) == response.usage.completion_tokens
        return message
    content, reasoning, calls = "", "", []
    async for event in await client.chat.completions.create(**kwargs, stream=True):
        if event.choices:
            delta = event.choices[0].delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            calls += [c.model_dump(exclude_none=True) for c in delta.tool_calls or []]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    if reasoning:
        message["reasoning_content"] = reasoning
    return message


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_openai_sdk_on_vllm_records_what_the_engine_generates(
    inference: str, checkpoint: Path, stream: bool
) -> None:
    tok = load_tokenizer(checkpoint)
    async with running_gateway([inference]) as gw:
        opened = await gw.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="run-vllm"))
        client = openai.AsyncOpenAI(api_key=opened.episode_key, base_url=opened.base_url, max_retries=0)
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a helpful agent."},
            {"role": "user", "content": "Say something about the sea."},
        ]
        for i in range(3):
            message = await chat(client, messages, stream)
            message.pop("reasoning_content", None)  # an agent that drops reasoning
            messages.append(message)
            for call in message.get("tool_calls", []):
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": "nothing found"})
            messages.append({"role": "user", "content": f"Go on ({i})."})
        closed = await gw.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key))
        await client.close()
    turns = closed.trajectory.turns
    assert len(turns) == 3
    for turn in turns:
        generated = list(turn.generated_token_ids)
        assert 0 < len(generated) <= 12 and turn.finish_reason in ("stop", "length")
        tokens, logprobs = await replay(inference, list(turn.prompt_token_ids), len(generated))
        assert tokens == generated  # token for token what inference generates for the recorded prompt
        assert np.max(np.abs(np.array(logprobs) - np.array(turn.behaviour_logprobs))) < 1e-3
        assert turn.policy_version == 1 and list(turn.loss_mask) == [1] * len(generated)
    for before, after in itertools.pairwise(turns):
        head = [*before.prompt_token_ids, *before.generated_token_ids]
        assert list(after.prompt_token_ids[: len(head)]) == head  # generated text never re-tokenised
    assert turns[2].cached_prompt_tokens > 0  # the episode stayed on its replica: its prefix was cached
    # the first prompt is exactly the chat template's
    fresh = tok.apply_chat_template(messages[:2], tools=[TOOL], tokenize=True, add_generation_prompt=True)
    assert list(turns[0].prompt_token_ids) == list(fresh["input_ids"])


async def test_mini_swe_agent_on_vllm(inference: str, tmp_path: Path) -> None:
    async with running_gateway([inference]) as gw:
        opened = await gw.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="run-vllm"))
        summary, saved = await run_mini_swe_agent(
            opened.base_url,
            opened.episode_key,
            tmp_path,
            step_limit=3,
            task="List the files in this directory.",
            max_tokens=32,
        )
        closed = await gw.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key))
    # an untrained model does not call bash: mini-swe-agent answers with format errors until its limits
    assert summary["exit_status"] in {"LimitsExceeded", "RepeatedFormatError", "Submitted"}
    turns = closed.trajectory.turns
    assert len(turns) == summary["n_calls"] >= 2
    first_prompt = list(turns[0].prompt_token_ids)
    for turn in turns:
        assert len(turn.generated_token_ids) > 0
        # every later prompt starts with the first one's messages, token for token
        assert list(turn.prompt_token_ids[: len(first_prompt) - 5]) == first_prompt[:-5]
    assert saved["info"]["model_stats"]["api_calls"] == summary["n_calls"]
