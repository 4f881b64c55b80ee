"""The asyncio gRPC server every ForgeRL service runs on.

One bootstrap gives each service the standard health service, server reflection, Prometheus metrics,
structured logs, an optional bearer token and graceful shutdown: on SIGTERM the health status turns
NOT_SERVING, new calls are refused, in-flight calls get `grace_s` to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from forgerl.runtime.config import ServiceConfig
from forgerl.runtime.interceptors import AuthInterceptor, MetricsInterceptor
from forgerl.runtime.logs import configure_logging
from forgerl.runtime.metrics_http import start_metrics_server

# Trajectories with long prompts and routed-expert ids run to tens of MB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# How often a service's own health check runs: well inside Kubernetes' default probe period of 10 s.
HEALTH_POLL_S = 1.0

logger = structlog.get_logger(__name__)


class StartupError(RuntimeError):
    """The server could not start (a port in use); the message says which and what to do."""


@dataclass
class ServiceSpec:
    """What a service contributes to the shared server: its gRPC services and lifecycle hooks."""

    name: str
    services: Sequence[ServiceDescriptor]
    register: Callable[[grpc.aio.Server], None]
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    extra_names: list[str] = field(default_factory=list)
    # Why the service cannot work right now (its engine died, its Kafka producer failed for good), or None;
    # polled while it serves, so health says NOT_SERVING when a dependency it cannot work without is gone.
    health_check: Callable[[], str | None] | None = None
    # The service's own Prometheus metrics; the server adds its RPC metrics and serves them on /metrics.
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def service_names(self) -> list[str]:
        return [descriptor.full_name for descriptor in self.services] + self.extra_names


@dataclass
class RunningServer:
    """A started server: its bound port and the means to stop it."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    spec: ServiceSpec

    async def watch_health(self, check: Callable[[], str | None]) -> None:
        """Poll `check` and report NOT_SERVING while it names a reason (and SERVING again once it is None)."""
        failing: str | None = None
        while True:
            reason = check()
            if reason != failing:
                if reason is None:
                    logger.info("health restored", service=self.spec.name)
                else:
                    logger.error("not serving", service=self.spec.name, reason=reason)
                await self.set_serving(reason is None)
                failing = reason
            await asyncio.sleep(HEALTH_POLL_S)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.spec.service_names]:
            await self.health.set(name, status)


@asynccontextmanager
async def started_server(spec: ServiceSpec, config: ServiceConfig) -> AsyncIterator[RunningServer]:
    """Start the server, run `on_start`, report SERVING; on exit drain for `grace_s` and run `on_stop`."""
    registry = spec.metrics
    interceptors: list[grpc.aio.ServerInterceptor] = [MetricsInterceptor(registry, spec.name)]
    if config.auth_token:
        interceptors.insert(0, AuthInterceptor(config.auth_token))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT by default: a second server on a port in use binds without an error and
            # the kernel splits calls between the two, so health answered for a process that was not ours.
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    spec.register(server)
    reflection.enable_server_reflection([*spec.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = _bind(server, spec.name, config)
    running = RunningServer(server, port, health_servicer, spec)
    await running.set_serving(False)
    metrics_http = _start_metrics(spec.name, config, registry)
    await server.start()
    watcher: asyncio.Task[None] | None = None
    try:
        if spec.on_start is not None:
            await spec.on_start()
        await running.set_serving(True)
        if spec.health_check is not None:
            watcher = asyncio.create_task(running.watch_health(spec.health_check))
        yield running
    finally:
        if watcher is not None:
            watcher.cancel()
        await running.set_serving(False)
        await server.stop(config.grace_s)
        if spec.on_stop is not None:
            await spec.on_stop()
        if metrics_http is not None:
            metrics_http.shutdown()


async def serve(spec: ServiceSpec, config: ServiceConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set or the process gets SIGTERM/SIGINT."""
    log = configure_logging(spec.name, config.log_level, config.log_format)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with suppress(NotImplementedError, RuntimeError):  # not the main thread: the caller stops us
            loop.add_signal_handler(sig, stop.set)
    async with started_server(spec, config) as running:
        log.info("serving", host=config.host, port=running.port, services=spec.service_names)
        await stop.wait()
        log.info("draining", grace_s=config.grace_s)
    log.info("stopped")


def run_service(spec: ServiceSpec | Callable[[], ServiceSpec], config: ServiceConfig) -> None:
    """Blocking entry point of a service process; returns (exit code 0) after a graceful stop.

    Pass a factory when building the service creates asyncio objects (grpc.aio channels to its peers):
    it is called inside the event loop the server runs on, so those objects belong to that loop.
    """

    async def main() -> None:
        await serve(spec() if callable(spec) else spec, config)

    try:
        asyncio.run(main())
    except StartupError as err:  # one line saying what to do, not a traceback
        print(f"forgerl: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _bind(server: grpc.aio.Server, name: str, config: ServiceConfig) -> int:
    try:
        return int(server.add_insecure_port(f"{config.host}:{config.port}"))
    except RuntimeError:
        raise StartupError(_in_use(name, "gRPC", config.host, config.port, "--port")) from None


def _start_metrics(name: str, config: ServiceConfig, registry: CollectorRegistry) -> WSGIServer | None:
    if not config.metrics_port:
        return None
    token = config.auth_token if config.metrics_auth else None
    try:
        return start_metrics_server(config.host, config.metrics_port, registry, token)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        raise StartupError(_in_use(name, "metrics", config.host, config.metrics_port, "--metrics-port")) from None


def _in_use(name: str, what: str, host: str, port: int, flag: str) -> str:
    return (
        f"{name} cannot bind its {what} port {host}:{port}: the address is in use by another process; "
        f"stop that process (`forgerl down` for a local topology) or choose another {flag}"
    )
