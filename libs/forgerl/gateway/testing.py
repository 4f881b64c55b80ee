"""A scripted inference replica, for tests and the benchmark: the real InferenceService gRPC face, with
generations taken from a script instead of a model.

`ScriptedInference` answers each Generate with the next scripted token ids (or what `respond(prompt_ids)`
returns), streamed in chunks with deterministic logprobs, an optional per-token delay (a decode rate),
and the prefix-cache hit a real engine would report. Requests are logged, so a test can compare what the
engine saw with what the gateway recorded. `fail_after` cuts the next stream after that many tokens with
UNAVAILABLE (a replica dying mid-generation).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from forgerl.v1 import inference_pb2, inference_pb2_grpc


def scripted_logprob(position: int, token_id: int) -> float:
    return -0.01 * ((position * 31 + token_id) % 97) - 0.001


@dataclass
class GenerateLog:
    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    generated: list[int] = field(default_factory=list)
    finish_reason: str = ""


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(
        self,
        script: Sequence[Sequence[int]] = (),
        respond: Callable[[list[int]], Sequence[int]] | None = None,
        *,
        token_delay_s: float = 0.0,
        chunk_size: int = 4,
        policy_version: int = 1,
        eos_id: int | None = None,
        vocab_size: int = 1 << 20,
        model_path: str = "",
    ) -> None:
        self.script: deque[list[int]] = deque(list(s) for s in script)
        self.respond = respond
        self.token_delay_s = token_delay_s
        self.chunk_size = chunk_size
        self.policy_version = policy_version
        self.eos_id = eos_id
        self.vocab_size = vocab_size
        self.model_path = model_path
        self.log: list[GenerateLog] = []
        self.fail_after: int | None = None
        self.down = False
        self._seen: deque[np.ndarray] = deque(maxlen=32)

    def add(self, *generations: Sequence[int]) -> None:
        self.script.extend(list(g) for g in generations)

    def _cached(self, prompt: list[int]) -> int:
        """The longest prefix shared with a recent prompt (what a prefix cache would hold)."""
        ids = np.asarray(prompt, dtype=np.int64)
        best = 0
        for seen in self._seen:
            n = min(len(seen), len(ids))
            differ = np.flatnonzero(seen[:n] != ids[:n])
            best = max(best, int(differ[0]) if differ.size else n)
        self._seen.append(ids)
        return best

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted replica is down")
        prompt = list(request.prompt_token_ids)
        if not prompt or any(not 0 <= t < self.vocab_size for t in prompt):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids empty or outside the vocabulary")
        if self.respond is not None:
            tokens = list(self.respond(prompt))
        elif self.script:
            tokens = self.script.popleft()
        else:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the script has no generation left")
        entry = GenerateLog(request.request_id, prompt, request.sampling.max_tokens)
        self.log.append(entry)
        stops = set(request.sampling.stop_token_ids) | ({self.eos_id} if self.eos_id is not None else set())
        limit = request.sampling.max_tokens or len(tokens)
        out: list[int] = []
        reason = "length"
        for token in tokens:
            if len(out) >= limit:
                break
            out.append(token)
            if token in stops:
                reason = "stop"
                break
        else:
            if len(out) < limit:
                reason = "stop"
        cached = self._cached(prompt)
        fail_after, self.fail_after = self.fail_after, None
        sent = 0
        while sent < len(out) or sent == 0:
            piece = out[sent : sent + self.chunk_size]
            if fail_after is not None and sent + len(piece) > fail_after:
                piece = piece[: max(0, fail_after - sent)]
                if piece:
                    entry.generated.extend(piece)
                    yield self._response(request, piece, sent, "", cached)
                await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted replica died mid-stream")
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s * max(1, len(piece)))
            sent += len(piece)
            done = sent >= len(out)
            entry.generated.extend(piece)
            if done:
                entry.finish_reason = reason
            yield self._response(request, piece, sent - len(piece), reason if done else "", cached)
            if done:
                break

    def _response(
        self, request: inference_pb2.GenerateRequest, piece: list[int], start: int, reason: str, cached: int
    ) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(
            request_id=request.request_id,
            token_ids=piece,
            logprobs=[scripted_logprob(start + i, t) for i, t in enumerate(piece)],
            finish_reason=reason,
            policy_version=self.policy_version,
            cached_prompt_tokens=cached,
        )

    async def GetStatus(
        self, request: inference_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.GetStatusResponse:
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scripted replica is down")
        return inference_pb2.GetStatusResponse(policy_version=self.policy_version, model_path=self.model_path)

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        return inference_pb2.AbortResponse(aborted=0)


class ScriptedReplica:
    """The same script as an in-process ReplicaClient (no gRPC): for unit tests of the router and core."""

    def __init__(self, address: str, servicer: ScriptedInference) -> None:
        self.address = address
        self.servicer = servicer

    async def generate(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[inference_pb2.GenerateResponse]:
        from forgerl.gateway.routing import InferenceRejected, ReplicaDown

        context = _Context()
        try:
            async for response in self.servicer.Generate(request, context):
                yield response
        except _Aborted as err:
            if err.code == grpc.StatusCode.UNAVAILABLE:
                raise ReplicaDown(f"{self.address}: {err.details}") from None
            raise InferenceRejected(err.code, err.details) from None

    async def status(self, timeout_s: float) -> inference_pb2.GetStatusResponse:
        from forgerl.gateway.routing import ReplicaDown

        if self.servicer.down:
            raise ReplicaDown(f"{self.address}: down")
        return inference_pb2.GetStatusResponse(
            policy_version=self.servicer.policy_version, model_path=self.servicer.model_path
        )

    async def close(self) -> None:
        return None


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _Aborted(code, details)


async def serve_scripted(port: int, generation: Sequence[int], *, host: str = "127.0.0.1", **kwargs: object) -> None:
    """Serve a ScriptedInference that answers every request with `generation`, until SIGTERM/SIGINT."""
    import signal

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    inference = ScriptedInference(respond=lambda prompt: generation, **kwargs)  # type: ignore[arg-type]
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m forgerl.gateway.testing --port P --generation-file ids.json [...]`: a scripted replica."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description="A scripted inference replica (the InferenceService gRPC API).")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--generation-file", required=True, help="JSON list of the token ids every request gets")
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--chunk-size", type=int, default=1)
    parser.add_argument("--model-path", default="")
    args = parser.parse_args(argv)
    generation = json.loads(Path(args.generation_file).read_text())
    asyncio.run(
        serve_scripted(
            args.port,
            generation,
            token_delay_s=args.token_delay_s,
            chunk_size=args.chunk_size,
            model_path=args.model_path,
        )
    )


if __name__ == "__main__":
    main()
