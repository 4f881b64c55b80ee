"""Faults: `kill -9` of the data pool service mid-stream, and of a broker with durable s3 storage.

Delivery contract checked here: a trajectory reaches training once, i.e. it is in exactly one batch whose
Ack succeeded, no trajectory is lost, and none is served after the batch holding it was acknowledged.
A batch fetched but never acknowledged (its pool was killed) is served again, that is the point.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from kafka import KafkaConsumer, TopicPartition

from forgerl.datapool.broker import BrokerError, LocalS3Server, TansuBroker, free_port
from forgerl.datapool.producer import TrajectoryProducer
from forgerl.datapool.topics import RunTopics
from forgerl.runtime.client import health_status, insecure_channel
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc

pytestmark = pytest.mark.integration

SERVICE = "forgerl.v1.DatapoolService"


class PoolProcess:
    """The real datapool service as a subprocess (`python -m forgerl.services.datapool.main`)."""

    def __init__(self, bootstrap: str, state_dir: Path, port: int | None = None) -> None:
        self.bootstrap = bootstrap
        self.state_dir = state_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        self.starts += 1
        log = open(self.state_dir / f"datapool-{self.starts}.log", "wb")  # noqa: SIM115
        argv = [
            sys.executable,
            "-m",
            "forgerl.services.datapool.main",
            "--port",
            str(self.port),
            "--kafka-bootstrap",
            self.bootstrap,
            "--run-policy-from-store",
            "false",
            "--max-staleness",
            "-1",
            "--ack-timeout-s",
            "120",
            "--state-dir",
            str(self.state_dir),
            "--log-format",
            "console",
        ]
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"datapool exited with {self.proc.returncode}: {self.log_tail()}")
            if health_status(self.address, SERVICE) == "SERVING":
                return
            time.sleep(0.1)
        raise RuntimeError(f"datapool not SERVING after {timeout_s}s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.state_dir / f"datapool-{self.starts}.log").read_bytes()[-3000:].decode("utf-8", "replace")

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None


def test_kill9_datapool_mid_stream(broker, run_id, make_traj, tmp_path):
    n = 2000
    rng = random.Random(7)
    order = list(range(n))
    for k in range(0, n, 40):  # completions out of submission order, within blocks of 40
        block = order[k : k + 40]
        rng.shuffle(block)
        order[k : k + 40] = block
    pool = PoolProcess(broker.bootstrap, tmp_path)
    pool.start()
    producer_error: list[BaseException] = []
    try:
        channel = insecure_channel(pool.address)
        stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
        # The first 200 through the service's PutTrajectories, the rest straight to Kafka while the
        # trainer consumes (and the pool is killed).
        first = [make_traj(run_id, s, seq=s) for s in order[:200]]
        assert stub.PutTrajectories(datapool_pb2.PutTrajectoriesRequest(trajectories=first)).accepted == 200

        def produce() -> None:
            try:
                with TrajectoryProducer(broker.bootstrap) as producer:
                    for k in range(200, n, 100):
                        producer.send_many([make_traj(run_id, s, seq=s) for s in order[k : k + 100]])
                        time.sleep(0.05)
            except BaseException as exc:  # pragma: no cover - reported by the assertion below
                producer_error.append(exc)

        producing = threading.Thread(target=produce, daemon=True)
        producing.start()

        event = 0
        acked_at: dict[str, int] = {}  # trajectory id -> event index of its successful Ack
        fetched: list[tuple[int, list[str]]] = []
        kills = {"unacked": False, "after_ack": False}
        deadline = time.monotonic() + 240
        while len(acked_at) < n:
            assert time.monotonic() < deadline, f"only {len(acked_at)} of {n} acknowledged"
            try:
                resp = stub.FetchBatch(
                    datapool_pb2.FetchBatchRequest(run_id=run_id, size=50, policy_version=10, timeout_s=1.0),
                    timeout=10,
                )
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), err
                time.sleep(0.2)
                continue
            event += 1
            ids = [t.trajectory_id for t in resp.trajectories]
            fetched.append((event, ids))
            if not ids:
                continue
            if not kills["unacked"] and len(acked_at) >= 600:
                # Fetched, never acknowledged: kill the pool before the Ack.
                kills["unacked"] = True
                pool.kill9()
                pool.start()
                channel = insecure_channel(pool.address)
                stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
                with pytest.raises(grpc.RpcError) as err:
                    stub.Ack(datapool_pb2.AckRequest(run_id=run_id, batch_id=resp.batch_id), timeout=10)
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                continue
            ack = stub.Ack(datapool_pb2.AckRequest(run_id=run_id, batch_id=resp.batch_id), timeout=30)
            assert ack.committed == len(ids)
            event += 1
            for tid in ids:
                assert tid not in acked_at, f"{tid} acknowledged twice"
                acked_at[tid] = event
            if not kills["after_ack"] and len(acked_at) >= 1300:
                # Acknowledged a moment ago: kill at once, before any periodic commit.
                kills["after_ack"] = True
                pool.kill9()
                pool.start()
                channel = insecure_channel(pool.address)
                stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
        producing.join(timeout=60)
        assert not producer_error, producer_error
        assert kills == {"unacked": True, "after_ack": True}
        assert set(acked_at) == {make_traj(run_id, s).trajectory_id for s in range(n)}, "lost trajectories"
        for ev, ids in fetched:
            for tid in ids:
                assert acked_at.get(tid, ev + 1) >= ev, f"{tid} served again after its batch was acknowledged"
        stats = stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id), timeout=10)
        assert stats.acknowledged == n
        assert stats.duplicates == 0
    finally:
        pool.stop()


def test_broker_kill9_with_s3_storage_loses_nothing(tmp_path, make_traj):
    try:
        LocalS3Server.executable()
    except BrokerError as exc:
        pytest.skip(str(exc)) if not os.environ.get("CI") else pytest.fail(str(exc))
    run_id = "durable"
    n = 600
    with LocalS3Server(log_path=tmp_path / "s3.log") as s3:
        s3.create_bucket("tansu")
        broker = TansuBroker(storage=s3.storage_url("tansu"), env=s3.env(), log_path=tmp_path / "tansu.log")
        broker.start()
        pool = PoolProcess(broker.bootstrap, tmp_path)
        try:
            with TrajectoryProducer(broker.bootstrap) as producer:
                producer.send_many([make_traj(run_id, i, seq=i) for i in range(n)])
            pool.start()
            stub = datapool_pb2_grpc.DatapoolServiceStub(insecure_channel(pool.address))
            acked: list[str] = []
            while len(acked) < 250:
                resp = stub.FetchBatch(
                    datapool_pb2.FetchBatchRequest(run_id=run_id, size=50, timeout_s=2.0), timeout=10
                )
                stub.Ack(datapool_pb2.AckRequest(run_id=run_id, batch_id=resp.batch_id), timeout=30)
                acked += [t.trajectory_id for t in resp.trajectories]
            pool.kill9()

            broker.kill()  # kill -9 the broker; its storage is the S3 server
            broker.start()

            raw = KafkaConsumer(
                bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest", consumer_timeout_ms=5000
            )
            topic = RunTopics(run_id).trajectories
            raw.assign([TopicPartition(topic, p) for p in raw.partitions_for_topic(topic)])
            stored = {r.value for r in raw}
            raw.close()
            assert len(stored) == n, f"the broker kept {len(stored)} of {n} records across kill -9"

            pool.start()
            stub = datapool_pb2_grpc.DatapoolServiceStub(insecure_channel(pool.address))
            rest: list[str] = []
            for _ in range(40):
                resp = stub.FetchBatch(
                    datapool_pb2.FetchBatchRequest(run_id=run_id, size=100, timeout_s=1.0), timeout=10
                )
                if resp.trajectories:
                    stub.Ack(datapool_pb2.AckRequest(run_id=run_id, batch_id=resp.batch_id), timeout=30)
                rest += [t.trajectory_id for t in resp.trajectories]
                if len(acked) + len(rest) >= n:
                    break
            assert not set(acked) & set(rest), "acknowledged before the crash, served again after it"
            assert sorted(acked + rest) == sorted(make_traj(run_id, i).trajectory_id for i in range(n))
        finally:
            pool.stop()
            broker.stop()
