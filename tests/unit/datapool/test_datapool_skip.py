"""The data pool's queue start and skip markers: a failed episode's sequence number never stalls the window."""

from __future__ import annotations

import pytest

from forgerl.datapool.pool import RunPool
from forgerl.datapool.topics import (
    SKIP_BEFORE_LABEL,
    SKIPPED_LABEL,
    SUBMIT_SEQ_LABEL,
    DecodeError,
    decode_index,
    encode_trajectory,
    lost_marker,
    skip_marker,
)
from forgerl.v1 import trajectory_pb2

pytestmark = pytest.mark.unit


def traj(seq: int) -> trajectory_pb2.Trajectory:
    return trajectory_pb2.Trajectory(
        schema_version=1,
        trajectory_id=f"t{seq}",
        run_id="r",
        turns=[trajectory_pb2.Turn(policy_version=1)],
        labels={SUBMIT_SEQ_LABEL: str(seq)},
    )


def taken(pool: RunPool, k: int = 10) -> list[str]:
    entries, _ = pool.take(k)
    return [e.trajectory_id for e in entries]


def test_fresh_run_queue_starts_at_zero_so_a_fast_later_episode_waits():
    pool = RunPool("r", window=1)
    pool.restore({0: 0, 1: 0}, [])
    pool.offer_trajectory(0, 0, traj(2))  # finished first, but 0 and 1 are still running
    assert taken(pool) == []
    pool.offer_trajectory(1, 0, traj(0))
    assert taken(pool) == ["t0"]
    pool.offer_trajectory(0, 1, traj(1))
    assert taken(pool) == ["t1", "t2"]


def test_after_a_restart_the_first_arrival_opens_the_queue():
    # Offsets were committed before: the queue's position is unknown, nothing may wait for seqs below.
    pool = RunPool("r", window=1)
    pool.restore({0: 7}, [])
    pool.offer_trajectory(0, 7, traj(40))
    assert taken(pool) == ["t40"]


def test_skip_marker_frees_the_head_at_once_and_is_never_served():
    pool = RunPool("r", window=1, gap_timeout_s=600)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, traj(0))
    pool.offer_trajectory(0, 1, traj(2))
    first, _ = pool.take(10)
    assert [e.trajectory_id for e in first] == ["t0"]  # 1 is in flight: strict FIFO waits for it
    assert pool.offer_trajectory(0, 2, skip_marker("r", 1, "ep1", "infrastructure failure")) == "skipped_seq"
    second, _ = pool.take(10)
    assert [e.trajectory_id for e in second] == ["t2"]
    assert pool.counters.skipped == 1 and pool.buffered == 0
    assert pool.drain_log() == {"t": "settle", "i": [[0, 2, "skip-ep1", "skip"]]}
    # The marker's offset is settled: once both trajectories are acknowledged, all 3 offsets commit.
    batch = pool.serve(first + second)
    reserved = pool.begin_ack(batch.batch_id)
    assert reserved is not None
    pool.finish_ack(reserved[0])
    assert pool.committable() == {0: 3}


def test_skip_marker_ahead_of_the_queue_and_twice():
    pool = RunPool("r", window=1)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, skip_marker("r", 1, "ep1", "cancelled"))  # 0 running, 1 failed already
    pool.offer_trajectory(0, 1, traj(2))
    assert taken(pool) == []  # 0 holds the head
    pool.offer_trajectory(0, 2, traj(0))
    assert taken(pool) == ["t0", "t2"]
    assert pool.offer_trajectory(0, 3, skip_marker("r", 1, "ep1", "cancelled")) == "duplicate"
    assert pool.counters.skipped == 1


def test_skip_marker_for_a_seq_a_trajectory_already_holds_keeps_the_trajectory():
    # An attempt published, then the episode was reported failed (its close's answer was lost).
    pool = RunPool("r", window=1)
    pool.restore({0: 0}, [])
    pool.offer_trajectory(0, 0, traj(0))
    pool.offer_trajectory(0, 1, skip_marker("r", 0, "ep0", "gateway UNAVAILABLE"))
    assert taken(pool) == ["t0"]


