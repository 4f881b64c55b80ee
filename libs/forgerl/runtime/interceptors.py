"""Server interceptors shared by every service: bearer-token auth and Prometheus RPC metrics."""

from __future__ import annotations

import hmac
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

# Kubernetes' native gRPC probes cannot send a token, so health checks stay open.
UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(UNAUTHENTICATED_METHODS):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        reason = "missing bearer token" if not given else "wrong bearer token"
        return _rejecting_handler(handler, f"{reason}: send 'authorization: Bearer <FORGERL_AUTH_TOKEN>'")


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by method and status code and times them into a histogram."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self._calls = Counter("forgerl_rpc_total", "RPCs handled", ["service", "method", "code"], registry=registry)
        self._seconds = Histogram("forgerl_rpc_seconds", "RPC handling time", ["service", "method"], registry=registry)
        self._service = service

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, self._observer(handler_call_details.method))

    def _observer(self, method: str) -> Callable[[float, grpc.aio.ServicerContext], None]:
        def observe(started: float, context: grpc.aio.ServicerContext) -> None:
            code = context.code() if hasattr(context, "code") else None
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            self._calls.labels(self._service, method, name).inc()
            self._seconds.labels(self._service, method).observe(time.perf_counter() - started)

        return observe


def _rejecting_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def reject(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)  # before decoding: nothing about the body

    async def reject_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    return _rebuild(handler, reject, reject_stream)


class _Undecodable:
    """What a request that could not be parsed becomes, so the handler can answer INVALID_ARGUMENT (grpc
    answers UNKNOWN to a deserializer that raises, which tells the caller nothing it can act on)."""

    def __init__(self, error: Exception) -> None:
        self.message = f"the request could not be decoded ({type(error).__name__}: {error}): send a valid message"


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as err:
            return _Undecodable(err)

    return safe


async def _decoded(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _wrap_handler(
    handler: grpc.RpcMethodHandler, observe: Callable[[float, grpc.aio.ServicerContext], None]
) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if handler.request_streaming:
            return _decoded(request, context)
        if isinstance(request, _Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.perf_counter()
        try:
            return await inner(await checked(request, context), context)
        finally:
            observe(started, context)

    async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            result = inner(await checked(request, context), context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:  # a handler that writes with context.write() and returns None
                await result
        finally:
            observe(started, context)

    return _rebuild(handler, unary_response, stream_response, _safe_deserializer(handler.request_deserializer))


def _rebuild(
    handler: grpc.RpcMethodHandler,
    unary_response: Callable[..., Any],
    stream_response: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind and (de)serializers as `handler` (or `request_deserializer`),
    calling the new functions."""
    codec = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_response, **codec)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_response, **codec)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_response, **codec)
    return grpc.unary_unary_rpc_method_handler(unary_response, **codec)
