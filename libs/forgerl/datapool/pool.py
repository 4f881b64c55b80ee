"""The data pool's bookkeeping for one run, free of any I/O (the Kafka side lives in `feed.py`).

What it keeps:
- every consumed, undelivered trajectory, queued in a `forgerl.rl.WindowedFIFO` keyed by its submission
  sequence (label `forgerl/submit_seq`, else arrival order); sequence numbers skipped by the producer are
  episodes still in flight and hold the window's head, until their skip marker arrives (an episode that
  ended without a trajectory, or a restarted rollout's lost marker, see `topics`) or `gap_timeout_s`
  gives up on them. A run
  without history starts its queue at `first_seq` (rollout numbers from 0), so an episode finishing
  first never opens the queue past earlier ones still running; after a restart the first arrival does;
- batches served and not yet acknowledged; one not acknowledged within `ack_timeout_s` is served again
  (first, before anything newer);
- per partition the offsets not yet settled (acknowledged, dropped as stale, dead-lettered or a
  duplicate): the committable offset is the lowest unsettled one;
- the trajectory ids already seen, so a duplicate (same trajectory_id) is dropped, never served.

Whatever must survive a crash is returned as log records (plain dicts) that the caller writes to the
run's state topic before it commits offsets; `restore()` reads them back.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from forgerl.datapool.topics import TrajectoryIndex, index_of
from forgerl.rl.windowed_fifo import ItemState, WindowedFIFO
from forgerl.v1 import trajectory_pb2

__all__ = [
    "AckError",
    "Batch",
    "Entry",
    "PartitionOffsets",
    "PoolCounters",
    "RunPool",
]

# Entry states.
BUFFERED = "buffered"  # queued, never served or served and returned
SERVED = "served"  # in a batch awaiting its Ack
ACKING = "acking"  # its Ack is being written
DONE = "done"  # acknowledged or dropped


class AckError(Exception):
    """An Ack that cannot be honoured; `code` is "unknown" or "expired"."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(eq=False, slots=True)
class Entry:
    """One trajectory in the pool: its Kafka position, index fields and the record's bytes, unparsed."""

    partition: int
    offset: int
    payload: bytes
    trajectory_id: str
    seq: int
    min_version: int | None
    state: str = BUFFERED
    in_fifo: bool = False
    batch_id: str | None = None

    @property
    def trajectory(self) -> trajectory_pb2.Trajectory:
        return trajectory_pb2.Trajectory.FromString(self.payload)


@dataclass(eq=False)
class Batch:
    batch_id: str
    entries: list[Entry]
    deadline: float
    expired: bool = False


@dataclass
class PoolCounters:
    consumed: int = 0
    served: int = 0
    acknowledged: int = 0
    dropped_stale: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    redelivered: int = 0
    gaps_expired: int = 0
    skipped: int = 0  # skip markers: sequence numbers whose episode ended without a trajectory


class PartitionOffsets:
    """Offsets of one partition consumed and not yet settled; `watermark` is the committable offset."""

    def __init__(self, start: int) -> None:
        self.next = start  # the offset after the last one consumed
        self.committed = start
        self._open: deque[int] = deque()
        self._settled: set[int] = set()

    def consumed(self, offset: int) -> None:
        self._open.append(offset)
        self.next = offset + 1

    def settle(self, offset: int) -> None:
        self._settled.add(offset)

    def watermark(self) -> int:
        while self._open and self._open[0] in self._settled:
            self._settled.discard(self._open.popleft())
        return self._open[0] if self._open else self.next

    @property
    def unsettled(self) -> int:
        return len(self._open) - len(self._settled)


@dataclass
class _Late:
    """Trajectories served before anything in the FIFO: returned or expired batches, late arrivals."""

    heap: list[tuple[int, int, Entry]] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def push(self, entry: Entry) -> None:
        heapq.heappush(self.heap, (entry.seq, next(self.counter), entry))

    def pop_buffered(self) -> Entry | None:
        while self.heap:
            _, _, entry = heapq.heappop(self.heap)
            if entry.state == BUFFERED:
                return entry
        return None

    def live(self) -> list[Entry]:
        return [e for _, _, e in self.heap if e.state == BUFFERED]


