"""uvicorn inside a service's event loop: the HTTP face of a gRPC service (the gateway's OpenAI-compatible
API, the evolution service's operator console), started and stopped by the service's lifecycle hooks."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn inside a loop it does not own: the service's runtime handles SIGTERM, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """Serves an ASGI app with uvicorn as a task of the running event loop."""

    def __init__(self, app: Any, host: str, port: int, grace_s: float = 10.0, log_level: str = "warning") -> None:
        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets; without it Nagle's algorithm holds
        # a response body behind its headers until the client's delayed ACK (~40 ms per request).
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
            timeout_keep_alive=30,
        )
        self.server = _Server(config)
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's base (the gateway's)."""
        return f"{self.url}/v1"

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it did not start
                raise RuntimeError("the HTTP server stopped before it started")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None
        self.sock.close()
