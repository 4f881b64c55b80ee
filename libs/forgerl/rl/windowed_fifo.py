"""Windowed FIFO: the generation queue's scheduling rule between strict FIFO and greedy (MiniMax-M2, Forge).

Requests are submitted in order and complete in any order. The trainer takes completed items only from
the window of the W oldest queue positions, `[head, head + W)`, where the head is the oldest item not yet
taken or dropped: greedy (any completed item, oldest first) inside the window, never beyond it. A slow
item at the head therefore holds back at most W - 1 later ones, which bounds both the off-policy lag and
the drift of the batch mix toward fast (easy) tasks, while a window larger than one keeps the trainer fed
past single stragglers. W = 1 is strict FIFO, W >= the queue's extent is greedy; the report uses
W = 0.3 N.

Positions count submissions (0, 1, 2, ...) whatever the sequence numbers are, so Kafka offsets with gaps
work as keys. A taken item keeps its position until the head passes it, so it still occupies a slot of
the window: the window limits how far past the head the trainer may reach, not how many items it holds.
Dropped items (staleness) never block the head. `take(k)` costs O(k) plus the dropped entries it skips
(each skipped once); `complete` is a binary search plus a list insert; memory is O(extent).
"""

from __future__ import annotations

import bisect
import enum
import math
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

T = TypeVar("T")

# Rebuild the backing lists once this many dead entries lie at their front (and they are half the list):
# amortised O(1) per item, and a steady queue of thousands never moves more than a few KiB at a time.
_COMPACT_MIN = 64


class ItemState(enum.Enum):
    PENDING = "pending"
    COMPLETED = "completed"
    TAKEN = "taken"
    DROPPED = "dropped"


class Taken(NamedTuple, Generic[T]):
    seq: int
    item: T


@dataclass(slots=True)
class _Slot(Generic[T]):
    seq: int
    state: ItemState
    item: T | None = None


