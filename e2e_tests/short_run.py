"""The main job's short form for end-to-end tests: examples/tiny-tool-use.yaml with a few small steps, the
environment the `forgerl` CLI runs it with, and the run's saved progress."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from forgerl.local.topology import LocalTopology

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]
MAIN_JOB = Path(__file__).parents[1] / "examples" / "tiny-tool-use.yaml"


def short_main_job(tmp_path: Path, rl_steps: int = 3) -> Path:
    """examples/tiny-tool-use.yaml with a few SFT and RL steps of small batches (minutes on 2 cores)."""
    config = yaml.safe_load(MAIN_JOB.read_text())
    config["checkpoint_every"] = 1
    config["sft"].update(steps=4, batch_size=4, examples=64, warmup_steps=0)
    config["rl"].update(steps=rl_steps, batch_size=16, group_size=4, episodes_in_flight=16, warmup_steps=0)
    path = tmp_path / "short-main-job.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def like_a_terminal() -> None:
    """Popen's preexec_fn: SIGINT back to its default, as in a terminal's foreground job. A test run started
    in the background of a shell without job control inherits SIGINT ignored, and a CLI started from it
    would never see the test's Ctrl-C (Python installs its KeyboardInterrupt handler only over SIG_DFL)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env(runs: Path) -> dict[str, str]:
    return {
        **os.environ,
        "COLUMNS": "200",
        "OMP_NUM_THREADS": "1",
        "FORGERL_TRAINER_RUNS_DIR": str(runs),
        "FORGERL_TRAINER_EVAL_TASKS": "8",
    }


def progress(runs: Path) -> dict[str, Any]:
    """The newest run's saved progress ({} before the first save)."""
    for path in sorted(runs.glob("*/state/progress.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):  # being replaced
            return {}
    return {}


def wait_for(what: str, check: Any, timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


def pid_of(topology: LocalTopology, name: str) -> int:
    """The pid the local topology's state file records for component `name` (the supervisor's latest)."""
    processes = json.loads(topology.state_file.read_text())["processes"]
    return int(next(p["pid"] for p in processes if p["name"] == name))
