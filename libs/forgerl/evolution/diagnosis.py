"""Diagnosis of a training run from its metrics series: detectors that raise anomalies for the operator.

Each detector reads `{metric name: [(step, value), ...]}` (the store's `StepMetricsRepository.series`) and
returns anomalies with the evidence (step, value, the window it was compared with) and a proposed action;
nothing acts on its own: the operator approves or dismisses in the console.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

Series = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Anomaly:
    kind: str
    metric: str
    step: int
    evidence: str
    action: str  # "stop", "rollback", "lower_lr", "inspect"
    severity: str  # "critical" or "warning"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DiagnosisSettings:
    window: int = 8  # rolling window of earlier steps
    spike_sigmas: float = 6.0  # a loss this many window deviations above the window mean is a spike
    spike_ratio: float = 3.0  # ... and at least this multiple of the window mean (noise on tiny losses)
    entropy_floor_ratio: float = 0.2  # entropy below 20% of its first window: the policy has collapsed
    drift_ratio: float = 0.5  # reward or length moved by 50% of the first window's level
    staleness_growth: int = 3  # staleness rose this many steps in a row


def _finite(metric: str, series: Series, s: DiagnosisSettings) -> list[Anomaly]:
    for step, value in series:
        if not math.isfinite(value):
            return [
                Anomaly(
                    "non_finite",
                    metric,
                    step,
                    f"{metric} = {value} at step {step}",
                    "stop",  # every later step trains on NaN weights: stop, then resume from a checkpoint before it
                    "critical",
                )
            ]
    return []


def _clean(series: Series) -> list[tuple[int, float]]:
    return [(step, v) for step, v in series if math.isfinite(v)]


def _loss_spike(metric: str, series: Series, s: DiagnosisSettings) -> list[Anomaly]:
    points = _clean(series)
    for i in range(s.window, len(points)):
        window = [v for _, v in points[i - s.window : i]]
        mean, sd = statistics.fmean(window), statistics.pstdev(window)
        step, value = points[i]
        if value > mean + s.spike_sigmas * max(sd, 1e-8) and abs(value) > s.spike_ratio * abs(mean):
            evidence = f"{metric} {value:.4g} at step {step}; previous {s.window} steps {mean:.4g} ± {sd:.2g}"
            return [Anomaly("loss_spike", metric, step, evidence, "lower_lr", "warning")]
    return []


def _ends(series: Series, window: int) -> tuple[float, float, int] | None:
    """Mean of the first and of the last `window` finite values, and the last step; None when too short."""
    points = _clean(series)
    if len(points) < 2 * window:
        return None
    start = statistics.fmean(v for _, v in points[:window])
    return start, statistics.fmean(v for _, v in points[-window:]), points[-1][0]


def _entropy_collapse(metric: str, series: Series, s: DiagnosisSettings) -> list[Anomaly]:
    ends = _ends(series, s.window)
    if ends is None:
        return []
    start, recent, step = ends
    if start > 0 and recent < s.entropy_floor_ratio * start:
        evidence = f"{metric} fell to {recent:.3g} (last {s.window} steps) from {start:.3g} (first {s.window})"
        return [Anomaly("entropy_collapse", metric, step, evidence, "rollback", "warning")]
    return []


def _drift(metric: str, series: Series, s: DiagnosisSettings) -> list[Anomaly]:
    ends = _ends(series, s.window)
    if ends is None:
        return []
    start, recent, step = ends
    scale = max(abs(start), 1e-6)
    if abs(recent - start) > s.drift_ratio * scale:
        direction = "rose" if recent > start else "fell"
        evidence = f"{metric} {direction} from {start:.3g} to {recent:.3g} ({(recent - start) / scale:+.0%})"
        action = "inspect" if direction == "rose" and "reward" in metric else "rollback"
        return [Anomaly("drift", metric, step, evidence, action, "warning")]
    return []


def _staleness(metric: str, series: Series, s: DiagnosisSettings) -> list[Anomaly]:
    points = _clean(series)
    rising = 0
    for (_, before), (step, value) in itertools.pairwise(points):
        rising = rising + 1 if value > before else 0
        if rising >= s.staleness_growth:
            evidence = f"{metric} rose {rising} steps in a row to {value:.3g} at step {step}"
            return [Anomaly("staleness_growth", metric, step, evidence, "inspect", "warning")]
    return []


Detector = Callable[[str, Series, DiagnosisSettings], list[Anomaly]]

# Which detectors read which metric; names are the trainer's StepMetrics keys (substring match).
DETECTORS: tuple[tuple[str, Detector], ...] = (
    ("loss", _loss_spike),
    ("entropy", _entropy_collapse),
    ("reward", _drift),
    ("length", _drift),
    ("staleness", _staleness),
)


def diagnose(metrics: Mapping[str, Series], settings: DiagnosisSettings | None = None) -> list[Anomaly]:
    """Every anomaly in the run's metrics: any non-finite value, then each metric's own detectors."""
    s = settings or DiagnosisSettings()
    anomalies: list[Anomaly] = []
    for metric, series in sorted(metrics.items()):
        anomalies += _finite(metric, series, s)
        for needle, detector in DETECTORS:
            if needle in metric.lower():
                anomalies += detector(metric, series, s)
    return anomalies
