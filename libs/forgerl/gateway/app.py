"""The OpenAI-compatible HTTP face of the gateway (an ASGI app) and the uvicorn server that runs it inside
the service's event loop, beside the gRPC admin API.

    GET  /v1/models
    POST /v1/chat/completions      (stream or not; tools, tool_choice, parallel tool calls, logprobs)

The episode key is the API key (`Authorization: Bearer <key>`) or the `X-Forgerl-Episode` header. Errors
are OpenAI's error body with a 4xx status that says what to fix; only generation itself can fail with 5xx.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from forgerl.gateway.errors import GatewayError
from forgerl.gateway.parsing import ParsedToolCall
from forgerl.gateway.requests import ChatRequest, parse_chat_request
from forgerl.gateway.service import GatewayCore, TurnEvent, TurnResult, cancel_quietly
from forgerl.runtime.http import HttpServer as HttpServer  # the server it runs on (runtime.http)

logger = logging.getLogger(__name__)

EPISODE_HEADER = "x-forgerl-episode"
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
# How often a non-streamed request checks that its client is still there (a disconnect costs at most this
# much generation; a decode step of the tiny model on CPU takes ~10 ms).
DISCONNECT_POLL_S = 0.25


def episode_key(request: Request) -> str | None:
    key = request.headers.get(EPISODE_HEADER)
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


async def read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise GatewayError(
            413, f"the request body has {length} bytes; the gateway takes at most {limit}", code="request_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise GatewayError(
                413, f"the request body is over {limit} bytes, the most the gateway takes", code="request_too_large"
            )
    if not body:
        raise GatewayError(400, "the request body is empty: send a JSON object", code="invalid_json")
    try:
        return json.loads(body)
    except RecursionError:  # json's C parser recurses per level; check_json_value bounds what it returns
        raise GatewayError(400, "the request body nests too deeply to parse: flatten it", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError, or an integer of over 4300 digits
        message = getattr(err, "msg", str(err))
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise GatewayError(400, f"the request body is not valid JSON: {message}{where}", code="invalid_json") from None


async def _finished_unless_gone(request: Request, task: asyncio.Task[TurnResult]) -> bool:
    """Wait for `task`; if the client disconnects first, cancel it (the engine aborts the generation and no
    turn the agent never saw is recorded) and return False."""
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return True
        if await request.is_disconnected():
            await cancel_quietly(task)
            return False


class GatewayApp:
    """Builds the Starlette app over a GatewayCore."""

    def __init__(self, core: GatewayCore, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        self.core = core
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/healthz", self.healthz, methods=["GET"]),
            ],
            exception_handlers={
                GatewayError: self._gateway_error,
                HTTPException: self._http_error,
                Exception: self._internal_error,
            },
        )

    # --- errors -------------------------------------------------------------------------------------

    async def _gateway_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = GatewayError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        error = GatewayError(500, f"the gateway failed: {type(exc).__name__}: {exc}", code="internal_error")
        return JSONResponse(error.body(), status_code=500)

    # --- routes -------------------------------------------------------------------------------------

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "forgerl"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card(self.core.settings.model_name)]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.core.settings.model_name:
            raise GatewayError(
                404, f"model {name!r} does not exist; this gateway serves {self.core.settings.model_name!r}"
            )
        return JSONResponse(self._model_card(name))

    async def healthz(self, request: Request) -> Response:
        return JSONResponse(
            {"status": "ok", "episodes": len(self.core.episodes), "replicas": self.core.router.snapshot()}
        )

    async def chat_completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        episode = self.core.episode_for_request(episode_key(request))
        body = await read_json(request, self.max_request_bytes)
        chat = parse_chat_request(body, self.core.settings.model_name)
        prepared = await self.core.prepare_turn(episode, chat, arrival)
        if not chat.stream:
            task = asyncio.create_task(self.core.run_turn(prepared))
            episode.inflight = task
            if not await _finished_unless_gone(request, task):
                logger.info("episode %s: the client went away; its turn was aborted, not recorded", episode.id)
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            return JSONResponse(self._completion(chat, task.result()))
        queue: asyncio.Queue[TurnEvent | None] = asyncio.Queue()
        task = asyncio.create_task(self.core.run_turn(prepared, queue.put_nowait))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        episode.inflight = task
        return StreamingResponse(
            self._stream(chat, prepared.completion_id, queue, task),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # --- responses ----------------------------------------------------------------------------------

    def _logprob_entries(self, token_ids: list[int], logprobs: list[float], top: int) -> list[dict[str, Any]]:
        fmt = self.core.fmt
        entries = []
        for token, logprob in zip(token_ids, logprobs, strict=True):
            text = fmt.token_text(token)
            data = list(fmt.token_bytes(token))
            entry: dict[str, Any] = {"token": text, "logprob": logprob, "bytes": data, "top_logprobs": []}
            if top:  # the engine returns the sampled token's logprob only
                entry["top_logprobs"] = [{"token": text, "logprob": logprob, "bytes": data}]
            entries.append(entry)
        return entries

    @staticmethod
    def _tool_call(call: ParsedToolCall, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out

    def _usage(self, result: TurnResult) -> dict[str, Any]:
        record = result.record
        prompt, completion = len(record.prompt_ids), len(record.generated_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": record.cached_prompt_tokens},
        }

    def _extension(self, result: TurnResult) -> dict[str, Any]:
        record = result.record
        malformed = [c.error for c in record.tool_calls if c.malformed]
        return {
            "turn_index": record.index,
            "policy_version": record.policy_version,
            "replica": record.replica,
            "malformed_tool_calls": malformed,
        }

    def _completion(self, chat: ChatRequest, result: TurnResult) -> dict[str, Any]:
        record, parser = result.record, result.parser
        calls = parser.valid_tool_calls
        message: dict[str, Any] = {"role": "assistant", "content": parser.content or (None if calls else "")}
        if parser.reasoning:
            message["reasoning_content"] = parser.reasoning
        if calls:
            message["tool_calls"] = [self._tool_call(c) for c in calls]
        logprobs = None
        if chat.logprobs:
            logprobs = {"content": self._logprob_entries(record.generated_ids, record.logprobs, chat.top_logprobs)}
        return {
            "id": result.completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": result.finish_reason}],
            "usage": self._usage(result),
            "forgerl": self._extension(result),
        }

    async def _stream(
        self,
        chat: ChatRequest,
        completion_id: str,
        queue: asyncio.Queue[TurnEvent | None],
        task: asyncio.Task[TurnResult],
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, **extra: Any) -> str:
            body = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
                **extra,
            }
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            tool_index = 0
            while True:
                event = await queue.get()
                if event is None:
                    break
                deltas = list(self._stream_deltas(event, tool_index))
                logprobs = None
                if chat.logprobs and event.token_ids:  # with the step's first delta, or alone (markers)
                    logprobs = {"content": self._logprob_entries(event.token_ids, event.logprobs, chat.top_logprobs)}
                    deltas = deltas or [{}]
                for i, delta in enumerate(deltas):
                    tool_index += len(delta.get("tool_calls", ()))
                    yield chunk(delta, logprobs=logprobs if i == 0 else None)
            try:
                result = task.result()
            except Exception as err:
                if not isinstance(err, GatewayError):
                    err = GatewayError(500, f"the turn failed: {type(err).__name__}: {err}", code="internal_error")
                yield f"data: {json.dumps(err.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield chunk({}, finish=result.finish_reason, forgerl=self._extension(result))
            if chat.include_usage:
                body = {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": chat.model,
                    "choices": [],
                    "usage": self._usage(result),
                }
                yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            # The client went away (or the stream ended): a turn still generating is cancelled, not recorded.
            if not task.done():
                await cancel_quietly(task)

    @staticmethod
    def _stream_deltas(event: TurnEvent, tool_index: int) -> Iterator[dict[str, Any]]:
        delta = event.delta
        if delta.reasoning:
            yield {"reasoning_content": delta.reasoning}
        if delta.content:
            yield {"content": delta.content}
        if delta.tool_calls:
            yield {"tool_calls": [GatewayApp._tool_call(c, tool_index + i) for i, c in enumerate(delta.tool_calls)]}
