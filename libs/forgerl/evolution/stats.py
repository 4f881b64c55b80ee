"""The decision rule of an iteration: paired per-task differences with a bootstrap confidence interval.

Candidate and incumbent run on the same tasks with the same number of seeds; each task contributes one
number, the candidate's mean score minus the incumbent's (pairing removes the between-task variance, which
on the tool-use suite is most of it: levels 1-4 range from ~100% to ~5% success). The mean of those
differences gets a percentile bootstrap interval over tasks; a candidate is promoted only when the interval's
lower bound is above the margin, rejected when its upper bound is not, and otherwise inconclusive.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Fewer seeds leave a binary task's per-task mean too coarse (0, 1/2, 1) to pair well; the issue asks >= 3.
MIN_SEEDS = 3


class Verdict(enum.StrEnum):
    PROMOTE = "promote"
    REJECT = "reject"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    mean_difference: float
    ci_low: float
    ci_high: float
    margin: float
    confidence: float
    tasks: int
    seeds: int

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        return data


def paired_differences(
    candidate: Mapping[str, Sequence[float]],
    incumbent: Mapping[str, Sequence[float]],
    min_seeds: int = MIN_SEEDS,
) -> dict[str, float]:
    """Per task: mean candidate score minus mean incumbent score, over the seeds each ran.

    Both sides must cover the same tasks with at least `min_seeds` scores each; a task missing on one side
    would silently unpair the comparison, so it is an error rather than dropped.
    """
    if set(candidate) != set(incumbent):
        only_c = sorted(set(candidate) - set(incumbent))[:3]
        only_i = sorted(set(incumbent) - set(candidate))[:3]
        raise ValueError(f"unpaired tasks: only candidate {only_c}, only incumbent {only_i}; run both on the same")
    if not candidate:
        raise ValueError("no tasks to compare: evaluate at least one task on both sides")
    diffs: dict[str, float] = {}
    for task in sorted(candidate):
        c, i = candidate[task], incumbent[task]
        if min(len(c), len(i)) < min_seeds:
            raise ValueError(f"task {task}: {len(c)} candidate and {len(i)} incumbent seeds; need >= {min_seeds}")
        diffs[task] = float(np.mean(c)) - float(np.mean(i))
    return diffs


def bootstrap_interval(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling values with replacement)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence}: must lie strictly between 0 and 1")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap of no values: pass at least one")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // x.size)  # bounds the index matrix at ~32 MB
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def decide(
    differences: Mapping[str, float],
    *,
    margin: float = 0.0,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
    seeds: int = MIN_SEEDS,
) -> Decision:
    """Promote when the interval's lower bound exceeds `margin`, reject when its upper bound does not."""
    values = list(differences.values())
    low, high = bootstrap_interval(values, confidence, resamples, seed)
    if low > margin:
        verdict = Verdict.PROMOTE
    elif high <= margin:
        verdict = Verdict.REJECT
    else:
        verdict = Verdict.INCONCLUSIVE
    mean = float(np.mean(values))
    if not math.isfinite(mean):
        raise ValueError("a task's score difference is not finite: check the evaluation's scores")
    return Decision(verdict, mean, low, high, margin, confidence, len(values), seeds)
