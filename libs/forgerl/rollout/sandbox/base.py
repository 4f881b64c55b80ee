"""One interface for every sandbox: create with files, run commands, close.

A sandbox is where an episode's tools and tests run: a throw-away work directory (local) or Pod
(Kubernetes). Failures are split in two, because rollout retries only one of them:

- `SandboxInfraError`: the sandbox itself could not be set up or reached (launcher setup, Pod never
  scheduled, API errors). Not the agent's fault: the episode is retried on a fresh sandbox.
- everything the agent's own commands do (non-zero exit, timeout, hitting a limit) is a normal
  `ExecResult`, with the limits it hit named in `violations`; the episode goes on and is rewarded.
"""

from __future__ import annotations

import abc
import base64
import json
import shlex
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Violation names an ExecResult reports: which limit or restriction stopped the command.
TIMEOUT = "timeout"
MEMORY = "memory"
FILE_SIZE = "file_size"
PROCESSES = "processes"
CPU = "cpu"
NETWORK = "network"
FILESYSTEM = "filesystem"
OUTPUT = "output_truncated"


class SandboxError(Exception):
    """A sandbox operation failed."""


class SandboxInfraError(SandboxError):
    """The sandbox failed for infrastructure reasons (not the agent's doing): retry the episode elsewhere."""


@dataclass(frozen=True)
class SandboxLimits:
    """What a command in a sandbox may use. Times in seconds, sizes in bytes."""

    memory_bytes: int = 1 << 30  # address space (RLIMIT_AS) locally; the container memory limit on Kubernetes
    file_size_bytes: int = 64 << 20  # largest file a command may write (RLIMIT_FSIZE)
    processes: int = 64  # processes and threads of the sandbox user (RLIMIT_NPROC)
    cpu_seconds: int = 120  # CPU seconds per command (RLIMIT_CPU)
    open_files: int = 256
    command_timeout_s: float = 60.0  # wall clock per command unless the call says otherwise
    output_bytes: int = 64 << 10  # stdout / stderr kept per stream; the rest is dropped
    cpu_cores: float = 1.0  # Kubernetes CPU limit (the local sandbox bounds CPU time, not cores)
    disk_bytes: int = 512 << 20  # Kubernetes ephemeral storage / emptyDir size


@dataclass(frozen=True)
class TaskEnvironment:
    """What a task's commands run with: a Python version and pip requirements (the local backend builds a
    virtualenv from them once per `key()`), or a ready image (the Kubernetes backend runs it as the Pod).

    None on a task means the machine's own `python3` (local) or the factory's default image (Kubernetes).
    """

    python: str = "3"  # the interpreter `python<version>` on the sandbox's PATH, e.g. "3.11"
    requirements: tuple[str, ...] = ()  # pip requirement lines; pin them (`pytest==8.3.3`) for reproducibility
    image: str | None = None  # a ready image with everything installed, for the Kubernetes backend

    def key(self) -> str:
        """What makes two environments the same build (the image is the Kubernetes backend's business)."""
        return json.dumps({"python": self.python, "requirements": sorted(self.requirements)}, sort_keys=True)


@dataclass
class ExecResult:
    exit_code: int | None  # None when the command was killed by a signal
    signal: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False
    truncated: bool = False
    violations: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe(self) -> str:
        """One line for the agent and the logs: how the command ended and which limit stopped it."""
        if self.timed_out:
            how = f"timed out after {self.duration_s:.1f}s and was killed"
        elif self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            how = f"killed by {name}"
        else:
            how = f"exit code {self.exit_code}"
        if self.violations:
            how += f" (limits hit: {', '.join(self.violations)})"
        return how


_STDERR_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (MEMORY, ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")),
    (FILE_SIZE, ("File too large", "File size limit exceeded")),
    (CPU, ("CPU time limit exceeded",)),
    (PROCESSES, ("Resource temporarily unavailable", "can't fork", "Cannot fork", "retry: No child processes")),
    (NETWORK, ("Network is unreachable", "Network is down", "Cannot assign requested address")),
    (FILESYSTEM, ("Read-only file system", "Permission denied", "Invalid cross-device link")),
)