def test_restore_counts_skips_from_the_log():
    pool = RunPool("r")
    pool.restore({0: 3}, [{"t": "settle", "i": [[0, 1, "skip-ep1", "skip"], [0, 2, "x", "stale"]]}])
    assert (pool.counters.skipped, pool.counters.dropped_stale) == (1, 1)


def test_skip_marker_decodes_and_needs_its_seq():
    _, value, _ = encode_trajectory(skip_marker("r", 12, "ep", "cancelled"))
    for full in (False, True):
        index = decode_index(value, "r", full=full)
        assert (index.submit_seq, index.skipped, index.trajectory_id) == (12, True, "skip-ep")
    assert not decode_index(encode_trajectory(traj(3))[1], "r").skipped
    bad = trajectory_pb2.Trajectory(schema_version=1, trajectory_id="x", run_id="r", labels={SKIPPED_LABEL: "y"})
    with pytest.raises(DecodeError) as err:
        decode_index(bad.SerializeToString(), "r")
    assert err.value.reason == "bad_skip_marker"
    with pytest.raises(ValueError):
        skip_marker("r", -1, "ep", "x")


def test_next_seq_is_where_a_restarted_rollout_goes_on():
    pool = RunPool("r", window=1)
    pool.restore({0: 0}, [])
    assert pool.next_seq == 0
    pool.offer_trajectory(0, 0, traj(3))
    pool.offer_trajectory(0, 1, skip_marker("r", 5, "ep5", "cancelled"))
    assert pool.next_seq == 6  # 4 is still in flight: numbering goes on after the newest queued
    restarted = RunPool("r", window=1)
    restarted.restore({0: 2}, [])
    assert restarted.next_seq == 0  # unknown until something arrives
    restarted.offer_trajectory(0, 2, traj(9))
    assert restarted.next_seq == 10


def test_lost_marker_gives_up_on_every_awaited_seq_below_it():
    # A rollout process died with 1, 3 and 4 in flight; its successor numbers from 6 and says so.
    pool = RunPool("r", window=1)
    pool.restore({0: 0}, [])
    for offset, seq in enumerate([0, 2, 5]):
        pool.offer_trajectory(0, offset, traj(seq))
    assert taken(pool) == ["t0"]
    assert pool.offer_trajectory(0, 3, lost_marker("r", 6, "rollout restarted")) == "skipped_seq"
    pool.offer_trajectory(0, 4, traj(7))  # 6 is running in the new process: it holds the head
    assert taken(pool) == ["t2", "t5"]
    pool.offer_trajectory(0, 5, traj(3))  # a trajectory that was on its way after all: served, first
    pool.offer_trajectory(0, 6, traj(6))
    assert taken(pool) == ["t3", "t6", "t7"]
    assert pool.counters.skipped == 1


def test_lost_marker_past_the_newest_queued():
    # The pool restarted (the start is unknown) and heard only of 2 when the new rollout says "below 5".
    pool = RunPool("r", window=1)
    pool.restore({0: 1}, [])
    pool.offer_trajectory(0, 1, traj(2))
    pool.offer_trajectory(0, 2, lost_marker("r", 5, "rollout restarted"))
    pool.offer_trajectory(0, 3, traj(5))
    assert taken(pool) == ["t2", "t5"]
    assert pool.next_seq == 6


def test_lost_marker_decodes():
    _, value, _ = encode_trajectory(lost_marker("r", 12, "rollout restarted"))
    for full in (False, True):
        index = decode_index(value, "r", full=full)
        assert (index.skipped, index.skip_before, index.submit_seq) == (True, 12, None)
    bad = lost_marker("r", 3, "x")
    bad.labels[SKIP_BEFORE_LABEL] = "-3"
    with pytest.raises(DecodeError) as err:
        decode_index(bad.SerializeToString(), "r")
    assert err.value.reason == "bad_skip_marker"
