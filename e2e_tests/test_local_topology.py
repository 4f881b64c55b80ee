"""`forgerl up` / `status` / `down` on loopback: every service SERVING, reflection, nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from short_run import FORGERL, like_a_terminal

from forgerl.local.supervisor import S3, pid_alive, s3_available
from forgerl.local.topology import BROKER, SERVICES, LocalTopology
from forgerl.runtime.client import health_status, insecure_channel

pytestmark = pytest.mark.e2e

SERVICE_NAMES = {
    "inference": "InferenceService",
    "datapool": "DatapoolService",
    "gateway": "GatewayService",
    "rollout": "RolloutService",
    "trainer": "TrainerService",
    "evolution": "EvolutionService",
}


def _pids(topology: LocalTopology) -> list[int]:
    return [entry["pid"] for entry in json.loads(topology.state_file.read_text())["processes"]]


def test_up_status_reflection_down(topology_file: Path, cli: Callable[..., Any]) -> None:
    topology = LocalTopology.load(topology_file)
    try:
        result = cli("up", "--detach", "--config", str(topology_file), timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        processes = json.loads(topology.state_file.read_text())["processes"]
        # The broker's S3 storage too, where moto_server is installed (it is in CI: a dev dependency).
        storage = {S3} if s3_available() else set()
        assert sorted(p["name"] for p in processes) == sorted({BROKER, *SERVICES, *storage})
        # Everything but the model-loading engine is SERVING within a minute (vLLM's start is its own issue).
        assert all(p["ready_s"] < 60 for p in processes if p["name"] != "inference"), processes
        status = cli("status", "--config", str(topology_file))
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("SERVING") == len(SERVICES) + 1
        for service, grpc_name in SERVICE_NAMES.items():
            address = topology.address(service)
            assert health_status(address, f"forgerl.v1.{grpc_name}") == "SERVING"
            with insecure_channel(address) as channel:
                assert f"forgerl.v1.{grpc_name}" in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        pids = _pids(topology) if topology.state_file.exists() else []
        down = cli("down", "--config", str(topology_file))
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids)
    assert not topology.state_file.exists()
    assert cli("status", "--config", str(topology_file)).returncode == 1


def test_ctrl_c_stops_everything(topology_file: Path, cli: Callable[..., Any]) -> None:
    topology = LocalTopology.load(topology_file)
    up = subprocess.Popen(
        [*FORGERL, "up", "--config", str(topology_file)], stdout=subprocess.PIPE, text=True, preexec_fn=like_a_terminal
    )
    pids: list[int] = []
    try:
        assert up.stdout is not None
        seen = []
        for line in up.stdout:  # the foreground `up` prints this once everything is SERVING
            seen.append(line)
            if "Ctrl-C" in line:
                break
        assert "Ctrl-C" in seen[-1], "".join(seen)
        pids = _pids(topology)
        assert all(pid_alive(pid) for pid in pids)
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if up.poll() is None:
            up.kill()
        if topology.state_file.exists():  # whatever happened, leave no process behind
            cli("down", "--config", str(topology_file))
    assert pids and not any(pid_alive(pid) for pid in pids)
