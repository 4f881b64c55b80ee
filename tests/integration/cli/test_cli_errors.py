"""CLI errors are one line saying what went wrong and what to do; `forgerl --debug` shows the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from forgerl.datapool.broker import free_port

pytestmark = pytest.mark.integration

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]


def _forgerl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "80"}  # narrower than the message: it must not wrap
    return subprocess.run([*FORGERL, *args], capture_output=True, text=True, timeout=60, env=env)


def test_a_trainer_that_is_not_there_is_one_line_with_what_to_do() -> None:
    proc = _forgerl("run", "status", "some-run", "--address", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "UNAVAILABLE" in lines[0] and "forgerl up" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr


def test_a_missing_config_names_the_file_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    proc = _forgerl("run", "start", str(missing))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: No such file or directory: {missing} (`forgerl --debug ...` shows the traceback)"
    ]
    debug = _forgerl("--debug", "run", "start", str(missing))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr
