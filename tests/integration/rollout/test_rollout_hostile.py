"""Hostile requests to rollout (issue 24, item 7): one Submit and the queue are bounded (RESOURCE_EXHAUSTED
naming the limit; a group_size of 200,000 over a split blocked the event loop and grew rollout past 4 GB),
and a property-based test sends random and mutated requests to every method: only clean statuses, and
rollout still serves. Real local sandboxes; the gateway and data pool addresses lead nowhere (free ports)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from forgerl.rollout.tasks import get_suite
from forgerl.runtime.fuzz import fuzz_service
from forgerl.runtime.testing import free_port, serve_in_process, serve_in_thread
from forgerl.services.rollout.config import RolloutConfig
from forgerl.services.rollout.main import build
from forgerl.v1 import rollout_pb2, rollout_pb2_grpc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
SERVICE = rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]


@pytest.fixture
def rollout(tmp_path: Path, sandbox_root: Path) -> Iterator[str]:
    config = RolloutConfig(
        state_dir=tmp_path,
        sandbox_root=str(sandbox_root),
        gateway_address=f"127.0.0.1:{free_port()}",
        datapool_address="",
        max_in_flight=1,
        max_attempts=1,
        max_submit_episodes=8,
        max_queued_episodes=12,
        log_level="warning",
    )
    with serve_in_thread(lambda: serve_in_process(build(config), config)) as address:
        yield address


def test_submit_and_queue_are_bounded(rollout: str) -> None:
    tasks = [t.id for t in get_suite("tooluse").tasks("train")[:4]]
    with grpc.insecure_channel(rollout) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)

        def submit(group_size: int, task_ids: list[str] = tasks) -> rollout_pb2.SubmitResponse:
            request = rollout_pb2.SubmitRequest(
                run_id="bounded", suite="tooluse", split="train", task_ids=task_ids, group_size=group_size
            )
            return stub.Submit(request, timeout=30)

        for group_size, whole_split in ((3, False), (200_000, True)):
            with pytest.raises(grpc.RpcError) as err:
                submit(group_size, [] if whole_split else tasks)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "one Submit takes at most 8 (max_submit_episodes)" in err.value.details()
        assert submit(2).episodes == 8  # 4 tasks x 2: at the limit
        with pytest.raises(grpc.RpcError) as err:  # one runs at a time: >= 6 still queued, 8 more do not fit
            submit(2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "takes at most 12 (max_queued_episodes)" in err.value.details()
        stats = stub.GetRolloutStats(rollout_pb2.GetRolloutStatsRequest(run_id="bounded"), timeout=10)
    assert stats.queued + stats.in_flight + stats.finished + stats.failed <= 8, stats


def test_random_requests_get_clean_statuses(rollout: str) -> None:
    with grpc.insecure_channel(rollout) as channel:
        # the event stream of a run is a subscription: it waits for events until the caller's deadline
        seen = fuzz_service(channel, SERVICE, max_examples=80, timeout_s=3, subscriptions=["StreamEpisodeEvents"])
    codes = {key.split()[1] for key in seen}
    assert "INVALID_ARGUMENT" in codes, seen
