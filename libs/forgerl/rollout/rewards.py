"""An episode's reward components, per step, as the RL core combines them (forgerl.rl.rewards).

- performance: from the tests (forgerl.rollout.tasks.grade), on the last step;
- process: per step, in [-1, 0]: 0 for a clean step, minus penalties for malformed tool calls (unknown
  tool, arguments that are not a JSON object), tool errors, a malformed turn (tool-call or reasoning
  markup the parser could not read, a generation cut at max_tokens) and running out of the turn budget;
- speed: h(T / T_baseline) of the wall-clock completion time against the task's baseline, on the last
  step, and only for a successful episode (finishing a wrong answer fast is worth nothing).

Step totals are `forgerl.rl.rewards.step_rewards` (r = alpha * process + beta * speed + performance); the
episode's components are the sums over its steps, so `total` is the sum of the step totals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forgerl.rl.rewards import check_speed_fn, get_speed_fn, speed_reward, step_rewards
from forgerl.v1 import trajectory_pb2


@dataclass(frozen=True)
class RewardSettings:
    alpha: float = 0.1  # weight of the process reward
    beta: float = 0.1  # weight of the speed reward
    speed_fn: str = "tanh_log"
    speed_requires_success: bool = True
    malformed_call_penalty: float = 1.0
    tool_error_penalty: float = 0.5
    format_penalty: float = 1.0
    turn_budget_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_speed_fn(get_speed_fn(self.speed_fn))


@dataclass(frozen=True)
class StepProcess:
    """What one agent step (one model call) did wrong, for the process reward."""

    malformed_calls: int = 0
    tool_errors: int = 0
    format_errors: int = 0
    over_budget: bool = False

    def reward(self, s: RewardSettings) -> float:
        penalty = (
            s.malformed_call_penalty * self.malformed_calls
            + s.tool_error_penalty * self.tool_errors
            + s.format_penalty * self.format_errors
            + (s.turn_budget_penalty if self.over_budget else 0.0)
        )
        return -min(1.0, penalty)


@dataclass(frozen=True)
class EpisodeRewards:
    steps: list[trajectory_pb2.StepReward]
    total: trajectory_pb2.RewardComponents


def episode_rewards(
    steps: Sequence[StepProcess],
    *,
    performance: float,
    success: bool,
    wall_clock_s: float,
    baseline_s: float,
    settings: RewardSettings,
) -> EpisodeRewards:
    """Per-step rewards and the episode's components. An episode has at least one step."""
    if not steps:
        steps = [StepProcess()]
    dt = torch.float64
    process = torch.tensor([[p.reward(settings) for p in steps]], dtype=dt)  # [1, S]
    n = process.shape[1]
    t_completion = torch.tensor([[max(wall_clock_s, 1e-3)]], dtype=dt)
    h = get_speed_fn(settings.speed_fn)
    gate = 1.0 if (success or not settings.speed_requires_success) else 0.0
    speed = float(speed_reward(t_completion, baseline_s, h)[0, 0]) * gate
    # Every step but the last: process only. The last: process, speed (gated) and performance.
    early = step_rewards(
        process[:, :-1], torch.zeros_like(process[:, :-1]), t_completion.expand(1, n - 1), baseline_s,
        alpha=settings.alpha, beta=0.0, speed_fn=h,
    )  # fmt: skip
    last = step_rewards(
        process[:, -1:], torch.tensor([[performance]], dtype=dt), t_completion, baseline_s,
        alpha=settings.alpha, beta=settings.beta * gate, speed_fn=h,
    )  # fmt: skip
    totals = torch.cat([early, last], dim=1)[0].tolist()
    out = []
    for i, total in enumerate(totals):
        final = i == n - 1
        out.append(
            trajectory_pb2.StepReward(
                turn_index=i,
                components=trajectory_pb2.RewardComponents(
                    process=float(process[0, i]),
                    speed=speed if final else 0.0,
                    performance=performance if final else 0.0,
                    total=total,
                ),
            )
        )
    episode = trajectory_pb2.RewardComponents(
        process=float(process.sum()), speed=speed, performance=performance, total=float(sum(totals))
    )
    return EpisodeRewards(out, episode)
