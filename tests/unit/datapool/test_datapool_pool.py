"""forgerl.datapool.pool and topics: the data pool's bookkeeping without Kafka."""

from __future__ import annotations

import pytest

from forgerl.datapool.pool import AckError, RunPool
from forgerl.datapool.topics import (
    SUBMIT_SEQ_LABEL,
    DecodeError,
    RunTopics,
    decode_index,
    decode_trajectory,
    encode_trajectory,
    topic_safe,
)
from forgerl.v1 import trajectory_pb2

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def traj(i: int, *, seq: int | None = None, version: int = 10, run: str = "r") -> trajectory_pb2.Trajectory:
    t = trajectory_pb2.Trajectory(
        schema_version=1,
        trajectory_id=f"t{i}",
        run_id=run,
        group_id=f"g{i // 4}",
        turns=[trajectory_pb2.Turn(policy_version=version), trajectory_pb2.Turn(policy_version=version + 1)],
    )
    if seq is not None:
        t.labels[SUBMIT_SEQ_LABEL] = str(seq)
    return t


def ids(entries) -> list[str]:
    return [e.trajectory_id for e in entries]


# -- topics ---------------------------------------------------------------------------------------


def test_topic_names_are_safe_and_distinct():
    assert RunTopics("run-1").trajectories == "forgerl.run-1.trajectories"
    assert RunTopics("run-1").dead_letter == "forgerl.run-1.trajectories.dlq"
    assert RunTopics("run-1").state == "forgerl.run-1.datapool.state"
    a, b = topic_safe("a/b"), topic_safe("a:b")
    assert a != b and all(c.isalnum() or c in "_-" for c in a)
    assert len(RunTopics("x" * 500).trajectories) <= 249


def test_encode_decode_roundtrip_and_key():
    t = traj(5)
    t.schema_version = 0
    key, value, headers = encode_trajectory(t)
    assert key == b"g1"
    assert dict(headers)["forgerl-schema"] == b"1"
    back = decode_trajectory(value, expected_run_id="r")
    assert back.trajectory_id == "t5" and back.schema_version == 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"", "empty"),
        (b"\xff\xff\xff\xff garbage", "not_protobuf"),
        (
            trajectory_pb2.Trajectory(schema_version=99, trajectory_id="x", run_id="r").SerializeToString(),
            "schema_version",
        ),
        (trajectory_pb2.Trajectory(schema_version=1, run_id="r").SerializeToString(), "no_trajectory_id"),
        (trajectory_pb2.Trajectory(schema_version=1, trajectory_id="x", run_id="q").SerializeToString(), "wrong_run"),
        (
            trajectory_pb2.Trajectory(
                schema_version=1, trajectory_id="x", run_id="r", labels={SUBMIT_SEQ_LABEL: "no"}
            ).SerializeToString(),
            "bad_submit_seq",
        ),
    ],
)
@pytest.mark.parametrize("full", [False, True])
def test_decode_rejects(value, reason, full):
    with pytest.raises(DecodeError) as err:
        decode_index(value, expected_run_id="r", full=full)
    assert err.value.reason == reason
    if full:
        with pytest.raises(DecodeError):
            decode_trajectory(value, expected_run_id="r")


def test_index_reads_what_the_pool_needs():
    t = traj(9, seq=42, version=3)
    t.turns[0].routed_experts.expert_ids.extend(range(1000))
    value = t.SerializeToString()
    for full in (False, True):
        idx = decode_index(value, "r", full=full)
        assert (idx.trajectory_id, idx.run_id, idx.schema_version) == ("t9", "r", 1)
        assert idx.submit_seq == 42 and idx.min_policy_version == 3


# -- serving --------------------------------------------------------------------------------------


def test_arrival_order_fifo_ack_and_commit():
    pool = RunPool("r", window=1)
    pool.restore({0: 0, 1: 0}, [])
    for i in range(6):
        assert pool.offer_trajectory(i % 2, i // 2, traj(i)) == "queued"
    entries, dropped = pool.take(4)
    assert ids(entries) == ["t0", "t1", "t2", "t3"] and dropped == 0
    batch = pool.serve(entries)
    assert pool.committable() == {}
    reserved = pool.begin_ack(batch.batch_id)
    assert reserved is not None
    _, record = reserved
    assert record["t"] == "ack" and len(record["i"]) == 4
    assert pool.finish_ack(batch) == 4
    assert pool.committable() == {0: 2, 1: 2}
    pool.mark_committed({0: 2, 1: 2})
    assert pool.begin_ack(batch.batch_id) is None  # acknowledged twice: no-op
    with pytest.raises(AckError) as err:
        pool.begin_ack("nope")
    assert err.value.code == "unknown"


def test_window_holds_back_items_beyond_it():
    # Submission order 0..9; seq 1 is still in flight when 9 and 2..8 arrive: with a window of 3
    # positions only 2 and 3 may go before it.
    pool = RunPool("r", window=3)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, traj(100, seq=0))  # the head arrives first...
    entries, _ = pool.take(1)
    assert ids(entries) == ["t100"]
    for offset, seq in enumerate([9, 2, 3, 4, 5, 6, 7, 8], start=1):
        pool.offer_trajectory(0, offset, traj(seq, seq=seq))
    # seq 1 is in flight: the head; the window (3 positions) covers seqs 1, 2, 3.
    entries, _ = pool.take(10)
    assert ids(entries) == ["t2", "t3"]
    pool.offer_trajectory(0, 20, traj(1, seq=1))
    entries, _ = pool.take(10)
    assert ids(entries)[:3] == ["t1", "t4", "t5"]


