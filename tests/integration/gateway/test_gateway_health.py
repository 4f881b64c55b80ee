"""The gateway's health follows its HTTP API for agents (issue 24, item 6): once the HTTP server stops, the
gRPC health says NOT_SERVING, so a probe or the supervisor acts on it."""

from __future__ import annotations

import asyncio
import time

import pytest
from gateway_services import running_gateway
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.integration


async def test_health_is_not_serving_once_the_http_server_stopped(replicas: list) -> None:
    async with running_gateway([r.address for r in replicas]) as gateway:
        health = health_pb2_grpc.HealthStub(gateway.channel)
        request = health_pb2.HealthCheckRequest(service="forgerl.v1.GatewayService")
        assert (await health.Check(request)).status == health_pb2.HealthCheckResponse.SERVING
        http = gateway.servicer.http
        assert http is not None
        http.server.should_exit = True  # uvicorn leaves its serve loop, as after a fatal error
        deadline = time.monotonic() + 10
        while (await health.Check(request)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health still SERVING 10 s after the HTTP server stopped"
            await asyncio.sleep(0.1)
        reason = gateway.servicer.failure()
        assert reason is not None and "HTTP server" in reason
