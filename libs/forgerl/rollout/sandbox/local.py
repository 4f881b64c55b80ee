"""Local sandbox: a throw-away directory on this machine; each command runs isolated by `launcher.py`.

Per command: new network / mount / PID / IPC / UTS namespaces (no network at all, a read-only view of
the machine except the work directory, only its own processes visible), rlimits for memory (address
space), file size, processes, CPU seconds and open files, an unprivileged uid of its own (one per live
sandbox, so the process limit and `kill` reach only that sandbox) and a wall-clock timeout after which
the launcher's process group, and with it the whole PID namespace, is killed. Where the machine's cgroup
v1 memory and pids hierarchies are writable, each sandbox also gets its own cgroups, which bound the
memory and the number of all its processes together. On close, any process still running as the
sandbox's uid is killed, the cgroups and the directory are deleted.

Not bounded locally: the total disk space a sandbox writes (each file is, by RLIMIT_FSIZE; the
Kubernetes sandbox has an emptyDir size limit and ephemeral-storage).

Needs root (namespaces, mounts, switching uid): `LocalSandboxFactory` refuses to start otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from forgerl.rollout.sandbox.base import (
    MEMORY,
    PROCESSES,
    ExecResult,
    Sandbox,
    SandboxFactory,
    SandboxInfraError,
    SandboxLimits,
    SandboxRequest,
    classify,
    shell_argv,
)
from forgerl.rollout.sandbox.environments import EnvironmentBuilder

log = logging.getLogger("forgerl.rollout")
LAUNCHER = Path(__file__).with_name("launcher.py")
DEFAULT_ROOT = Path("/var/tmp/forgerl-sandboxes")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
UID_LOCK_DIR = Path("/run/forgerl-sandbox-uids")


class UidPool:
    """Unprivileged uids, one per live sandbox, locked with flock so that several processes on one machine
    (services, tests, benchmarks) never share one. The uids need no /etc/passwd entry."""

    def __init__(self, base: int, size: int, lock_dir: Path) -> None:
        self.base, self.size, self.lock_dir = base, size, lock_dir
        self._held: dict[int, int] = {}  # uid -> lock fd
        self._next = 0

    def acquire(self) -> int:
        self.lock_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for i in range(self.size):
            uid = self.base + (self._next + i) % self.size
            if uid in self._held:
                continue
            fd = os.open(self.lock_dir / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self._held[uid] = fd
            self._next = (self._next + i + 1) % self.size
            return uid
        raise SandboxInfraError(f"all {self.size} sandbox uids from {self.base} are in use")

    def release(self, uid: int) -> None:
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing drops the flock


def processes_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids


def kill_uid(uid: int, *, wait_s: float = 2.0) -> int:
    """SIGKILL every process running as `uid`; returns how many there were."""
    found = processes_of_uid(uid)
    deadline = time.monotonic() + wait_s
    while found:
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
        found = processes_of_uid(uid)
    return len(found)


class SandboxCgroup:
    """Per-sandbox cgroups (v1 `memory` and `pids` hierarchies) holding every process of its commands.

    rlimits bound each process; the cgroup bounds the sandbox as a whole: the memory of all its processes
    together (the kernel's OOM killer acts inside the group) and their number. Used when this machine's
    cgroup v1 hierarchies are writable; `available()` says whether they are.
    """

    CONTROLLERS = ("memory", "pids")
    ROOT = Path("/sys/fs/cgroup")

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    @classmethod
    def parents(cls) -> dict[str, Path] | None:
        """Where this process's own cgroups are, per controller; None without writable v1 hierarchies."""
        found: dict[str, Path] = {}
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller in cls.CONTROLLERS:
                    base = cls.ROOT / controller / path.lstrip("/")
                    if base.is_dir() and os.access(base, os.W_OK):
                        found[controller] = base
        return found if set(found) == set(cls.CONTROLLERS) else None

    @classmethod
    def create(cls, name: str, limits: SandboxLimits, parents: dict[str, Path]) -> SandboxCgroup:
        dirs = {c: parents[c] / name for c in cls.CONTROLLERS}
        group = cls(dirs)
        try:
            for d in dirs.values():
                d.mkdir()
            memory = dirs["memory"]
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            if (memory / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                (memory / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_bytes))
            (dirs["pids"] / "pids.max").write_text(str(limits.processes))
        except OSError:
            group.remove()
            raise
        return group

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs.values()]

    def _counter(self, controller: str, filename: str, key: str) -> int:
        try:
            for line in (self.dirs[controller] / filename).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def counters(self) -> tuple[int, int]:
        """(OOM kills, refused forks) so far."""
        return self._counter("memory", "memory.oom_control", "oom_kill"), self._counter("pids", "pids.events", "max")

    def remove(self, wait_s: float = 2.0) -> None:
        deadline = time.monotonic() + wait_s
        for d in self.dirs.values():
            while d.exists():
                try:
                    d.rmdir()
                except OSError:  # EBUSY until the last process of the group is gone
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)


