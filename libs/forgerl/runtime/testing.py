"""Helpers for tests: a real server of a service on 127.0.0.1, inside the test's event loop."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from forgerl.runtime.config import ServiceConfig
from forgerl.runtime.server import RunningServer, ServiceSpec, started_server


@asynccontextmanager
async def serve_in_process(spec: ServiceSpec, config: ServiceConfig) -> AsyncIterator[str]:
    """Start `spec` on 127.0.0.1 with a free port (whatever `config.port` says); yield "127.0.0.1:PORT"."""
    config = config.model_copy(update={"host": "127.0.0.1", "port": 0})
    running: RunningServer
    async with started_server(spec, config) as running:
        yield f"127.0.0.1:{running.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the caller binds it next; good enough on loopback in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
