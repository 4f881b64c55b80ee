"""Topics and the wire format of trajectories on Kafka.

Per run `R` (topic-safe form of the run id, see `topic_safe`):
- `forgerl.R.trajectories`        Trajectory protobuf, key = group_id (a task group stays in one
                                  partition), headers `forgerl-schema` and `content-type`;
- `forgerl.R.trajectories.dlq`    what the data pool could not decode, verbatim, with the reason and
                                  the source topic/partition/offset in headers;
- `forgerl.R.datapool.state`      the data pool's own log (one partition): acknowledged batches and
                                  settled offsets, read back on restart.

The submission sequence of an episode (its position in the run's generation queue: rollout numbers a
run's publishing episodes 0, 1, 2, ... in the order it queues them) travels in the label
`forgerl/submit_seq`; the data pool's windowed FIFO is keyed by it. Without the label a trajectory
joins the queue in arrival order.

An episode that ends without a trajectory (it failed, was cancelled, or its agent never called the
model) would hold the window's head until the pool's gap timeout (600 s by default). Rollout publishes
a skip marker for it instead (`skip_marker`): a Trajectory without turns whose labels carry its
`forgerl/submit_seq` and `forgerl/skipped` (the reason). The pool gives up on that sequence number at
once and never serves the marker. A rollout process that starts on a run the pool has queued before
(a restart) sends `lost_marker`: with `forgerl/skip_before` = N instead of a single seq, it gives up on
every seq below N still awaited, the episodes that were in flight in the process that died.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as _PbDecodeError
from google.protobuf.message import Message

from forgerl.v1 import trajectory_pb2

__all__ = [
    "CONTENT_TYPE",
    "SCHEMA_VERSION",
    "SKIPPED_LABEL",
    "SKIP_BEFORE_LABEL",
    "SUBMIT_SEQ_LABEL",
    "SUPPORTED_SCHEMA_VERSIONS",
    "DecodeError",
    "RunTopics",
    "TrajectoryIndex",
    "decode_index",
    "decode_trajectory",
    "encode_trajectory",
    "index_of",
    "lost_marker",
    "min_policy_version",
    "skip_marker",
    "submit_seq",
    "topic_safe",
]

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
CONTENT_TYPE = b"application/x-protobuf; messageType=forgerl.v1.Trajectory"
SCHEMA_HEADER = "forgerl-schema"
SUBMIT_SEQ_LABEL = "forgerl/submit_seq"
SKIPPED_LABEL = "forgerl/skipped"
SKIP_BEFORE_LABEL = "forgerl/skip_before"

# Kafka topic names: [a-zA-Z0-9._-], at most 249 characters.
_TOPIC_SAFE = re.compile(r"[^a-zA-Z0-9_-]")
_MAX_RUN_PART = 180


@functools.lru_cache(maxsize=4096)
def topic_safe(run_id: str) -> str:
    """The run id as it appears in topic names; ids that needed changes get a hash suffix (no clashes)."""
    if not run_id:
        raise ValueError("run_id must not be empty")
    safe = _TOPIC_SAFE.sub("_", run_id)
    if safe != run_id or len(safe) > _MAX_RUN_PART:
        digest = hashlib.sha1(run_id.encode()).hexdigest()[:10]
        safe = f"{safe[: _MAX_RUN_PART - 11]}-{digest}"
    return safe


@dataclass(frozen=True)
class RunTopics:
    run_id: str
    prefix: str = "forgerl"

    @property
    def trajectories(self) -> str:
        return f"{self.prefix}.{topic_safe(self.run_id)}.trajectories"

    @property
    def dead_letter(self) -> str:
        return f"{self.trajectories}.dlq"

    @property
    def state(self) -> str:
        return f"{self.prefix}.{topic_safe(self.run_id)}.datapool.state"


class DecodeError(ValueError):
    """A record that is not a readable Trajectory of this run; `reason` is a short machine word."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _index_message_class() -> type[Message]:
    """A pool-internal view of Trajectory with only what the pool indexes by (same field numbers).

    Parsing it checks the record's wire format down to each turn's envelope and skips the bulk (token
    ids, logprobs, routed experts) as unknown fields: 2-6x cheaper than a full parse."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="forgerl/internal/trajectory_index.proto", package="forgerl.internal", syntax="proto3"
    )
    turn = fdp.message_type.add(name="TurnIndex")
    turn.field.add(name="policy_version", number=5, type=f.TYPE_INT64, label=f.LABEL_OPTIONAL)
    msg = fdp.message_type.add(name="TrajectoryIndex")
    msg.field.add(name="schema_version", number=1, type=f.TYPE_INT32, label=f.LABEL_OPTIONAL)
    msg.field.add(name="trajectory_id", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    msg.field.add(name="run_id", number=3, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    msg.field.add(
        name="turns", number=8, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED, type_name=".forgerl.internal.TurnIndex"
    )
    entry = msg.nested_type.add(name="LabelsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    msg.field.add(
        name="labels",
        number=18,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_REPEATED,
        type_name=".forgerl.internal.TrajectoryIndex.LabelsEntry",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("forgerl.internal.TrajectoryIndex"))


_TrajectoryIndexMessage = _index_message_class()


@dataclass(frozen=True, slots=True)
class TrajectoryIndex:
    """What the data pool needs of a trajectory; the record's bytes travel on unparsed."""

    trajectory_id: str
    run_id: str
    schema_version: int
    submit_seq: int | None
    min_policy_version: int | None
    # A skip marker: the episode at `submit_seq` ended without a trajectory, or (`skip_before`) none of the
    # seqs below it still awaited will come (see the module docstring).
    skipped: bool = False
    skip_before: int | None = None


