"""RolloutManager: in-flight bound, infrastructure retries (only those), events, cancel, stats."""

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
TASKS = SUITES["tooluse"].tasks("test")[:4]


def result(spec: EpisodeSpec, success: bool = True) -> EpisodeResult:
    perf = 1.0 if success else 0.0
    return EpisodeResult(
        episode_id=spec.episode_id, task_id=spec.task.id,
        reward=trajectory_pb2.RewardComponents(performance=perf, total=perf), step_rewards=[], success=success,
        performance=perf, wall_clock_s=0.01, sandbox_start_s=0.0, stopped="answer", turns=1,
        tests=Grading({}, perf, success), trajectory_id=f"traj-{spec.episode_id}-{spec.attempt}",
    )  # fmt: skip


class FakeRunner:
    def __init__(self, delay: float = 0.02, infra_failures: int = 0, agent_error_task: str = "") -> None:
        self.delay = delay
        self.infra_failures = infra_failures  # first N attempts of every episode fail for infrastructure
        self.agent_error_task = agent_error_task
        self.active = 0
        self.peak = 0
        self.attempts: collections.Counter[str] = collections.Counter()

    async def __call__(self, spec: EpisodeSpec) -> EpisodeResult:
        self.attempts[spec.episode_id] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay)
            if spec.task.id == self.agent_error_task:
                raise EpisodeError("the scaffold needs a model")
            if spec.attempt <= self.infra_failures:
                raise InfraError("sandbox launcher failed")
            return result(spec)
        finally:
            self.active -= 1


async def collect(manager: RolloutManager, submission_id: str) -> list[rollout_pb2.EpisodeEvent]:
    return [e async for e in manager.events(submission_id=submission_id)]


async def test_groups_in_flight_bound_and_events() -> None:
    runner = FakeRunner()
    manager = RolloutManager(runner, SUITES, max_in_flight=3)
    await manager.start()
    try:
        sid, n = await manager.submit("run-a", TASKS, group_size=4, scaffold_version="oracle")
        assert n == 16
        events = await asyncio.wait_for(collect(manager, sid), 10)
    finally:
        await manager.stop()
    assert runner.peak == 3
    finished = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
    assert len(finished) == 16 and all(e.success and e.trajectory_id for e in finished)
    assert len([e for e in events if e.kind == K.EPISODE_EVENT_KIND_STARTED]) == 16
    by_task = collections.Counter(e.task_id for e in finished)
    assert set(by_task.values()) == {4}
    stats = manager.run_stats("run-a")
    assert (stats.finished, stats.failed, stats.retried, stats.in_flight, stats.queued) == (16, 0, 0, 0, 0)


async def test_submission_max_in_flight_is_its_own_bound() -> None:
    runner = FakeRunner()
    manager = RolloutManager(runner, SUITES, max_in_flight=8)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-b", TASKS, group_size=3, scaffold_version="oracle", max_in_flight=2)
        await asyncio.wait_for(collect(manager, sid), 10)
    finally:
        await manager.stop()
    assert runner.peak == 2


async def test_infrastructure_failures_are_retried_agent_errors_are_not() -> None:
    runner = FakeRunner(infra_failures=1, agent_error_task=TASKS[1].id)
    manager = RolloutManager(runner, SUITES, max_in_flight=4, max_attempts=3, retry_backoff_s=0.0)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-c", TASKS[:2], group_size=2, scaffold_version="oracle")
        events = await asyncio.wait_for(collect(manager, sid), 10)
    finally:
        await manager.stop()
    kinds = collections.defaultdict(list)
    for e in events:
        kinds[e.task_id].append(e.kind)
    ok, bad = kinds[TASKS[0].id], kinds[TASKS[1].id]
    assert ok.count(K.EPISODE_EVENT_KIND_RETRIED) == 2 and ok.count(K.EPISODE_EVENT_KIND_FINISHED) == 2
    assert K.EPISODE_EVENT_KIND_RETRIED not in bad and bad.count(K.EPISODE_EVENT_KIND_FAILED) == 2
    assert max(runner.attempts.values()) == 2
    stats = manager.run_stats("run-c")
    assert (stats.finished, stats.failed, stats.retried) == (2, 2, 2)


