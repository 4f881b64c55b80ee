"""Engine load and prefix-cache counters, fed by vLLM's stat-logger hook (one record per engine step)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class EngineStats:
    running_requests: int = 0
    waiting_requests: int = 0
    kv_cache_usage: float = 0.0
    # Prompt tokens looked up in the prefix cache, and how many of them were found, since start.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        if not self.prefix_cache_queried_tokens:
            return 0.0
        return self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens

    def record(self, scheduler_stats: Any) -> None:
        """Take one vLLM `SchedulerStats`: the gauges replace, the prefix-cache counts add up."""
        if scheduler_stats is None:
            return
        self.running_requests = int(scheduler_stats.num_running_reqs)
        self.waiting_requests = int(scheduler_stats.num_waiting_reqs) + int(
            getattr(scheduler_stats, "num_skipped_waiting_reqs", 0)
        )
        self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
        prefix = getattr(scheduler_stats, "prefix_cache_stats", None)
        if prefix is not None:
            self.prefix_cache_queried_tokens += int(prefix.queries)
            self.prefix_cache_hit_tokens += int(prefix.hits)


def stat_logger_factory(stats: EngineStats) -> Any:
    """A vLLM `StatLoggerFactory` whose loggers feed `stats` (vLLM is imported here, not at module import)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
        ) -> None:
            stats.record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _Logger
