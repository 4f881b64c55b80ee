"""Rollout's close of an episode whose trajectory the gateway could not hand to the data pool (UNAVAILABLE:
the pool or its broker restarting; the episode stays open) is repeated until it is written, not the
episode run again or failed; an episode the gateway lost meanwhile is run again (InfraError)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from forgerl.rollout import episode as episode_module
from forgerl.rollout.episode import EpisodeError, GrpcGateway, InfraError
from forgerl.v1 import gateway_pb2, trajectory_pb2

pytestmark = pytest.mark.unit


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class _Stub:
    """CloseEpisode answers the given errors in turn, then the trajectory."""

    def __init__(self, errors: list[grpc.aio.AioRpcError]) -> None:
        self.errors = errors
        self.calls = 0

    async def CloseEpisode(self, request: gateway_pb2.CloseEpisodeRequest, **_: Any) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return gateway_pb2.CloseEpisodeResponse(trajectory=trajectory_pb2.Trajectory(trajectory_id="t-1"))


async def _close(stub: _Stub, monkeypatch: pytest.MonkeyPatch, deadline_s: float = 120.0) -> list[float]:
    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(episode_module.asyncio, "sleep", no_sleep)
    gateway = GrpcGateway(grpc.aio.insecure_channel("127.0.0.1:1"), close_deadline_s=deadline_s)
    gateway.stub = stub  # type: ignore[assignment]
    trajectory = await gateway.close(
        "key", step_rewards=[], reward=trajectory_pb2.RewardComponents(), success=True,
        wall_clock_s=1.0, baseline_s=1.0, publish=True,
    )  # fmt: skip
    assert trajectory.trajectory_id == "t-1"
    return waits


async def test_a_close_the_pool_could_not_take_is_repeated_until_written(monkeypatch: pytest.MonkeyPatch) -> None:
    unavailable = [_error(grpc.StatusCode.UNAVAILABLE, "the data pool did not take the trajectory")] * 3
    stub = _Stub(list(unavailable))
    assert await _close(stub, monkeypatch) == [0.5, 1.0, 2.0]
    assert stub.calls == 4


async def test_an_episode_the_gateway_lost_meanwhile_is_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    errors = [_error(grpc.StatusCode.UNAVAILABLE, "gateway down"), _error(grpc.StatusCode.NOT_FOUND, "unknown key")]
    with pytest.raises(InfraError, match="lost the episode"):
        await _close(_Stub(errors), monkeypatch)


async def test_a_refused_close_fails_at_once_and_the_deadline_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(EpisodeError):
        await _close(_Stub([_error(grpc.StatusCode.INVALID_ARGUMENT, "no such turn")]), monkeypatch)
    with pytest.raises(InfraError):  # 0.5 s would pass a deadline of 0.1 s: the first error is raised
        await _close(_Stub([_error(grpc.StatusCode.UNAVAILABLE, "down")] * 2), monkeypatch, deadline_s=0.1)
