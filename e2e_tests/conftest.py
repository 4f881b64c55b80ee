"""Shared by the end-to-end tests: a local topology on free loopback ports, and the `forgerl` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from deployment import free_topology_values

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]


@pytest.fixture
def topology_file(tmp_path: Path) -> Path:
    path = tmp_path / "local.yaml"
    path.write_text(yaml.safe_dump(free_topology_values(tmp_path)))
    return path


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`forgerl <args>` in a subprocess, output captured."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FORGERL, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