def decode_index(value: bytes | None, expected_run_id: str | None = None, *, full: bool = False) -> TrajectoryIndex:
    """Check one record value and read its index fields; DecodeError with the reason when unusable.

    full=False parses the envelope (every top-level field and each turn's policy_version) and leaves
    the bulk unparsed; full=True parses the whole Trajectory."""
    if full:
        return index_of(decode_trajectory(value, expected_run_id))
    if not value:
        raise DecodeError("empty", "the record has no value")
    try:
        idx: Any = _TrajectoryIndexMessage.FromString(value)
    except (_PbDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError("not_protobuf", f"not a Trajectory protobuf ({exc})") from None
    _check(idx.schema_version, idx.trajectory_id, idx.run_id, idx.labels, expected_run_id)
    seq = idx.labels.get(SUBMIT_SEQ_LABEL)
    return TrajectoryIndex(
        idx.trajectory_id,
        idx.run_id,
        idx.schema_version,
        int(seq) if seq is not None else None,
        min((t.policy_version for t in idx.turns), default=None),
        SKIPPED_LABEL in idx.labels,
        _skip_before(idx.labels),
    )


def _check(schema_version: int, trajectory_id: str, run_id: str, labels: Any, expected_run_id: str | None) -> None:
    if schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        raise DecodeError(
            "schema_version",
            f"schema_version {schema_version} is not one of {sorted(SUPPORTED_SCHEMA_VERSIONS)}",
        )
    if not trajectory_id:
        raise DecodeError("no_trajectory_id", "trajectory_id is empty")
    if expected_run_id is not None and run_id != expected_run_id:
        raise DecodeError("wrong_run", f"run_id {run_id!r} on the topic of run {expected_run_id!r}")
    if SUBMIT_SEQ_LABEL in labels:
        value = labels[SUBMIT_SEQ_LABEL]
        if not (value.isascii() and value.isdigit()):
            raise DecodeError("bad_submit_seq", f"label {SUBMIT_SEQ_LABEL}={value!r} is not an int >= 0")
    if SKIP_BEFORE_LABEL in labels:
        value = labels[SKIP_BEFORE_LABEL]
        if not (value.isascii() and value.isdigit()):
            raise DecodeError("bad_skip_marker", f"label {SKIP_BEFORE_LABEL}={value!r} is not an int >= 0")
    if SKIPPED_LABEL in labels and SUBMIT_SEQ_LABEL not in labels and SKIP_BEFORE_LABEL not in labels:
        raise DecodeError(
            "bad_skip_marker", f"a skip marker ({SKIPPED_LABEL}) names no {SUBMIT_SEQ_LABEL} or {SKIP_BEFORE_LABEL}"
        )


def encode_trajectory(traj: trajectory_pb2.Trajectory) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of a trajectory; schema_version 0 is set to the current version."""
    if not traj.trajectory_id:
        raise ValueError("trajectory_id is required")
    if not traj.run_id:
        raise ValueError(f"trajectory {traj.trajectory_id}: run_id is required")
    if traj.schema_version == 0:
        traj.schema_version = SCHEMA_VERSION
    key = (traj.group_id or traj.trajectory_id).encode()
    headers = [(SCHEMA_HEADER, str(traj.schema_version).encode()), ("content-type", CONTENT_TYPE)]
    return key, traj.SerializeToString(), headers


def decode_trajectory(value: bytes | None, expected_run_id: str | None = None) -> trajectory_pb2.Trajectory:
    """Parse and check one record value; raise DecodeError with the reason when it is unusable."""
    if not value:
        raise DecodeError("empty", "the record has no value")
    traj = trajectory_pb2.Trajectory()
    try:
        traj.ParseFromString(value)
    except (_PbDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError("not_protobuf", f"not a Trajectory protobuf ({exc})") from None
    _check(traj.schema_version, traj.trajectory_id, traj.run_id, traj.labels, expected_run_id)
    return traj


def index_of(traj: trajectory_pb2.Trajectory) -> TrajectoryIndex:
    """The index fields of a parsed trajectory (unchecked: `decode_trajectory` checks)."""
    return TrajectoryIndex(
        traj.trajectory_id,
        traj.run_id,
        traj.schema_version,
        submit_seq(traj),
        min_policy_version(traj),
        SKIPPED_LABEL in traj.labels,
        _skip_before(traj.labels),
    )


def _skip_before(labels: Any) -> int | None:
    value = labels.get(SKIP_BEFORE_LABEL)
    return int(value) if value is not None else None


def lost_marker(run_id: str, before: int, reason: str) -> trajectory_pb2.Trajectory:
    """The record telling the data pool that no seq below `before` it still awaits will come (their
    rollout process is gone). Sent twice for the same `before`, the second is dropped as a duplicate."""
    return _marker(run_id, f"skip-before-{before}", SKIP_BEFORE_LABEL, before, reason)


def skip_marker(run_id: str, seq: int, episode_id: str, reason: str) -> trajectory_pb2.Trajectory:
    """The record telling the data pool that the episode at `seq` of the run will send no trajectory.

    Its trajectory_id derives from the episode, so a marker sent twice is dropped as a duplicate."""
    return _marker(run_id, f"skip-{episode_id}", SUBMIT_SEQ_LABEL, seq, reason, episode_id)


def _marker(
    run_id: str, trajectory_id: str, label: str, seq: int, reason: str, episode_id: str = ""
) -> trajectory_pb2.Trajectory:
    if seq < 0:
        raise ValueError(f"{label}={seq}: submission sequence numbers are >= 0")
    return trajectory_pb2.Trajectory(
        schema_version=SCHEMA_VERSION,
        trajectory_id=trajectory_id,
        run_id=run_id,
        episode_id=episode_id,
        labels={label: str(seq), SKIPPED_LABEL: reason[:200] or "no trajectory"},
    )


def submit_seq(traj: trajectory_pb2.Trajectory) -> int | None:
    """The submission sequence number rollout gave the episode, or None when it carries none."""
    value = traj.labels.get(SUBMIT_SEQ_LABEL)
    return int(value) if value is not None else None


def min_policy_version(traj: trajectory_pb2.Trajectory) -> int | None:
    """The oldest policy version among the turns (None for a trajectory without turns)."""
    return min((t.policy_version for t in traj.turns), default=None)
