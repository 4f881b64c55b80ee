"""The data pool against a real Tansu broker, in process: put -> fetch -> ack for thousands of
trajectories with order and window checked, dead letters, duplicates, redelivery, restart, backpressure."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from forgerl.datapool.feed import KafkaSettings
from forgerl.datapool.manager import DataPool, PoolSettings, RunPolicy
from forgerl.datapool.producer import PoolBehindError, TrajectoryProducer
from forgerl.datapool.topics import RunTopics

pytestmark = pytest.mark.integration


def settings(broker, **kw) -> PoolSettings:
    policy = kw.pop("policy", RunPolicy(window=0.3, max_staleness=None))
    return PoolSettings(kafka=KafkaSettings(bootstrap=broker.bootstrap), default_policy=policy, **kw)


def bounded_shuffle(n: int, block: int, rng: random.Random) -> list[int]:
    """0..n-1 with 0 first, each block of `block` shuffled: completions out of order, boundedly."""
    order = [0]
    for start in range(1, n, block):
        chunk = list(range(start, min(n, start + block)))
        rng.shuffle(chunk)
        order += chunk
    return order


async def drain(pool: DataPool, run_id: str, expected: int, size: int, policy_version: int = 10):
    """Fetch and ack until `expected` trajectories were acknowledged; returns the seqs, batch by batch."""
    batches: list[list[int]] = []
    total = 0
    idle = 0
    while total < expected:
        batch = await pool.fetch(run_id, size, policy_version=policy_version, timeout_s=1.0)
        if not batch.trajectories:
            idle += 1
            assert idle < 30, f"no trajectories for 30s; got {total} of {expected}"
            continue
        idle = 0
        seqs = [int(t.labels["forgerl/submit_seq"]) for t in batch.trajectories]
        batches.append(seqs)
        assert await pool.ack(run_id, batch.batch_id) == len(seqs)
        total += len(seqs)
    return batches


async def test_thousands_in_strict_order_with_window_one(broker, run_id, make_traj):
    n = 2000
    order = bounded_shuffle(n, 50, random.Random(1))
    with TrajectoryProducer(broker.bootstrap) as producer:
        producer.send_many([make_traj(run_id, s, seq=s) for s in order])
    pool = DataPool(settings(broker, policy=RunPolicy(window=1, max_staleness=None)))
    await pool.start()
    try:
        batches = await drain(pool, run_id, n, size=64)
        served = [s for b in batches for s in b]
        assert served == list(range(n)), "window 1 must be strict FIFO by submission sequence"
        stats = await pool.stats(run_id)
        assert stats.acknowledged == n and stats.buffered == 0 and stats.duplicates == 0
    finally:
        await pool.stop()


async def test_thousands_streaming_window_respected(broker, run_id, make_traj):
    n, window = 3000, 40
    order = bounded_shuffle(n, 100, random.Random(2))
    pool = DataPool(settings(broker, policy=RunPolicy(window=window, max_staleness=None)))
    await pool.start()
    try:
        await pool.fetch(run_id, size=1)  # opens the run (topics) before producing, as a trainer's first fetch

        def produce() -> None:
            with TrajectoryProducer(broker.bootstrap) as producer:
                for k in range(0, n, 250):
                    producer.send_many([make_traj(run_id, s, seq=s) for s in order[k : k + 250]])

        producing = asyncio.get_running_loop().run_in_executor(None, produce)
        batches = await drain(pool, run_id, n, size=32)
        await producing
        served = [s for b in batches for s in b]
        assert sorted(served) == list(range(n)), "each trajectory exactly once"
        taken: set[int] = set()
        head = 0
        for s in served:
            assert s < head + window, f"seq {s} served while the head was {head} (window {window})"
            taken.add(s)
            while head in taken:
                head += 1
        stats = await pool.stats(run_id)
        assert stats.acknowledged == n
        for _ in range(50):  # offsets are committed right behind the Ack answers
            if stats.lag == 0:
                break
            await asyncio.sleep(0.1)
            stats = await pool.stats(run_id)
        assert stats.lag == 0
    finally:
        await pool.stop()


async def test_dead_letter_garbage_and_keep_serving(broker, run_id, make_traj, caplog):
    pool = DataPool(settings(broker))
    await pool.start()
    topics = RunTopics(run_id)
    try:
        await pool.fetch(run_id, size=1)  # opens the run (topics) before producing
        raw = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        good = [make_traj(run_id, i) for i in range(20)]
        for i, t in enumerate(good):
            raw.send(topics.trajectories, key=b"g0", value=t.SerializeToString())
            if i == 9:
                raw.send(topics.trajectories, key=b"g0", value=b"\x00\xffnot a trajectory\xff")
        raw.flush()
        raw.close()
        with caplog.at_level(logging.WARNING, logger="forgerl.datapool"):
            got = []
            for _ in range(20):
                batch = await pool.fetch(run_id, 20 - len(got), timeout_s=1.0)
                got += [t.trajectory_id for t in batch.trajectories]
                await pool.ack(run_id, batch.batch_id)
                if len(got) == 20:
                    break
        assert sorted(got) == sorted(t.trajectory_id for t in good)
        stats = await pool.stats(run_id)
        assert stats.dead_lettered == 1
        assert any("dead-lettered" in r.getMessage() for r in caplog.records)
        sample = pool.registry.get_sample_value(
            "forgerl_datapool_dead_letter_events_total", {"run_id": run_id, "reason": "not_protobuf"}
        )
        assert sample == 1.0
        assert pool.registry.get_sample_value("forgerl_datapool_dead_lettered_total", {"run_id": run_id}) == 1.0
        dlq = KafkaConsumer(bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000)
        dlq.assign([TopicPartition(topics.dead_letter, 0)])
        records = list(dlq)
        dlq.close()
        assert len(records) == 1
        assert records[0].value == b"\x00\xffnot a trajectory\xff"
        assert dict(records[0].headers)["forgerl-dlq-reason"] == b"not_protobuf"
        # Everything is settled, the garbage included: committed up to the end.
        await asyncio.sleep(1.5)  # housekeeping commit
        assert (await pool.stats(run_id)).lag == 0
    finally:
        await pool.stop()


async def test_duplicates_stale_redelivery_and_restart(broker, run_id, make_traj):
    s = settings(broker, policy=RunPolicy(window=1.0, max_staleness=2), ack_timeout_s=1.0, housekeeping_s=0.2)
    with TrajectoryProducer(broker.bootstrap) as producer:
        trajs = [make_traj(run_id, i, version=10) for i in range(30)]
        trajs += [make_traj(run_id, i, version=10) for i in range(5)]  # 5 duplicates
        trajs += [make_traj(run_id, 100 + i, version=5) for i in range(4)]  # stale at version 10
        producer.send_many(trajs)
    pool = DataPool(s)
    await pool.start()
    try:
        first = await pool.fetch(run_id, 10, policy_version=10, timeout_s=5)
        assert len(first.trajectories) == 10
        await asyncio.sleep(1.5)  # its Ack is overdue: served again
        second = await pool.fetch(run_id, 10, policy_version=10, timeout_s=5)
        assert [t.trajectory_id for t in second.trajectories] == [t.trajectory_id for t in first.trajectories]
        with pytest.raises(Exception, match="served again"):
            await pool.ack(run_id, first.batch_id)
        assert await pool.ack(run_id, second.batch_id) == 10
        third = await pool.fetch(run_id, 5, policy_version=10, timeout_s=5)
        assert await pool.ack(run_id, third.batch_id) == 5
        in_flight = await pool.fetch(run_id, 5, policy_version=10, timeout_s=5)  # never acknowledged
        assert len(in_flight.trajectories) == 5
        acked = {t.trajectory_id for b in (second, third) for t in b.trajectories}
    finally:
        await pool.stop()

    pool = DataPool(s)  # restart: rebuilt from committed offsets and the state log
    await pool.start()
    try:
        rest = []
        dropped = 0
        for _ in range(10):
            batch = await pool.fetch(run_id, 50, policy_version=10, timeout_s=1.0)
            rest += [t.trajectory_id for t in batch.trajectories]
            dropped += batch.dropped_stale
            await pool.ack(run_id, batch.batch_id)
            if len(rest) >= 15:
                break
        assert not acked & set(rest), "nothing acknowledged is served after a restart"
        assert {t.trajectory_id for t in in_flight.trajectories} <= set(rest)
        assert len(rest) == len(set(rest)) == 15
        stats = await pool.stats(run_id)
        assert stats.acknowledged == 30
        assert stats.duplicates == 5
        assert stats.dropped_stale == 4
    finally:
        await pool.stop()


async def test_backpressure(broker, run_id, make_traj):
    pool = DataPool(settings(broker, max_lag=50))
    await pool.start()
    try:
        await pool.put([make_traj(run_id, i) for i in range(60)])
        for _ in range(50):
            if (await pool.stats(run_id)).lag >= 50:
                break
            await asyncio.sleep(0.1)
        with pytest.raises(PoolBehindError):
            await pool.put([make_traj(run_id, 1000)])
        producer = TrajectoryProducer(broker.bootstrap, max_lag=50, backpressure_timeout_s=1.0, lag_check_s=0.1)
        try:
            with pytest.raises(PoolBehindError):
                producer.send_many([make_traj(run_id, 2000 + i) for i in range(70)])
            # The trainer catches up: the producer may go on.
            got = 0
            while got < 60:
                batch = await pool.fetch(run_id, 60, timeout_s=1.0)
                got += len(batch.trajectories)
                await pool.ack(run_id, batch.batch_id)
            producer.wait_for_pool(run_id)
        finally:
            producer.close()
    finally:
        await pool.stop()
