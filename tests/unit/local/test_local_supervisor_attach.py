"""Attaching to a running local topology: the recorded topology wins over the caller's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgerl.local.supervisor import Process, Supervisor
from forgerl.local.topology import LocalTopology

pytestmark = pytest.mark.unit


def test_attach_takes_the_recorded_topology(tmp_path: Path) -> None:
    # `forgerl run start --local` starts the topology with the run's model (tiny); a later
    # `forgerl restart inference` names no config and must not restart it on the default (debug) model.
    started = Supervisor(LocalTopology.load(None, state_dir=tmp_path, model_preset="tiny", grpc_base_port=27000))
    started.processes["inference"] = Process("inference", 12345, "127.0.0.1:27000", 1.5)
    started._save()

    attached = Supervisor.attach(LocalTopology.load(None, state_dir=tmp_path))
    assert attached.topology.model_preset == "tiny"
    assert attached.topology.initial_model_path == tmp_path / "checkpoints" / "init-tiny"
    assert attached.topology.port("inference") == 27000
    assert attached.processes["inference"].pid == 12345


def test_attach_without_a_running_topology_keeps_the_callers(tmp_path: Path) -> None:
    attached = Supervisor.attach(LocalTopology.load(None, state_dir=tmp_path, model_preset="small"))
    assert attached.topology.model_preset == "small" and not attached.processes
