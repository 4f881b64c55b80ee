"""The local topology: which processes run, on which loopback ports, with which environment.

One place decides every port; each service reads its own through the same `FORGERL_<SERVICE>_<KEY>`
variables the Helm chart sets in a cluster.
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

# Start order: engines and storage first, then the services that call them.
SERVICES = ("inference", "datapool", "gateway", "rollout", "trainer", "evolution")
BROKER = "broker"


@dataclass(frozen=True)
class LocalTopology:
    """Ports and paths of one local deployment (defaults are the embedded ones; a YAML file may override)."""

    host: str = "127.0.0.1"
    broker_port: int = 19092
    # Service i (in SERVICES order) gets grpc_base_port + i and metrics_base_port + i.
    grpc_base_port: int = 50051
    metrics_base_port: int = 19151
    # The gateway's OpenAI-compatible HTTP endpoint, for agents.
    gateway_http_port: int = 18080
    # The evolution service's operator console (HTTP).
    evolution_http_port: int = 18090
    state_dir: Path = Path(".forgerl")
    auth_token: str | None = None
    # The checkpoint inference serves first; unset: a fresh `model_preset` one under state_dir.
    model_path: Path | None = None
    model_preset: str = "debug"
    # The engine's context (prompt + generation), and what a request that names no max_tokens gets.
    max_model_len: int = 2048
    default_max_tokens: int = 512
    # The trainer's torch threads. SFT runs alone on the machine: with both of 2 cores its 32-row steps take
    # ~0.7 of the one-thread time (make run's SFT: 600 steps).
    trainer_threads: int = 2
    # vLLM's CPU engine takes about a minute to start on 2 cores; everything else a few seconds.
    ready_timeout_s: float = 300.0
    grace_s: float = 10.0

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> LocalTopology:
        """The defaults, then the keys of YAML file `path`, then non-None `overrides`."""
        values: dict[str, Any] = {}
        if path is not None:
            loaded = yaml.safe_load(path.read_text()) or {}
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(loaded) - known)
            if unknown:
                raise ValueError(f"{path}: unknown keys {unknown}; known keys: {sorted(known)}")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("state_dir", "model_path"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        return cls(**values)

    def port(self, service: str) -> int:
        return self.grpc_base_port + SERVICES.index(service)

    def address(self, service: str) -> str:
        if service == BROKER:
            return f"{self.host}:{self.broker_port}"
        return f"{self.host}:{self.port(service)}"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "topology.json"

    @property
    def initial_model_path(self) -> Path:
        return self.model_path or self.state_dir / "checkpoints" / f"init-{self.model_preset}"

    def ports(self, name: str) -> list[tuple[str, int]]:
        """The ports component `name` listens on, labelled: the broker's, or a service's gRPC, metrics (and
        the gateway's HTTP) ports."""
        if name == BROKER:
            return [("Kafka", self.broker_port)]
        ports = [("gRPC", self.port(name)), ("metrics", self.metrics_base_port + SERVICES.index(name))]
        return [*ports, ("HTTP", self.gateway_http_port)] if name == "gateway" else ports

    def check_ports_free(self, names: list[str]) -> None:
        """RuntimeError naming every port of `names` another process listens on. Checked before anything
        starts: a foreign server on a service's port answers the health checks meant for ours."""
        busy = [
            f"{name} {what} {self.host}:{port}"
            for name in names
            for what, port in self.ports(name)
            if not _bindable(self.host, port)
        ]
        if busy:
            raise RuntimeError(
                f"ports in use by another process: {', '.join(busy)}; stop it (`forgerl down --config ...` for "
                "another local topology) or move this one (grpc_base_port, metrics_base_port, broker_port, "
                "gateway_http_port in `forgerl up --config local.yaml`)"
            )

    def service_env(self, service: str) -> dict[str, str]:
        """The variables a service process is started with: its own keys and where its peers are."""
        prefix = f"FORGERL_{service.upper()}_"
        env = {
            prefix + "HOST": self.host,
            prefix + "PORT": str(self.port(service)),
            prefix + "METRICS_PORT": str(self.metrics_base_port + SERVICES.index(service)),
            prefix + "GRACE_S": str(self.grace_s),
            prefix + "STATE_DIR": str(self.state_dir.resolve()),
            prefix + "KAFKA_BOOTSTRAP": self.address(BROKER),
        }
        # A service's config declares the peers it calls as fields such as `inference_address`.
        for peer in SERVICES:
            if peer != service:
                env[f"{prefix}{peer.upper()}_ADDRESS"] = self.address(peer)
        if service == "gateway":
            env[prefix + "HTTP_PORT"] = str(self.gateway_http_port)
            env[prefix + "DEFAULT_MAX_TOKENS"] = str(self.default_max_tokens)
        if service in ("gateway", "inference"):
            env[prefix + "MAX_MODEL_LEN"] = str(self.max_model_len)
        if service == "inference":
            env[prefix + "MODEL_PATH"] = str(self.initial_model_path.resolve())
        if service == "trainer":  # where a run starts from when its config names no checkpoint
            env[prefix + "INFERENCE_MODEL_PATH"] = str(self.initial_model_path.resolve())
            env[prefix + "THREADS"] = str(self.trainer_threads)
        if service == "datapool":  # the trainer acks every step: an orphaned batch comes back within a minute
            env[prefix + "ACK_TIMEOUT_S"] = "60"
        if service == "rollout":
            env[prefix + "MAX_IN_FLIGHT"] = "64"
        if service == "evolution":  # the console, and the gateway's OpenAI API for the model proposer
            env[prefix + "HTTP_PORT"] = str(self.evolution_http_port)
            env[prefix + "PROPOSER_BASE_URL"] = f"http://{self.host}:{self.gateway_http_port}/v1"
        if self.auth_token:
            env["FORGERL_AUTH_TOKEN"] = self.auth_token
        return env

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["state_dir"] = str(self.state_dir)
        values["model_path"] = None if self.model_path is None else str(self.model_path)
        values.pop("auth_token")
        return values


def _bindable(host: str, port: int) -> bool:
    """Whether a listener could bind `host:port` now (SO_REUSEADDR: a closed socket in TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
