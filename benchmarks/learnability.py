"""Does the main job's RL gain hold across seeds? Held-out success after SFT and after RL, per seed (JSON).

Two ways to run the main job's configuration (`examples/tiny-tool-use.yaml` unless `--config`):

- `--mode services` (the default): `forgerl run start CONFIG --local` once per seed, the config's `seed`
  replaced: the whole local topology, SFT then CISPO RL through rollout -> gateway -> vLLM -> Kafka -> data
  pool, exactly `make run` (~15-20 min a seed on 2 cores). The seed moves SFT's batch order, RL's task
  order and sampling; the initial weights are the topology's (`init-<preset>`, seed 0).
- `--mode in-process`: `forgerl.trainer.learnability` with the config's SFT and RL settings, no services
  (vLLM replaced by the in-process sampler), from the same initial weights (`.forgerl/checkpoints/init-<preset>`).

The baseline is each seed's own SFT checkpoint, measured in the same run: the figures are its held-out
success, the success after RL, their difference in points (`gain_points`) and ratio. Prints one JSON object
last; progress goes to stderr.

    python benchmarks/learnability.py [--seeds 0,1,2] [--mode services|in-process] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _seed_config(config: dict[str, Any], seed: int, directory: Path) -> Path:
    path = directory / f"{config['name']}-seed{seed}.yaml"
    path.write_text(yaml.safe_dump({**config, "seed": seed, "name": f"{config['name']}-seed{seed}"}))
    return path


def run_services(config: dict[str, Any], seed: int, runs_dir: Path) -> dict[str, Any]:
    """One `forgerl run start --local` (what `make run` runs); held-out figures from the run's report."""
    with tempfile.TemporaryDirectory() as tmp:
        path = _seed_config(config, seed, Path(tmp))
        started = time.monotonic()
        cmd = [str(ROOT / ".venv/bin/forgerl"), "run", "start", str(path), "--local", "--runs-dir", str(runs_dir)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall_s = time.monotonic() - started
    if out.returncode != 0:
        raise RuntimeError(f"seed {seed}: forgerl run start failed ({out.returncode}):\n{out.stdout[-3000:]}")
    report = max(runs_dir.glob("*/report/summary.json"), key=lambda p: p.stat().st_mtime)
    summary = json.loads(report.read_text())
    by_level = {level: [round(100 * v, 1) if v is not None else None for v in pair]
                for level, pair in summary["heldout_by_level"].items()}  # fmt: skip
    return {
        "run_id": summary["run_id"],
        "sft": summary["heldout_success_sft"],
        "rl": summary["heldout_success_final"],
        "by_level_sft_rl_pct": by_level,
        "trajectories": summary.get("trajectories_trained"),
        "wall_s": round(wall_s, 1),
    }


def run_in_process(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """forgerl.trainer.learnability with the config's settings (one thread, as the trainer's SFT)."""
    from forgerl.local.bootstrap import ensure_initial_checkpoint
    from forgerl.trainer import learnability

    sft, rl = config["sft"], config["rl"]
    preset = config["model_preset"]
    init = ensure_initial_checkpoint(ROOT / f".forgerl/checkpoints/init-{preset}", preset)
    argv = [
        "--preset", preset, "--init", str(init), "--seed", str(seed), "--eval-n", "256",
        "--sft-examples", str(sft.get("examples") or 4000), "--sft-steps", str(sft["steps"]),
        "--sft-batch", str(sft["batch_size"]), "--sft-lr", str(sft["learning_rate"]),
        "--sft-schedule", sft.get("lr_schedule", "constant"), "--sft-warmup", str(sft.get("warmup_steps", 0)),
        "--sft-min-lr", str(sft.get("min_lr_ratio", 0.1)), "--teacher-error", str(sft.get("teacher_error_rate", 0)),
        "--rl-steps", str(rl["steps"]), "--rl-lr", str(rl["learning_rate"]), "--group", str(rl["group_size"]),
        "--rl-tasks", str(rl["batch_size"] // rl["group_size"]), "--rl-schedule", rl.get("lr_schedule", "constant"),
        "--rl-warmup", str(rl.get("warmup_steps", 0)), "--rl-min-lr", str(rl.get("min_lr_ratio", 0.1)),
        "--eps-high", str(rl.get("eps_high", 0.28)), "--rl-fresh-opt", "--eval-every", str(rl["steps"]),
        "--mtp-weight", str(rl.get("mtp_loss_weight", 0.0)),
    ]  # fmt: skip
    started = time.monotonic()
    result = learnability.main(argv)
    levels = sorted(result["sft_heldout"].keys() - {"success"})
    return {
        "sft": result["sft_heldout"]["success"],
        "rl": result["rl_heldout"]["success"],
        "by_level_sft_rl_pct": {
            level: [round(100 * result["sft_heldout"][level], 1), round(100 * result["rl_heldout"][level], 1)]
            for level in levels
        },
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--mode", choices=("services", "in-process"), default="services")
    parser.add_argument("--config", type=Path, default=ROOT / "examples/tiny-tool-use.yaml")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs/learnability")
    parser.add_argument("--min-gain-points", type=float, default=20.0, help="the claim each seed is checked against")
    args = parser.parse_args()
    config = yaml.safe_load(args.config.read_text())
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        print(f"seed {seed}: {args.mode} run of {args.config.name} ...", file=sys.stderr, flush=True)
        one = run_services(config, seed, args.runs_dir) if args.mode == "services" else run_in_process(config, seed)
        one["seed"] = seed
        one["gain_points"] = round(100 * (one["rl"] - one["sft"]), 1)
        one["ratio_rl_to_sft"] = round(one["rl"] / one["sft"], 3) if one["sft"] else None
        print(f"seed {seed}: {json.dumps(one)}", file=sys.stderr, flush=True)
        results.append(one)
    gains = [r["gain_points"] for r in results]
    print(
        json.dumps(
            {
                "benchmark": "learnability",
                "mode": args.mode,
                "config": str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
                "seeds": results,
                "gain_points_min": min(gains),
                "gain_points_mean": round(statistics.fmean(gains), 1),
                "every_seed_gains_at_least": args.min_gain_points,
                "claim_holds": all(g >= args.min_gain_points for g in gains),
                "wall_s_max": max(r["wall_s"] for r in results),
                "machine": {
                    "cpus": os.cpu_count(),
                    "processor": platform.processor(),
                    "python": platform.python_version(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
