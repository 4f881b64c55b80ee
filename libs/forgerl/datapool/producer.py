"""Publishing trajectories to Kafka, for the gateway and rollout.

    producer = TrajectoryProducer("127.0.0.1:9092", max_lag=20_000)
    producer.send(traj)            # blocks while the data pool is behind (backpressure)
    producer.flush()

Idempotent producer, acks=all, bounded retries (kafka-python retries inside `delivery_timeout_ms`).
Backpressure: `max_lag` bounds the records of a run that the data pool has not settled yet (its
consumer group's committed offsets against what was produced); `send` waits for the pool, up to
`backpressure_timeout_s`, then raises PoolBehindError. Lag is measured at most every `lag_check_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.producer.future import FutureRecordMetadata

from forgerl.datapool.security import KafkaSecurity
from forgerl.datapool.topics import RunTopics, encode_trajectory
from forgerl.v1 import trajectory_pb2

__all__ = ["PoolBehindError", "TrajectoryProducer", "producer_config", "producer_failure"]


class PoolBehindError(RuntimeError):
    """The data pool is too far behind to take more trajectories of this run now; retry later."""


def producer_config(
    bootstrap: str, client_id: str = "forgerl-producer", security: KafkaSecurity | None = None, **overrides: Any
) -> dict[str, Any]:
    """The kafka-python producer settings every ForgeRL producer uses (security: PLAINTEXT when None)."""
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "client_id": client_id,
        **(security or KafkaSecurity()).client_kwargs(),
        "acks": "all",
        "enable_idempotence": True,
        "retries": 10,
        "retry_backoff_ms": 200,
        "delivery_timeout_ms": 60_000,
        "request_timeout_ms": 30_000,
        "max_in_flight_requests_per_connection": 5,
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "max_request_size": 64 * 1024 * 1024,
        # send() blocks this long when the local buffer is full (local backpressure) before it raises.
        "max_block_ms": 60_000,
    }
    config.update(overrides)
    return config


def producer_failure(producer: KafkaProducer | None) -> str | None:
    """Why `producer` can send nothing more (closed, its sender thread gone, or a fatal idempotence error
    such as OutOfOrderSequenceNumber after the broker lost its state), or None while it is usable.
    kafka-python has no public call for this; these are the fields its own send() checks."""
    if producer is None or getattr(producer, "_closed", True):
        return "the Kafka producer is closed"
    sender = getattr(producer, "_sender", None)
    if sender is not None and not sender.is_alive():
        return "the Kafka producer's sender thread stopped"
    transactions = getattr(producer, "_transaction_manager", None)
    if transactions is not None and transactions.has_fatal_error():
        return f"the Kafka producer failed for good: {transactions.last_error!r}"
    return None


class TrajectoryProducer:
    def __init__(
        self,
        bootstrap: str,
        *,
        topic_prefix: str = "forgerl",
        pool_group_id: str = "forgerl-datapool",
        max_lag: int = 0,
        lag_check_s: float = 0.5,
        backpressure_timeout_s: float = 300.0,
        client_id: str = "forgerl-producer",
        security: KafkaSecurity | None = None,
        **kafka_overrides: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.security = security or KafkaSecurity()
        self.topic_prefix = topic_prefix
        self.pool_group_id = pool_group_id
        self.max_lag = max_lag
        self.lag_check_s = lag_check_s
        self.backpressure_timeout_s = backpressure_timeout_s
        self._producer = KafkaProducer(**producer_config(bootstrap, client_id, self.security, **kafka_overrides))
        self._lock = threading.Lock()
        self._lag_lock = threading.Lock()
        self._offsets_reader: KafkaConsumer | None = None
        # Per topic and partition: the offset after the last record this producer wrote.
        self._produced_end: dict[TopicPartition, int] = {}
        self._lag_cache: dict[str, tuple[float, int]] = {}

    # -- sending ----------------------------------------------------------------------------------

    def send(self, traj: trajectory_pb2.Trajectory) -> FutureRecordMetadata:
        """Queue one trajectory (keyed by group_id); waits first while its run's pool is behind."""
        if self.max_lag:
            self.wait_for_pool(traj.run_id)
        key, value, headers = encode_trajectory(traj)
        topic = RunTopics(traj.run_id, self.topic_prefix).trajectories
        future = self._producer.send(topic, key=key, value=value, headers=headers)
        if self.max_lag:  # only backpressure needs to know how far this producer wrote
            future.add_callback(self._record_offset)
        return future

    def send_many(self, trajectories: Iterable[trajectory_pb2.Trajectory], timeout_s: float = 60.0) -> int:
        """Send and wait until every one is acknowledged by the broker; returns how many."""
        futures = [self.send(t) for t in trajectories]
        self._producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=timeout_s)
        return len(futures)

    def flush(self, timeout_s: float | None = None) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        self._producer.close(timeout=timeout_s)
        if self._offsets_reader is not None:
            self._offsets_reader.close(autocommit=False)
            self._offsets_reader = None

    def __enter__(self) -> TrajectoryProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record_offset(self, metadata: Any) -> None:
        tp = TopicPartition(metadata.topic, metadata.partition)
        with self._lock:
            if metadata.offset + 1 > self._produced_end.get(tp, 0):
                self._produced_end[tp] = metadata.offset + 1

    # -- backpressure -----------------------------------------------------------------------------

    def lag(self, run_id: str) -> int:
        """Records on the run's topic that the data pool has not committed past yet.

        The end of each partition is the high watermark of a fetch of its last batch (Tansu's
        ListOffsets alone under-reports it), and never less than what this producer wrote there."""
        topic = RunTopics(run_id, self.topic_prefix).trajectories
        with self._lag_lock:  # the consumer reading offsets is not thread-safe
            if self._offsets_reader is None:
                self._offsets_reader = KafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    **self.security.client_kwargs(),
                    group_id=self.pool_group_id,
                    enable_auto_commit=False,
                    client_id=f"{self._producer.config['client_id']}-lag",
                )
            reader = self._offsets_reader
            partitions = reader.partitions_for_topic(topic)
            if not partitions:
                return 0
            tps = [TopicPartition(topic, p) for p in sorted(partitions)]
            reader.unsubscribe()  # forget the high watermarks of the last check
            reader.assign(tps)
            listed = reader.end_offsets(tps)
            for tp in tps:
                reader.seek(tp, max(0, listed[tp] - 1))
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and any(reader.highwater(tp) is None for tp in tps):
                reader.poll(timeout_ms=100)
            with self._lock:
                produced = dict(self._produced_end)
            lag = 0
            for tp in tps:
                end = max(reader.highwater(tp) or 0, listed[tp], produced.get(tp, 0))
                committed = reader.committed(tp) or 0
                lag += max(0, end - committed)
            return lag

    def _cached_lag(self, run_id: str) -> int:
        now = time.monotonic()
        cached = self._lag_cache.get(run_id)
        if cached is not None and now - cached[0] < self.lag_check_s:
            return cached[1]
        lag = self.lag(run_id)
        self._lag_cache[run_id] = (now, lag)
        return lag

    def wait_for_pool(self, run_id: str) -> None:
        """Block while the run's lag is at max_lag; PoolBehindError after backpressure_timeout_s."""
        deadline = time.monotonic() + self.backpressure_timeout_s
        while self._cached_lag(run_id) >= self.max_lag:
            if time.monotonic() >= deadline:
                raise PoolBehindError(
                    f"the data pool is {self._cached_lag(run_id)} records behind on run {run_id!r} "
                    f"(limit {self.max_lag}) after waiting {self.backpressure_timeout_s:.0f}s"
                )
            time.sleep(self.lag_check_s)
