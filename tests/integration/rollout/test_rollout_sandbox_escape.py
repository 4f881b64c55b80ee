"""Escape attempts from the local sandbox: each one is stopped, and reported in the result's violations.

Network: only to a listener this test opens on the host's 127.0.0.1 (nothing else is ever addressed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from forgerl.rollout.sandbox.base import (
    CPU,
    FILE_SIZE,
    FILESYSTEM,
    MEMORY,
    NETWORK,
    PROCESSES,
    TIMEOUT,
    SandboxInfraError,
    SandboxLimits,
    SandboxRequest,
)
from forgerl.rollout.sandbox.local import LocalSandbox, LocalSandboxFactory, SandboxCgroup, processes_of_uid

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]


async def make(root: Path, limits: SandboxLimits, files: dict[str, str] | None = None) -> LocalSandbox:
    factory = LocalSandboxFactory(root, limits)
    sandbox = await factory.create(SandboxRequest(files=files or {}))
    assert isinstance(sandbox, LocalSandbox)
    return sandbox


async def test_runs_commands_in_its_directory_as_an_unprivileged_user(sandbox_root: Path, limits) -> None:
    sb = await make(sandbox_root, limits, {"pkg/hello.py": "print('hello from', __name__)\n"})
    try:
        r = await sb.exec("python3 pkg/hello.py && pwd && id -u && grep CapEff /proc/self/status")
        assert r.ok, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == "hello from __main__" and lines[1] == sb.workdir
        assert int(lines[2]) == sb.uid >= 200_000
        assert lines[3].split()[1] == "0000000000000000", "no capabilities"
        r = await sb.exec(["python3", "-c", "import os; os.setuid(0)"])
        assert not r.ok and "PermissionError" in r.stderr
        r = await sb.exec(["cat"], stdin=b"piped input")
        assert r.stdout == "piped input"
    finally:
        await sb.close()


async def test_no_network_connection_can_be_opened(sandbox_root: Path, limits) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept())
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_loop, daemon=True)
    thread.start()
    # The listener works from the host side (the check is not vacuous).
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    time.sleep(0.3)
    assert len(accepted) == 1
    sb = await make(sandbox_root, limits)
    try:
        tcp = await sb.exec(["python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 3)"])
        assert not tcp.ok and NETWORK in tcp.violations, tcp.stderr
        send = f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port}))"
        udp = await sb.exec(["python3", "-c", f"import socket; {send}"])
        assert not udp.ok and NETWORK in udp.violations, udp.stderr
        ifaces = await sb.exec(["python3", "-c", "import socket; print([n for _, n in socket.if_nameindex()])"])
        assert ifaces.stdout.strip() == "['lo']"
        dns = await sb.exec(["python3", "-c", "import socket; socket.getaddrinfo('pypi.org', 443)"])
        assert not dns.ok
    finally:
        await sb.close()
        stop.set()
        thread.join()
        listener.close()
    assert len(accepted) == 1, "a connection from the sandbox reached the host"


async def test_cannot_write_outside_its_directory(sandbox_root: Path, limits) -> None:
    neighbour = await make(sandbox_root, limits, {"secret.txt": "neighbour's"})
    sb = await make(sandbox_root, limits)
    marker = f"escape-{os.getpid()}"
    home_target = Path("/root") / marker
    targets = [
        f"/tmp/{marker}", f"/var/tmp/{marker}", f"{sandbox_root}/{marker}", f"/etc/{marker}", str(home_target),
        f"/dev/shm/{marker}", f"{neighbour.workdir}/{marker}", f"{neighbour.workdir}/secret.txt", "/etc/passwd",
    ]  # fmt: skip
    try:
        for target in targets:
            r = await sb.exec(["sh", "-c", f"echo pwned >> '{target}'"])
            assert not r.ok and FILESYSTEM in r.violations, (target, r.stdout, r.stderr)
        # Links do not help: a symlink is followed into the read-only world, a hard link crosses mounts.
        r = await sb.exec(["sh", "-c", "ln -s /etc/hostname link && echo pwned >> link"])
        assert not r.ok and FILESYSTEM in r.violations
        r = await sb.exec(["sh", "-c", "ln /etc/hostname hard"])
        assert not r.ok and FILESYSTEM in r.violations
        r = await sb.exec(["cat", f"{neighbour.workdir}/secret.txt"])
        assert not r.ok and "Permission denied" in r.stderr
        r = await sb.exec(["sh", "-c", "echo fine > inside.txt && mkdir -p a/b && echo ok > a/b/c && cat inside.txt"])
        assert r.ok and r.stdout == "fine\n"
    finally:
        await sb.close()
        await neighbour.close()
    for target in targets[:7]:
        assert not Path(target).exists(), target
    assert "pwned" not in Path("/etc/passwd").read_text()


async def test_memory_limit(sandbox_root: Path) -> None:
    sb = await make(sandbox_root, SandboxLimits(memory_bytes=256 << 20))
    try:
        r = await sb.exec(["python3", "-c", "x = bytearray(1 << 30); print('allocated')"])
        assert not r.ok and "allocated" not in r.stdout and MEMORY in r.violations
        small = await sb.exec(["python3", "-c", "x = bytearray(32 << 20); print('allocated')"])
        assert small.ok and small.stdout.strip() == "allocated"
    finally:
        await sb.close()


async def test_memory_limit_holds_for_the_sandbox_as_a_whole(sandbox_root: Path) -> None:
    """Many processes, each under the per-process limit, together far over it: the sandbox's cgroup stops them."""
    if SandboxCgroup.parents() is None:
        pytest.skip("no writable cgroup v1 memory and pids hierarchies here: per-process rlimits only")
    sb = await make(sandbox_root, SandboxLimits(memory_bytes=256 << 20, processes=32))
    assert sb.cgroup is not None
    hog = (
        "import os, time\n"
        "for _ in range(6):\n"
        "    if os.fork() == 0:\n"
        "        x = bytearray(150 << 20)\n"  # touched: really resident
        "        time.sleep(3)\n"
        "        os._exit(0)\n"
        "statuses = [os.wait()[1] for _ in range(6)]\n"
        "print('killed', sum(os.WIFSIGNALED(s) for s in statuses))\n"
    )
    try:
        r = await sb.exec(["python3", "-c", hog], timeout_s=60)
        assert MEMORY in r.violations, (r.describe(), r.stdout, r.stderr[-300:])
        assert r.signal is not None or int(r.stdout.split()[-1]) > 0
        dirs = list(sb.cgroup.dirs.values())
        assert all(d.is_dir() for d in dirs)
    finally:
        await sb.close()
    assert not any(d.exists() for d in dirs), "the sandbox's cgroups were not removed"


