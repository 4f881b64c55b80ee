"""forgerl.inference.stats: gauges replace, prefix-cache counts add up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from forgerl.inference.stats import EngineStats

pytestmark = pytest.mark.unit


def step(running: int, waiting: int, usage: float, queries: int, hits: int) -> SimpleNamespace:
    return SimpleNamespace(
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_skipped_waiting_reqs=0,
        kv_cache_usage=usage,
        prefix_cache_stats=SimpleNamespace(queries=queries, hits=hits),
    )


def test_records_accumulate() -> None:
    stats = EngineStats()
    assert stats.prefix_cache_hit_rate == 0.0
    stats.record(step(2, 1, 0.25, 300, 0))
    stats.record(step(1, 0, 0.5, 300, 256))
    stats.record(None)
    assert (stats.running_requests, stats.waiting_requests, stats.kv_cache_usage) == (1, 0, 0.5)
    assert (stats.prefix_cache_queried_tokens, stats.prefix_cache_hit_tokens) == (600, 256)
    assert stats.prefix_cache_hit_rate == pytest.approx(256 / 600)
