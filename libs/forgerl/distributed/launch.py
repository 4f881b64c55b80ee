"""Run a script once per parallel layout under `torchrun` on this machine and collect what each run wrote.

Benchmarks that compare layouts (benchmarks/parallel_step.py, benchmarks/weight_stream.py) re-launch
themselves: the parent parses its arguments, then `run_layouts` starts `torchrun --standalone` for each
layout with `--layout NAME --out FILE` appended; the ranks of that run write one JSON object to FILE.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def run_layouts(script: str, layouts: Iterable[str], args: Sequence[str], nproc: int = 2) -> dict[str, Any]:
    """layout name -> the JSON object the torchrun job of `script` wrote for it (CalledProcessError, with
    the job's output, if a job fails)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in layouts:
            out = Path(tmp) / f"{name}.json"
            cmd = [torchrun, "--standalone", "--nproc-per-node", str(nproc), script, *args]
            subprocess.run([*cmd, "--layout", name, "--out", str(out)], check=True, capture_output=True, text=True)
            results[name] = json.loads(out.read_text())
    return results
