"""Calls that wait for a peer that is restarting, instead of failing the work that needed it.

    resp = retry_call(lambda: stub.FetchBatch(request, timeout=150), "data pool FetchBatch", deadline_s=600)

A peer being replaced (a Deployment's new pod, the local supervisor's restart) answers UNAVAILABLE until it
serves again: the call is repeated with exponential backoff (0.5 s doubling to 10 s) until it succeeds, it
fails otherwise, or `deadline_s` has passed since the first try; then the last error is raised. Only calls
that are safe to repeat should go through it (reads, idempotent writes, calls the peer dedups).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import TypeVar

import grpc

log = logging.getLogger("forgerl.retry")

T = TypeVar("T")

# A peer that is down or restarting; other codes say something about the request and are not retried.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})
BACKOFF_S = (0.5, 10.0)


def retry_call(
    call: Callable[[], T],
    what: str,
    deadline_s: float,
    *,
    retry_on: Collection[grpc.StatusCode] = RETRYABLE,
    backoff_s: tuple[float, float] = BACKOFF_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """`call()`, repeated while it raises a grpc.RpcError whose code is in `retry_on`, up to `deadline_s`."""
    started = clock()
    delay = backoff_s[0]
    attempt = 1
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            waited = clock() - started
            if code not in retry_on or waited + delay > deadline_s:
                raise
            log.warning("%s: %s (attempt %d, %.0f s so far); retrying in %.1f s", what, code, attempt, waited, delay)
        sleep(delay)
        delay = min(backoff_s[1], delay * 2)
        attempt += 1
