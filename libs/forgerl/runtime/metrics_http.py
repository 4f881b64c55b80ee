"""The Prometheus `/metrics` endpoint, optionally behind the same bearer token as the gRPC API.

Open by default, as Prometheus scrapes in a cluster usually are (the NetworkPolicy decides who may reach
the port); with `metrics_auth` on, a scrape needs `authorization: Bearer <token>` (Prometheus'
`authorization: {credentials: ...}` scrape setting) and anything else is answered 401.
"""

from __future__ import annotations

import hmac
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every 15 s would flood stderr; the service's structured log is the place for events."""


def token_protected(app: WsgiApp, token: str) -> WsgiApp:
    """`app`, answering 401 to any request without `authorization: Bearer <token>`."""
    expected = f"Bearer {token}".encode()

    def protected(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        given = str(environ.get("HTTP_AUTHORIZATION", "")).encode()
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        reason = "missing" if not given else "wrong"
        body = f"{reason} bearer token: metrics_auth is on; send 'authorization: Bearer <FORGERL_AUTH_TOKEN>'\n"
        start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
        return [body.encode()]

    return protected


def start_metrics_server(host: str, port: int, registry: CollectorRegistry, token: str | None) -> WSGIServer:
    """Serve `registry` on http://host:port/metrics in a daemon thread; with `token`, only to its bearer."""
    app: WsgiApp = make_wsgi_app(registry)
    if token is not None:
        app = token_protected(app, token)
    server = make_server(host, port, app, _ThreadingWSGIServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
