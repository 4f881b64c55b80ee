"""The console's ASGI app: the pages, a JSON API under /api/v1, and server-sent events.

Reads are open to whoever reaches the port (the service binds loopback, or sits behind the cluster's
ingress); every mutating call needs the operator token (`Authorization: Bearer <token>`) and names the
operator, whom the audit log records.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from forgerl.evolution.controller import Controller
from forgerl.evolution.records import AnomalyRecord

STATIC = Path(__file__).parent / "static"
# An idle stream still gets a comment line this often, so proxies keep it open and dead clients are found.
HEARTBEAT_S = 15.0


class ConsoleApp:
    def __init__(
        self,
        controller: Controller,
        operator_token: str,
        act: Callable[[AnomalyRecord], Awaitable[str]] | None = None,
    ) -> None:
        """`act` carries out an approved anomaly's action and says what it did."""
        if not operator_token:
            raise ValueError("the console needs an operator token: set operator_token (or auth_token)")
        self.controller = controller
        self.token = operator_token
        self.act = act
        self.closing = asyncio.Event()
        api = [
            Route("/status", self.status),
            Route("/iterations", self.iterations),
            Route("/iterations/{iteration_id}", self.iteration),
            Route("/iterations/{iteration_id}/approve", self.approve, methods=["POST"]),
            Route("/versions", self.versions),
            Route("/versions/{name}", self.version),
            Route("/anomalies", self.anomalies),
            Route("/anomalies/{anomaly_id}/decide", self.decide_anomaly, methods=["POST"]),
            Route("/audit", self.audit),
            Route("/memory", self.memory),
            Route("/control", self.control, methods=["POST"]),
            Route("/rollback", self.rollback, methods=["POST"]),
            Route("/events", self.events),
        ]
        self.app = Starlette(
            routes=[
                Route("/", self.index),
                Mount("/api/v1", routes=api),
                Mount("/static", StaticFiles(directory=STATIC)),
            ],
            exception_handlers={HTTPException: self._http_error, KeyError: self._not_found, ValueError: self._bad},
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    # -- errors and auth ---------------------------------------------------------------------------

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc.args[0]) if exc.args else "not found"}, status_code=404)

    async def _bad(self, request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": str(exc)}, status_code=400)

    async def _operator(self, request: Request) -> tuple[str, dict[str, Any]]:
        """The operator's name and the JSON body; 401 without the operator token."""
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise HTTPException(401, "this call changes the evolution: send the operator token as a Bearer token")
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise HTTPException(400, f"the body is not JSON: {exc}") from None
        operator = str(body.get("operator", "")).strip()
        if not operator:
            raise HTTPException(400, 'name the operator in the body: {"operator": "alice", ...}')
        return operator, body

    # -- pages and reads ---------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.controller.snapshot())

    async def iterations(self, request: Request) -> Response:
        rows = []
        for it in reversed(self.controller.iterations):
            rows.append(
                {
                    "id": it.id, "index": it.index, "base": it.base, "candidate": it.candidate,
                    "state": it.state.value, "proposer": it.proposer, "operator": it.operator,
                    "rationale": it.rationale, "decision": it.decision(),
                    "stages": [s.name for s in it.stages], "created_at": it.created_at, "updated_at": it.updated_at,
                }
            )  # fmt: skip
        return JSONResponse(rows)

    async def iteration(self, request: Request) -> Response:
        it = self.controller.iteration(request.path_params["iteration_id"])
        data = it.to_json()
        data["base_yaml"] = self._yaml(it.base)
        data["candidate_yaml"] = self._yaml(it.candidate) if it.candidate else ""
        return JSONResponse(data)

    def _yaml(self, version: str) -> str:
        config = self.controller.registry.get(version)
        return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)

    async def versions(self, request: Request) -> Response:
        incumbent, versions = self.controller.incumbent, self.controller.versions.values()
        return JSONResponse([{**asdict(v), "incumbent": v.name == incumbent} for v in versions])

    async def version(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.controller.versions:
            raise KeyError(f"unknown scaffold version {name!r}")
        return JSONResponse({**asdict(self.controller.versions[name]), "yaml": self._yaml(name)})

    async def anomalies(self, request: Request) -> Response:
        return JSONResponse([asdict(a) for a in reversed(self.controller.anomalies)])

    async def audit(self, request: Request) -> Response:
        problems = self.controller.audit.verify()
        return JSONResponse(
            {
                "verified": not problems,
                "problems": [asdict(p) for p in problems],
                "entries": list(reversed(self.controller.audit.entries()))[:500],
            }
        )

    async def memory(self, request: Request) -> Response:
        return JSONResponse({"markdown": self.controller.memory.recent(rounds=20)})

    # -- operator actions --------------------------------------------------------------------------

    async def approve(self, request: Request) -> Response:
        operator, body = await self._operator(request)
        it = self.controller.approve(
            request.path_params["iteration_id"], bool(body.get("approve", True)), operator, str(body.get("note", ""))
        )
        # The controller records the decision once its round resumes: wait for that (bounded) so the answer
        # shows the new state.
        for _ in range(200):
            if it.state.value != "awaiting_approval":
                break
            await asyncio.sleep(0.01)
        return JSONResponse(it.to_json())

    async def control(self, request: Request) -> Response:
        operator, body = await self._operator(request)
        action = body.get("action")
        if action == "start":
            self.controller.start(operator)
        elif action == "pause":
            self.controller.pause(operator)
        elif action == "resume":
            self.controller.resume(operator)
        elif action == "halt":
            self.controller.halt(operator, str(body.get("reason", "")) or f"halted by {operator}")
        else:
            raise ValueError(f"unknown action {action!r}: start, pause, resume or halt")
        return JSONResponse(self.controller.snapshot())

    async def rollback(self, request: Request) -> Response:
        operator, body = await self._operator(request)
        self.controller.rollback(str(body.get("version", "")), operator)
        return JSONResponse(self.controller.snapshot())

    async def decide_anomaly(self, request: Request) -> Response:
        operator, body = await self._operator(request)
        record = self.controller.decide_anomaly(request.path_params["anomaly_id"], bool(body.get("approve")), operator)
        if record.status == "approved" and self.act is not None:
            self.controller.anomaly_outcome(record, await self.act(record), operator)
        return JSONResponse(asdict(record))

    # -- live updates ------------------------------------------------------------------------------

    async def events(self, request: Request) -> Response:
        return StreamingResponse(
            self._stream(request),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def _stream(self, request: Request) -> AsyncIterator[str]:
        queue = self.controller.subscribe()
        try:
            yield f"event: status\ndata: {json.dumps(self.controller.snapshot())}\n\n"
            idle = 0.0
            while not self.closing.is_set() and not await request.is_disconnected():
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    idle += 1.0
                    if idle >= HEARTBEAT_S:
                        idle = 0.0
                        yield ": heartbeat\n\n"
                    continue
                idle = 0.0
                yield f"event: {event['kind']}\ndata: {json.dumps(event)}\n\n"
        finally:
            self.controller.unsubscribe(queue)
