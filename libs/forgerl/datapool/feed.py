"""The Kafka side of one run in the data pool (kafka-python, blocking: it runs in its own threads).

- a consumer thread reads the run's trajectory topic from the committed offsets, with all partitions
  assigned by the pool itself (no group membership, so no rebalances), decodes each record, sends what
  cannot be decoded to the dead-letter topic and hands the rest to the `RunPool`;
- `ack()` and `flush_and_commit()` (called from one ack thread) write the pool's log records to the
  state topic, wait for them (acks=all), then commit the offsets below which everything is settled;
- `open()` rebuilds the pool from the committed offsets and the state topic before consuming.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from forgerl.datapool.pool import RunPool
from forgerl.datapool.security import KafkaSecurity
from forgerl.datapool.topics import DecodeError, RunTopics, TrajectoryIndex, decode_index

__all__ = ["FeedError", "KafkaSettings", "RunFeed", "ensure_topics", "read_to_end"]

log = logging.getLogger("forgerl.datapool")


class FeedError(RuntimeError):
    pass


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap: str = "127.0.0.1:9092"
    group_id: str = "forgerl-datapool"
    topic_prefix: str = "forgerl"
    partitions: int = 4
    client_id: str = "forgerl-datapool"
    request_timeout_s: float = 30.0
    # Largest trajectory the pool reads in one fetch per partition (bigger ones still arrive, alone).
    max_partition_fetch_bytes: int = 16 * 1024 * 1024
    # Parse every trajectory in full before queueing it (else: its envelope, see topics.decode_index).
    full_validation: bool = False
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def connection(self, client_id: str | None = None) -> dict[str, Any]:
        """What every kafka-python client of the pool is built with: bootstrap, client id, security."""
        return {
            "bootstrap_servers": self.bootstrap,
            "client_id": client_id or self.client_id,
            **self.security.client_kwargs(),
        }


def ensure_topics(admin: KafkaAdminClient, topics: dict[str, int]) -> None:
    """Create the topics (name -> partitions) that do not exist yet."""
    existing = set(admin.list_topics())
    missing = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
    if not missing:
        return
    with contextlib.suppress(TopicAlreadyExistsError):
        admin.create_topics(missing)


def read_to_end(consumer: KafkaConsumer, tp: TopicPartition, timeout_s: float = 60.0) -> list[Any]:
    """Every record of one partition from the beginning to its current end.

    The end is the high watermark of fetch responses (Tansu's ListOffsets answers the last batch's base
    offset + 1, too low when that batch holds several records)."""
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = consumer.poll(timeout_ms=200)
        for recs in batch.values():
            records.extend(recs)
        hw = consumer.highwater(tp)
        if hw is not None and consumer.position(tp) >= hw:
            return records
    raise FeedError(f"could not read {tp.topic} to its end within {timeout_s:.0f}s")


class RunFeed:
    """Kafka plumbing of one run; the caller holds `lock` around every use of `pool`."""

    def __init__(
        self,
        run_id: str,
        settings: KafkaSettings,
        pool: RunPool,
        lock: threading.Lock,
        producer: KafkaProducer,
        on_data: Callable[[], None] = lambda: None,
        on_dead_letter: Callable[[str, str], None] = lambda run_id, reason: None,
    ) -> None:
        self.run_id = run_id
        self.settings = settings
        self.topics = RunTopics(run_id, settings.topic_prefix)
        self.pool = pool
        self.lock = lock
        self.producer = producer
        self.on_data = on_data
        self.on_dead_letter = on_dead_letter
        self._consumer: KafkaConsumer | None = None
        self._committer: KafkaConsumer | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._highwater: dict[int, int] = {}
        self.partitions: list[int] = []
        self.error: BaseException | None = None

    def _consumer_config(self, **extra: Any) -> dict[str, Any]:
        return {
            **self.settings.connection(),
            "enable_auto_commit": False,
            "auto_offset_reset": "earliest",
            "request_timeout_ms": int(self.settings.request_timeout_s * 1000),
            **extra,
        }

    # -- lifecycle --------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the topics, rebuild the pool from Kafka, start consuming (blocking)."""
        admin = KafkaAdminClient(**self.settings.connection(f"{self.settings.client_id}-admin"))
        try:
            ensure_topics(
                admin,
                {
                    self.topics.trajectories: self.settings.partitions,
                    self.topics.dead_letter: 1,
                    self.topics.state: 1,
                },
            )
        finally:
            admin.close()
        self._committer = KafkaConsumer(**self._consumer_config(group_id=self.settings.group_id))
        partitions = self._wait_partitions(self._committer, self.topics.trajectories)
        self.partitions = sorted(partitions)
        tps = [TopicPartition(self.topics.trajectories, p) for p in self.partitions]
        committed: dict[int, int] = {}
        for tp in tps:
            offset = self._committer.committed(tp)
            committed[tp.partition] = int(offset) if offset is not None else 0
        state_reader = KafkaConsumer(**self._consumer_config())
        try:
            raw = read_to_end(state_reader, TopicPartition(self.topics.state, 0))
        finally:
            state_reader.close()
        records = []
        for rec in raw:
            try:
                records.append(json.loads(rec.value))
            except (ValueError, TypeError):
                log.warning("unreadable state record", extra={"run_id": self.run_id, "offset": rec.offset})
        with self.lock:
            self.pool.restore(committed, records)
        consumer = KafkaConsumer(
            **self._consumer_config(
                group_id=self.settings.group_id,
                max_partition_fetch_bytes=self.settings.max_partition_fetch_bytes,
                fetch_max_bytes=max(64 * 1024 * 1024, self.settings.max_partition_fetch_bytes),
            )
        )
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, committed[tp.partition])
        self._consumer = consumer
        log.info(
            "run opened",
            extra={
                "run_id": self.run_id,
                "committed": committed,
                "state_records": len(records),
                "acknowledged": self.pool.counters.acknowledged,
            },
        )
        self._thread = threading.Thread(target=self._loop, name=f"datapool-{self.run_id}", daemon=True)
        self._thread.start()

    def _wait_partitions(self, consumer: KafkaConsumer, topic: str, timeout_s: float = 30.0) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts:
                return set(parts)
            consumer.topics()  # refresh metadata
            time.sleep(0.1)
        raise FeedError(f"topic {topic} has no partitions after {timeout_s:.0f}s")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for client in (self._consumer, self._committer):
            if client is not None:
                try:
                    client.close(autocommit=False)
                except Exception:  # pragma: no cover - best effort on shutdown
                    log.debug("consumer close failed", exc_info=True)
        self._consumer = self._committer = None

    # -- consuming --------------------------------------------------------------------------------

    def _loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                polled = consumer.poll(timeout_ms=100, max_records=2000)
                if polled:
                    self._handle(polled)
                for p in self.partitions:
                    hw = consumer.highwater(TopicPartition(self.topics.trajectories, p))
                    if hw is not None:
                        self._highwater[p] = hw
        except Exception as exc:  # surfaced by the manager (Stats, FetchBatch)
            if not self._stop.is_set():
                self.error = exc
                log.exception("consumer of run %s failed", self.run_id)

    def _handle(self, polled: dict[TopicPartition, list[Any]]) -> None:
        # Decode outside the lock; hand over in offset order (the pool expects offsets to increase).
        items: list[tuple[int, int, TrajectoryIndex | None, bytes, str]] = []
        for tp, recs in polled.items():
            for rec in recs:
                try:
                    index = decode_index(rec.value, self.run_id, full=self.settings.full_validation)
                except DecodeError as exc:
                    self._dead_letter(rec, exc)
                    items.append((tp.partition, rec.offset, None, b"", exc.reason))
                    continue
                items.append((tp.partition, rec.offset, index, rec.value, ""))
        queued = 0
        with self.lock:
            for p, o, found, payload, reason in items:
                if found is None:
                    self.pool.dead_lettered(p, o, reason)
                elif self.pool.offer(p, o, found, payload) in ("queued", "skipped_seq"):
                    queued += 1  # a skip marker may open the window to trajectories already here
        if queued:
            self.on_data()

    def _dead_letter(self, rec: Any, exc: DecodeError) -> None:
        headers = [
            ("forgerl-dlq-reason", exc.reason.encode()),
            ("forgerl-dlq-detail", str(exc.detail)[:500].encode()),
            ("forgerl-source-topic", rec.topic.encode()),
            ("forgerl-source-partition", str(rec.partition).encode()),
            ("forgerl-source-offset", str(rec.offset).encode()),
        ]
        self.producer.send(self.topics.dead_letter, key=rec.key, value=rec.value or b"", headers=headers)
        log.warning(
            "dead-lettered a record of run %s at %s[%d]@%d: %s",
            self.run_id,
            rec.topic,
            rec.partition,
            rec.offset,
            exc,
            extra={"run_id": self.run_id, "reason": exc.reason, "dead_letter_topic": self.topics.dead_letter},
        )
        self.on_dead_letter(self.run_id, exc.reason)

    # -- acknowledging and committing (one thread) ------------------------------------------------

    def _write_log(self, records: list[dict[str, Any]]) -> None:
        futures = [
            self.producer.send(self.topics.state, value=json.dumps(r, separators=(",", ":")).encode()) for r in records
        ]
        self.producer.flush(timeout=self.settings.request_timeout_s)
        for future in futures:
            future.get(timeout=self.settings.request_timeout_s)

    def ack(self, batch_id: str, commit: bool = True) -> int:
        """Acknowledge a served batch: log it durably, settle it, commit (or leave the commit to the
        next `flush_and_commit`: the log already makes the Ack durable). Returns how many were
        acknowledged (0 for a batch acknowledged before). Raises pool.AckError."""
        with self.lock:
            reserved = self.pool.begin_ack(batch_id)
            settle = self.pool.drain_log()
        if reserved is None:
            if settle is not None:
                self._write_settle(settle)
            return 0
        batch, record = reserved
        try:
            self._write_log([*([settle] if settle else []), record])
        except Exception:
            with self.lock:
                self.pool.abort_ack(batch)
            if settle is not None:
                self._requeue_settle(settle)
            raise
        with self.lock:
            n = self.pool.finish_ack(batch)
        if commit:
            self._commit()
        return n

    def _write_settle(self, settle: dict[str, Any]) -> None:
        try:
            self._write_log([settle])
        except Exception:
            self._requeue_settle(settle)
            raise

    def _requeue_settle(self, settle: dict[str, Any]) -> None:
        with self.lock:
            self.pool._log[:0] = [{"p": p, "o": o, "id": i, "r": r} for p, o, i, r in settle["i"]]

    def flush_and_commit(self) -> None:
        """Write pending drop records and commit what is settled (periodic housekeeping)."""
        with self.lock:
            settle = self.pool.drain_log()
        if settle is not None:
            self._write_settle(settle)
        self._commit()

    def _commit(self) -> None:
        with self.lock:
            offsets = self.pool.committable()
        if not offsets or self._committer is None:
            return
        # Dead-lettered records must be on their topic before their offsets are passed.
        self.producer.flush(timeout=self.settings.request_timeout_s)
        self._committer.commit(
            {TopicPartition(self.topics.trajectories, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()}
        )
        with self.lock:
            self.pool.mark_committed(offsets)

    # -- introspection ----------------------------------------------------------------------------

    def lag(self) -> int:
        """Records on the trajectory topic past the committed offsets."""
        with self.lock:
            committed = self.pool.committed_offsets()
        return sum(max(0, hw - committed.get(p, 0)) for p, hw in self._highwater.items())
