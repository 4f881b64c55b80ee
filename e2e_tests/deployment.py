"""Where the end-to-end suite runs: the local process topology (the default, and CI) or a cluster.

    FORGERL_E2E_TARGET=local     # default: `forgerl up` on free loopback ports, `forgerl down` after
    FORGERL_E2E_TARGET=cluster FORGERL_E2E_ADDRESSES=inference=127.0.0.1:30051,datapool=...,trainer=...
                                 # a deployed chart, reached through port-forwards (scripts/e2e-kind.sh)

The tests drive the deployment through the gRPC API only, so the same assertions hold on both.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from forgerl.local.topology import SERVICES, LocalTopology

FORGERL = [sys.executable, "-m", "forgerl.cli.main"]
TARGETS = ("local", "cluster")


@dataclass(frozen=True)
class Deployment:
    target: str
    addresses: dict[str, str]
    token: str | None = None


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def free_block(size: int) -> int:
    for _ in range(100):
        base = random.randrange(20000, 32000)  # below the ephemeral range other processes bind from
        if all(port_free(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports")


def free_topology_values(root: Path) -> dict[str, object]:
    """A local topology's YAML values: free loopback ports, state under `root`."""
    return {
        "broker_port": free_block(1),
        "grpc_base_port": free_block(len(SERVICES)),
        "metrics_base_port": free_block(len(SERVICES)),
        "gateway_http_port": free_block(1),
        "evolution_http_port": free_block(1),
        "state_dir": str(root / "state"),
        "grace_s": 2.0,
    }


def target_from_env() -> str:
    target = os.environ.get("FORGERL_E2E_TARGET", "local")
    if target not in TARGETS:
        raise ValueError(f"FORGERL_E2E_TARGET={target!r}: choose one of {', '.join(TARGETS)}")
    return target


def cluster_deployment() -> Deployment:
    """The addresses of a deployed chart from FORGERL_E2E_ADDRESSES (service=host:port, comma-separated)."""
    raw = os.environ.get("FORGERL_E2E_ADDRESSES", "")
    addresses = dict(pair.split("=", 1) for pair in raw.split(",") if "=" in pair)
    missing = sorted(set(SERVICES) - set(addresses))
    if missing:
        raise ValueError(f"FORGERL_E2E_ADDRESSES lacks {missing}: service=host:port for each of {list(SERVICES)}")
    return Deployment("cluster", addresses, os.environ.get("FORGERL_AUTH_TOKEN"))


@contextmanager
def local_deployment(topology_file: Path, extra_env: dict[str, str]) -> Iterator[Deployment]:
    """`forgerl up --detach` on the ports of `topology_file`; `forgerl down` whatever happens."""
    topology = LocalTopology.load(topology_file)
    env = {**os.environ, "COLUMNS": "200", **extra_env}
    config = ["--config", str(topology_file)]
    try:
        up = subprocess.run([*FORGERL, "up", "--detach", *config], capture_output=True, text=True, timeout=600, env=env)
        if up.returncode != 0:
            raise RuntimeError(f"forgerl up failed:\n{up.stdout}\n{up.stderr}")
        yield Deployment("local", {s: topology.address(s) for s in SERVICES}, topology.auth_token)
    finally:
        subprocess.run([*FORGERL, "down", *config], capture_output=True, text=True, timeout=120, env=env)
