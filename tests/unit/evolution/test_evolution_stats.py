"""The decision rule: false acceptance of an identical candidate, power against a planted gain, and the
bootstrap interval against the normal-theory interval (an independent reference)."""

import numpy as np
import pytest

from forgerl.evolution.stats import Verdict, bootstrap_interval, decide, paired_differences

pytestmark = pytest.mark.unit

TASKS = 200  # the size of the dev split the service draws by default
SEEDS = 3
ROUNDS = 300


def simulate_acceptance(gain: float, rounds: int = ROUNDS, seed: int = 1234) -> float:
    """Fraction of rounds promoted when the candidate's true success is the incumbent's plus `gain`."""
    rng = np.random.default_rng(seed)
    p_incumbent = rng.uniform(0.05, 0.95, size=TASKS)  # fixed tasks; scores drawn anew each round
    p_candidate = np.clip(p_incumbent + gain, 0, 1)
    accepted = 0
    for r in range(rounds):
        inc = rng.random((TASKS, SEEDS)) < p_incumbent[:, None]
        cand = rng.random((TASKS, SEEDS)) < p_candidate[:, None]
        ids = [f"t{i}" for i in range(TASKS)]
        diffs = paired_differences(
            {t: list(map(float, cand[i])) for i, t in enumerate(ids)},
            {t: list(map(float, inc[i])) for i, t in enumerate(ids)},
        )
        accepted += decide(diffs, margin=0.0, resamples=1000, seed=r).verdict == Verdict.PROMOTE
    return accepted / rounds


def test_an_identical_candidate_is_accepted_at_most_5_percent_of_the_time() -> None:
    rate = simulate_acceptance(0.0)
    assert rate <= 0.05, f"identical candidate promoted in {rate:.1%} of {ROUNDS} rounds"


def test_a_planted_ten_point_gain_is_accepted_at_least_80_percent_of_the_time() -> None:
    rate = simulate_acceptance(0.10)
    assert rate >= 0.80, f"+10-point candidate promoted in only {rate:.1%} of {ROUNDS} rounds"


def test_a_planted_loss_is_never_promoted_and_mostly_rejected() -> None:
    rng = np.random.default_rng(7)
    p = rng.uniform(0.2, 0.8, size=TASKS)
    cand = {f"t{i}": [float(rng.random() < p[i] - 0.15) for _ in range(SEEDS)] for i in range(TASKS)}
    inc = {f"t{i}": [float(rng.random() < p[i]) for _ in range(SEEDS)] for i in range(TASKS)}
    assert decide(paired_differences(cand, inc)).verdict == Verdict.REJECT


def test_bootstrap_interval_matches_the_normal_interval_on_a_large_sample() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0.3, 1.0, size=2000)
    low, high = bootstrap_interval(list(x), confidence=0.95, resamples=4000, seed=1)
    half = 1.959964 * x.std(ddof=1) / np.sqrt(x.size)
    assert low == pytest.approx(x.mean() - half, abs=0.01)
    assert high == pytest.approx(x.mean() + half, abs=0.01)


def test_paired_differences_are_per_task_means_and_refuse_unpaired_or_few_seeds() -> None:
    diffs = paired_differences({"a": [1, 1, 0], "b": [0, 0, 0]}, {"a": [0, 0, 0], "b": [1, 0, 1]})
    assert diffs == pytest.approx({"a": 2 / 3, "b": -2 / 3})
    with pytest.raises(ValueError, match="unpaired"):
        paired_differences({"a": [1, 1, 1]}, {"b": [1, 1, 1]})
    with pytest.raises(ValueError, match="need >= 3"):
        paired_differences({"a": [1, 1]}, {"a": [1, 1, 1]})


def test_the_margin_moves_the_verdict() -> None:
    diffs = {f"t{i}": 0.1 + 0.01 * (i % 3 - 1) for i in range(50)}  # mean 0.1, tight interval
    assert decide(diffs, margin=0.0).verdict == Verdict.PROMOTE
    assert decide(diffs, margin=0.2).verdict == Verdict.REJECT
    assert decide(diffs, margin=0.1).verdict == Verdict.INCONCLUSIVE
