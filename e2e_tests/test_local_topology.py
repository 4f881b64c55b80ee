"""`forgerl up` / `status` / `down` on loopback: every service SERVING, reflection, nothing left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from forgerl.local.supervisor import pid_alive
from forgerl.local.topology import SERVICES, LocalTopology
from forgerl.runtime.client import health_status, insecure_channel

pytestmark = pytest.mark.e2e

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]
SERVICE_NAMES = {
    "inference": "InferenceService",
    "datapool": "DatapoolService",
    "gateway": "GatewayService",
    "rollout": "RolloutService",
    "trainer": "TrainerService",
    "evolution": "EvolutionService",
}


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
        "state_dir": str(tmp_path / "state"),
        "grace_s": 2.0,
    }
    path.write_text(yaml.safe_dump(values))
    return path


def _cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*FORGERL, *args], capture_output=True, text=True, timeout=timeout, env=env)


def _pids(topology: LocalTopology) -> list[int]:
    return [entry["pid"] for entry in json.loads(topology.state_file.read_text())["processes"]]


def test_up_status_reflection_down(topology_file: Path) -> None:
    topology = LocalTopology.load(topology_file)
    try:
        result = _cli("up", "--detach", "--config", str(topology_file), timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        processes = json.loads(topology.state_file.read_text())["processes"]
        assert len(processes) == len(SERVICES) + 1
        # Everything but the model-loading engine is SERVING within a minute (vLLM's start is its own issue).
        assert all(p["ready_s"] < 60 for p in processes if p["name"] != "inference"), processes
        status = _cli("status", "--config", str(topology_file))
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("SERVING") == len(SERVICES) + 1
        for service, grpc_name in SERVICE_NAMES.items():
            address = topology.address(service)
            assert health_status(address, f"forgerl.v1.{grpc_name}") == "SERVING"
            with insecure_channel(address) as channel:
                assert f"forgerl.v1.{grpc_name}" in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        pids = _pids(topology) if topology.state_file.exists() else []
        down = _cli("down", "--config", str(topology_file))
    assert down.returncode == 0, down.stdout + down.stderr
    assert pids and not any(pid_alive(pid) for pid in pids)
    assert not topology.state_file.exists()
    assert _cli("status", "--config", str(topology_file)).returncode == 1


def test_ctrl_c_stops_everything(topology_file: Path) -> None:
    topology = LocalTopology.load(topology_file)
    up = subprocess.Popen([*FORGERL, "up", "--config", str(topology_file)], stdout=subprocess.PIPE, text=True)
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
            _cli("down", "--config", str(topology_file))
    assert pids and not any(pid_alive(pid) for pid in pids)
