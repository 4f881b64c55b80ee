"""RolloutManager stamps publishing episodes with their generation-queue position and reports those that end
without a trajectory, so that the data pool's windowed FIFO neither misorders nor waits for them."""

from __future__ import annotations

import asyncio
import collections

import pytest

from forgerl.rollout.episode import EpisodeError, EpisodeResult, EpisodeSpec, InfraError
from forgerl.rollout.manager import RolloutManager
from forgerl.rollout.tasks import Grading, get_suite
from forgerl.v1 import rollout_pb2, trajectory_pb2

pytestmark = pytest.mark.unit
K = rollout_pb2.EpisodeEventKind
SUITES = {"tooluse": get_suite("tooluse")}
TASKS = SUITES["tooluse"].tasks("test")[:6]
SEQ = "forgerl/submit_seq"


class Runner:
    """Records each attempt's spec; per task: fail for infrastructure once, fail as an agent, or finish
    without a trajectory (an agent that never called the model)."""

    def __init__(self, *, flaky: str = "", agent_error: str = "", no_trajectory: str = "", hold: str = "") -> None:
        self.flaky, self.agent_error, self.no_trajectory, self.hold = flaky, agent_error, no_trajectory, hold
        self.specs: list[EpisodeSpec] = []
        self.release = asyncio.Event()

    async def __call__(self, spec: EpisodeSpec) -> EpisodeResult:
        self.specs.append(spec)
        await asyncio.sleep(0)
        if spec.task.id == self.hold:
            await self.release.wait()
        if spec.task.id == self.flaky and spec.attempt == 1:
            raise InfraError("sandbox launcher failed")
        if spec.task.id == self.agent_error:
            raise EpisodeError("unknown scaffold")
        trajectory_id = "" if spec.task.id == self.no_trajectory else f"traj-{spec.episode_id}"
        return EpisodeResult(
            episode_id=spec.episode_id, task_id=spec.task.id, reward=trajectory_pb2.RewardComponents(),
            step_rewards=[], success=True, performance=1.0, wall_clock_s=0.01, sandbox_start_s=0.0,
            stopped="answer", turns=1, tests=Grading({}, 1.0, True), trajectory_id=trajectory_id,
        )  # fmt: skip


async def drain(manager: RolloutManager, submission_id: str) -> list[rollout_pb2.EpisodeEvent]:
    return await asyncio.wait_for(_collect(manager, submission_id), 10)


async def _collect(manager: RolloutManager, submission_id: str) -> list[rollout_pb2.EpisodeEvent]:
    return [e async for e in manager.events(submission_id=submission_id)]


async def test_publishing_episodes_get_consecutive_queue_positions_per_run() -> None:
    runner = Runner(flaky=TASKS[0].id)
    manager = RolloutManager(runner, SUITES, max_in_flight=2, retry_backoff_s=0.0)
    await manager.start()
    try:
        a1, _ = await manager.submit("run-a", TASKS[:2], group_size=2, scaffold_version="oracle")
        b1, _ = await manager.submit("run-b", TASKS[2:3], group_size=3, scaffold_version="oracle")
        evaluation, _ = await manager.submit(
            "run-a", TASKS[3:4], group_size=2, scaffold_version="oracle", publish=False
        )
        a2, _ = await manager.submit("run-a", TASKS[4:6], group_size=1, scaffold_version="oracle")
        for sid in (a1, b1, evaluation, a2):
            await drain(manager, sid)
    finally:
        await manager.stop()
    # The queue order the test submitted in, written out: run-a's publishing episodes are positions 0-5
    # (a1: task 0 x2, task 1 x2; a2: task 4, task 5), run-b's 0-2; the evaluation takes none.
    expected = {
        ("run-a", a1): [(TASKS[0].id, 0), (TASKS[0].id, 1), (TASKS[1].id, 2), (TASKS[1].id, 3)],
        ("run-a", a2): [(TASKS[4].id, 4), (TASKS[5].id, 5)],
        ("run-b", b1): [(TASKS[2].id, 0), (TASKS[2].id, 1), (TASKS[2].id, 2)],
    }
    firsts = [s for s in runner.specs if s.attempt == 1]
    for (run, sid), want in expected.items():
        mine = [s for s in firsts if s.labels["forgerl/submission"] == sid]
        assert {s.run_id for s in mine} == {run}
        assert sorted(((s.task.id, int(s.labels[SEQ])) for s in mine), key=lambda x: x[1]) == want
    assert not [s for s in runner.specs if s.labels["forgerl/submission"] == evaluation and SEQ in s.labels]
    # A retried attempt keeps its episode's position.
    retried = [s for s in runner.specs if s.attempt == 2]
    assert len(retried) == 2
    by_episode = {s.episode_id: s.labels.get(SEQ) for s in firsts}
    assert all(by_episode[s.episode_id] == s.labels[SEQ] for s in retried)


