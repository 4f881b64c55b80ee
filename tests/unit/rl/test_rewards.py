"""Step rewards, reward-to-go, group-baseline advantages and their per-token expansion."""

from __future__ import annotations

import math

import pytest
import torch

from forgerl.rl.rewards import (
    SPEED_FUNCTIONS,
    check_speed_fn,
    get_speed_fn,
    group_baseline_advantages,
    reward_to_go,
    speed_reward,
    step_rewards,
    tanh_log_speed,
    token_advantages,
)

pytestmark = pytest.mark.unit
DT = torch.float64


@pytest.mark.parametrize("name", sorted(SPEED_FUNCTIONS))
def test_speed_functions_are_monotone_decreasing_and_bounded(name: str) -> None:
    h = get_speed_fn(name)
    check_speed_fn(h)
    ratios = torch.tensor([0.25, 0.5, 1.0, 1.5, 1.9], dtype=DT)
    values = h(ratios)
    assert bool((values[1:] < values[:-1]).all()), "strictly decreasing around the baseline"


def test_check_speed_fn_rejects_increasing_or_unbounded_shapes() -> None:
    with pytest.raises(ValueError, match="monotone decreasing"):
        check_speed_fn(lambda x: torch.tanh(torch.log(x)))
    with pytest.raises(ValueError, match="bounded"):
        check_speed_fn(lambda x: -torch.log(x))
    with pytest.raises(ValueError, match="unknown speed function"):
        get_speed_fn("quadratic")


def test_tanh_log_speed_closed_form() -> None:
    # -tanh(log x) = (1 - x^2) / (1 + x^2): 0 at the baseline, +-0.6 at half / twice the baseline.
    values = tanh_log_speed(torch.tensor([1.0, 0.5, 2.0], dtype=DT))
    assert values.tolist() == pytest.approx([0.0, 0.6, -0.6])


def test_step_reward_combines_process_speed_and_performance() -> None:
    r_process = torch.tensor([[1.0, 0.0]], dtype=DT)
    r_perf = torch.tensor([[0.0, 1.0]], dtype=DT)
    t_completion = torch.tensor([[5.0, 20.0]], dtype=DT)
    rewards = step_rewards(r_process, r_perf, t_completion, 10.0, alpha=0.5, beta=0.2)
    # speeds: h(0.5) = 0.6, h(2) = -0.6
    assert rewards[0].tolist() == pytest.approx([0.5 * 1 + 0.2 * 0.6, 0.2 * -0.6 + 1.0])
    with pytest.raises(ValueError, match="> 0"):
        speed_reward(torch.tensor([0.0]), 1.0)


def test_reward_to_go_closed_form_with_padding() -> None:
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]], dtype=DT)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    returns = reward_to_go(rewards, mask, gamma=0.5)
    assert returns[0].tolist() == pytest.approx([1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0])
    assert returns[1].tolist() == [4.0, 0.0, 0.0]


def test_reward_to_go_matches_the_definition_on_random_input() -> None:
    torch.manual_seed(0)
    rewards = torch.randn(4, 6, dtype=DT)
    lengths = [6, 3, 1, 5]
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    gamma = 0.9
    returns = reward_to_go(rewards, mask, gamma)
    for b, length in enumerate(lengths):
        for t in range(length):
            expected = sum(gamma ** (tau - t) * rewards[b, tau].item() for tau in range(t, length))
            assert returns[b, t].item() == pytest.approx(expected, rel=1e-12)


def test_group_baseline_is_the_group_mean_of_trajectory_returns() -> None:
    returns = torch.tensor([[3.0, 1.0], [1.0, 0.0], [5.0, 0.0], [2.0, 2.0]], dtype=DT)
    mask = torch.tensor([[True, True], [True, False], [True, False], [True, True]])
    groups = torch.tensor([7, 7, 3, 3])
    adv = group_baseline_advantages(returns, mask, groups)
    # group 7: baseline (3 + 1) / 2 = 2; group 3: (5 + 2) / 2 = 3.5
    assert adv.tolist() == [[1.0, -1.0], [-1.0, 0.0], [1.5, 0.0], [-1.5, -1.5]]
    normed = group_baseline_advantages(returns, mask, groups, normalize_std=True)
    # population std of G_0: group 7 -> 1, group 3 -> 1.5
    assert normed.tolist() == [[1.0, -1.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]


def test_group_of_equal_returns_is_not_blown_up_by_std_normalisation() -> None:
    returns = torch.tensor([[1.0, 0.5], [1.0, 0.25]], dtype=DT)
    adv = group_baseline_advantages(
        returns, torch.ones(2, 2, dtype=torch.bool), torch.tensor([0, 0]), normalize_std=True
    )
    assert adv.tolist() == [[0.0, -0.5], [0.0, -0.75]]


def test_token_advantages_follow_the_step_that_generated_each_token() -> None:
    step_adv = torch.tensor([[0.5, -1.0, 2.0]], dtype=DT)
    # prompt (-1), step 0 tokens, tool output (-1), step 1 tokens, step 2 token, padding (-1)
    token_step = torch.tensor([[-1, 0, 0, -1, 1, 1, 2, -1]])
    assert token_advantages(step_adv, token_step).tolist() == [[0.0, 0.5, 0.5, 0.0, -1.0, -1.0, 2.0, 0.0]]
    with pytest.raises(ValueError, match="step index or -1"):
        token_advantages(step_adv, torch.tensor([[3]]))


def test_terminal_reward_with_gamma_one_reduces_to_grpo() -> None:
    # Only the final step carries r_perf: every step's advantage is the trajectory's centred outcome.
    perf = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=DT)
    mask = torch.ones(2, 3, dtype=torch.bool)
    returns = reward_to_go(perf, mask, gamma=1.0)
    adv = group_baseline_advantages(returns, mask, torch.tensor([0, 0]), normalize_std=True)
    assert adv.tolist() == [[1.0] * 3, [-1.0] * 3]
    assert math.isclose(adv.sum().item(), 0.0)
