"""Client side of the runtime: channels that carry the bearer token, and health checks."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forgerl.runtime.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def insecure_channel(address: str, token: str | None = None) -> grpc.Channel:
    """A blocking channel to `address`; with `token`, every call carries `authorization: Bearer <token>`."""
    channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if token is None:
        return channel
    return grpc.intercept_channel(channel, _AuthClientInterceptor(token))


def aio_channel(address: str, token: str | None = None) -> grpc.aio.Channel:
    """An asyncio channel to `address`, carrying the bearer token on every kind of call when one is given."""
    interceptors = [] if token is None else _aio_auth_interceptors(token)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


def health_status(address: str, service: str = "", timeout_s: float = 1.0) -> str:
    """ "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN" or "UNREACHABLE" for `service` at `address`."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as err:
            return "SERVICE_UNKNOWN" if err.code() == grpc.StatusCode.NOT_FOUND else "UNREACHABLE"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _with_token(details: grpc.ClientCallDetails, token: str) -> list[tuple[str, str]]:
    metadata = list(details.metadata or [])
    metadata.append(("authorization", f"Bearer {token}"))
    return metadata


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, base: grpc.ClientCallDetails, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _AuthClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, _with_token(details, self._token))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def _aio_auth_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call kind: grpc.aio files each channel interceptor under the first of the four
    kinds it is an instance of (grpc/aio/_channel.py, `isinstance` chain in Channel.__init__), so a single
    object subclassing all four would only ever see unary-unary calls, and streams would go out anonymous."""
    return [
        _AioUnaryUnaryAuth(token),
        _AioUnaryStreamAuth(token),
        _AioStreamUnaryAuth(token),
        _AioStreamStreamAuth(token),
    ]


class _AioAuth:
    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(details.metadata or ()), ("authorization", f"Bearer {self._token}")),
            details.credentials,
            details.wait_for_ready,
        )


class _AioUnaryUnaryAuth(_AioAuth, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStreamAuth(_AioAuth, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnaryAuth(_AioAuth, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStreamAuth(_AioAuth, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._details(client_call_details), request_iterator)