async def test_episodes_without_a_trajectory_are_reported_with_their_seq() -> None:
    reported: list[tuple[str, int, str, str]] = []

    async def report(run_id: str, seq: int, episode_id: str, reason: str) -> None:
        reported.append((run_id, seq, episode_id, reason))

    runner = Runner(agent_error=TASKS[1].id, no_trajectory=TASKS[2].id, hold=TASKS[3].id)
    manager = RolloutManager(runner, SUITES, max_in_flight=1, report_skipped=report)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-a", TASKS[:3], group_size=1, scaffold_version="oracle")
        await drain(manager, sid)
        held, _ = await manager.submit("run-a", TASKS[3:5], group_size=1, scaffold_version="oracle")
        while not [s for s in runner.specs if s.task.id == TASKS[3].id]:
            await asyncio.sleep(0.01)
        assert await manager.cancel(held) == 2  # seq 3 running, seq 4 still queued
        runner.release.set()
        await drain(manager, held)
        evaluation, _ = await manager.submit(
            "run-a", TASKS[1:2], group_size=1, scaffold_version="oracle", publish=False
        )
        await drain(manager, evaluation)
    finally:
        await manager.stop()
    by_seq = {seq: (run, reason) for run, seq, _, reason in reported}
    # 0 finished with a trajectory; 1 failed (agent error); 2 finished without one; 3 and 4 cancelled;
    # the evaluation's failure is no queue position.
    assert sorted(by_seq) == [1, 2, 3, 4] and len(reported) == 4
    assert {run for run, _ in by_seq.values()} == {"run-a"}
    assert "unknown scaffold" in by_seq[1][1] and by_seq[3][1] == by_seq[4][1] == "cancelled"
    episodes = collections.Counter(episode for _, _, episode, _ in reported)
    assert max(episodes.values()) == 1


async def test_a_failing_report_does_not_hold_the_episode() -> None:
    async def report(run_id: str, seq: int, episode_id: str, reason: str) -> None:
        raise ConnectionError("data pool down")

    manager = RolloutManager(Runner(agent_error=TASKS[0].id), SUITES, report_skipped=report)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-a", TASKS[:1], group_size=1, scaffold_version="oracle")
        events = await drain(manager, sid)
    finally:
        await manager.stop()
    assert events[-1].kind == K.EPISODE_EVENT_KIND_FAILED
    assert manager.run_stats("run-a").failed == 1


async def test_numbering_goes_on_where_the_data_pool_says() -> None:
    # A restarted rollout: the pool has queued run-a up to 40; run-b is new to it; run-c's pool is away.
    asked: list[str] = []

    async def queue_start(run_id: str) -> int:
        asked.append(run_id)
        if run_id == "run-c":
            raise ConnectionError("data pool restarting")
        return {"run-a": 41, "run-b": 0}[run_id]

    runner = Runner()
    manager = RolloutManager(runner, SUITES, queue_start=queue_start)
    await manager.start()
    try:
        sids = [await manager.submit(run, TASKS[:2], group_size=1, scaffold_version="oracle") for run in
                ("run-a", "run-a", "run-b", "run-c")]  # fmt: skip
        await manager.submit("run-d", TASKS[:1], group_size=1, scaffold_version="oracle", publish=False)
        for sid, _ in sids:
            await drain(manager, sid)
    finally:
        await manager.stop()
    seqs = collections.defaultdict(list)
    for spec in runner.specs:
        if SEQ in spec.labels:
            seqs[spec.run_id].append(int(spec.labels[SEQ]))
    assert {run: sorted(s) for run, s in seqs.items()} == {
        "run-a": [41, 42, 43, 44],
        "run-b": [0, 1],
        "run-c": [0, 1],
    }
    assert asked == ["run-a", "run-b", "run-c"]  # once per run; evaluations take no number
