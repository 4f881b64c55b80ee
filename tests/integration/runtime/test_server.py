"""The shared server bootstrap on a real loopback port: health, reflection, auth, metrics, graceful stop."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import Counter

from forgerl.runtime import ServiceConfig, ServiceSpec, placeholder_spec
from forgerl.runtime.client import aio_channel, health_status, insecure_channel
from forgerl.runtime.testing import free_port, serve_in_process
from forgerl.v1 import gateway_pb2, gateway_pb2_grpc, inference_pb2, inference_pb2_grpc

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"
GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"]


def build_gateway(config: ServiceConfig) -> ServiceSpec:
    """The runtime around a service whose RPCs are all placeholders (independent of the real gateway)."""
    return placeholder_spec("gateway", GATEWAY, owner="issue 6")


async def in_thread(function, *args):  # type: ignore[no-untyped-def]
    """Blocking clients run off the event loop that serves them."""
    return await asyncio.to_thread(function, *args)


def reflected_services(address: str, token: str | None = None) -> set[str]:
    with insecure_channel(address, token) as channel:
        return set(ProtoReflectionDescriptorDatabase(channel).get_services())


async def test_health_reflection_and_unimplemented_placeholder() -> None:
    async with serve_in_process(build_gateway(ServiceConfig()), ServiceConfig()) as address:
        assert await in_thread(health_status, address) == "SERVING"
        assert await in_thread(health_status, address, "forgerl.v1.GatewayService") == "SERVING"
        assert await in_thread(health_status, address, "forgerl.v1.NoSuchService") == "SERVICE_UNKNOWN"
        assert {"forgerl.v1.GatewayService", "grpc.health.v1.Health"} <= await in_thread(reflected_services, address)
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await gateway_pb2_grpc.GatewayServiceStub(channel).OpenEpisode(gateway_pb2.OpenEpisodeRequest())
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "issue 6" in (err.value.details() or "")


async def test_token_is_required_when_configured() -> None:
    config = ServiceConfig(auth_token=TOKEN)
    async with serve_in_process(build_gateway(config), config) as address:
        await in_thread(check_token_enforced, address)


def check_token_enforced(address: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        reflected_services(address)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as err:
        reflected_services(address, token="wrong")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "forgerl.v1.GatewayService" in reflected_services(address, token=TOKEN)
    # Health stays open for Kubernetes' probes, which cannot send a token.
    assert health_status(address) == "SERVING"
    with insecure_channel(address, TOKEN) as channel, pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayServiceStub(channel).GetEpisode(gateway_pb2.GetEpisodeRequest())
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # past auth, into the servicer


def echo_spec() -> ServiceSpec:
    """A service with one method of each of the four call kinds, echoing what the caller's metadata said
    about the bearer token, so a test sees what reached the server (independent of the client code)."""

    def seen(context: grpc.aio.ServicerContext) -> bytes:
        return dict(context.invocation_metadata() or ()).get("authorization", "none").encode()

    async def unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return seen(context)

    async def unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield seen(context)

    async def stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        async for _ in requests:
            pass
        return seen(context)

    async def stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield seen(context)

    handlers = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    generic = grpc.method_handlers_generic_handler("forgerl.test.Echo", handlers)
    return ServiceSpec(name="echo", services=[], register=lambda server: server.add_generic_rpc_handlers([generic]))


async def test_aio_channel_sends_the_token_on_every_call_kind() -> None:
    """grpc.aio files a channel interceptor under the first call kind it matches (issue 24: the gateway's
    streaming call to inference went out anonymous); every kind must carry the token through auth."""
    config = ServiceConfig(auth_token=TOKEN)
    async with serve_in_process(echo_spec(), config) as address:
        async with aio_channel(address, TOKEN) as channel:
            one = b"x"
            replies = [
                await channel.unary_unary("/forgerl.test.Echo/UnaryUnary")(one, timeout=10),
                *[r async for r in channel.unary_stream("/forgerl.test.Echo/UnaryStream")(one, timeout=10)],
                await channel.stream_unary("/forgerl.test.Echo/StreamUnary")(iter([one, one]), timeout=10),
                *[r async for r in channel.stream_stream("/forgerl.test.Echo/StreamStream")(iter([one]), timeout=10)],
            ]
        assert replies == [f"Bearer {TOKEN}".encode()] * 4
        async with aio_channel(address) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in anonymous.unary_stream("/forgerl.test.Echo/UnaryStream")(one, timeout=10):
                    pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_metrics_endpoint_counts_rpcs() -> None:
    metrics_port = free_port()
    config = ServiceConfig(metrics_port=metrics_port)
    spec = build_gateway(config)
    Counter("forgerl_toy_events_total", "a service's own metric", registry=spec.metrics).inc(7)
    async with serve_in_process(spec, config) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(3):
                await stub.Check(health_pb2.HealthCheckRequest())
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        body = (await in_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    line = next(x for x in body.splitlines() if x.startswith("forgerl_rpc_total{") and "Health/Check" in x)
    assert line.endswith(" 3.0"), line
    assert "forgerl_toy_events_total 7.0" in body


def scrape(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("metrics_auth", [False, True])
async def test_metrics_take_the_token_only_when_metrics_auth_is_on(metrics_auth: bool) -> None:
    metrics_port = free_port()
    config = ServiceConfig(metrics_port=metrics_port, auth_token=TOKEN, metrics_auth=metrics_auth)
    async with serve_in_process(build_gateway(config), config):
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        anonymous, wrong, right = [await in_thread(scrape, url, token) for token in (None, "wrong", TOKEN)]
    assert right[0] == 200 and "# TYPE forgerl_rpc_total counter" in right[1]
    if metrics_auth:
        assert (anonymous[0], wrong[0]) == (401, 401)
        assert "missing bearer token" in anonymous[1] and "wrong bearer token" in wrong[1]
    else:  # documented as open: the NetworkPolicy decides who reaches the port
        assert (anonymous[0], wrong[0]) == (200, 200)


def test_sigterm_lets_the_in_flight_call_finish_and_exits_zero() -> None:
    port = free_port()
    script = Path(__file__).with_name("slow_service.py")
    server = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--grace-s", "10"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while health_status(address) != "SERVING":
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, "slow service never became SERVING"
            time.sleep(0.1)
        with insecure_channel(address) as channel:
            call = inference_pb2_grpc.InferenceServiceStub(channel).GetStatus.future(
                inference_pb2.GetStatusRequest(), timeout=20
            )
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "in-flight"
            server.send_signal(signal.SIGTERM)
            assert call.result().policy_version == 42
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