async def test_retries_give_up_after_max_attempts() -> None:
    runner = FakeRunner(infra_failures=99)
    manager = RolloutManager(runner, SUITES, max_attempts=3, retry_backoff_s=0.0)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-d", TASKS[:1], group_size=1, scaffold_version="oracle")
        events = await asyncio.wait_for(collect(manager, sid), 10)
    finally:
        await manager.stop()
    assert [e.kind for e in events] == [
        K.EPISODE_EVENT_KIND_STARTED, K.EPISODE_EVENT_KIND_RETRIED, K.EPISODE_EVENT_KIND_STARTED,
        K.EPISODE_EVENT_KIND_RETRIED, K.EPISODE_EVENT_KIND_STARTED, K.EPISODE_EVENT_KIND_FAILED,
    ]  # fmt: skip
    assert "3 attempts" in events[-1].message


async def test_cancel_stops_queued_and_running_episodes() -> None:
    runner = FakeRunner(delay=5.0)
    manager = RolloutManager(runner, SUITES, max_in_flight=2)
    await manager.start()
    try:
        sid, n = await manager.submit("run-e", TASKS, group_size=2, scaffold_version="oracle")
        await asyncio.sleep(0.1)
        assert manager.run_stats("run-e").in_flight == 2
        assert await manager.cancel(sid) == n
        events = await asyncio.wait_for(collect(manager, sid), 5)
        assert await manager.cancel(sid) == 0
    finally:
        await manager.stop()
    failed = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FAILED]
    assert len(failed) == n and all(e.message == "cancelled" for e in failed)
    stats = manager.run_stats("run-e")
    assert (stats.in_flight, stats.queued, stats.failed) == (0, 0, n)
    with pytest.raises(KeyError):
        await manager.cancel("nope")


async def test_late_stream_replays_and_run_stream_follows() -> None:
    manager = RolloutManager(FakeRunner(), SUITES)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-f", TASKS[:1], group_size=2, scaffold_version="oracle")
        first = await asyncio.wait_for(collect(manager, sid), 5)
        again = await asyncio.wait_for(collect(manager, sid), 5)  # after the fact: replayed
        assert [e.SerializeToString() for e in again] == [e.SerializeToString() for e in first]
        seen: list[rollout_pb2.EpisodeEvent] = []

        async def follow() -> None:
            async for e in manager.events(run_id="run-f"):
                seen.append(e)

        follower = asyncio.create_task(follow())
        sid2, _ = await manager.submit("run-f", TASKS[1:2], group_size=1, scaffold_version="oracle")
        await asyncio.wait_for(collect(manager, sid2), 5)
        await asyncio.sleep(0.05)
        follower.cancel()
        assert {e.submission_id for e in seen} == {sid, sid2} and len(seen) == len(first) + 2
    finally:
        await manager.stop()


async def test_submit_validation() -> None:
    manager = RolloutManager(FakeRunner(), SUITES)
    with pytest.raises(ValueError, match="unknown suite"):
        manager.resolve_tasks("nope", "train", [])
    with pytest.raises(ValueError, match="no split"):
        manager.resolve_tasks("tooluse", "dev", [])
    with pytest.raises(ValueError, match="unknown task ids"):
        manager.resolve_tasks("tooluse", "test", ["tooluse/train/00000"])
    assert len(manager.resolve_tasks("tooluse", "test", [TASKS[0].id])) == 1
    with pytest.raises(ValueError, match="group_size"):
        await manager.submit("r", TASKS, group_size=0, scaffold_version="oracle")
    with pytest.raises(ValueError, match="run_id"):
        await manager.submit("", TASKS, group_size=1, scaffold_version="oracle")


async def test_pool_back_pressure_holds_publishing_episodes() -> None:
    behind = {"value": True}

    async def pool_behind(run_id: str) -> bool:
        return behind["value"]

    runner = FakeRunner()
    manager = RolloutManager(runner, SUITES, pool_behind=pool_behind, pool_poll_s=0.05)
    await manager.start()
    try:
        sid, _ = await manager.submit("run-g", TASKS[:1], group_size=1, scaffold_version="oracle", publish=True)
        await asyncio.sleep(0.3)
        assert runner.attempts.total() == 0 and manager.run_stats("run-g").queued == 1
        behind["value"] = False
        events = await asyncio.wait_for(collect(manager, sid), 5)
        assert events[-1].kind == K.EPISODE_EVENT_KIND_FINISHED
    finally:
        await manager.stop()
