"""Honest answers for RPCs whose implementation belongs to later work: UNIMPLEMENTED, naming the owner."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from forgerl.runtime.server import ServiceSpec


def unimplemented_handler(service: ServiceDescriptor, owner: str) -> grpc.GenericRpcHandler:
    """A generic handler answering every method of `service` with UNIMPLEMENTED."""

    def make(method_name: str) -> grpc.RpcMethodHandler:
        message = f"{service.name}.{method_name} is not implemented yet ({owner})"

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=lambda data: data, response_serializer=lambda data: data
        )

    handlers = {method.name: make(method.name) for method in service.methods}
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def placeholder_spec(name: str, service: ServiceDescriptor, owner: str) -> ServiceSpec:
    """A service that starts, reports SERVING and answers every RPC with UNIMPLEMENTED until `owner` lands."""
    handler = unimplemented_handler(service, owner)
    return ServiceSpec(
        name=name, services=[service], register=lambda server: server.add_generic_rpc_handlers([handler])
    )
