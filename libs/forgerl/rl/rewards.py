"""Composite step rewards, reward-to-go and group-baseline advantages (MiniMax-M2 report, Forge RL).

Shapes, for B trajectories padded to S steps and T tokens:

    step values   [B, S]  one value per agent step (a model call: reasoning + action)
    step_mask     [B, S]  bool: which steps exist (padding at the end)
    group_ids     [B]     long: trajectories with the same id answered the same task
    token_step    [B, T]  long: the step a token was generated in, -1 for tokens the policy did not
                          generate (prompt, tool output, padding)

The step reward is `r_t = alpha * r_process + beta * h(T_completion / T_baseline) + r_perf`: process
(format, tool-use) reward, a speed reward that is a bounded, monotone decreasing function `h` of the
completion time relative to a baseline time, and the task's performance reward (tests passed), which a
rollout usually puts on the last step only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

SpeedFn = Callable[[Tensor], Tensor]
"""h: time ratio T_completion / T_baseline (> 0) -> speed reward; monotone decreasing and bounded."""


def tanh_log_speed(ratio: Tensor) -> Tensor:
    """`-tanh(log x)` = (1 - x^2) / (1 + x^2): +1 at x -> 0, 0 at the baseline (x = 1), -1 at x -> inf.

    Symmetric in log-time, so twice as fast earns what twice as slow costs.
    """
    return -torch.tanh(torch.log(ratio))


def linear_speed(ratio: Tensor) -> Tensor:
    """`clip(1 - x, -1, 1)`: linear in the time ratio, 0 at the baseline, -1 from twice the baseline on."""
    return (1 - ratio).clamp(-1.0, 1.0)


def exp_speed(ratio: Tensor) -> Tensor:
    """`exp(-x)`, in (0, 1]: always positive, 1/e at the baseline."""
    return torch.exp(-ratio)


SPEED_FUNCTIONS: Mapping[str, SpeedFn] = {
    "tanh_log": tanh_log_speed,
    "linear": linear_speed,
    "exp": exp_speed,
}


def get_speed_fn(name: str) -> SpeedFn:
    """The registered speed shaping `h` called `name` (one of `SPEED_FUNCTIONS`)."""
    try:
        return SPEED_FUNCTIONS[name]
    except KeyError:
        known = ", ".join(sorted(SPEED_FUNCTIONS))
        raise ValueError(f"unknown speed function {name!r}: choose one of {known}") from None


def check_speed_fn(h: SpeedFn, *, bound: float = 1.0) -> None:
    """Raises ValueError unless `h` is monotone non-increasing with values in [-bound, bound].

    The speed reward's scale is `beta`'s job, so `h` itself is held to [-1, 1] by default. Checked on a
    float64 grid of ratios from 1e-6 to 1e6 (log-spaced, 1,201 points), where any real time ratio lies;
    a user-supplied `h` should be checked once, at configuration time.
    """
    ratios = torch.logspace(-6, 6, 1201, dtype=torch.float64)
    values = h(ratios)
    if values.shape != ratios.shape or not bool(torch.isfinite(values).all()):
        raise ValueError("speed function must map ratios elementwise to finite values")
    if bool((values.abs() > bound).any()):
        raise ValueError(f"speed function must be bounded: |h(x)| exceeds {bound} on (1e-6, 1e6)")
    if bool((values[1:] > values[:-1] + 1e-12).any()):
        raise ValueError("speed function must be monotone decreasing in T_completion / T_baseline")


def speed_reward(t_completion: Tensor, t_baseline: Tensor | float, h: SpeedFn = tanh_log_speed) -> Tensor:
    """r_speed = h(T_completion / T_baseline); both times must be positive."""
    t_base = torch.as_tensor(t_baseline, dtype=t_completion.dtype, device=t_completion.device)
    if bool((t_completion <= 0).any()) or bool((t_base <= 0).any()):
        raise ValueError("completion and baseline times must be > 0 (seconds)")
    return h(t_completion / t_base)


def step_rewards(
    r_process: Tensor,
    r_perf: Tensor,
    t_completion: Tensor,
    t_baseline: Tensor | float,
    *,
    alpha: float,
    beta: float,
    speed_fn: SpeedFn = tanh_log_speed,
) -> Tensor:
    """r_t = alpha * r_process + beta * h(T_completion / T_baseline) + r_perf, elementwise ([B, S])."""
    return alpha * r_process + beta * speed_reward(t_completion, t_baseline, speed_fn) + r_perf


def reward_to_go(rewards: Tensor, step_mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{tau >= t} gamma^(tau - t) r_tau over each trajectory's own steps; 0 on padding."""
    if rewards.shape != step_mask.shape or rewards.dim() != 2:
        raise ValueError(f"rewards {tuple(rewards.shape)} and step_mask {tuple(step_mask.shape)} must both be [B, S]")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma {gamma} must lie in [0, 1]")
    mask_f = step_mask.to(rewards.dtype)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in range(rewards.shape[1] - 1, -1, -1):
        running = (rewards[:, t] + gamma * running) * mask_f[:, t]
        returns[:, t] = running
    return returns


def group_baseline_advantages(
    returns: Tensor,
    step_mask: Tensor,
    group_ids: Tensor,
    *,
    normalize_std: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """A_t = (G_t - b) [/ sigma]: b is the mean trajectory return G_0 over the trajectory's group.

    The baseline is trajectory-level (one number per group, as in GRPO); with `normalize_std` the
    advantages are divided by the group's population standard deviation of G_0, except in groups whose
    returns are all equal (std <= eps), which are left unscaled rather than blown up. 0 on padding.
    """
    if returns.shape != step_mask.shape or returns.dim() != 2:
        raise ValueError(f"returns {tuple(returns.shape)} and step_mask {tuple(step_mask.shape)} must both be [B, S]")
    if group_ids.shape != returns.shape[:1]:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} must be [B] with B = {returns.shape[0]}")
    _, group_index = torch.unique(group_ids, return_inverse=True)
    n_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    total_returns = returns[:, 0]  # G_0, [B]
    ones = torch.ones_like(total_returns)
    counts = torch.zeros(n_groups, dtype=returns.dtype, device=returns.device).index_add_(0, group_index, ones)
    sums = torch.zeros_like(counts).index_add_(0, group_index, total_returns)
    mean = sums / counts  # [G]
    advantages = returns - mean[group_index].unsqueeze(1)
    if normalize_std:
        squares = torch.zeros_like(counts).index_add_(0, group_index, (total_returns - mean[group_index]) ** 2)
        std = torch.sqrt(squares / counts)
        scale = torch.where(std > eps, std, torch.ones_like(std))
        advantages = advantages / scale[group_index].unsqueeze(1)
    return advantages * step_mask.to(returns.dtype)


def token_advantages(step_advantages: Tensor, token_step: Tensor) -> Tensor:
    """Per-token advantages [B, T]: every token generated in step t gets A_t; other tokens get 0."""
    if step_advantages.dim() != 2 or token_step.dim() != 2 or token_step.shape[0] != step_advantages.shape[0]:
        raise ValueError(
            f"step_advantages {tuple(step_advantages.shape)} must be [B, S] and token_step "
            f"{tuple(token_step.shape)} [B, T] with the same B"
        )
    n_steps = step_advantages.shape[1]
    if bool((token_step >= n_steps).any()):
        raise ValueError(f"token_step names a step >= S = {n_steps}: it must be a step index or -1")
    generated = token_step >= 0
    values = step_advantages.gather(1, token_step.clamp(min=0))
    return torch.where(generated, values, torch.zeros_like(values))
