"""Sandbox launcher: runs ONE command isolated, then exits. Standard library only; run as a script.

    python -I -S launcher.py SPEC_FD          (as root; SPEC_FD: a pipe holding the spec below as JSON)

It must start as root (it creates namespaces and mounts). Steps:

1. new network, mount, PID, IPC and UTS namespaces (`unshare(2)`): the network namespace has only a
   loopback interface, and it is down, so no connection can be opened, not even to the host's 127.0.0.1;
2. every mount is made private and re-mounted read-only, then the work directory is bind-mounted onto
   itself read-write (nosuid, nodev): the only writable place is the work directory (and /dev's device
   nodes, e.g. /dev/null, which a read-only mount still lets one write);
3. fork: the child is PID 1 ("init") of the new PID namespace, mounts a fresh /proc (the sandbox sees
   only its own processes), forks the command and reaps everything until the command exits. When init
   exits the kernel kills every process left in the namespace, so nothing outlives the command; init
   also dies (SIGKILL, PR_SET_PDEATHSIG) when the launcher is killed, e.g. on a timeout;
4. the command process sets its rlimits (address space, file size, processes, CPU seconds, open files,
   no core dumps; soft = hard so they cannot be raised, except CPU, whose hard limit is one second higher
   so that SIGXCPU comes first), drops every group and capability by switching
   to the sandbox's unprivileged uid/gid (PR_SET_NO_NEW_PRIVS too), and execs the command in the work
   directory with the given environment.

When the sandbox has cgroups (memory, pids), the launcher joins them before forking, so every process of
the command is counted against the sandbox's memory and process limits as a whole.

The outcome goes to the status file descriptor as JSON lines: {"init_pid": N} once init runs, then
{"exit": code} or {"signal": n} for the command, or {"setup_error": "..."} when isolation could not be
set up (an infrastructure failure, never the command's fault).

SPEC: {"argv": [...], "cwd": "/abs/workdir", "uid": int, "gid": int, "env": {...}, "status_fd": int,
       "limits": {"as_bytes": int, "fsize_bytes": int, "nproc": int, "cpu_s": int, "nofile": int},
       "readonly_mounts": bool, "cgroup_procs": ["/sys/fs/cgroup/<controller>/.../cgroup.procs", ...]}
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import warnings  # noqa: F401 - os.execvpe imports it lazily, after the uid switch (stdlib may be unreadable)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

_FLAG_BITS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}
# Pseudo file systems whose mounts stay as they are: /proc is replaced by the namespace's own.
_SKIP_FSTYPES = {"proc"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


class SetupError(Exception):
    pass


def _check(ret: int, what: str) -> None:
    if ret != 0:
        errno = ctypes.get_errno()
        raise SetupError(f"{what}: {os.strerror(errno)} (errno {errno})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    _check(
        _libc.mount(
            source.encode() if source else None, target.encode(), fstype.encode() if fstype else None, flags, None
        ),
        f"mount {target}",
    )


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040 ...)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mounts() -> list[tuple[str, str, int]]:
    """(mount point, fs type, per-mount flags to keep) for every mount of this namespace."""
    result = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            point, options, fstype = _unescape(parts[4]), parts[5].split(","), parts[sep + 1]
            flags = 0
            for opt in options:
                flags |= _FLAG_BITS.get(opt, 0)
            result.append((point, fstype, flags))
    return result


def _isolate_filesystem(workdir: str) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    seen = set()
    for point, fstype, flags in _mounts():
        if fstype in _SKIP_FSTYPES or point in seen or not os.path.isdir(point):
            continue
        seen.add(point)
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except SetupError:
            # A mount shadowed by a later one at the same place cannot be reached; the top one is re-mounted.
            if point == "/":
                raise
    _mount(workdir, workdir, None, MS_BIND)
    _mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)


def _set_limits(limits: dict[str, int]) -> None:
    table = {
        "as_bytes": resource.RLIMIT_AS,
        "fsize_bytes": resource.RLIMIT_FSIZE,
        "nproc": resource.RLIMIT_NPROC,
        "cpu_s": resource.RLIMIT_CPU,
        "nofile": resource.RLIMIT_NOFILE,
    }
    for key, value in limits.items():
        if key in table and value and value > 0:
            # CPU: SIGXCPU at the soft limit (reported as such), SIGKILL a second later if it is caught.
            hard = int(value) + 1 if key == "cpu_s" else int(value)
            resource.setrlimit(table[key], (int(value), hard))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _write_status(fd: int, payload: dict) -> None:
    try:  # noqa: SIM105 - the launcher keeps its imports to the minimum (start-up time)
        os.write(fd, (json.dumps(payload) + "\n").encode())
    except OSError:
        pass


def _run_command(spec: dict) -> None:
    """In the command process (a child of init): limits, drop privileges, exec. Never returns."""
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        _set_limits(spec["limits"])
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        os.chdir(spec["cwd"])
        os.umask(0o022)
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except FileNotFoundError:
        os.write(2, f"sandbox: command not found: {spec['argv'][0]}\n".encode())
        os._exit(127)
    except Exception as exc:
        os.write(2, f"sandbox: cannot start the command: {exc}\n".encode())
        os._exit(126)


def _init(spec: dict, status_fd: int) -> None:
    """PID 1 of the namespace: fresh /proc, run the command, reap everything, report. Never returns."""
    code = 1
    try:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if spec.get("readonly_mounts", True):
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(status_fd)
            _run_command(spec)
        result: dict = {}
        while True:
            try:
                child, status = os.wait()
            except ChildProcessError:
                break
            if child == pid:
                signalled = os.WIFSIGNALED(status)
                result = {"signal": os.WTERMSIG(status)} if signalled else {"exit": os.WEXITSTATUS(status)}
                break
        _write_status(status_fd, result)
        code = 0
    except SetupError as exc:
        _write_status(status_fd, {"setup_error": str(exc)})
    except Exception as exc:
        _write_status(status_fd, {"setup_error": f"init: {exc!r}"})
    os._exit(code)  # PID 1 exits: the kernel kills whatever the command left behind


def main() -> None:
    spec_fd = int(sys.argv[1])
    with os.fdopen(spec_fd, "rb") as f:  # a pipe, not argv: the sandbox's /proc would show argv
        spec = json.loads(f.read())
    status_fd = int(spec["status_fd"])
    os.set_inheritable(status_fd, False)
    try:
        if os.geteuid() != 0:
            raise SetupError("the local sandbox launcher must run as root (namespaces, mounts, uid switch)")
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # Join the sandbox's cgroups first (the file systems turn read-only below): all forks land in them.
        for procs in spec.get("cgroup_procs", []):  # the sandbox's cgroups: every process forked from here
            try:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as exc:
                raise SetupError(f"cgroup {procs}: {exc.strerror}") from None
        _check(_libc.unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        if spec.get("readonly_mounts", True):
            _isolate_filesystem(spec["cwd"])
    except SetupError as exc:
        _write_status(status_fd, {"setup_error": str(exc)})
        sys.exit(125)
    pid = os.fork()
    if pid == 0:
        _init(spec, status_fd)
    _write_status(status_fd, {"init_pid": pid})
    _, status = os.waitpid(pid, 0)
    sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125)


if __name__ == "__main__":
    main()
