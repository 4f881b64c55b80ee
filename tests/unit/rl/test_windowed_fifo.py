"""Windowed FIFO: exact agreement with a plain reference, and the properties the issue names."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from forgerl.rl.windowed_fifo import ItemState, WindowedFIFO

pytestmark = pytest.mark.unit


class ReferenceQueue:
    """The rule written out literally, O(n) per item: positions in a list, a window from the head."""

    def __init__(self, window: int | float) -> None:
        self.window = window
        self.seqs: list[int] = []
        self.states: list[str] = []

    def head(self) -> int:
        live = [i for i, s in enumerate(self.states) if s in ("pending", "completed")]
        return live[0] if live else len(self.states)

    def width(self) -> int:
        if isinstance(self.window, int):
            return self.window
        return max(1, math.ceil(self.window * (len(self.states) - self.head())))

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            head = self.head()
            ready = [
                i for i in range(head, min(head + self.width(), len(self.states))) if self.states[i] == "completed"
            ]
            if not ready:
                break
            self.states[ready[0]] = "taken"
            out.append(self.seqs[ready[0]])
        return out


def _drive(queue: WindowedFIFO[int], n: int, order: list[int], takes: list[int]) -> list[list[int]]:
    """Submits n items, completes them in `order`, calling take(k) after each completion."""
    for seq in range(n):
        queue.submit(seq)
    batches = []
    for seq, k in zip(order, takes, strict=True):
        queue.complete(seq, seq)
        batches.append([t.item for t in queue.take(k)])
    return batches


schedules = st.integers(1, 40).flatmap(
    lambda n: st.tuples(
        st.just(n),
        st.permutations(range(n)),
        st.lists(st.integers(0, 5), min_size=n, max_size=n),
    )
)


@settings(max_examples=200, deadline=None)
@given(schedules, st.integers(1, 12))
def test_nothing_lost_nothing_twice_nothing_beyond_the_window(schedule, window: int) -> None:
    n, order, takes = schedule
    queue: WindowedFIFO[int] = WindowedFIFO(window)
    for seq in range(n):
        queue.submit(seq)
    taken: list[int] = []
    for seq, k in zip(order, takes, strict=True):
        queue.complete(seq, seq)
        for _ in range(k):  # take(1) at a time, so the head before every single take is known
            head = min((s for s in range(n) if s not in taken), default=n)
            got = queue.take(1)
            if not got:
                break
            assert got[0].seq < head + window, "taken from beyond the window"
            taken.append(got[0].seq)
    while batch := queue.take(n):
        taken.extend(t.seq for t in batch)
    assert sorted(taken) == list(range(n)) and len(taken) == len(set(taken))
    assert len(queue) == 0 and queue.head_seq is None


@settings(max_examples=200, deadline=None)
@given(schedules)
def test_window_one_is_strict_fifo(schedule) -> None:
    n, order, takes = schedule
    batches = _drive(WindowedFIFO(1), n, order, takes)
    completed: set[int] = set()
    next_seq = 0
    for seq, k, batch in zip(order, takes, batches, strict=True):
        completed.add(seq)
        expected: list[int] = []
        while len(expected) < k and next_seq in completed:
            expected.append(next_seq)
            next_seq += 1
        assert batch == expected


@settings(max_examples=200, deadline=None)
@given(schedules, st.sampled_from(["fraction", "count"]))
def test_window_n_is_greedy(schedule, kind: str) -> None:
    n, order, takes = schedule
    window: int | float = 1.0 if kind == "fraction" else n
    batches = _drive(WindowedFIFO(window), n, order, takes)
    waiting: list[int] = []
    for seq, k, batch in zip(order, takes, batches, strict=True):
        waiting = sorted([*waiting, seq])
        assert batch == waiting[:k]  # every completed item is takeable, oldest first
        waiting = waiting[k:]


@settings(max_examples=300, deadline=None)
@given(schedules, st.one_of(st.integers(1, 10), st.sampled_from([0.1, 0.3, 0.5, 1.0])))
def test_take_k_equals_k_single_takes(schedule, window: int | float) -> None:
    n, order, takes = schedule
    batches = _drive(WindowedFIFO(window), n, order, takes)
    one_by_one: WindowedFIFO[int] = WindowedFIFO(window)
    for seq in range(n):
        one_by_one.submit(seq)
    for seq, k, batch in zip(order, takes, batches, strict=True):
        one_by_one.complete(seq, seq)
        singles = [t.item for _ in range(k) for t in one_by_one.take(1)]
        assert singles == batch


class QueueMachine(RuleBasedStateMachine):
    """Random interleavings of submit / complete / drop / take, checked step by step against the
    reference; sequence numbers have gaps, as Kafka offsets do."""

    @initialize(window=st.one_of(st.integers(1, 8), st.sampled_from([0.1, 0.3, 0.5, 1.0])))
    def setup(self, window: int | float) -> None:
        self.queue: WindowedFIFO[str] = WindowedFIFO(window)
        self.ref = ReferenceQueue(window)
        self.next_seq = 100
        self.taken: list[int] = []
        self.dropped: set[int] = set()

    def _seqs(self, state: str) -> list[int]:
        return [seq for seq, s in zip(self.ref.seqs, self.ref.states, strict=True) if s == state]

    @rule(gap=st.integers(1, 3))
    def submit(self, gap: int) -> None:
        self.next_seq += gap
        assert self.queue.submit(self.next_seq) == self.next_seq
        self.ref.seqs.append(self.next_seq)
        self.ref.states.append("pending")

    @precondition(lambda self: "pending" in self.ref.states)
    @rule(data=st.data())
    def complete(self, data) -> None:
        seq = data.draw(st.sampled_from(self._seqs("pending")))
        assert self.queue.complete(seq, f"result-{seq}")
        self.ref.states[self.ref.seqs.index(seq)] = "completed"

    @precondition(lambda self: any(s in ("pending", "completed") for s in self.ref.states))
    @rule(data=st.data())
    def drop(self, data) -> None:
        seq = data.draw(st.sampled_from(self._seqs("pending") + self._seqs("completed")))
        was_pending = self.ref.states[self.ref.seqs.index(seq)] == "pending"
        assert self.queue.drop(seq)
        self.ref.states[self.ref.seqs.index(seq)] = "dropped"
        self.dropped.add(seq)
        if was_pending:  # its generation finishes later: the result is discarded, not queued
            assert not self.queue.complete(seq, "late")

    @rule(k=st.integers(0, 6))
    def take(self, k: int) -> None:
        got = self.queue.take(k)
        assert [t.seq for t in got] == self.ref.take(k)
        assert all(t.item == f"result-{t.seq}" for t in got)
        self.taken.extend(t.seq for t in got)

    @invariant()
    def agrees_with_reference(self) -> None:
        states = self.ref.states
        assert len(self.queue) == states.count("pending") + states.count("completed")
        assert self.queue.num_completed == states.count("completed")
        head = self.ref.head()
        assert self.queue.head_seq == (self.ref.seqs[head] if head < len(states) else None)
        assert self.queue.extent == len(states) - head
        assert len(self.taken) == len(set(self.taken)) and not self.dropped & set(self.taken)


QueueMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_queue_machine = QueueMachine.TestCase


def test_positions_not_offsets_define_the_window() -> None:
    queue: WindowedFIFO[str] = WindowedFIFO(2)
    for offset in (10, 20, 30):
        queue.submit(offset)
    queue.complete(30, "c")
    assert queue.take(5) == []  # position 2 is outside [0, 2) while offset 10 is pending
    queue.complete(20, "b")
    assert [t.seq for t in queue.take(5)] == [20]
    assert queue.state(20) is ItemState.TAKEN
    queue.drop(10)  # stale: the head jumps past it and the taken 20, so 30 comes into the window
    assert queue.head_seq == 30
    assert [t.item for t in queue.take(5)] == ["c"]


def test_fraction_window_is_measured_on_the_current_extent() -> None:
    queue: WindowedFIFO[int] = WindowedFIFO(0.3)
    for seq in range(10):
        queue.submit(seq)
    assert queue.window == 3
    for seq in (1, 2, 3, 9):
        queue.complete(seq, seq)
    assert [t.seq for t in queue.take(10)] == [1, 2]
    queue.complete(0, 0)
    # taking 0 moves the head past 0-2: extent 7 -> W = 3, so 3 is taken and 9 stays out of reach.
    assert [t.seq for t in queue.take(10)] == [0, 3]
    assert queue.window == 2 and queue.head_seq == 4


def test_misuse_is_reported() -> None:
    queue: WindowedFIFO[int] = WindowedFIFO(3)
    queue.submit(5)
    with pytest.raises(ValueError, match="must increase"):
        queue.submit(5)
    with pytest.raises(KeyError, match="never submitted"):
        queue.complete(6, 0)
    queue.complete(5, 0)
    with pytest.raises(ValueError, match="completes once"):
        queue.complete(5, 0)
    with pytest.raises(ValueError, match="a count must be >= 1"):
        WindowedFIFO(0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        WindowedFIFO(1.5)
    with pytest.raises(TypeError):
        WindowedFIFO(True)


def test_thousands_of_items_stay_cheap_and_compact() -> None:
    queue: WindowedFIFO[int] = WindowedFIFO(0.3)
    n = 20_000
    for seq in range(n):
        queue.submit(seq)
    for seq in range(n - 1, -1, -1):  # reverse completion: the head completes last
        queue.complete(seq, seq)
        if seq % 7 == 0 and seq > 0:
            queue.drop(seq)
    taken = [t.seq for t in queue.take(n)]
    assert taken == [seq for seq in range(n) if seq == 0 or seq % 7]
    assert len(queue._slots) < 2 * 64 and len(queue._ready) < 2 * 64  # the backing lists were compacted
