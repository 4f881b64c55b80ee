"""The tracking sink: one interface the trainer logs a run to, whatever backends are on.

    tracking = Tracking([("tensorboard", lambda: TensorBoardTracker(logdir))])
    tracking.log_params(flatten_config(config))
    tracking.log_metrics(step, {"loss": 0.3})     # returns at once: a thread of its own writes
    tracking.close("FINISHED")                    # waits (bounded) until every backend has everything

Tracking never fails or stalls a run: the backends are opened and written by one thread behind a queue
(MLflow's import and first SQLite migration took 90 s on a loaded 2-core box), and a backend that raises
is logged once and dropped for the rest of the run. The run store stays the record; the backends are views.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from google.protobuf import json_format
from google.protobuf.message import Message

from forgerl.v1 import run_pb2

log = logging.getLogger("forgerl.trainer.tracking")

CLOSE_TIMEOUT_S = 120.0  # a backend still opening after this long is left behind, with a warning


class Tracker(Protocol):
    """One tracking backend. `close` takes MLflow's run status vocabulary: FINISHED, FAILED or KILLED."""

    name: str

    def log_params(self, params: Mapping[str, str]) -> None: ...

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None: ...

    def log_checkpoint(self, checkpoint: run_pb2.Checkpoint) -> None: ...

    def close(self, status: str) -> None: ...


def flatten_config(config: Message) -> dict[str, str]:
    """A RunConfig as `section.field` -> value text, every field (defaults and unset sections too) so that
    runs compare key by key; an unset `optional` field is left out. Strings stay as they are; numbers,
    booleans and lists are JSON ("3", "true", "[1, 2]")."""
    full = type(config)()
    full.CopyFrom(config)
    _set_sections(full)
    tree = json_format.MessageToDict(full, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node if isinstance(node, str) else json.dumps(node)

    walk("", tree)
    return flat


def _set_sections(message: Message) -> None:
    """Mark every singular sub-message present, so that MessageToDict prints its defaults too."""
    for field in message.DESCRIPTOR.fields:
        if field.message_type is not None and not field.is_repeated and field.containing_oneof is None:
            section = getattr(message, field.name)
            section.SetInParent()
            _set_sections(section)


Call = Callable[[Tracker], None]


class Tracking:
    """Backends behind one queue and one writer thread. `openers` are (name, factory) pairs, opened by that
    thread in order; a factory or a call that raises disables its backend (logged once)."""

    def __init__(self, openers: Sequence[tuple[str, Callable[[], Tracker]]]) -> None:
        self.disabled: list[str] = []  # names of the backends that failed, in order
        self._openers = list(openers)
        self._queue: queue.Queue[tuple[str, Call] | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="tracking", daemon=True)
        self._thread.start()

    def log_params(self, params: Mapping[str, str]) -> None:
        params = dict(params)
        self._put("log_params", lambda backend: backend.log_params(params))

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        values = dict(values)
        self._put("log_metrics", lambda backend: backend.log_metrics(step, values))

    def log_checkpoint(self, checkpoint: run_pb2.Checkpoint) -> None:
        self._put("log_checkpoint", lambda backend: backend.log_checkpoint(checkpoint))

    def close(self, status: str = "FINISHED", timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close every backend with `status` and wait for the writer, at most `timeout_s`. Idempotent."""
        if not self._closed:
            self._put("close", lambda backend: backend.close(status))
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("tracking still writing after %.0f s; left behind (the run store has every metric)", timeout_s)

    def _put(self, what: str, call: Call) -> None:
        if not self._closed:
            self._queue.put((what, call))

    def _work(self) -> None:
        backends: list[Tracker] = []
        for name, opener in self._openers:
            try:
                backends.append(opener())
            except Exception:
                self._disable(name, "open")
        while (item := self._queue.get()) is not None:
            what, call = item
            for backend in list(backends):
                try:
                    call(backend)
                except Exception:
                    backends.remove(backend)
                    self._disable(backend.name, what)

    def _disable(self, name: str, what: str) -> None:
        log.exception("tracking backend %s failed in %s: disabled for the rest of this run", name, what)
        self.disabled.append(name)
