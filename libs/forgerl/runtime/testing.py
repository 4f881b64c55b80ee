"""Helpers for tests: a real server of a service on 127.0.0.1, inside the test's event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from typing import TypeVar

from forgerl.runtime.config import ServiceConfig
from forgerl.runtime.server import RunningServer, ServiceSpec, started_server

T = TypeVar("T")


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


@contextmanager
def serve_in_thread(factory: Callable[[], AbstractAsyncContextManager[T]]) -> Iterator[T]:
    """Run the async context manager that `factory` builds (called on the new loop, so what it creates belongs
    to it: `lambda: serve_in_process(build(config), config)`) on an event loop of its own thread; yield what
    it yields (an address). For blocking tests, such as
    hypothesis' property tests, that cannot await."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="serve-in-thread", daemon=True)
    thread.start()
    entered = asyncio.run_coroutine_threadsafe(_enter(factory), loop).result(timeout=120)
    manager, address = entered
    try:
        yield address
    finally:
        asyncio.run_coroutine_threadsafe(manager.__aexit__(None, None, None), loop).result(timeout=120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()


async def _enter(factory: Callable[[], AbstractAsyncContextManager[T]]) -> tuple[AbstractAsyncContextManager[T], T]:
    manager = factory()
    return manager, await manager.__aenter__()
