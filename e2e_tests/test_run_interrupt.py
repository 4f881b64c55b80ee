"""Ctrl-C in `forgerl run start --local` (the main job, `make run`, in its short form) stops the run
cleanly: the topology goes down with no process left, the run is marked interrupted with its state saved,
and starting the main job again works: a new run starts and succeeds, and the interrupted one's
`--resume` command is shown."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from short_run import FORGERL, cli_env, like_a_terminal, progress, short_main_job, wait_for

from forgerl.local.supervisor import pid_alive
from forgerl.local.topology import LocalTopology
from forgerl.store import Store, default_url
from forgerl.v1 import run_pb2

pytestmark = [pytest.mark.e2e, pytest.mark.chaos]


def _group_alive(pgid: int) -> bool:
    """True while a process of group `pgid` runs (zombies, which a container's init may never reap, do not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def test_ctrl_c_then_the_main_job_again(topology_file: Path, tmp_path: Path) -> None:
    topology = LocalTopology.load(topology_file)
    runs = tmp_path / "runs"
    config = short_main_job(tmp_path)
    command = [*FORGERL, "run", "start", str(config), "--local", "--topology", str(topology_file)]
    env = cli_env(runs)
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=like_a_terminal
        )
        try:
            wait_for("the first RL step", lambda: progress(runs).get("rl_step", 0) >= 1, 900)
            pids = [p["pid"] for p in json.loads(topology.state_file.read_text())["processes"]]
            first.send_signal(signal.SIGINT)
            assert first.wait(timeout=120) == 130
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    output = (tmp_path / "first.log").read_text()
    run_id = re.search(r"run (\S+) started", output).group(1)  # type: ignore[union-attr]
    assert f"--resume {run_id}" in output and "Traceback" not in output, output
    assert not topology.state_file.exists()
    assert not any(pid_alive(pid) or _group_alive(pid) for pid in pids), "a process of the topology was left"
    interrupted = Store.open(default_url(topology.state_dir)).runs.get(run_id)
    assert interrupted.state == run_pb2.RUN_STATE_INTERRUPTED and interrupted.stage == "rl"
    saved = json.loads((runs / run_id / "state" / "progress.json").read_text())
    assert saved["rl_step"] >= 1

    second = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"run {run_id} was interrupted at rl step" in second.stdout
    assert f"--resume {run_id}" in second.stdout
    new_id = re.search(r"run (\S+) started", second.stdout).group(1)  # type: ignore[union-attr]
    store = Store.open(default_url(topology.state_dir))
    assert new_id != run_id and store.runs.get(new_id).state == run_pb2.RUN_STATE_SUCCEEDED
    assert store.runs.get(run_id).state == run_pb2.RUN_STATE_INTERRUPTED