class RunPool:
    """One run's trajectories between Kafka and the trainer (not thread-safe: the caller locks)."""

    def __init__(
        self,
        run_id: str,
        *,
        window: int | float = 0.3,
        ack_timeout_s: float = 300.0,
        gap_timeout_s: float = 600.0,
        max_gap_fill: int = 100_000,
        first_seq: int | None = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_id = run_id
        self.window = window
        self.ack_timeout_s = ack_timeout_s
        self.gap_timeout_s = gap_timeout_s
        self.max_gap_fill = max_gap_fill
        self.clock = clock
        self.counters = PoolCounters()
        self.partitions: dict[int, PartitionOffsets] = {}
        self._fifo: WindowedFIFO[Entry] = WindowedFIFO(window)
        # The newest sequence number queued; first_seq - 1 for a fresh run, None when the start is unknown.
        self._last_seq: int | None = None if first_seq is None else first_seq - 1
        self._gaps: deque[tuple[float, int]] = deque()
        self._late = _Late()
        self._entries: dict[tuple[int, int], Entry] = {}  # undelivered and in-flight entries
        self._seen: set[str] = set()  # trajectory ids consumed, acknowledged or dropped
        self._restored_settled: dict[int, set[int]] = {}  # offsets settled before a restart
        self._batches: dict[str, Batch] = {}
        self._expired: dict[str, Batch] = {}
        self._acked_batches: deque[str] = deque(maxlen=10_000)
        self._acked_set: set[str] = set()
        self._incarnation = secrets.token_hex(4)
        self._batch_counter = itertools.count(1)
        self._log: list[dict[str, Any]] = []
        self._stale_checked: tuple[int, int | None] | None = None

    # -- restart ----------------------------------------------------------------------------------

    def restore(self, committed: dict[int, int], records: Iterable[dict[str, Any]]) -> None:
        """Rebuild from committed offsets (partition -> offset) and the state log, before consuming."""
        records = list(records)
        if records or any(committed.values()):
            # Trajectories were consumed before the restart: where the queue stands now is unknown.
            self._last_seq = None
        for partition, offset in committed.items():
            self.partitions[partition] = PartitionOffsets(offset)
        for record in records:
            kind = record.get("t")
            if kind == "ack":
                for p, o, tid in record["i"]:
                    self._restore_settled(p, o, tid)
                    self.counters.acknowledged += 1
                # An Ack that was written but not answered before a crash may be retried: it succeeds.
                self._remember_acked(record["b"])
            elif kind == "settle":
                for p, o, tid, reason in record["i"]:
                    self._restore_settled(p, o, tid)
                    if reason == "stale":
                        self.counters.dropped_stale += 1
                    elif reason == "dead":
                        self.counters.dead_lettered += 1
                    elif reason == "dup":
                        self.counters.duplicates += 1
                    elif reason == "skip":
                        self.counters.skipped += 1

    def _restore_settled(self, partition: int, offset: int, trajectory_id: str) -> None:
        if trajectory_id:
            self._seen.add(trajectory_id)
        start = self.partitions[partition].committed if partition in self.partitions else 0
        if offset >= start:
            self._restored_settled.setdefault(partition, set()).add(offset)

    def start_offset(self, partition: int) -> int:
        return self._tracker(partition).next

    def _tracker(self, partition: int) -> PartitionOffsets:
        tracker = self.partitions.get(partition)
        if tracker is None:
            tracker = self.partitions[partition] = PartitionOffsets(0)
        return tracker

    # -- consuming --------------------------------------------------------------------------------

    def _consume_offset(self, partition: int, offset: int) -> bool:
        """Register a consumed offset; False when it was consumed before (a re-fetch) or settled before
        the restart (then it is settled again at once)."""
        tracker = self._tracker(partition)
        if offset < tracker.next:
            return False
        tracker.consumed(offset)
        self.counters.consumed += 1
        restored = self._restored_settled.get(partition)
        if restored is not None and offset in restored:
            restored.discard(offset)
            tracker.settle(offset)
            return False
        return True

    def offer(self, partition: int, offset: int, index: TrajectoryIndex, payload: bytes) -> str:
        """A checked record from Kafka: "queued", "duplicate", "skipped_seq" (a skip marker, never served)
        or "skipped" (consumed or settled before)."""
        if not self._consume_offset(partition, offset):
            return "skipped"
        tid = index.trajectory_id
        if tid in self._seen:
            self.counters.duplicates += 1
            self._settle(partition, offset, tid, "dup")
            return "duplicate"
        self._seen.add(tid)
        if index.skipped:  # decode_index guarantees a seq or a bound
            if index.submit_seq is not None:
                self._skip(index.submit_seq)
            if index.skip_before is not None:
                self._skip_before(index.skip_before)
            self.counters.skipped += 1
            self._settle(partition, offset, tid, "skip")
            return "skipped_seq"
        entry = Entry(partition, offset, payload, tid, -1, index.min_policy_version)
        self._entries[(partition, offset)] = entry
        self._enqueue(entry, index.submit_seq)
        return "queued"

    def offer_trajectory(self, partition: int, offset: int, traj: trajectory_pb2.Trajectory) -> str:
        """offer() for a Trajectory message (tests, tools)."""
        return self.offer(partition, offset, index_of(traj), traj.SerializeToString())

    def dead_lettered(self, partition: int, offset: int, reason: str) -> bool:
        """A record that went to the dead-letter topic; False when it had been settled before."""
        if not self._consume_offset(partition, offset):
            return False
        self.counters.dead_lettered += 1
        self._settle(partition, offset, "", "dead", detail=reason)
        return True

    def _extend_to(self, seq: int) -> bool:
        """Queue `seq` (and the in-flight gaps before it) when it is past the newest; False if it is not."""
        last = self._last_seq
        if last is not None and seq <= last:
            return False
        now = self.clock()
        first_gap = seq if last is None else max(last + 1, seq - self.max_gap_fill)
        for gap in range(first_gap, seq):
            self._fifo.submit(gap)
            self._gaps.append((now, gap))
        self._fifo.submit(seq)
        self._last_seq = seq
        return True

    def _skip(self, seq: int) -> None:
        """The episode at `seq` sends no trajectory: stop holding the window for it."""
        if self._extend_to(seq) or self._fifo.state(seq) is ItemState.PENDING:
            self._fifo.drop(seq)
        # Otherwise a trajectory holds the seq (an attempt published before a later one failed) or the
        # head passed it: nothing waits for it.

    def _skip_before(self, end: int) -> None:
        """No seq below `end` still awaited will come (its rollout process is gone): stop waiting for them."""
        if end > 0 and self._extend_to(end - 1):
            self._fifo.drop(end - 1)
        for _, gap in self._gaps:  # every awaited seq was queued as a gap (at most max_gap_fill of them)
            if gap < end and self._fifo.state(gap) is ItemState.PENDING:
                self._fifo.drop(gap)

    def _enqueue(self, entry: Entry, seq: int | None) -> None:
        last = self._last_seq
        if seq is None:
            seq = 0 if last is None else last + 1
        entry.seq = seq
        if self._extend_to(seq) or self._fifo.state(seq) is ItemState.PENDING:
            self._fifo.complete(seq, entry)
            entry.in_fifo = True
        else:
            # The head passed this sequence number (an in-flight gap given up on, or one from before a
            # restart) or another trajectory holds it: it is among the oldest, serve it first.
            self._late.push(entry)

    # -- serving ----------------------------------------------------------------------------------

    def _expire_gaps(self, now: float) -> None:
        limit = now - self.gap_timeout_s
        while self._gaps and self._gaps[0][0] <= limit:
            _, gap = self._gaps.popleft()
            if self._fifo.state(gap) is ItemState.PENDING:
                self._fifo.drop(gap)
                self.counters.gaps_expired += 1

    def _is_stale(self, entry: Entry, policy_version: int, max_staleness: int | None) -> bool:
        if max_staleness is None or entry.min_version is None:
            return False
        return policy_version - entry.min_version > max_staleness

    def _drop_stale(self, entry: Entry) -> None:
        if entry.in_fifo and self._fifo.state(entry.seq) is ItemState.COMPLETED:
            self._fifo.drop(entry.seq)
        entry.state = DONE
        self._entries.pop((entry.partition, entry.offset), None)
        self.counters.dropped_stale += 1
        self._settle(entry.partition, entry.offset, entry.trajectory_id, "stale")

    def sweep_stale(self, policy_version: int, max_staleness: int | None) -> int:
        """Drop every buffered trajectory too stale for `policy_version`; returns how many."""
        if max_staleness is None:
            return 0
        key = (policy_version, max_staleness)
        if self._stale_checked == key:
            return 0
        self._stale_checked = key
        stale = [
            e
            for e in self._entries.values()
            if e.state == BUFFERED and self._is_stale(e, policy_version, max_staleness)
        ]
        for entry in stale:
            self._drop_stale(entry)
        return len(stale)

    def take(self, size: int, policy_version: int = 0, max_staleness: int | None = None) -> tuple[list[Entry], int]:
        """Up to `size` trajectories (returned or expired ones first, then windowed FIFO), and how many
        were dropped as stale on the way. The caller registers them with `serve()` or `give_back()`."""
        now = self.clock()
        self.expire(now)
        self._expire_gaps(now)
        dropped = self.sweep_stale(policy_version, max_staleness)
        out: list[Entry] = []
        while len(out) < size:
            entry = self._late.pop_buffered()
            if entry is None:
                break
            if self._is_stale(entry, policy_version, max_staleness):
                self._drop_stale(entry)
                dropped += 1
                continue
            out.append(entry)
        while len(out) < size:
            taken = self._fifo.take(size - len(out))
            if not taken:
                break
            for item in taken:
                entry = item.item
                entry.in_fifo = False
                if self._is_stale(entry, policy_version, max_staleness):
                    entry.in_fifo = False
                    self._drop_stale(entry)
                    dropped += 1
                else:
                    out.append(entry)
        for entry in out:
            entry.state = SERVED
        return out, dropped

    def serve(self, entries: list[Entry]) -> Batch:
        """Register taken entries as a batch awaiting its Ack."""
        batch_id = f"{self._incarnation}-{next(self._batch_counter)}"
        batch = Batch(batch_id, entries, self.clock() + self.ack_timeout_s)
        for entry in entries:
            entry.state = SERVED
            entry.batch_id = batch_id
        self._batches[batch_id] = batch
        self.counters.served += len(entries)
        return batch

    def give_back(self, entries: Iterable[Entry]) -> None:
        """Return taken or served entries, to be served again before anything newer."""
        for entry in entries:
            if entry.state in (SERVED, ACKING):
                entry.state = BUFFERED
                entry.batch_id = None
                self._late.push(entry)

    def expire(self, now: float | None = None) -> int:
        """Serve again the batches whose Ack is overdue; returns how many trajectories went back."""
        now = self.clock() if now is None else now
        overdue = [b for b in self._batches.values() if b.deadline <= now]
        n = 0
        for batch in overdue:
            del self._batches[batch.batch_id]
            batch.expired = True
            self._expired[batch.batch_id] = batch
            if len(self._expired) > 10_000:
                self._expired.pop(next(iter(self._expired)))
            live = [e for e in batch.entries if e.state == SERVED and e.batch_id == batch.batch_id]
            self.give_back(live)
            n += len(live)
        self.counters.redelivered += n
        return n

    # -- acknowledging ----------------------------------------------------------------------------

    def begin_ack(self, batch_id: str) -> tuple[Batch, dict[str, Any]] | None:
        """Reserve a batch for acknowledgement: (batch, the log record to write first), or None when it
        was acknowledged already. Raises AckError for an unknown batch or an expired one re-served."""
        batch = self._batches.pop(batch_id, None)
        if batch is None:
            if batch_id in self._acked_set:
                return None
            batch = self._expired.get(batch_id)
            if batch is None:
                raise AckError(
                    "unknown",
                    f"batch {batch_id!r} is unknown to this data pool (it may have restarted since): its "
                    "trajectories are served again; discard the batch",
                )
            if any(e.state != BUFFERED or e.batch_id is not None for e in batch.entries):
                raise AckError(
                    "expired",
                    f"batch {batch_id!r} was not acknowledged within {self.ack_timeout_s:.0f}s and its "
                    "trajectories were served again; discard the batch",
                )
            del self._expired[batch_id]
        for entry in batch.entries:
            entry.state = ACKING
            entry.batch_id = batch_id
        record = {
            "t": "ack",
            "b": batch_id,
            "i": [[e.partition, e.offset, e.trajectory_id] for e in batch.entries],
        }
        return batch, record

    def finish_ack(self, batch: Batch) -> int:
        """The ack record is durable: settle the batch's offsets. Returns the number acknowledged."""
        for entry in batch.entries:
            entry.state = DONE
            self._entries.pop((entry.partition, entry.offset), None)
            self._tracker(entry.partition).settle(entry.offset)
        self.counters.acknowledged += len(batch.entries)
        self._remember_acked(batch.batch_id)
        return len(batch.entries)

    def _remember_acked(self, batch_id: str) -> None:
        if len(self._acked_batches) == self._acked_batches.maxlen:
            self._acked_set.discard(self._acked_batches[0])
        self._acked_batches.append(batch_id)
        self._acked_set.add(batch_id)

    def abort_ack(self, batch: Batch) -> None:
        """Writing the ack record failed: the batch awaits its Ack again."""
        for entry in batch.entries:
            entry.state = SERVED
        batch.expired = False
        self._batches[batch.batch_id] = batch

    # -- offsets and the log ----------------------------------------------------------------------

    def _settle(self, partition: int, offset: int, trajectory_id: str, reason: str, detail: str = "") -> None:
        self._tracker(partition).settle(offset)
        self._log.append({"p": partition, "o": offset, "id": trajectory_id, "r": reason})

    def drain_log(self) -> dict[str, Any] | None:
        """The settle record to write for drops since the last call (None when there were none)."""
        if not self._log:
            return None
        items = [[x["p"], x["o"], x["id"], x["r"]] for x in self._log]
        self._log = []
        return {"t": "settle", "i": items}

    def committable(self) -> dict[int, int]:
        """Partitions whose committable offset moved past the last commit: partition -> offset."""
        out: dict[int, int] = {}
        for partition, tracker in self.partitions.items():
            wm = tracker.watermark()
            if wm > tracker.committed:
                out[partition] = wm
        return out

    def mark_committed(self, offsets: dict[int, int]) -> None:
        for partition, offset in offsets.items():
            tracker = self._tracker(partition)
            tracker.committed = max(tracker.committed, offset)

    # -- introspection ----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        return sum(1 for e in self._entries.values() if e.state == BUFFERED)

    @property
    def in_flight(self) -> int:
        return sum(len(b.entries) for b in self._batches.values())

    @property
    def pending_gaps(self) -> int:
        return self._fifo.num_pending

    @property
    def next_seq(self) -> int:
        """The sequence number after the newest queued; 0 when none is (or none since a restart)."""
        return 0 if self._last_seq is None else self._last_seq + 1

    def committed_offsets(self) -> dict[int, int]:
        return {p: t.committed for p, t in self.partitions.items()}
