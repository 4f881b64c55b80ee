"""retry_call: repeats UNAVAILABLE with doubling backoff until success or the deadline; nothing else."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from forgerl.runtime.retry import retry_call

pytestmark = pytest.mark.unit


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _failing(times: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> Callable[[], str]:
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise _Error(code)
        return f"ok after {calls['n']}"

    return call


def test_a_peer_back_after_five_failures_is_waited_for_with_doubling_backoff() -> None:
    clock = _Clock()
    result = retry_call(_failing(5), "peer", deadline_s=60, sleep=clock.sleep, clock=lambda: clock.now)
    assert result == "ok after 6"
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]


def test_the_deadline_raises_the_last_error() -> None:
    clock = _Clock()
    with pytest.raises(_Error) as err:
        retry_call(_failing(100), "peer", deadline_s=30, sleep=clock.sleep, clock=lambda: clock.now)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # 0.5 + 1 + 2 + 4 + 8 = 15.5 s, then 10 s (the cap) reaches 25.5 s; another 10 s would pass 30 s.
    assert clock.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_other_codes_are_raised_at_once() -> None:
    clock = _Clock()
    with pytest.raises(_Error):
        retry_call(
            _failing(1, grpc.StatusCode.INVALID_ARGUMENT),
            "peer",
            deadline_s=60,
            sleep=clock.sleep,
            clock=lambda: clock.now,
        )
    assert clock.sleeps == []
