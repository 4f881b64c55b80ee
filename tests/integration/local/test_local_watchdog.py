"""The local supervisor's watchdog restarts a component that died (as a Deployment would), with backoff,
and `stop_all` leaves no process behind. The component is the real Tansu broker (it starts in ~0.1 s)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from forgerl.datapool.broker import free_port, kafka_metadata_ok
from forgerl.local import supervisor as supervisor_module
from forgerl.local.supervisor import Supervisor, pid_alive
from forgerl.local.topology import BROKER, LocalTopology

pytestmark = pytest.mark.integration


def _wait_for_new_pid(supervisor: Supervisor, old_pid: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        process = supervisor.processes.get(BROKER)
        restarts = supervisor.restarts
        if process and process.pid != old_pid and restarts and restarts[-1].recovered_s is not None:
            return process.pid
        time.sleep(0.1)
    raise TimeoutError(f"the broker was not restarted within {timeout_s:.0f} s: {supervisor.restarts}")


def test_watchdog_restarts_a_killed_component_with_backoff(tmp_path: Path) -> None:
    topology = LocalTopology.load(None, state_dir=tmp_path, broker_port=free_port())
    topology.logs_dir.mkdir(parents=True)
    supervisor = Supervisor(topology)
    events: list[tuple[str, str]] = []
    supervisor._spawn(BROKER, fresh=True)
    try:
        supervisor._wait_ready([BROKER], lambda name, what: None)
        supervisor.watch(lambda name, what: events.append((name, what)), every_s=0.1)
        pids = [supervisor.processes[BROKER].pid]
        for _ in range(2):
            os.kill(pids[-1], signal.SIGKILL)
            pids.append(_wait_for_new_pid(supervisor, pids[-1]))
            assert kafka_metadata_ok(topology.host, topology.broker_port)
    finally:
        supervisor.stop_all()
    # Two deaths in a row within a minute: the second restart waited twice as long (1 s, then 2 s).
    assert [(r.exit_status, r.attempt) for r in supervisor.restarts] == [
        ("killed by SIGKILL", 1),
        ("killed by SIGKILL", 2),
    ]
    assert all(r.recovered_s is not None and r.recovered_s >= 2 ** (r.attempt - 1) for r in supervisor.restarts)
    assert any("restarting in 2 s (attempt 2)" in what for _, what in events), events
    assert not any(pid_alive(pid) for pid in pids)
    assert not topology.state_file.exists()


class _SaysNotServing(Supervisor):
    """The broker's process lives but its health says NOT_SERVING, as a service whose engine died does,
    until the test says it is healthy again (its replacement)."""

    sick = True

    def status(self, name: str) -> str:
        return "NOT_SERVING" if self.sick else super().status(name)


def test_a_live_component_not_serving_for_long_is_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "UNHEALTHY_RESTART_S", 1.0)
    monkeypatch.setattr(supervisor_module, "HEALTH_EVERY_S", 0.2)
    topology = LocalTopology.load(None, state_dir=tmp_path, broker_port=free_port())
    topology.logs_dir.mkdir(parents=True)
    supervisor = _SaysNotServing(topology)
    events: list[tuple[str, str]] = []
    supervisor._spawn(BROKER, fresh=True)
    supervisor._save()
    sick_pid = supervisor.processes[BROKER].pid
    try:
        supervisor.watch(lambda name, what: events.append((name, what)), every_s=0.1)
        deadline = time.monotonic() + 30
        while not supervisor.restarts and time.monotonic() < deadline:
            time.sleep(0.1)
        supervisor.sick = False  # the replacement is healthy
        new_pid = _wait_for_new_pid(supervisor, sick_pid)
        assert kafka_metadata_ok(topology.host, topology.broker_port)
    finally:
        supervisor.stop_all()
    assert any("NOT_SERVING for 1 s; killing it" in what for _, what in events), events
    assert supervisor.restarts[0].exit_status == "killed by SIGKILL"
    assert not pid_alive(sick_pid) and not pid_alive(new_pid)
