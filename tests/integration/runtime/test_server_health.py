"""Health tells the truth (issue 24, item 6): a port in use stops the service at start with a message saying
which port and what to do (gRPC's default SO_REUSEPORT let a second server share a port silently, so health
answered for a process that was not ours), and a service's own health check turns it NOT_SERVING and back."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from forgerl.runtime import ServiceConfig, ServiceSpec, started_server
from forgerl.runtime.server import StartupError
from forgerl.runtime.testing import free_port, serve_in_process

pytestmark = pytest.mark.integration


def empty_spec(health_check=None) -> ServiceSpec:  # type: ignore[no-untyped-def]
    return ServiceSpec(name="toy", services=[], register=lambda server: None, health_check=health_check)


@contextmanager
def listening(port: int) -> Iterator[None]:
    """Another process's listener on `port`, as a plain socket with SO_REUSEPORT on (what gRPC servers set)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


async def test_a_grpc_port_in_use_is_a_startup_error_naming_it() -> None:
    foreign = grpc.aio.server()  # another service, gRPC's defaults (SO_REUSEPORT on)
    port = foreign.add_insecure_port("127.0.0.1:0")
    await foreign.start()
    try:
        with pytest.raises(
            StartupError, match=f"toy cannot bind its gRPC port 127.0.0.1:{port}: the address is in use"
        ):
            async with started_server(empty_spec(), ServiceConfig(port=port)):
                pass
    finally:
        await foreign.stop(0)


async def test_a_metrics_port_in_use_is_a_startup_error_naming_it() -> None:
    metrics_port = free_port()
    with listening(metrics_port), pytest.raises(StartupError, match=f"metrics port 127.0.0.1:{metrics_port}"):
        async with started_server(empty_spec(), ServiceConfig(port=0, metrics_port=metrics_port)):
            pass


def test_the_process_exits_2_with_one_line_saying_what_to_do() -> None:
    port = free_port()
    script = Path(__file__).with_name("slow_service.py")
    with listening(port):
        proc = subprocess.run(
            [sys.executable, str(script), "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"forgerl: slow cannot bind its gRPC port 127.0.0.1:{port}: the address is in use by another process; "
        "stop that process (`forgerl down` for a local topology) or choose another --port"
    )
    assert "Traceback" not in proc.stderr


async def test_the_health_check_turns_health_not_serving_and_back() -> None:
    reason: list[str | None] = [None]
    spec = empty_spec(lambda: reason[0])
    async with serve_in_process(spec, ServiceConfig()) as address, grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        async def wait_for(status: int) -> float:
            started = time.monotonic()
            while (await health.Check(health_pb2.HealthCheckRequest())).status != status:
                assert time.monotonic() - started < 10, f"health never became {status}"
                await asyncio.sleep(0.05)
            return time.monotonic() - started

        await wait_for(health_pb2.HealthCheckResponse.SERVING)
        reason[0] = "the engine died"
        took = await wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert took < 2.5  # polled every second
        reason[0] = None
        await wait_for(health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("token", [None, "t0ken"])
async def test_undecodable_requests_are_invalid_argument_not_unknown(token: str | None) -> None:
    """Bytes that are no protobuf message, to a unary method (health) and a streaming one (reflection)."""
    garbage = b"\xff\xff\xff"
    config = ServiceConfig(auth_token=token)
    async with serve_in_process(empty_spec(), config) as address, grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await channel.unary_unary("/grpc.health.v1.Health/Check")(garbage, timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
            async for _ in channel.stream_stream(method)(iter([garbage]), timeout=5):
                pass
        # still serving: a good request after the bad ones
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert unary.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # health takes no token (probes)
    assert "could not be decoded (DecodeError" in (unary.value.details() or "")
    expected = grpc.StatusCode.UNAUTHENTICATED if token else grpc.StatusCode.INVALID_ARGUMENT
    assert stream.value.code() == expected, stream.value.details()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
