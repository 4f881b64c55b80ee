"""Hostile input to the gateway (issue 24, item 7): the cases the outside tester found (a 100k-deep JSON body,
top_k 10^12, a lone UTF-16 surrogate) answer 400 naming the problem, idle episodes expire, a non-streamed
request whose client went away is aborted and not recorded, and property-based tests (hypothesis) send
random and mutated requests to the HTTP API and the gRPC admin API: only 2xx/4xx or clean statuses, and
the gateway serves a normal turn afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from gateway_services import capturing_datapool, running_gateway, scripted_replicas
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forgerl.model.tokenizer import load_tokenizer
from forgerl.runtime.fuzz import fuzz_service
from forgerl.runtime.testing import serve_in_thread
from forgerl.v1 import gateway_pb2, gateway_pb2_grpc

pytestmark = pytest.mark.integration

START = [{"role": "user", "content": "What is 2 + 2?"}]
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]


def answer(tokenizer_dir: Path, n: int = 6) -> list[int]:
    tok = load_tokenizer(tokenizer_dir)
    return [*tok.encode("four", add_special_tokens=False)[:n], tok.eos_token_id]


@dataclass
class Served:
    grpc_address: str
    base_url: str
    gateway: Any


@asynccontextmanager
async def gateway_stack(tokenizer_dir: Path, **overrides: Any) -> AsyncIterator[Served]:
    ids = answer(tokenizer_dir)
    async with (
        scripted_replicas(1, tokenizer_dir, respond=lambda prompt: ids) as replicas,
        capturing_datapool() as (_, datapool),
        running_gateway([r.address for r in replicas], datapool_address=datapool, **overrides) as gateway,
    ):
        yield Served(gateway.address, gateway.base_url, gateway)


async def open_key(gateway: Any) -> str:
    opened = await gateway.stub.OpenEpisode(gateway_pb2.OpenEpisodeRequest(run_id="hostile", task_id="t"))
    return str(opened.episode_key)


def deep(levels: int) -> bytes:
    return b'{"messages": ' + b"[" * levels + b"]" * levels + b"}"


BAD_BODIES = {
    "100k-deep JSON": (deep(100_000), "nests too deeply"),
    "65-deep JSON": (deep(65), "nests deeper than 64 levels"),
    "top_k 10^12": (json.dumps({"messages": START, "top_k": 10**12}).encode(), "top_k=1000000000000"),
    "max_tokens 10^12": (json.dumps({"messages": START, "max_tokens": 10**12}).encode(), "max_tokens="),
    "lone surrogate": (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "lone UTF-16 surrogate"),
    "lone surrogate key": (b'{"messages": [], "\\udfff": 1}', "not valid Unicode"),
    "5000-digit integer": (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "invalid UTF-8": (b'{"messages": "\xff"}', "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_hostile_bodies_get_400_naming_the_problem(tokenizer_dir: Path, case: str) -> None:
    body, message = BAD_BODIES[case]
    async with gateway_stack(tokenizer_dir) as served:
        key = await open_key(served.gateway)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=served.base_url, headers=headers, timeout=30) as http:
            bad = await http.post("/chat/completions", content=body)
            good = await http.post("/chat/completions", json={"messages": START})
    assert bad.status_code == 400, bad.text
    assert message in bad.json()["error"]["message"], bad.text
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"] == "four", good.text


async def test_idle_episodes_expire(tokenizer_dir: Path) -> None:
    async with gateway_stack(tokenizer_dir, episode_idle_ttl_s=0.5) as served:
        idle, busy = await open_key(served.gateway), await open_key(served.gateway)
        headers = {"Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=served.base_url, headers=headers, timeout=30) as http:
            deadline = time.monotonic() + 10
            while served.gateway.servicer.core.find(idle).closed is False:
                assert time.monotonic() < deadline, "the idle episode never expired"
                # the other episode stays active: a turn every 0.1 s keeps it open
                turn = await http.post("/chat/completions", json={"messages": START}, headers=auth(busy))
                assert turn.status_code == 200, turn.text
                await asyncio.sleep(0.1)
            refused = await http.post("/chat/completions", json={"messages": START}, headers=auth(idle))
        core = served.gateway.servicer.core
        assert idle not in core.episodes and busy in core.episodes
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await served.gateway.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=idle))
    assert refused.status_code == 403 and "expired" in refused.json()["error"]["message"]
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in (err.value.details() or "")


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_non_streamed_request_whose_client_went_away_is_aborted(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    long = tok.encode("four " * 200, add_special_tokens=False)[:200]  # 200 tokens at 20 ms each: 4 s
    async with (
        scripted_replicas(1, tokenizer_dir, respond=lambda prompt: long, token_delay_s=0.02, chunk_size=1) as reps,
        running_gateway([r.address for r in reps]) as gateway,
    ):
        key = await open_key(gateway)
        async with httpx.AsyncClient(base_url=gateway.base_url, headers=auth(key)) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.post("/chat/completions", json={"messages": START}, timeout=0.5)
        log = reps[0].inference.log[-1]
        deadline = time.monotonic() + 5
        episode = gateway.servicer.core.find(key)
        while episode.lock.locked() or (episode.inflight is not None and not episode.inflight.done()):
            assert time.monotonic() < deadline, "the turn of a gone client still runs"
            await asyncio.sleep(0.05)
        generated = len(log.generated)
        await asyncio.sleep(0.3)
        assert len(log.generated) == generated < 200 and log.finish_reason == ""  # stopped, not finished
        assert episode.turn_count == 0  # the agent never saw that turn: not recorded


# --- property-based ------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
FIELDS = ["messages", "model", "tools", "tool_choice", "stream", "stream_options", "logprobs", "top_logprobs",
          "temperature", "top_p", "top_k", "max_tokens", "max_completion_tokens", "seed", "n", "stop",
          "response_format"]  # fmt: skip
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]) | JSON},
    optional={"content": st.text(max_size=30) | JSON, "tool_calls": JSON, "tool_call_id": JSON, "name": JSON},
)
# A valid request with some fields replaced by random JSON.
MUTATED = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, min_size=1, max_size=3)}),
    st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4),
)
BODIES = st.one_of(
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    MUTATED.map(lambda v: json.dumps(v).encode()),
    # escapes JSON allows and text does not hold: lone surrogates anywhere in a string
    MUTATED.map(lambda v: json.dumps(v).replace("a", "\\ud83d", 1).encode()),
)


@pytest.fixture(scope="module")
def gateway_thread(tokenizer_dir: Path) -> Iterator[Served]:
    with serve_in_thread(lambda: gateway_stack(tokenizer_dir)) as served:
        yield served


@pytest.fixture(scope="module")
def open_keys(gateway_thread: Served) -> Iterator[list[str]]:
    with grpc.insecure_channel(gateway_thread.grpc_address) as channel:
        opener = gateway_pb2_grpc.GatewayServiceStub(channel)
        request = gateway_pb2.OpenEpisodeRequest(run_id="fuzz")
        yield [opener.OpenEpisode(request, timeout=10).episode_key for _ in range(8)]


def test_random_http_requests_get_2xx_or_4xx(gateway_thread: Served, open_keys: list[str]) -> None:
    with httpx.Client(base_url=gateway_thread.base_url, timeout=30) as http:

        @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(
            body=BODIES,
            path=st.sampled_from(["/chat/completions", "/chat/completions", "/models", "/models/x", "/nope"]),
            key=st.sampled_from([*open_keys, None, "fep-wrong"]),
            content_type=st.sampled_from(["application/json", "text/plain", None]),
        )
        def one(body: bytes, path: str, key: str | None, content_type: str | None) -> None:
            headers = {} if key is None else auth(key)
            if content_type is not None:
                headers["Content-Type"] = content_type
            reply = http.post(path, content=body, headers=headers)
            assert reply.status_code < 500, f"{path} {body!r}: {reply.status_code} {reply.text}"

        one()
        good = http.post("/chat/completions", json={"messages": START}, headers=auth(open_keys[0]))
    # the episode may have turns from the fuzzing; a fresh history must still be served
    assert good.status_code in (200, 400), good.text


def test_random_grpc_requests_get_clean_statuses(gateway_thread: Served) -> None:
    with grpc.insecure_channel(gateway_thread.grpc_address) as channel:
        seen = fuzz_service(channel, GATEWAY_SERVICE, max_examples=150)
    assert sum(seen.values()) == 150
    codes = {key.split()[1] for key in seen}
    assert {"OK", "INVALID_ARGUMENT"} <= codes, seen  # valid requests served, hostile ones refused