class WindowedFIFO(Generic[T]):
    """A queue keyed by submission sequence numbers whose `take` is greedy inside a window of W positions.

    `window` is a count W >= 1, or a fraction f in (0, 1] of the queue's extent N (positions from the
    head to the newest submission, taken-but-not-yet-passed ones included): W = max(1, ceil(f * N)),
    re-evaluated as the head moves. `WindowedFIFO(1)` is strict FIFO and `WindowedFIFO(1.0)` greedy.
    """

    def __init__(self, window: int | float) -> None:
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise TypeError(f"window must be an int count or a float fraction, got {window!r}")
        if isinstance(window, int) and window < 1:
            raise ValueError(f"window {window}: a count must be >= 1 (1 = strict FIFO)")
        if isinstance(window, float) and not 0.0 < window <= 1.0:
            raise ValueError(f"window {window}: a fraction must lie in (0, 1] (1.0 = greedy)")
        self._window = window
        self._slots: list[_Slot[T]] = []  # positions _base .. _base + len(_slots) - 1
        self._base = 0
        self._head = 0  # first position that is pending or completed (== tail when none is)
        self._position: dict[int, int] = {}  # seq -> position, for positions >= head
        self._ready: list[int] = []  # positions of completed items; sorted from _ready_start on
        self._ready_start = 0
        self._last_seq: int | None = None
        self._n_pending = 0
        self._n_completed = 0

    # -- queries -------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Items still queued: submitted and neither taken nor dropped."""
        return self._n_pending + self._n_completed

    @property
    def num_pending(self) -> int:
        return self._n_pending

    @property
    def num_completed(self) -> int:
        """Completed items waiting to be taken (inside the window or not)."""
        return self._n_completed

    @property
    def extent(self) -> int:
        """N: positions from the head to the newest submission, the span a window can cover."""
        return self._tail - self._head

    @property
    def head_seq(self) -> int | None:
        """The sequence number at the head (the oldest queued item), or None when nothing is queued."""
        return self._slot(self._head).seq if self._head < self._tail else None

    @property
    def window(self) -> int:
        """W now: how many positions from the head `take` may reach."""
        if isinstance(self._window, int):
            return self._window
        return max(1, math.ceil(self._window * self.extent))

    def state(self, seq: int) -> ItemState | None:
        """The state of a queued item, or None once the head has passed it (or it was never submitted)."""
        position = self._position.get(seq)
        return None if position is None else self._slot(position).state

    # -- updates -------------------------------------------------------------------------------------

    def submit(self, seq: int | None = None) -> int:
        """Queues a new request at the tail; `seq` must exceed every earlier one (default: last + 1)."""
        if seq is None:
            seq = 0 if self._last_seq is None else self._last_seq + 1
        elif self._last_seq is not None and seq <= self._last_seq:
            raise ValueError(f"seq {seq} submitted after {self._last_seq}: sequence numbers must increase")
        self._position[seq] = self._tail
        self._slots.append(_Slot(seq, ItemState.PENDING))
        self._last_seq = seq
        self._n_pending += 1
        return seq

    def complete(self, seq: int, item: T) -> bool:
        """Marks a pending item completed with its result.

        Returns False, and keeps nothing, when the item is no longer waiting: it was dropped (a stale
        request whose generation finished anyway), or the head has moved past it. Raises KeyError for a
        sequence number never submitted, ValueError for a second completion of a queued item.
        """
        position = self._position.get(seq)
        if position is None:
            if self._last_seq is None or seq > self._last_seq:
                raise KeyError(f"seq {seq} was never submitted (last submitted: {self._last_seq})")
            return False
        slot = self._slot(position)
        if slot.state is ItemState.DROPPED:
            return False
        if slot.state is not ItemState.PENDING:
            raise ValueError(f"seq {seq} is already {slot.state.value}: an item completes once")
        slot.state, slot.item = ItemState.COMPLETED, item
        self._n_pending -= 1
        self._n_completed += 1
        bisect.insort(self._ready, position, lo=self._ready_start)
        return True

    def drop(self, seq: int) -> bool:
        """Removes a pending or completed item (e.g. too stale to train on); False if already dropped."""
        slot, position = self._queued(seq)
        if slot.state is ItemState.DROPPED:
            return False
        if slot.state is ItemState.TAKEN:
            raise ValueError(f"seq {seq} was already taken: only queued items can be dropped")
        if slot.state is ItemState.PENDING:
            self._n_pending -= 1
        else:
            self._n_completed -= 1  # its entry in _ready is skipped lazily by take()
        slot.state, slot.item = ItemState.DROPPED, None
        if position == self._head:
            self._advance_head()
        return True

    def take(self, k: int) -> list[Taken[T]]:
        """Up to k completed items, oldest first, each inside the window at the moment it is taken.

        Taking the head moves the head (and with it the window) forward, so one call behaves as k calls
        of `take(1)`: with W = 1 and everything completed, `take(k)` returns the k oldest items.
        """
        if k < 0:
            raise ValueError(f"take({k}): k must be >= 0")
        taken: list[Taken[T]] = []
        while len(taken) < k:
            position = self._next_ready()
            if position is None or position >= self._head + self.window:
                break  # the oldest completed item is outside the window, so every other one is too
            slot = self._slot(position)
            taken.append(Taken(slot.seq, slot.item))  # type: ignore[arg-type]  # completed => item set
            slot.state, slot.item = ItemState.TAKEN, None
            self._n_completed -= 1
            self._ready_start += 1
            if position == self._head:
                self._advance_head()
        self._compact_ready()
        return taken

    # -- internals -----------------------------------------------------------------------------------

    @property
    def _tail(self) -> int:
        return self._base + len(self._slots)

    def _slot(self, position: int) -> _Slot[T]:
        return self._slots[position - self._base]

    def _queued(self, seq: int) -> tuple[_Slot[T], int]:
        position = self._position.get(seq)
        if position is None:
            raise KeyError(
                f"seq {seq} is not queued: it was never submitted, or it was taken or dropped and the "
                "head has moved past it"
            )
        return self._slot(position), position

    def _next_ready(self) -> int | None:
        """The oldest completed position, skipping entries of items dropped after they completed."""
        ready = self._ready
        while self._ready_start < len(ready):
            position = ready[self._ready_start]
            if position >= self._head and self._slot(position).state is ItemState.COMPLETED:
                return position
            self._ready_start += 1
        return None

    def _advance_head(self) -> None:
        while self._head < self._tail:
            slot = self._slot(self._head)
            if slot.state is ItemState.PENDING or slot.state is ItemState.COMPLETED:
                break
            del self._position[slot.seq]
            self._head += 1
        passed = self._head - self._base
        if passed >= _COMPACT_MIN and 2 * passed >= len(self._slots):
            del self._slots[:passed]
            self._base = self._head

    def _compact_ready(self) -> None:
        start = self._ready_start
        if start >= _COMPACT_MIN and 2 * start >= len(self._ready):
            del self._ready[:start]
            self._ready_start = 0
