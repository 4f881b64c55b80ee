"""Rollout throughput: episodes/minute and sandbox start latency p50/p99 at 1, 8 and 32 episodes in flight.

Real episodes through `RolloutManager` + `EpisodeRunner` in local sandboxes (network/mount/PID namespaces,
rlimits, a uid per sandbox), with the scripted knows-the-answers agent, so the numbers are the rollout
machinery's own (sandbox start, tool calls in the sandbox, restoring and running the tests, rewards,
clean-up), not a model's: with a model, generation time adds to every episode. The task mix alternates
the two suites (a tool-use question: one sandboxed tool call or none; a SWE task: an edit, a test run in
the sandbox, then the graded test run).

    sandbox_start_p50_s / _p99_s   creating the sandbox: directory, files, ownership, first command (probe)
    episodes_per_minute            finished episodes / wall time of the level
    episode_wall_p50_s             the agent's part of an episode (what the speed reward sees)

Run: `python benchmarks/rollout.py [--levels 1,8,32] [--episodes-per-slot 3] [--out results.json]` (root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

from forgerl.rollout.episode import EpisodeResult, EpisodeRunner, EpisodeSpec
from forgerl.rollout.manager import RolloutManager
from forgerl.rollout.sandbox.base import SandboxLimits
from forgerl.rollout.sandbox.local import LocalSandboxFactory
from forgerl.rollout.tasks import get_suite
from forgerl.v1 import rollout_pb2


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def level(in_flight: int, episodes: int, root: Path) -> dict[str, object]:
    suites = {"tooluse": get_suite("tooluse"), "swe": get_suite("swe")}
    runner = EpisodeRunner(LocalSandboxFactory(root, SandboxLimits()), suites)
    results: list[EpisodeResult] = []

    async def run(spec: EpisodeSpec) -> EpisodeResult:
        result = await runner.run(spec)
        results.append(result)
        return result

    manager = RolloutManager(run, suites, max_in_flight=in_flight, retry_backoff_s=0.1)
    await manager.start()
    tool_tasks = list(suites["tooluse"].tasks("test"))
    swe_tasks = [*suites["swe"].tasks("train"), *suites["swe"].tasks("test")]
    n_swe = episodes // 2
    start = time.monotonic()
    subs = [
        await manager.submit("bench", tool_tasks[: episodes - n_swe], group_size=1, scaffold_version="oracle"),
        await manager.submit(
            "bench", [swe_tasks[i % len(swe_tasks)] for i in range(n_swe)], group_size=1, scaffold_version="oracle"
        ),
    ]
    events = []
    for sid, _ in subs:
        events += [e async for e in manager.events(submission_id=sid)]
    elapsed = time.monotonic() - start
    await manager.stop()
    kinds = rollout_pb2.EpisodeEventKind
    starts = [r.sandbox_start_s for r in results]
    return {
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "in_flight": in_flight,
        "episodes": len(results),
        "elapsed_s": round(elapsed, 3),
        "episodes_per_minute": round(60.0 * len(results) / elapsed, 2),
        "sandbox_start_p50_s": round(percentile(starts, 0.5), 4),
        "sandbox_start_p99_s": round(percentile(starts, 0.99), 4),
        "sandbox_start_max_s": round(max(starts), 4),
        "episode_wall_p50_s": round(statistics.median(r.wall_clock_s for r in results), 4),
        "success_rate": round(sum(r.success for r in results) / len(results), 4),
        "retried": sum(e.kind == kinds.EPISODE_EVENT_KIND_RETRIED for e in events),
        "failed": sum(e.kind == kinds.EPISODE_EVENT_KIND_FAILED for e in events),
    }


async def main_async(levels: list[int], per_slot: int, min_episodes: int) -> dict[str, object]:
    root = Path("/var/tmp") / f"forgerl-bench-{uuid.uuid4().hex[:8]}"
    try:
        rows = []
        for c in levels:
            rows.append(await level(c, max(min_episodes, per_slot * c), root))
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "benchmark": "rollout",
        "agent": "scripted oracle (no model): the rollout and sandbox machinery alone",
        "sandbox": "local (namespaces + rlimits + per-sandbox uid)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        # Other work on the machine slows sandboxes (process start-up is CPU-bound): read the numbers with it.
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "levels": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", default="1,8,32", help="episodes in flight, comma-separated")
    parser.add_argument("--episodes-per-slot", type=int, default=3, help="episodes per in-flight slot and level")
    parser.add_argument("--min-episodes", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if os.geteuid() != 0:
        result: dict[str, object] = {"benchmark": "rollout", "skipped": "the local sandbox needs root"}
    else:
        levels = [int(x) for x in args.levels.split(",") if x.strip()]
        result = asyncio.run(main_async(levels, args.episodes_per_slot, args.min_episodes))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
