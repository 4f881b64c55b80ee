"""`forgerl up` fails, saying why, when the topology cannot start (issue 24, item 6): a port that another
process holds is named before anything starts (its server would answer the health checks meant for ours),
and a component that exits at start ends `forgerl up` with the last lines of its log."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from forgerl.local.topology import LocalTopology

pytestmark = pytest.mark.e2e


def test_up_names_a_port_held_by_another_process(topology_file: Path, cli: Callable[..., Any]) -> None:
    topology = LocalTopology.load(topology_file)
    port = topology.port("datapool")
    with socket.socket() as other:
        other.bind((topology.host, port))
        other.listen()
        result = cli("up", "--detach", "--config", str(topology_file), timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"ports in use by another process: datapool gRPC {topology.host}:{port};" in result.stdout
    assert not topology.state_file.exists()  # nothing was started


def test_up_fails_with_the_log_of_a_component_that_exits_at_start(
    topology_file: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    values = yaml.safe_load(topology_file.read_text())
    values["model_path"] = str(tmp_path / "no-such-checkpoint")
    topology_file.write_text(yaml.safe_dump(values))
    topology = LocalTopology.load(topology_file)
    try:
        result = cli("up", "--detach", "--config", str(topology_file), timeout=300)
    finally:
        cli("down", "--config", str(topology_file))
    assert result.returncode == 1, result.stdout + result.stderr
    out = " ".join(result.stdout.split())  # rich wraps long lines
    assert "inference exited during start-up" in out, out
    assert f"inference cannot serve --model-path '{tmp_path / 'no-such-checkpoint'}'" in out, out
    assert not topology.state_file.exists()
