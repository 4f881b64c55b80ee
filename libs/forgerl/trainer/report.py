"""The end-of-run report: PNG plots and a summary table under `runs/<run-id>/report/`.

Plots: reward (and its components), held-out success, entropy, staleness, expert load (max violation),
loss, the multi-token-prediction loss (when RL trains MTP), from the run's step metrics. The summary
(summary.json and summary.md, also printed as a rich table by the CLI) holds SFT vs final held-out
success, steps, trajectories trained, time, the last values and the MTP loss's first and last.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from forgerl.v1 import run_pb2

PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "reward.png",
        "Reward (training batches)",
        ("reward/mean", "reward/performance", "reward/process", "success_rate"),
    ),
    (
        "heldout_success.png",
        "Held-out success (greedy), overall and per level",
        ("eval/heldout_success", *(f"eval/heldout_success_level{level}" for level in (1, 2, 3, 4))),
    ),
    ("entropy.png", "Policy entropy", ("entropy",)),
    ("staleness.png", "Policy lag (versions)", ("staleness/mean", "staleness/max")),
    ("expert_load.png", "Expert load: max violation", ("moe/max_violation",)),
    ("loss.png", "Loss", ("loss", "sft/loss")),
    (
        "mtp_loss.png",
        "Multi-token prediction loss (unweighted)",
        ("mtp/loss", "mtp/loss_1", "mtp/loss_2", "mtp/loss_3"),
    ),
)


def series(metrics: Iterable[run_pb2.StepMetrics], name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.values[name]) for m in metrics if name in m.values)


def summarize(run: run_pb2.Run, metrics: Sequence[run_pb2.StepMetrics]) -> dict[str, Any]:
    heldout = series(metrics, "eval/heldout_success")
    sft_points = [v for m in metrics if m.stage == "sft" for k, v in m.values.items() if k == "eval/heldout_success"]
    rl_points = [(m.step, m.values["eval/heldout_success"]) for m in metrics
                 if m.stage == "rl" and "eval/heldout_success" in m.values]  # fmt: skip
    sft_success = sft_points[-1] if sft_points else None
    final_success = max(rl_points)[1] if rl_points else None
    rl = [m for m in metrics if m.stage == "rl"]

    def last(name: str) -> float | None:
        points = series(rl, name)
        return points[-1][1] if points else None

    def mean(name: str) -> float | None:
        points = [v for _, v in series(rl, name)]
        return sum(points) / len(points) if points else None

    def sft_and_final(name: str) -> list[float | None]:
        sft = [v for _, v in series([m for m in metrics if m.stage == "sft"], name)]
        final = [v for _, v in series(rl, name)]
        return [sft[-1] if sft else None, final[-1] if final else None]

    levels = sorted({k for m in metrics for k in m.values if k.startswith("eval/heldout_success_level")})
    mtp = series(rl, "mtp/loss")
    summary = {
        "run_id": run.run_id,
        "name": run.config.name,
        "state": run_pb2.RunState.Name(run.state),
        "sft_steps": run.config.sft.steps,
        "rl_steps": sum(1 for m in rl if "loss" in m.values),
        "policy_version": run.policy_version,
        "heldout_success_sft": sft_success,
        "heldout_success_final": final_success,
        "heldout_success_gain": None if sft_success is None or final_success is None else final_success - sft_success,
        "heldout_points": heldout,
        # {"level3": [after SFT, after RL], ...}
        "heldout_by_level": {k.removeprefix("eval/heldout_success_"): sft_and_final(k) for k in levels},
        "trajectories_trained": sum(m.values.get("batch/trajectories", 0.0) for m in rl),
        "tokens_merged_total": sum(m.values.get("tokens/merged", 0.0) for m in rl),
        "staleness_max": max((v for _, v in series(rl, "staleness/max")), default=None),
        "mean_step_time_s": mean("step_time_s"),
        "final_reward": last("reward/mean"),
        "final_train_success": last("success_rate"),
        "final_entropy": last("entropy"),
        "final_clip_frac": last("clip_frac"),
        "final_expert_max_violation": last("moe/max_violation"),
        # [first RL step, last RL step]: the MTP loss falls when RL trains the MTP modules.
        "mtp_loss": [mtp[0][1], mtp[-1][1]] if mtp else None,
    }
    return summary


def write_report(run: run_pb2.Run, metrics: Sequence[run_pb2.StepMetrics], out_dir: str | Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rl_start = run.config.sft.steps
    written = []
    for filename, title, names in PLOTS:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drew = False
        for name in names:
            points = series(metrics, name)
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            style = "o-" if len(points) < 30 else "-"
            ax.plot(xs, ys, style, label=name, markersize=3)
            drew = True
        if not drew:
            plt.close(fig)
            continue
        if rl_start:
            ax.axvline(rl_start, color="grey", linestyle="--", linewidth=1, label="SFT -> RL")
        ax.set_title(title)
        ax.set_xlabel("step (SFT, then RL)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(filename)
    summary = summarize(run, metrics)
    summary["plots"] = written
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    rows = [f"| {k} | {_fmt(v)} |" for k, v in summary.items() if k not in ("heldout_points", "plots")]
    (out / "summary.md").write_text("| metric | value |\n|---|---|\n" + "\n".join(rows) + "\n")
    return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # mtp_loss: [first, last]
        return " -> ".join(_fmt(v) for v in value)
    if isinstance(value, dict):  # heldout_by_level: {"level3": [after SFT, after RL]}
        return ", ".join(f"{k} {' -> '.join(_fmt(v) for v in pair)}" for k, pair in value.items())
    return "-" if value is None else str(value)


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    keys = (
        "run_id", "state", "sft_steps", "rl_steps", "heldout_success_sft", "heldout_success_final",
        "heldout_success_gain", "heldout_by_level", "trajectories_trained", "staleness_max", "tokens_merged_total",
        "mean_step_time_s", "final_reward", "final_entropy", "final_clip_frac", "final_expert_max_violation",
        "mtp_loss",
    )  # fmt: skip
    return [(k, _fmt(summary.get(k))) for k in keys]
