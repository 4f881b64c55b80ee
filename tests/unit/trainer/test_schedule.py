"""Learning-rate schedules against their closed forms, and the run config's checks of them."""

from __future__ import annotations

import itertools
import math

import pytest

from forgerl.trainer.run_config import run_config_from_dict
from forgerl.trainer.schedule import learning_rate

pytestmark = pytest.mark.unit


def test_constant_is_the_base_rate_after_warmup() -> None:
    assert [learning_rate(s, 10, 0.5, "", 4) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    assert learning_rate(9, 10, 0.5, "constant") == 0.5


def test_cosine_matches_the_closed_form() -> None:
    base, total, warmup, floor = 3e-3, 800, 50, 0.1
    for step in (50, 123, 400, 799):
        progress = (step - warmup) / (total - 1 - warmup)
        want = base * (floor + (1 - floor) * (1 + math.cos(math.pi * progress)) / 2)
        assert learning_rate(step, total, base, "cosine", warmup, floor) == pytest.approx(want, rel=1e-12)
    assert learning_rate(50, total, base, "cosine", warmup, floor) == pytest.approx(base)
    assert learning_rate(799, total, base, "cosine", warmup, floor) == pytest.approx(base * floor)
    rates = [learning_rate(s, total, base, "cosine", warmup, floor) for s in range(warmup, total)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_unknown_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="linear"):
        learning_rate(0, 10, 1.0, "linear")
    with pytest.raises(ValueError, match=r"sft\.lr_schedule 'linear'"):
        run_config_from_dict({"sft": {"lr_schedule": "linear"}})
    with pytest.raises(ValueError, match="min_lr_ratio"):
        run_config_from_dict({"rl": {"lr_schedule": "cosine", "min_lr_ratio": 2.0}})


def test_run_config_carries_the_schedule() -> None:
    config = run_config_from_dict({"sft": {"lr_schedule": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.1}})
    assert (config.sft.lr_schedule, config.sft.warmup_steps, config.sft.min_lr_ratio) == ("cosine", 50, 0.1)
    assert config.rl.lr_schedule == ""
