"""Inference replicas: each episode sticks to one (its prefix stays in that replica's cache); when the
replica fails, the episode moves to another and a generation in progress goes on there.

Fail-over keeps the turn token-exact: the tokens already received stay, and the next replica is asked to
continue from the prompt followed by them (each token keeps the logprob of the replica that generated it).
A replica that failed is left out of new assignments until a probe (GetStatus) reaches it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from forgerl.gateway.errors import GatewayError
from forgerl.runtime.client import aio_channel
from forgerl.v1 import inference_pb2, inference_pb2_grpc

logger = logging.getLogger(__name__)

# Codes that say the replica, not the request, is at fault: the call moves to another replica.
_FAIL_OVER = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
# How often a turn may continue after the engine aborted it (e.g. a weight update with in_flight=abort).
MAX_CONTINUATIONS = 4


class ReplicaDown(Exception):
    """The replica could not serve the call (unreachable, crashed, stream cut): try another."""


class InferenceRejected(Exception):
    """The replica refused the request itself (e.g. the prompt exceeds the context)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class ReplicaClient(Protocol):
    address: str

    def generate(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[inference_pb2.GenerateResponse]: ...

    async def status(self, timeout_s: float) -> inference_pb2.GetStatusResponse: ...

    async def close(self) -> None: ...


class GrpcReplica:
    """One inference service over gRPC."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self.channel = aio_channel(address, token)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    async def generate(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[inference_pb2.GenerateResponse]:
        call = self.stub.Generate(request)
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as err:
            if err.code() in _FAIL_OVER:
                raise ReplicaDown(f"{self.address}: {err.code().name}: {err.details()}") from None
            raise InferenceRejected(err.code(), err.details() or "") from None
        finally:
            if not call.done():
                call.cancel()

    async def status(self, timeout_s: float) -> inference_pb2.GetStatusResponse:
        try:
            return await self.stub.GetStatus(inference_pb2.GetStatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as err:
            raise ReplicaDown(f"{self.address}: {err.code().name}: {err.details()}") from None

    async def close(self) -> None:
        await self.channel.close()


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 0  # 0: up to the context
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class Chunk:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "" until the last chunk
    policy_version: int
    cached_prompt_tokens: int
    replica: str
    routed_experts: Any = None  # trajectory_pb2.RoutedExperts of this chunk's tokens, or None


@dataclass
class _Replica:
    client: ReplicaClient
    healthy: bool = True
    episodes: int = 0
    failures: int = 0
    failed_at: float = 0.0
    last_error: str = ""


@dataclass
class Route:
    """An episode's place: the replica it sticks to."""

    replica: str = ""
    moves: int = 0
    history: list[str] = field(default_factory=list)


class Router:
    def __init__(self, clients: Sequence[ReplicaClient], probe_interval_s: float = 2.0) -> None:
        if not clients:
            raise ValueError("the gateway needs at least one inference replica")
        self.replicas = {client.address: _Replica(client) for client in clients}
        self.probe_interval_s = probe_interval_s
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[str]:
        return list(self.replicas)

    # --- assignment ---------------------------------------------------------------------------------

    def _pick(self, exclude: set[str] = frozenset()) -> str | None:  # type: ignore[assignment]
        candidates = [a for a, r in self.replicas.items() if a not in exclude]
        healthy = [a for a in candidates if self.replicas[a].healthy]
        if healthy:
            return min(healthy, key=lambda a: self.replicas[a].episodes)
        # None looks healthy: try the one that failed longest ago (marks may be stale).
        return min(candidates, key=lambda a: self.replicas[a].failed_at, default=None)

    def assign(self, route: Route) -> str:
        address = self._pick()
        assert address is not None
        self._move(route, address)
        return address

    def release(self, route: Route) -> None:
        if route.replica in self.replicas:
            self.replicas[route.replica].episodes -= 1
        route.replica = ""

    def _move(self, route: Route, address: str) -> None:
        if route.replica:
            self.replicas[route.replica].episodes -= 1
            route.moves += 1
        route.replica = address
        route.history.append(address)
        self.replicas[address].episodes += 1

    def mark_down(self, address: str, error: str) -> None:
        replica = self.replicas[address]
        if replica.healthy:
            logger.warning("inference replica %s is down: %s", address, error)
        replica.healthy = False
        replica.failures += 1
        replica.failed_at = time.monotonic()
        replica.last_error = error

    # --- generation ---------------------------------------------------------------------------------

    async def generate(
        self,
        route: Route,
        prompt_ids: Sequence[int],
        sampling: Sampling,
        request_id: str,
        return_routed_experts: bool = False,
    ) -> AsyncIterator[Chunk]:
        """Stream a generation on the episode's replica, failing over (and continuing) when it dies.

        Raises GatewayError: 400 when inference refuses the request, 503 when no replica can serve it."""
        received: list[int] = []
        tried: set[str] = set()
        continuations = 0
        attempt = 0
        while True:
            if not route.replica or route.replica not in self.replicas:
                self.assign(route)
            elif not self.replicas[route.replica].healthy:
                other = self._pick(exclude={route.replica} | tried)
                if other is not None and self.replicas[other].healthy:
                    self._move(route, other)
            address = route.replica
            replica = self.replicas[address]
            max_tokens = sampling.max_tokens
            if max_tokens > 0:
                max_tokens -= len(received)
                if max_tokens <= 0:
                    yield Chunk([], [], "length", 0, 0, address)
                    return
            request = inference_pb2.GenerateRequest(
                request_id=f"{request_id}-{attempt}",
                prompt_token_ids=[*prompt_ids, *received],
                sampling=inference_pb2.SamplingParams(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k,
                    max_tokens=max_tokens,
                    stop_token_ids=list(sampling.stop_token_ids),
                    seed=sampling.seed,
                ),
                return_routed_experts=return_routed_experts,
            )
            attempt += 1
            try:
                async for response in replica.client.generate(request):
                    received.extend(response.token_ids)
                    finish = response.finish_reason
                    routed = response.routed_experts if response.HasField("routed_experts") else None
                    if finish == "abort" and continuations < MAX_CONTINUATIONS:
                        continuations += 1
                        yield Chunk(
                            list(response.token_ids),
                            list(response.logprobs),
                            "",
                            response.policy_version,
                            response.cached_prompt_tokens,
                            address,
                            routed,
                        )
                        break
                    yield Chunk(
                        list(response.token_ids),
                        list(response.logprobs),
                        finish,
                        response.policy_version,
                        response.cached_prompt_tokens,
                        address,
                        routed,
                    )
                    if finish:
                        replica.healthy = True
                        return
                else:
                    raise ReplicaDown(f"{address}: the stream ended before the generation finished")
            except ReplicaDown as err:
                self.mark_down(address, str(err))
                tried.add(address)
                other = self._pick(exclude=tried)
                if other is None:
                    raise GatewayError(
                        503,
                        f"no inference replica could serve the request (tried {', '.join(sorted(tried))}; "
                        f"last error: {err})",
                        code="inference_unavailable",
                    ) from None
                logger.warning("episode moves from %s to %s: %s", address, other, err)
                self._move(route, other)
            except InferenceRejected as err:
                if received:  # a continuation the context cannot hold: the turn is as long as it gets
                    yield Chunk([], [], "length", 0, 0, address)
                    return
                raise GatewayError(
                    400, f"inference refused the request: {err.details}", code="inference_rejected"
                ) from None

    # --- probing ------------------------------------------------------------------------------------

    async def probe(self, timeout_s: float = 1.0) -> None:
        """Ask every replica marked down whether it is back."""
        for address, replica in self.replicas.items():
            if replica.healthy:
                continue
            with contextlib.suppress(ReplicaDown):
                await replica.client.status(timeout_s)
                replica.healthy = True
                logger.info("inference replica %s is back", address)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            try:
                await self.probe()
            except Exception:  # keep probing whatever one probe did
                logger.exception("probing inference replicas failed")

    def start(self) -> None:
        if self._probe_task is None:
            self._probe_task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
            self._probe_task = None
        for replica in self.replicas.values():
            with contextlib.suppress(Exception):
                await replica.client.close()

    def snapshot(self) -> list[dict[str, Any]]:
        return [
            {"address": a, "healthy": r.healthy, "episodes": r.episodes, "failures": r.failures, "error": r.last_error}
            for a, r in self.replicas.items()
        ]
