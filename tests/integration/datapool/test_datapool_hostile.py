"""Hostile requests to the data pool on a real Tansu broker (issue 24, item 7): GetPoolStats of unknown runs is
NOT_FOUND and creates no topic (20 unknown runs created 60 topics and 81 threads), and a property-based test
sends random and mutated requests to every method: only clean statuses, and the pool still serves."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from kafka import KafkaAdminClient

from forgerl.runtime.fuzz import fuzz_service
from forgerl.runtime.testing import serve_in_process, serve_in_thread
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.main import build
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc

pytestmark = pytest.mark.integration

SERVICE = datapool_pb2.DESCRIPTOR.services_by_name["DatapoolService"]


@pytest.fixture(scope="module")
def pool_address(broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    config = DatapoolConfig(
        kafka_bootstrap=broker.bootstrap,
        run_policy_from_store=False,
        state_dir=tmp_path_factory.mktemp("pool"),
        grace_s=1.0,
        log_level="warning",
    )
    with serve_in_thread(lambda: serve_in_process(build(config), config)) as address:
        yield address


def _topics(bootstrap: str) -> set[str]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="test-topics")
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


def test_stats_of_unknown_runs_are_not_found_and_create_nothing(broker, pool_address: str, make_traj) -> None:
    with grpc.insecure_channel(pool_address) as channel:
        stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
        before_topics, before_threads = _topics(broker.bootstrap), threading.active_count()
        for i in range(20):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=f"no-such-run-{i}"), timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert "unknown to the data pool" in err.value.details()
        assert _topics(broker.bootstrap) == before_topics
        assert threading.active_count() <= before_threads + 2  # the lookup client, once
        # a run the pool holds answers as before
        stub.PutTrajectories(datapool_pb2.PutTrajectoriesRequest(trajectories=[make_traj("known-run", 0)]), timeout=30)
        stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id="known-run"), timeout=30)  # OK, not NOT_FOUND


def test_random_requests_get_clean_statuses(pool_address: str) -> None:
    with grpc.insecure_channel(pool_address) as channel:
        seen = fuzz_service(channel, SERVICE, max_examples=80, timeout_s=60)  # opening a run joins a group
    codes = {key.split()[1] for key in seen}
    assert "INVALID_ARGUMENT" in codes, seen
