"""Rewards (performance, process, speed through forgerl.rl.rewards) and the in-process tools."""

from __future__ import annotations

import math

import pytest
import torch

from forgerl.rl.rewards import tanh_log_speed
from forgerl.rollout.rewards import RewardSettings, StepProcess, episode_rewards
from forgerl.rollout.tools import ToolBox, ToolError, evaluate_arithmetic, format_number

pytestmark = pytest.mark.unit
S = RewardSettings(alpha=0.5, beta=0.2)


def test_full_and_zero_rewards() -> None:
    perfect = episode_rewards([StepProcess(), StepProcess()], performance=1.0, success=True, wall_clock_s=5.0,
                              baseline_s=10.0, settings=S)  # fmt: skip
    speed = float(tanh_log_speed(torch.tensor(0.5, dtype=torch.float64)))
    assert perfect.total.performance == 1.0 and perfect.total.process == 0.0
    assert perfect.total.speed == pytest.approx(speed) and speed > 0
    assert perfect.total.total == pytest.approx(1.0 + 0.2 * speed)
    assert [s.turn_index for s in perfect.steps] == [0, 1]
    assert perfect.steps[0].components.total == 0.0 and perfect.steps[1].components.performance == 1.0
    nothing = episode_rewards([StepProcess()], performance=0.0, success=False, wall_clock_s=0.01, baseline_s=10.0,
                              settings=S)  # fmt: skip
    assert nothing.total.total == 0.0 and nothing.total.speed == 0.0, "a fast failure earns no speed reward"


def test_process_penalties_are_per_step_and_bounded() -> None:
    steps = [StepProcess(malformed_calls=1), StepProcess(tool_errors=1), StepProcess(format_errors=3)]
    r = episode_rewards(steps, performance=1.0, success=True, wall_clock_s=10.0, baseline_s=10.0, settings=S)
    assert [s.components.process for s in r.steps] == [-1.0, -0.5, -1.0]
    assert r.total.process == -2.5
    assert r.total.speed == pytest.approx(0.0, abs=1e-12)  # at the baseline
    assert r.total.total == pytest.approx(1.0 + 0.5 * -2.5)
    assert math.isclose(sum(s.components.total for s in r.steps), r.total.total)
    over = episode_rewards([StepProcess(over_budget=True)], performance=0.0, success=False, wall_clock_s=1,
                           baseline_s=1, settings=S)  # fmt: skip
    assert over.total.process == -1.0


def test_settings_check_the_speed_function() -> None:
    with pytest.raises(ValueError, match="unknown speed function"):
        RewardSettings(speed_fn="fastest")
    slow = episode_rewards([StepProcess()], performance=1.0, success=True, wall_clock_s=40.0, baseline_s=10.0,
                           settings=RewardSettings(speed_fn="linear"))  # fmt: skip
    assert slow.total.speed == -1.0


@pytest.mark.parametrize(
    ("expr", "value"),
    [("47 + 38", "85"), ("80 - 95", "-15"), ("473 * 28", "13244"), ("(12 + 7) * 9", "171"), ("7 / 2", "3.5"),
     ("2 ** 10", "1024"), ("-3 * -3", "9"), ("10 / 4 * 2", "5")],
)  # fmt: skip
def test_calculator(expr: str, value: str) -> None:
    assert format_number(evaluate_arithmetic(expr)) == value


@pytest.mark.parametrize("expr", ["__import__('os')", "2 ** 99999", "1 / 0", "abs(3)", "x + 1", "1 +", "'a' * 3"])
def test_calculator_refuses(expr: str) -> None:
    with pytest.raises(ToolError):
        evaluate_arithmetic(expr)


async def test_toolbox_flags_malformed_calls_and_tool_errors() -> None:
    box = ToolBox(["calculator"], sandbox=None)
    ok = await box.call("calculator", '{"expression": "6 * 7"}')
    assert ok.content == "42" and not ok.is_error
    unknown = await box.call("rm_rf", "{}")
    assert unknown.malformed and unknown.is_error and "unknown tool" in unknown.content
    bad_json = await box.call("calculator", '{"expression": ')
    assert bad_json.malformed and "not valid JSON" in bad_json.content
    not_obj = await box.call("calculator", "[1, 2]")
    assert not_obj.malformed
    bad_expr = await box.call("calculator", {"expression": "six times seven"})
    assert bad_expr.is_error and not bad_expr.malformed
    missing = await box.call("calculator", {})
    assert missing.is_error and "must be a string" in missing.content
    assert (box.stats.calls, box.stats.errors, box.stats.malformed) == (6, 5, 3)
    with pytest.raises(ValueError, match="no implementation"):
        ToolBox(["teleport"], sandbox=None)
