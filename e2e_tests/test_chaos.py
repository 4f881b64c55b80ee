"""Chaos: `kill -9` of each component once, in turn, mid-RL of one short run of the main job
(`forgerl run start --local`). Nobody steps in: the local supervisor restarts what died, every client
waits for it, and the run finishes by itself, with no `--resume`. Checked: every trajectory was trained
at most once; every episode that rollout reported on ended finished, or failed with its reason; the time
each component took to recover is printed (benchmarks/README.md, "Chaos")."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from short_run import FORGERL, cli_env, like_a_terminal, pid_of, progress, short_main_job, wait_for

from forgerl.local.supervisor import status
from forgerl.local.topology import LocalTopology
from forgerl.runtime.client import insecure_channel
from forgerl.v1 import rollout_pb2, rollout_pb2_grpc

# 9.5 min on 2 cores shared with other work (load 15-22), ~6 min of it recovering (benchmarks/README.md).
pytestmark = [pytest.mark.e2e, pytest.mark.chaos, pytest.mark.timeout(2400)]

# The order. Each kill waits for the previous component to be back and the run to have stepped.
COMPONENTS = ("broker", "datapool", "inference", "gateway", "rollout", "trainer")
# Two steps before the first kill, two per kill (one to recover, one of margin), two at the end.
RL_STEPS = 2 + 2 * len(COMPONENTS) + 2
Kind = rollout_pb2.EpisodeEventKind


@dataclass
class Recovery:
    component: str
    killed_at_step: int
    back_s: float  # kill -> the component SERVING again (a new process)
    stepped_s: float  # kill -> the first RL step completed after it was back


class EpisodeEvents:
    """Rollout's episode events of the run, followed across rollout restarts (each process has its own)."""

    def __init__(self, address: str, run_id: str) -> None:
        self.address, self.run_id = address, run_id
        self.final: dict[str, rollout_pb2.EpisodeEvent] = {}
        self.started: set[str] = set()
        self.retried = 0
        self._seen: set[tuple[str, int, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            stub = rollout_pb2_grpc.RolloutServiceStub(insecure_channel(self.address))
            try:
                for resp in stub.StreamEpisodeEvents(rollout_pb2.StreamEpisodeEventsRequest(run_id=self.run_id)):
                    self._record(resp.event)
            except grpc.RpcError:
                self._stop.wait(1.0)  # rollout is restarting; its replacement replays its own events

    def _record(self, event: rollout_pb2.EpisodeEvent) -> None:
        key = (event.episode_id, event.kind, event.message)
        if key in self._seen:
            return
        self._seen.add(key)
        if event.kind == Kind.EPISODE_EVENT_KIND_STARTED:
            self.started.add(event.episode_id)
        elif event.kind == Kind.EPISODE_EVENT_KIND_RETRIED:
            self.retried += 1
        elif event.kind in (Kind.EPISODE_EVENT_KIND_FINISHED, Kind.EPISODE_EVENT_KIND_FAILED):
            self.final[event.episode_id] = event

    def stop(self) -> None:
        self._stop.set()


def _kill_and_recover(topology: LocalTopology, runs: Path, name: str) -> Recovery:
    old = pid_of(topology, name)
    step = progress(runs)["rl_step"]
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)

    def back() -> bool:
        return pid_of(topology, name) != old and status(topology, name) == "SERVING"

    wait_for(f"{name} to be restarted", back, 600, every_s=0.5)
    back_s = time.monotonic() - killed
    step_when_back = progress(runs).get("rl_step", step)
    wait_for(f"an RL step after {name} came back", lambda: progress(runs).get("rl_step", 0) > step_when_back, 600)
    recovery = Recovery(name, step, round(back_s, 1), round(time.monotonic() - killed, 1))
    print(f"chaos: {name} killed at RL step {step}: back in {recovery.back_s} s, run stepped {recovery.stepped_s} s")
    return recovery


def test_every_component_killed_once_mid_rl(topology_file: Path, tmp_path: Path) -> None:
    topology = LocalTopology.load(topology_file)
    runs = tmp_path / "runs"
    config = short_main_job(tmp_path, rl_steps=RL_STEPS)
    command = [*FORGERL, "run", "start", str(config), "--local", "--topology", str(topology_file)]
    log_path = tmp_path / "run.log"
    recoveries: list[Recovery] = []
    with open(log_path, "w") as out:
        run = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=cli_env(runs), start_new_session=True,
            preexec_fn=like_a_terminal,
        )  # fmt: skip
        events: EpisodeEvents | None = None
        try:
            wait_for("two RL steps", lambda: progress(runs).get("rl_step", 0) >= 2, 900)
            run_id = progress(runs)["run_id"]
            events = EpisodeEvents(topology.address("rollout"), run_id)
            for name in COMPONENTS:
                assert run.poll() is None, log_path.read_text()[-3000:]
                recoveries.append(_kill_and_recover(topology, runs, name))
            returncode = run.wait(timeout=900)
        finally:
            if events is not None:
                events.stop()
            if run.poll() is None:
                run.send_signal(signal.SIGINT)  # the CLI takes its topology down
                run.wait(timeout=120)
    output = log_path.read_text()
    (tmp_path / "recoveries.json").write_text(json.dumps([r.__dict__ for r in recoveries], indent=1))
    print("chaos recoveries:", json.dumps([r.__dict__ for r in recoveries]))
    assert returncode == 0, output[-5000:]
    assert re.search(rf"run {re.escape(run_id)}: succeeded", output), output[-3000:]

    final = progress(runs)
    assert final["run_id"] == run_id and final["stage"] == "done" and final["rl_step"] == RL_STEPS
    trained = final["trained_trajectory_ids"]
    assert len(trained) == len(set(trained)) == final["trained_trajectories"] > 0  # none twice
    assert len(final["trained_batches"]) == len(set(final["trained_batches"])) == RL_STEPS

    assert events is not None and events.final, "rollout reported no episode"
    failed = [e for e in events.final.values() if e.kind == Kind.EPISODE_EVENT_KIND_FAILED]
    assert all(e.message for e in failed), [e for e in failed if not e.message]
    # Episodes still running when their rollout was killed end with it, unreported: at most one wave.
    unreported = events.started - set(events.final)
    print(f"chaos episodes: {len(events.final) - len(failed)} finished, {len(failed)} failed with a reason, "
          f"{events.retried} retries, {len(unreported)} lost with the killed rollout")  # fmt: skip
    assert [r.component for r in recoveries] == list(COMPONENTS)
