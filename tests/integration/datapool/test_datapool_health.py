"""The data pool's health follows its Kafka producer (issue 24, item 6): SERVING while the producer can send,
NOT_SERVING once it failed for good (kafka-python's fatal idempotence state, entered as its sender does on
OutOfOrderSequenceNumber after a broker lost its state) or was closed."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka.errors import KafkaError

from forgerl.datapool.manager import DataPool
from forgerl.runtime.testing import serve_in_process
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.main import build

pytestmark = pytest.mark.integration


async def _status(health: health_pb2_grpc.HealthStub) -> int:
    return int((await health.Check(health_pb2.HealthCheckRequest(service="forgerl.v1.DatapoolService"))).status)


async def _wait_for(health: health_pb2_grpc.HealthStub, status: int) -> None:
    deadline = time.monotonic() + 10
    while await _status(health) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("breakage", ["fatal", "closed"])
async def test_health_is_not_serving_once_the_producer_is_unusable(broker, tmp_path, breakage: str) -> None:
    config = DatapoolConfig(kafka_bootstrap=broker.bootstrap, run_policy_from_store=False, state_dir=tmp_path)
    spec = build(config)
    pool = spec.health_check.__self__  # type: ignore[union-attr]
    assert isinstance(pool, DataPool)
    async with serve_in_process(spec, config) as address, grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert await _status(health) == health_pb2.HealthCheckResponse.SERVING
        producer = pool._producer
        assert producer is not None
        if breakage == "fatal":
            producer._transaction_manager.transition_to_fatal_error(KafkaError("OutOfOrderSequenceNumber"))
        else:
            await asyncio.to_thread(producer.close, 5)
        await _wait_for(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        reason = pool.failure()
    assert reason is not None and ("failed for good" in reason if breakage == "fatal" else "closed" in reason)