def test_gap_given_up_after_timeout_and_late_arrival_served_first():
    clock = Clock()
    pool = RunPool("r", window=2, gap_timeout_s=10, first_seq=None, clock=clock)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, traj(3, seq=3))  # the start is unknown: the first arrival opens the queue
    pool.offer_trajectory(0, 1, traj(6, seq=6))  # 4 and 5 in flight
    entries, _ = pool.take(5)
    assert ids(entries) == ["t3"]
    entries, _ = pool.take(5)
    assert entries == []
    clock.t = 11
    entries, _ = pool.take(5)
    assert ids(entries) == ["t6"]
    assert pool.counters.gaps_expired == 2
    pool.offer_trajectory(0, 2, traj(4, seq=4))  # late: the head passed it
    pool.offer_trajectory(0, 3, traj(7, seq=7))
    entries, _ = pool.take(5)
    assert ids(entries) == ["t4", "t7"]


def test_staleness_drops_and_counts():
    pool = RunPool("r", window=1.0)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, traj(0, version=1))
    pool.offer_trajectory(0, 1, traj(1, version=5))
    pool.offer_trajectory(0, 2, trajectory_pb2.Trajectory(schema_version=1, trajectory_id="no-turns", run_id="r"))
    entries, dropped = pool.take(10, policy_version=6, max_staleness=2)
    assert ids(entries) == ["t1", "no-turns"] and dropped == 1
    assert pool.counters.dropped_stale == 1
    settle = pool.drain_log()
    assert settle == {"t": "settle", "i": [[0, 0, "t0", "stale"]]}
    assert pool.drain_log() is None


def test_duplicates_dropped_and_dead_letters_settled():
    pool = RunPool("r")
    pool.restore({0: 0}, [])
    assert pool.offer_trajectory(0, 0, traj(1)) == "queued"
    assert pool.offer_trajectory(0, 1, traj(1)) == "duplicate"
    assert pool.dead_lettered(0, 2, "not_protobuf")
    entries, _ = pool.take(10)
    assert ids(entries) == ["t1"]
    assert pool.counters.duplicates == 1 and pool.counters.dead_lettered == 1
    batch = pool.serve(entries)
    pool.begin_ack(batch.batch_id)
    pool.finish_ack(batch)
    assert pool.committable() == {0: 3}


def test_unacked_batch_is_served_again_first():
    clock = Clock()
    pool = RunPool("r", window=1.0, ack_timeout_s=5, clock=clock)
    pool.restore({0: 0}, [])
    for i in range(4):
        pool.offer_trajectory(0, i, traj(i))
    first = pool.serve(pool.take(2)[0])
    clock.t = 6
    entries, _ = pool.take(3)
    assert ids(entries) == ["t0", "t1", "t2"]
    assert pool.counters.redelivered == 2
    with pytest.raises(AckError) as err:
        pool.begin_ack(first.batch_id)
    assert err.value.code == "expired"


def test_late_ack_of_expired_batch_accepted_if_not_served_again():
    clock = Clock()
    pool = RunPool("r", ack_timeout_s=5, clock=clock)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, traj(0))
    batch = pool.serve(pool.take(1)[0])
    clock.t = 6
    pool.expire()
    reserved = pool.begin_ack(batch.batch_id)
    assert reserved is not None
    pool.finish_ack(reserved[0])
    assert pool.take(5)[0] == []


def test_give_back_and_abort_ack():
    pool = RunPool("r")
    pool.restore({0: 0}, [])
    for i in range(3):
        pool.offer_trajectory(0, i, traj(i))
    entries, _ = pool.take(2)
    pool.give_back(entries)
    again, _ = pool.take(3)
    assert ids(again) == ["t0", "t1", "t2"]
    batch = pool.serve(again)
    reserved = pool.begin_ack(batch.batch_id)
    assert reserved is not None
    pool.abort_ack(reserved[0])
    reserved = pool.begin_ack(batch.batch_id)
    assert reserved is not None and pool.finish_ack(reserved[0]) == 3


def test_restore_skips_acknowledged_and_rejects_their_duplicates():
    records = [
        {"t": "ack", "b": "x-1", "i": [[0, 5, "t5"], [0, 7, "t7"], [0, 1, "t1"]]},
        {"t": "settle", "i": [[0, 6, "t6", "stale"], [0, 8, "", "dead"]]},
    ]
    pool = RunPool("r")
    pool.restore({0: 5}, records)
    assert pool.counters.acknowledged == 3 and pool.counters.dropped_stale == 1
    assert pool.counters.dead_lettered == 1
    for offset in range(5, 10):
        pool.offer_trajectory(0, offset, traj(offset))
    pool.offer_trajectory(0, 11, traj(1))  # a duplicate of a trajectory acknowledged before the restart
    entries, _ = pool.take(10)
    assert ids(entries) == ["t9"]
    assert pool.counters.duplicates == 1
    assert pool.committable() == {0: 9}
    # The Ack of batch x-1 was written before the crash: retried now, it succeeds (nothing new to commit).
    assert pool.begin_ack("x-1") is None


def test_refetched_offsets_are_ignored():
    pool = RunPool("r")
    pool.restore({0: 0}, [])
    assert pool.offer_trajectory(0, 0, traj(0)) == "queued"
    assert pool.offer_trajectory(0, 0, traj(0)) == "skipped"
    assert pool.counters.duplicates == 0
