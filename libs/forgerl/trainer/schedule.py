"""Learning-rate schedules of a run's stages: `constant`, or `cosine` (linear warm-up, then a half cosine
from the base rate down to `min_lr_ratio` of it at the stage's last step).

A constant rate leaves a small model's SFT wandering from step to step at the end (held-out success of
the `tiny` preset moved between 24% and 63% over the last 300 of 800 steps at 3e-3): the checkpoint RL
starts from would be whichever step came last. Decaying the rate lets SFT settle.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def learning_rate(
    step: int, total_steps: int, base: float, schedule: str = "constant", warmup_steps: int = 0, min_ratio: float = 0.0
) -> float:
    """The rate for 0-based `step` of a stage of `total_steps` steps."""
    schedule = schedule or "constant"
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: choose one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        return base * (step + 1) / warmup_steps
    if schedule == "constant":
        return base
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return base * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def set_learning_rate(optimizer: object, lr: float) -> None:
    for group in optimizer.param_groups:  # type: ignore[attr-defined]
        group["lr"] = lr