async def test_process_limit_stops_a_fork_bomb(sandbox_root: Path) -> None:
    sb = await make(sandbox_root, SandboxLimits(processes=16, command_timeout_s=30))
    try:
        bomb = "import os, time\nfor _ in range(200):\n    os.fork()\ntime.sleep(0.5)\n"
        start = time.monotonic()
        r = await sb.exec(["python3", "-c", bomb])
        assert PROCESSES in r.violations and not r.timed_out, r.stderr[-500:]
        assert time.monotonic() - start < 20
        assert processes_of_uid(sb.uid) == [], "the bomb's processes outlived the command"
    finally:
        await sb.close()


async def test_the_timeout_covers_a_stdin_the_command_never_reads(sandbox_root: Path, limits) -> None:
    """1 MiB on stdin to a command that never reads it: the feed fills the pipe and waits. The timeout counts
    from the start, feed included; before, it started after the feed, which then waited forever."""
    sb = await make(sandbox_root, limits)
    try:
        start = time.monotonic()
        r = await asyncio.wait_for(sb.exec(["sleep", "300"], stdin=b"x" * 2**20, timeout_s=2.0), 60)
        assert r.timed_out and TIMEOUT in r.violations and time.monotonic() - start < 10
    finally:
        await sb.close()


async def test_nothing_outlives_the_timeout_or_the_command(sandbox_root: Path, limits) -> None:
    sb = await make(sandbox_root, limits)
    daemon = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(300)\n"
        "    os._exit(0)\n"
    )
    try:
        start = time.monotonic()
        r = await sb.exec(["sh", "-c", f"python3 -c '{daemon}'; setsid sleep 300 & nohup sleep 300 & sleep 300"],
                          timeout_s=2.0)  # fmt: skip
        elapsed = time.monotonic() - start
        assert r.timed_out and TIMEOUT in r.violations and elapsed < 10
        assert "timed out" in r.describe()
        await asyncio.sleep(0.2)
        assert processes_of_uid(sb.uid) == []
        # A command that returns at once but leaves a daemon behind: the daemon dies with it.
        r = await sb.exec(["sh", "-c", f"python3 -c '{daemon}'; (setsid sleep 300 &); echo left"], timeout_s=20)
        assert r.ok and r.stdout.strip() == "left"
        await asyncio.sleep(0.2)
        assert processes_of_uid(sb.uid) == []
    finally:
        await sb.close()


async def test_file_size_and_cpu_limits(sandbox_root: Path) -> None:
    sb = await make(sandbox_root, SandboxLimits(file_size_bytes=4 << 20, cpu_seconds=1, command_timeout_s=60))
    try:
        r = await sb.exec(["python3", "-c", "open('big', 'wb').write(b'x' * (64 << 20))"])
        assert not r.ok and FILE_SIZE in r.violations, r.stderr
        assert (Path(sb.workdir) / "big").stat().st_size <= 4 << 20
        r = await sb.exec(["sh", "-c", "head -c 50000000 /dev/zero > big2"])
        assert not r.ok and FILE_SIZE in r.violations
        r = await sb.exec(["python3", "-c", "while True: pass"])
        assert not r.ok and not r.timed_out and CPU in r.violations, r.describe()
    finally:
        await sb.close()


async def test_host_processes_are_invisible_and_out_of_reach(sandbox_root: Path, limits) -> None:
    sb = await make(sandbox_root, limits)
    try:
        r = await sb.exec(["sh", "-c", f"kill -9 {os.getpid()}; ls /proc | grep -c '^[0-9]'"])
        assert "No such process" in r.stderr
        assert int(r.stdout.strip()) <= 4  # init, sh, ls, grep: its own PID namespace
    finally:
        await sb.close()
    assert Path(f"/proc/{os.getpid()}").exists()


async def test_output_is_capped_and_close_cleans_up(sandbox_root: Path) -> None:
    sb = await make(sandbox_root, SandboxLimits(output_bytes=1000))
    r = await sb.exec(["python3", "-c", "print('a' * 100000); print('END')"])
    assert r.ok and r.truncated and len(r.stdout) <= 1000 and r.stdout.endswith("END\n")
    path, uid = Path(sb.workdir), sb.uid
    await sb.close()
    await sb.close()  # idempotent
    assert not path.exists() and processes_of_uid(uid) == []
    with pytest.raises(SandboxInfraError):
        await sb.exec(["true"])


async def test_broken_launcher_is_an_infrastructure_error(sandbox_root: Path, limits) -> None:
    factory = LocalSandboxFactory(sandbox_root, dataclasses.replace(limits), python="/nonexistent/python3")
    with pytest.raises(SandboxInfraError):
        await factory.create(SandboxRequest())
    assert [p for p in sandbox_root.iterdir() if not p.name.startswith(".")] == []
