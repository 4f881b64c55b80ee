"""Peak CPU tensor memory of a piece of work, measured by torch's profiler, not by the code measured.

`PeakCpuMemory` records every allocation and free of torch's CPU allocator while it is open (the
profiler's allocation events, `profile_memory=True`) and replays them in time order: `peak_bytes` is
the largest amount allocated beyond what was live when it opened (frees of older tensors count as
negative, so it is the growth over the starting point). The calling thread only: what gloo's worker threads
allocate is not seen, and a tensor whose last reference dies there (they hold a broadcast's or an
all-gather's tensors until done with them) stays counted as held. torch 2.13's `profile_all_threads`
records no allocation events at all. Tensors only, not Python
objects. The profiler costs ~1 s to start: for benchmarks and tests.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


class PeakCpuMemory:
    """`with PeakCpuMemory() as meter: work()`, then `meter.peak_bytes`."""

    def __init__(self) -> None:
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.peak_bytes = 0
        self.net_bytes = 0

    def __enter__(self) -> PeakCpuMemory:
        self._profile.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._profile.__exit__(kind, error, trace)
        if kind is not None:
            return
        events: list[tuple[int, int]] = []
        results = self._profile.profiler.kineto_results  # type: ignore[union-attr]
        assert results is not None, "the profiler recorded nothing"
        _collect_allocations(results.experimental_event_tree(), events)
        live = 0
        for _, size in sorted(events):
            live += size
            self.peak_bytes = max(self.peak_bytes, live)
        self.net_bytes = live


def _collect_allocations(nodes: list[Any], out: list[tuple[int, int]]) -> None:
    """(time ns, bytes: + allocated, - freed) of every allocation event under `nodes`."""
    for node in nodes:
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            out.append((node.start_time_ns, int(node.extra_fields.alloc_size)))
        _collect_allocations(node.children, out)
