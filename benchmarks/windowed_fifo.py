"""Windowed FIFO vs strict FIFO vs greedy: a discrete-event simulation of the generation queue (JSON out).

The generation engine runs up to C requests at once and starts a new one whenever a slot frees; the queue
(the data pool) holds at most N items, pending or completed and not yet taken, so completed items that
wait behind a slow head eventually stop the engine (back-pressure). Tasks are easy / medium / hard with a
mix p, and a request's completion time is lognormal around its difficulty's median (heavy tail: sigma 1.0
puts p99 at 10x the median). The trainer needs B items per step and trains for tau per step; its policy
version goes up by one per step. Items whose lag would exceed a staleness bound are dropped from the
head, as the data pool does; each schedule runs with and without the bound. Measured after a warm-up:

    idle_frac          time the trainer waits for data / total time
    throughput         items trained per unit of time
    lag_*              off-policy lag: version trained at - version the request was generated with
    lag_mean_<d>       the same per difficulty: greedy trains hard tasks much staler than easy ones
    dropped_frac       requests dropped as stale / requests finished or dropped
    mix_tv_*           drift of a batch's difficulty mix from the task mix p (total-variation distance),
                       over all batches, and over the first `warmup` batches (the start-up transient)
    hard_frac_mean     share of hard tasks in batches (p_hard is what an unbiased batch has);
                       hard_frac_warmup_first10: the same over the first 10 batches of the run

Run: `python benchmarks/windowed_fifo.py [--steps 600] [--out results.json]`. Same seed, same tasks and
durations for every schedule (common random numbers), so differences come from the schedule alone.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from forgerl.rl.windowed_fifo import WindowedFIFO

DIFFICULTIES = ("easy", "medium", "hard")


@dataclass(frozen=True)
class SimConfig:
    concurrency: int = 256  # C, requests the generation engine runs at once
    batch: int = 32  # B, items per trainer step
    steps: int = 600
    warmup_steps: int = 100
    queue: int = 1024  # N, the queue's size: pending + completed-not-taken items
    # Trainer demand B / tau over the engine's capacity C / E[duration]: > 1, generation is the bottleneck.
    load: float = 1.25
    max_lag: int | None = 24  # staleness bound in policy versions; None keeps everything
    sigma: float = 1.0  # lognormal shape of completion times: p99 is 10x the median
    medians: tuple[float, float, float] = (1.0, 3.0, 9.0)  # easy, medium, hard median durations
    mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    seed: int = 0

    @property
    def mean_duration(self) -> float:
        return float(np.dot(self.mix, self.medians)) * math.exp(self.sigma**2 / 2)

    @property
    def train_time(self) -> float:
        return self.batch * self.mean_duration / (self.concurrency * self.load)


def draw_tasks(cfg: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """Difficulty index and completion time of request i, for as many requests as any run submits."""
    n = 4 * (cfg.queue + cfg.steps * cfg.batch)  # drops included; checked in simulate()
    rng = np.random.default_rng(cfg.seed)
    difficulty = rng.choice(len(DIFFICULTIES), size=n, p=cfg.mix)
    duration = np.asarray(cfg.medians)[difficulty] * rng.lognormal(0.0, cfg.sigma, size=n)
    return difficulty, duration


@dataclass
class _Trace:
    lags: list[int] = field(default_factory=list)
    lag_difficulty: list[int] = field(default_factory=list)
    mixes: list[np.ndarray] = field(default_factory=list)
    warmup_mixes: list[np.ndarray] = field(default_factory=list)
    finished: int = 0
    dropped: int = 0
    idle: float = 0.0
    take_seconds: float = 0.0
    taken: int = 0


def simulate(window: int | float, cfg: SimConfig, difficulty: np.ndarray, duration: np.ndarray) -> dict:
    queue: WindowedFIFO[int] = WindowedFIFO(window)
    finishing: list[tuple[float, int]] = []  # (finish time, seq)
    generated_at: list[int] = []  # policy version each request was generated with
    now, version, start_time = 0.0, 0, 0.0
    trace = _Trace()
    batch: list[int] = []

    def refill() -> None:
        while queue.num_pending < cfg.concurrency and len(queue) < cfg.queue:
            seq = queue.submit()
            if seq >= len(duration):
                raise RuntimeError("draw_tasks() drew too few requests for this run: raise its n")
            heapq.heappush(finishing, (now + duration[seq], seq))
            generated_at.append(version)

    refill()
    while version < cfg.steps:
        while finishing and finishing[0][0] <= now:
            _, seq = heapq.heappop(finishing)
            trace.finished += queue.complete(seq, seq)  # False: dropped while it ran
        # Generation versions rise with seq, so the stale items are the oldest ones: drop from the head.
        while (head := queue.head_seq) is not None and _stale(cfg, version - generated_at[head]):
            queue.drop(head)
            trace.dropped += 1
        tic = time.perf_counter()
        taken = queue.take(cfg.batch - len(batch))
        trace.take_seconds += time.perf_counter() - tic
        trace.taken += len(taken)
        batch.extend(item.item for item in taken)
        refill()
        if len(batch) == cfg.batch:
            _record(trace, cfg, version, batch, difficulty, generated_at)
            if version == cfg.warmup_steps:
                start_time = now
            now += cfg.train_time
            version += 1
            batch = []
            continue
        next_finish = finishing[0][0]
        if version >= cfg.warmup_steps:
            trace.idle += next_finish - now
        now = next_finish
    return _summary(cfg, trace, now - start_time)


def _stale(cfg: SimConfig, lag: int) -> bool:
    return cfg.max_lag is not None and lag > cfg.max_lag


def _record(
    trace: _Trace, cfg: SimConfig, version: int, batch: list[int], difficulty: np.ndarray, generated_at: list[int]
) -> None:
    mix = np.bincount(difficulty[batch], minlength=len(DIFFICULTIES)) / cfg.batch
    if version < cfg.warmup_steps:
        trace.warmup_mixes.append(mix)
        return
    trace.mixes.append(mix)
    trace.lags.extend(version - generated_at[seq] for seq in batch)
    trace.lag_difficulty.extend(int(d) for d in difficulty[batch])


def _summary(cfg: SimConfig, trace: _Trace, elapsed: float) -> dict:
    lag = np.asarray(trace.lags)
    lag_difficulty = np.asarray(trace.lag_difficulty)
    mixes, warmup_mixes = np.asarray(trace.mixes), np.asarray(trace.warmup_mixes)
    tv = 0.5 * np.abs(mixes - np.asarray(cfg.mix)).sum(axis=1)
    warmup_tv = 0.5 * np.abs(warmup_mixes - np.asarray(cfg.mix)).sum(axis=1)
    measured_steps = cfg.steps - cfg.warmup_steps
    summary = {
        "idle_frac": trace.idle / elapsed,
        "throughput": measured_steps * cfg.batch / elapsed,
        "lag_mean": float(lag.mean()),
        "lag_p50": float(np.percentile(lag, 50)),
        "lag_p95": float(np.percentile(lag, 95)),
        "lag_max": int(lag.max()),
    }
    for index, name in enumerate(DIFFICULTIES):
        summary[f"lag_mean_{name}"] = float(lag[lag_difficulty == index].mean())
    summary |= {
        "dropped_frac": trace.dropped / max(1, trace.finished + trace.dropped),
        "mix_tv_mean": float(tv.mean()),
        "mix_tv_p95": float(np.percentile(tv, 95)),
        "mix_tv_warmup_mean": float(warmup_tv.mean()),
        "hard_frac_mean": float(mixes[:, DIFFICULTIES.index("hard")].mean()),
        "hard_frac_warmup_first10": float(warmup_mixes[:10, DIFFICULTIES.index("hard")].mean()),
        "take_us_per_item": 1e6 * trace.take_seconds / max(1, trace.taken),
    }
    return summary


def schedules(cfg: SimConfig) -> list[tuple[str, int | float]]:
    """(name, window): counts for strict FIFO and W = f N, the fraction 1.0 (whole extent) for greedy."""
    windowed = [(f"windowed_{f}N", max(1, round(f * cfg.queue))) for f in (0.1, 0.3, 0.5)]
    return [("fifo", 1), *windowed, ("greedy", 1.0)]


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU model, cores, torch, and the load from other processes."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = SimConfig()
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--queue", type=int, default=defaults.queue)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--load", type=float, default=defaults.load)
    parser.add_argument(
        "--max-lag",
        nargs="+",
        default=["24", "none"],
        help="staleness bounds to run, in policy versions ('none': no bound)",
    )
    parser.add_argument("--sigma", type=float, default=defaults.sigma)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.warmup_steps >= args.steps:
        parser.error(f"--warmup-steps {args.warmup_steps} must be < --steps {args.steps}")
    cfg = SimConfig(
        concurrency=args.concurrency,
        queue=args.queue,
        batch=args.batch,
        steps=args.steps,
        warmup_steps=args.warmup_steps,
        load=args.load,
        sigma=args.sigma,
        seed=args.seed,
    )
    difficulty, duration = draw_tasks(cfg)
    max_lags = [None if value == "none" else int(value) for value in args.max_lag]
    results = [
        {"schedule": name, "window": window, "max_lag": max_lag, **simulate(window, run, difficulty, duration)}
        for max_lag in max_lags
        for run in [replace(cfg, max_lag=max_lag)]
        for name, window in schedules(run)
    ]
    report = {
        "benchmark": "windowed_fifo",
        "machine": machine(),
        "config": {
            **asdict(cfg),
            "max_lag": max_lags,
            "train_time": cfg.train_time,
            "mean_duration": cfg.mean_duration,
        },
        "results": results,
    }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