def classify(
    exit_code: int | None, sig: int | None, stderr: str, *, timed_out: bool, truncated: bool
) -> tuple[str, ...]:
    """Which limits a command ran into: from how it ended (signals) and what it said (stderr markers)."""
    found: list[str] = []
    if timed_out:
        found.append(TIMEOUT)
    if sig == signal.SIGXCPU:
        found.append(CPU)
    if sig == signal.SIGXFSZ:
        found.append(FILE_SIZE)
    for name, markers in _STDERR_MARKERS:
        if name not in found and any(m in stderr for m in markers):
            found.append(name)
    if truncated:
        found.append(OUTPUT)
    return tuple(found)


# A tiny program the sandbox runs to write files sent on stdin (JSON {path: base64}), so that files are
# written by the sandbox's own user inside the sandbox, never by the host following a path the agent made.
_WRITE_FILES = (
    "import base64,json,os,shutil,sys\n"
    "a=json.load(sys.stdin)\n"
    "for p in a['clear']:\n"
    " if os.path.islink(p) or os.path.isfile(p): os.unlink(p)\n"
    " else: shutil.rmtree(p,ignore_errors=True)\n"
    "for p,d in a['files'].items():\n"
    " q=os.path.normpath(p)\n"
    " if os.path.isabs(q) or q.startswith('..'): sys.exit('path outside the work directory: '+p)\n"
    " os.makedirs(os.path.dirname(q) or '.',exist_ok=True)\n"
    " open(q,'wb').write(base64.b64decode(d))\n"
)


class Sandbox(abc.ABC):
    """A live sandbox. `exec` never raises for what the command does; only for infrastructure failures."""

    kind: str = "abstract"
    workdir: str = "/workspace"  # where commands start, as the command sees it

    def __init__(self, sandbox_id: str, limits: SandboxLimits) -> None:
        self.id = sandbox_id
        self.limits = limits
        self.start_latency_s = 0.0
        self.closed = False

    @abc.abstractmethod
    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        output_bytes: int | None = None,
    ) -> ExecResult:
        """Run a command (a string runs under `sh -c`) in the work directory. `output_bytes` overrides the
        limits' cap on each of stdout and stderr (the grader reads the agent's changes in one call)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Kill everything still running and delete the sandbox. Idempotent."""

    async def write_files(
        self, files: Mapping[str, str | bytes], *, clear: Sequence[str] = (), timeout_s: float = 30.0
    ) -> ExecResult:
        """Write files (paths relative to the work directory) from inside the sandbox, after deleting the
        directories in `clear`."""
        payload = {
            "clear": list(clear),
            "files": {
                path: base64.b64encode(data.encode() if isinstance(data, str) else data).decode()
                for path, data in files.items()
            },
        }
        return await self.exec(["python3", "-c", _WRITE_FILES], stdin=json.dumps(payload).encode(), timeout_s=timeout_s)

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass
class SandboxRequest:
    """What a new sandbox starts with."""

    files: Mapping[str, str | bytes] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    time_budget_s: float = 600.0  # how long the sandbox may live at most (Pod activeDeadlineSeconds)
    environment: TaskEnvironment | None = None  # None: the machine's python3 / the factory's image


class SandboxFactory(abc.ABC):
    kind: str = "abstract"

    @abc.abstractmethod
    async def create(self, request: SandboxRequest) -> Sandbox:
        """A started sandbox holding `request.files`, ready for `exec`; raises SandboxInfraError."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release what the factory holds (clients, pools)."""


def shell_argv(command: Sequence[str] | str) -> list[str]:
    return ["sh", "-c", command] if isinstance(command, str) else list(command)


def quote(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)
