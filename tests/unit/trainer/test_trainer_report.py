"""Run configs from YAML, and the end-of-run report (plots and summary from step metrics)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from forgerl.trainer.report import write_report
from forgerl.trainer.run_config import load_run_config, run_config_from_dict
from forgerl.v1 import run_pb2

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).parents[3] / "examples" / "tiny-tool-use.yaml"


def test_example_config_and_defaults() -> None:
    config = load_run_config(EXAMPLE)
    assert config.model_preset == "tiny" and config.suite == "tooluse"
    assert config.sft.steps > 0 and config.rl.steps > 0 and config.rl.loss == "cispo"
    assert config.rl.prefix_merge and config.rl.max_staleness > 0
    defaults = run_config_from_dict({"name": "x"})
    assert defaults.rl.group_size == 8 and not defaults.rl.HasField("eps_low")


def test_unknown_key_is_an_error() -> None:
    with pytest.raises(ValueError, match="bad run config"):
        run_config_from_dict({"name": "x", "rl": {"stepz": 3}})


def test_report(tmp_path: Path) -> None:
    run = run_pb2.Run(run_id="r", state=run_pb2.RUN_STATE_SUCCEEDED, policy_version=4)
    run.config.CopyFrom(run_config_from_dict({"name": "x", "sft": {"steps": 2}, "rl": {"steps": 2}}))
    rows = [
        ("sft", 1, {"loss": 2.0, "sft/loss": 2.0}),
        ("sft", 2, {"loss": 1.0, "sft/loss": 1.0, "eval/heldout_success": 0.25, "eval/heldout_success_level3": 0.125}),
        ("rl", 3, {"loss": 0.1, "reward/mean": 0.3, "entropy": 0.5, "staleness/max": 1.0, "moe/max_violation": 0.4,
                   "batch/trajectories": 64.0, "tokens/merged": 1000.0, "mtp/loss": 8.25}),
        ("rl", 4, {"loss": 0.1, "reward/mean": 0.6, "entropy": 0.4, "staleness/max": 2.0, "moe/max_violation": 0.3,
                   "batch/trajectories": 64.0, "tokens/merged": 1000.0, "eval/heldout_success": 0.5,
                   "eval/heldout_success_level3": 0.625, "mtp/loss": 6.5}),
    ]  # fmt: skip
    metrics = [run_pb2.StepMetrics(run_id="r", stage=s, step=n, values=v) for s, n, v in rows]
    summary = write_report(run, metrics, tmp_path)
    assert summary["heldout_success_sft"] == 0.25 and summary["heldout_success_final"] == 0.5
    assert summary["heldout_success_gain"] == 0.25 and summary["trajectories_trained"] == 128
    assert summary["staleness_max"] == 2.0 and summary["rl_steps"] == 2
    assert summary["heldout_by_level"] == {"level3": [0.125, 0.625]}
    assert "level3 0.125 -> 0.625" in (tmp_path / "summary.md").read_text()
    assert summary["mtp_loss"] == [8.25, 6.5] and "| mtp_loss | 8.25 -> 6.5 |" in (tmp_path / "summary.md").read_text()
    for name in (
        "reward.png",
        "heldout_success.png",
        "entropy.png",
        "staleness.png",
        "expert_load.png",
        "mtp_loss.png",
    ):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "summary.json").read_text())["final_reward"] == 0.6


def test_mtp_settings_are_checked() -> None:
    assert run_config_from_dict({"name": "x", "rl": {"grow_mtp_to": 3}}).rl.grow_mtp_to == 3
    for bad in ({"grow_mtp_to": -1}, {"mtp_loss_weight": -0.1}):
        with pytest.raises(ValueError, match=r"rl\.mtp_loss_weight and rl\.grow_mtp_to"):
            run_config_from_dict({"name": "x", "rl": bad})
