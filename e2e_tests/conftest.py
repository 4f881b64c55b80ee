"""Shared by the end-to-end tests: a local topology on free loopback ports, and the `forgerl` CLI."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from forgerl.local.topology import SERVICES

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _free_block(size: int) -> int:
    for _ in range(100):
        base = random.randrange(20000, 32000)  # below the ephemeral range other processes bind from
        if all(_port_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports")


@pytest.fixture
def topology_file(tmp_path: Path) -> Path:
    path = tmp_path / "local.yaml"
    values = {
        "broker_port": _free_block(1),
        "grpc_base_port": _free_block(len(SERVICES)),
        "metrics_base_port": _free_block(len(SERVICES)),
        "gateway_http_port": _free_block(1),
        "evolution_http_port": _free_block(1),
        "state_dir": str(tmp_path / "state"),
        "grace_s": 2.0,
    }
    path.write_text(yaml.safe_dump(values))
    return path


def run_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """`forgerl <args>` in a subprocess, output captured."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FORGERL, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_cli