async def _read_capped(stream: asyncio.StreamReader | None, cap: int) -> tuple[bytes, bool]:
    """Read until EOF, keeping at most `cap` bytes: the head and the last quarter (a result line printed
    at the end survives a flood of output before it); the middle is drained and dropped."""
    if stream is None:
        return b"", False
    tail_cap = cap // 4
    head_cap = cap - tail_cap
    head = bytearray()
    tail = bytearray()
    truncated = False
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        room = head_cap - len(head)
        if room > 0:
            head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            tail += chunk
            if len(tail) > tail_cap:
                truncated = True
                del tail[: len(tail) - tail_cap]
    if not truncated:
        return bytes(head + tail), False
    return bytes(head[: head_cap - 32]) + b"\n[... output cut ...]\n" + bytes(tail), True


def _read_status(fd: int) -> list[dict]:
    data = bytearray()
    with contextlib.suppress(BlockingIOError, OSError):
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    out = []
    for line in data.decode(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


class LocalSandbox(Sandbox):
    kind = "local"

    def __init__(
        self,
        factory: LocalSandboxFactory,
        sandbox_id: str,
        path: Path,
        uid: int,
        cgroup: SandboxCgroup | None,
        environment: Path | None = None,
    ) -> None:
        super().__init__(sandbox_id, factory.limits)
        self.factory = factory
        self.path = path
        self.workdir = str(path)
        self.uid = uid
        self.cgroup = cgroup
        self.environment = environment  # the task's virtualenv (read-only here), None: the machine's python3
        self._procs: set[int] = set()

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        path = DEFAULT_PATH if self.environment is None else f"{self.environment / 'bin'}:{DEFAULT_PATH}"
        env = {
            "PATH": path,
            "HOME": self.workdir,
            "TMPDIR": os.path.join(self.workdir, ".tmp"),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.environment is not None:
            env["VIRTUAL_ENV"] = str(self.environment)
        if extra:
            env.update(extra)
        return env

    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        output_bytes: int | None = None,
    ) -> ExecResult:
        if self.closed:
            raise SandboxInfraError(f"sandbox {self.id} is closed")
        limits = self.limits
        timeout = limits.command_timeout_s if timeout_s is None else timeout_s
        read_fd, write_fd = os.pipe()
        spec = {
            "argv": shell_argv(argv),
            "cwd": self.workdir,
            "uid": self.uid,
            "gid": self.uid,
            "env": self._env(env),
            "status_fd": write_fd,
            "readonly_mounts": self.factory.readonly_mounts,
            "cgroup_procs": self.cgroup.procs_files if self.cgroup else [],
            "limits": {
                "as_bytes": limits.memory_bytes,
                "fsize_bytes": limits.file_size_bytes,
                "nproc": limits.processes,
                "cpu_s": limits.cpu_seconds,
                "nofile": limits.open_files,
            },
        }
        before = self.cgroup.counters() if self.cgroup else (0, 0)
        start = time.monotonic()
        spec_read, spec_write = os.pipe()
        payload = json.dumps(spec).encode()
        if len(payload) > 60_000:  # must fit the pipe's buffer: written before the launcher reads it
            for fd in (read_fd, write_fd, spec_read, spec_write):
                os.close(fd)
            raise ValueError(f"sandbox command and environment too large ({len(payload)} bytes)")
        os.write(spec_write, payload)
        os.close(spec_write)
        try:
            proc = await asyncio.create_subprocess_exec(
                self.factory.python,
                "-I",
                "-S",
                str(LAUNCHER),
                str(spec_read),
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                pass_fds=(write_fd, spec_read),
                start_new_session=True,
            )
        except OSError as exc:
            os.close(read_fd)
            raise SandboxInfraError(f"cannot start the sandbox launcher: {exc}") from exc
        finally:
            os.close(write_fd)
            os.close(spec_read)
        self._procs.add(proc.pid)
        os.set_blocking(read_fd, False)
        cap = output_bytes or limits.output_bytes
        readers = asyncio.gather(_read_capped(proc.stdout, cap), _read_capped(proc.stderr, cap))
        readers.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved, even when cancelled
        timed_out = False

        async def feed_and_wait() -> None:
            if stdin is not None and proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    proc.stdin.write(stdin)
                    await proc.stdin.drain()
                proc.stdin.close()
            await proc.wait()

        try:
            try:  # the timeout counts from the start: a command that never reads its stdin cannot hang the feed
                await asyncio.wait_for(feed_and_wait(), timeout)
            except TimeoutError:
                timed_out = True
                self._kill(proc.pid, read_fd)
                await proc.wait()
            try:
                (out, out_cut), (err, err_cut) = await asyncio.wait_for(readers, 5.0)
            except TimeoutError:
                # Pipes still open after the namespace died cannot happen unless something escaped it.
                kill_uid(self.uid)
                (out, out_cut), (err, err_cut) = await asyncio.wait_for(readers, 5.0)
        except BaseException:
            self._kill(proc.pid, read_fd)
            readers.cancel()
            os.close(read_fd)
            raise
        finally:
            self._procs.discard(proc.pid)
        statuses = _read_status(read_fd)
        os.close(read_fd)
        duration = time.monotonic() - start
        final = next((s for s in reversed(statuses) if "exit" in s or "signal" in s or "setup_error" in s), None)
        if final is not None and "setup_error" in final:
            raise SandboxInfraError(f"sandbox {self.id}: isolation setup failed: {final['setup_error']}")
        if final is None and not timed_out:
            raise SandboxInfraError(
                f"sandbox {self.id}: the launcher exited ({proc.returncode}) without a status: "
                f"{err.decode(errors='replace')[-500:]}"
            )
        exit_code = final.get("exit") if final else None
        sig = final.get("signal") if final else None
        if timed_out:
            exit_code, sig = None, signal.SIGKILL
        stderr = err.decode(errors="replace")
        truncated = out_cut or err_cut
        violations = classify(exit_code, sig, stderr, timed_out=timed_out, truncated=truncated)
        if self.cgroup is not None:
            oom, forks = (a - b for a, b in zip(self.cgroup.counters(), before, strict=True))
            extra = [
                name for name, hit in ((MEMORY, oom > 0), (PROCESSES, forks > 0)) if hit and name not in violations
            ]
            violations = (*violations, *extra)
        return ExecResult(
            exit_code=exit_code,
            signal=sig,
            stdout=out.decode(errors="replace"),
            stderr=stderr,
            duration_s=duration,
            timed_out=timed_out,
            truncated=truncated,
            violations=violations,
        )

    def _kill(self, launcher_pid: int, status_fd: int) -> None:
        """Kill the launcher's process group and its namespace's init (which takes the namespace with it)."""
        for status in _read_status(status_fd):
            if "init_pid" in status:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(status["init_pid"]), signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(launcher_pid, signal.SIGKILL)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for pid in list(self._procs):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        await asyncio.to_thread(self._cleanup)

    def _cleanup(self) -> None:
        try:
            kill_uid(self.uid)
            if self.cgroup is not None:
                self.cgroup.remove()
            shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self.factory.uids.release(self.uid)


class LocalSandboxFactory(SandboxFactory):
    kind = "local"

    def __init__(
        self,
        root: str | Path = DEFAULT_ROOT,
        limits: SandboxLimits | None = None,
        *,
        uid_base: int = 200_000,
        uid_count: int = 1024,
        python: str | None = None,
        probe: bool = True,
        readonly_mounts: bool = True,
        uid_lock_dir: str | Path = UID_LOCK_DIR,
        cgroups: bool | None = None,
        environments: EnvironmentBuilder | None = None,
    ) -> None:
        if os.geteuid() != 0:
            raise SandboxInfraError(
                "the local sandbox needs root (network/mount/PID namespaces and a per-sandbox uid); "
                "run rollout as root or use the kubernetes sandbox"
            )
        self.root = Path(root)
        self.limits = limits or SandboxLimits()
        # One lock directory per machine, whatever the root: two factories (a service and a benchmark, say)
        # must never hand out the same uid, or closing one sandbox would kill the other's processes.
        self.uids = UidPool(uid_base, uid_count, Path(uid_lock_dir))
        self.python = python or sys.executable
        self.probe = probe
        self.readonly_mounts = readonly_mounts
        # Sandbox-wide memory and process limits by cgroup where the machine allows (None: when available).
        self.cgroup_parents = SandboxCgroup.parents() if cgroups is not False else None
        if cgroups and self.cgroup_parents is None:
            raise SandboxInfraError("cgroups were asked for, but no writable cgroup v1 memory and pids hierarchy")
        log.info(
            "local sandboxes under %s: network/mount/PID namespaces, rlimits, uids from %d, cgroups %s",
            root, uid_base, "on (memory, pids)" if self.cgroup_parents else "off (per-process rlimits only)",
        )  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # sandboxes can reach their own directory, never list their neighbours
        # Task environments live beside the sandboxes: a place every sandbox uid can traverse (the service's
        # state dir may sit under a 0700 home) and outside every work directory, so read-only inside.
        self.environments = environments or EnvironmentBuilder(self.root / ".envs", search_path=DEFAULT_PATH)

    async def create(self, request: SandboxRequest) -> Sandbox:
        start = time.monotonic()
        uid = self.uids.acquire()
        sandbox_id = uuid.uuid4().hex[:12]
        path = self.root / sandbox_id
        cgroup = None
        environment = None
        try:
            if request.environment is not None:
                environment = await asyncio.to_thread(self.environments.ensure, request.environment)
            await asyncio.to_thread(self._prepare, path, uid, request.files)
            if self.cgroup_parents is not None:
                cgroup = SandboxCgroup.create(f"forgerl-{sandbox_id}", self.limits, self.cgroup_parents)
        except (OSError, SandboxInfraError) as exc:
            self.uids.release(uid)
            shutil.rmtree(path, ignore_errors=True)
            if isinstance(exc, SandboxInfraError):
                raise
            raise SandboxInfraError(f"cannot prepare sandbox {sandbox_id} ({path}): {exc}") from exc
        sandbox = LocalSandbox(self, sandbox_id, path, uid, cgroup, environment)
        if self.probe:
            try:
                result = await sandbox.exec(["true"], timeout_s=30.0)
            except BaseException:
                await sandbox.close()
                raise
            if not result.ok:
                await sandbox.close()
                raise SandboxInfraError(f"sandbox {sandbox_id} failed its start probe: {result.describe()}")
        sandbox.start_latency_s = time.monotonic() - start
        return sandbox

    @staticmethod
    def _prepare(path: Path, uid: int, files: Mapping[str, str | bytes]) -> None:
        # We hold the uid's lock: anything still running as it is a leftover (e.g. of a killed service).
        kill_uid(uid, wait_s=0.5)
        # The agent has not run yet, so nothing in the fresh directory can redirect these writes.
        path.mkdir(mode=0o700)
        (path / ".tmp").mkdir()
        for rel, data in files.items():
            target = (path / rel).resolve()
            if not target.is_relative_to(path.resolve()):
                raise OSError(f"task file {rel!r} lies outside the work directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, str):
                target.write_text(data)
            else:
                target.write_bytes(data)
        for dirpath, _dirnames, filenames in os.walk(path):
            os.chown(dirpath, uid, uid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, uid)
