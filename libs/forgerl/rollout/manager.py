"""Many episodes at once: submissions, a bounded number in flight, infrastructure retries, event streams.

`RolloutManager.submit` queues `group_size` episodes per task (one group per task: episodes of a group
share a baseline in the RL core) and returns at once. A dispatcher keeps at most `max_in_flight` episodes
running overall (and at most the submission's own `max_in_flight`), in submission order, groups kept
together. An attempt that fails for infrastructure reasons (`InfraError`: sandbox, gateway, model
endpoint) is retried on a fresh sandbox up to `max_attempts`, after a doubling backoff; an episode the
agent itself botched is a normal, rewarded outcome and never retried.

Every episode emits STARTED (per attempt), then RETRIED (per failed attempt), and finally FINISHED or
FAILED. Events are kept per run (bounded), so a stream opened late replays what it missed, then follows.

Each publishing episode is stamped with its position in the run's generation queue, the label
`forgerl/submit_seq` (0, 1, 2, ... per run, in the order `submit` queues them; retries keep it), which
the gateway copies into the trajectory and the data pool's windowed FIFO schedules by. One that ends
without a published trajectory (failed, cancelled, an agent that never called the model) is reported
through `report_skipped`, so that the pool does not hold its window for it until the gap timeout. A
run's numbering starts where `queue_start` says (the data pool's next expected number), so that it
carries on across a restart of rollout instead of starting at 0 again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from forgerl.datapool.topics import SUBMIT_SEQ_LABEL
from forgerl.rollout.episode import EpisodeError, EpisodeResult, EpisodeSpec, InfraError
from forgerl.rollout.tasks import Suite, Task
from forgerl.v1 import rollout_pb2, trajectory_pb2

log = logging.getLogger("forgerl.rollout")

# Longest wait between two attempts of an episode (the backoff doubles from retry_backoff_s up to it).
MAX_RETRY_BACKOFF_S = 30.0

Kind = rollout_pb2.EpisodeEventKind
RunEpisode = Callable[[EpisodeSpec], Awaitable[EpisodeResult]]
# Checked before an episode that publishes starts: True while the data pool of the run is too far behind.
PoolBehind = Callable[[str], Awaitable[bool]]
# Called when a publishing episode ended without a trajectory: (run_id, submit_seq, episode_id, reason).
ReportSkipped = Callable[[str, int, str, str], Awaitable[None]]
# Where a run's generation queue goes on (asked once per run and process): the data pool's next_submit_seq.
QueueStart = Callable[[str], Awaitable[int]]


@dataclass
class _Episode:
    spec: EpisodeSpec
    submission: _Submission
    task: asyncio.Task[None] | None = None
    done: bool = False
    cancelled: bool = False  # ended by a Cancel, not by finishing or failing on its own


@dataclass
class _Submission:
    id: str
    run_id: str
    episodes: list[_Episode]
    max_in_flight: int
    in_flight: int = 0
    cancelled: bool = False
    remaining: int = 0
    finished_event: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class RunStats:
    in_flight: int = 0
    queued: int = 0
    finished: int = 0
    retried: int = 0
    failed: int = 0


class _EventLog:
    """A run's events, bounded; readers keep an absolute position and wait for new ones."""

    def __init__(self, capacity: int) -> None:
        self.events: collections.deque[rollout_pb2.EpisodeEvent] = collections.deque(maxlen=capacity)
        self.first = 0  # absolute index of events[0]
        self.changed = asyncio.Condition()

    async def append(self, event: rollout_pb2.EpisodeEvent) -> None:
        if len(self.events) == self.events.maxlen:
            self.first += 1
        self.events.append(event)
        async with self.changed:
            self.changed.notify_all()

    async def wake(self) -> None:
        async with self.changed:
            self.changed.notify_all()


class QueueFull(Exception):
    """A submission larger than one Submit may be, or one the queue has no room for; the message says the
    limit (gRPC RESOURCE_EXHAUSTED)."""


class RolloutManager:
    def __init__(
        self,
        run_episode: RunEpisode,
        suites: dict[str, Suite],
        *,
        max_in_flight: int = 8,
        max_attempts: int = 3,
        retry_backoff_s: float = 0.5,
        event_capacity: int = 100_000,
        pool_behind: PoolBehind | None = None,
        pool_poll_s: float = 1.0,
        report_skipped: ReportSkipped | None = None,
        report_timeout_s: float = 10.0,
        queue_start: QueueStart | None = None,
        max_submit_episodes: int = 4096,
        max_queued_episodes: int = 16384,
    ) -> None:
        self.run_episode = run_episode
        # One Submit of group_size 200,000 over a whole split blocked the event loop and grew rollout past
        # 4 GB (issue 24); an RL step of the main job submits 64 episodes, a held-out evaluation ~1,000.
        self.max_submit_episodes = max_submit_episodes
        self.max_queued_episodes = max_queued_episodes
        self.suites = suites
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.event_capacity = event_capacity
        self.pool_behind = pool_behind
        self.pool_poll_s = pool_poll_s
        self.report_skipped = report_skipped
        self.report_timeout_s = report_timeout_s
        self.queue_start = queue_start
        self._next_seq: dict[str, int] = {}  # run -> the next position in its generation queue
        self.submissions: dict[str, _Submission] = {}
        self.queue: collections.deque[_Episode] = collections.deque()
        self.logs: dict[str, _EventLog] = {}
        self.stats: dict[str, RunStats] = collections.defaultdict(RunStats)
        self.in_flight = 0
        self._wakeup = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch(), name="rollout-dispatcher")

    async def stop(self) -> None:
        self._stopping = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for log_ in self.logs.values():
            await log_.wake()

    # -- API -------------------------------------------------------------------------------------------

    def resolve_tasks(self, suite_name: str, split: str, task_ids: Sequence[str]) -> list[Task]:
        """The tasks a submission names; raises ValueError with what is wrong."""
        suite = self.suites.get(suite_name)
        if suite is None:
            raise ValueError(f"unknown suite {suite_name!r}: choose one of {', '.join(sorted(self.suites))}")
        try:
            return suite.select(split, task_ids)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None

    async def submit(
        self,
        run_id: str,
        tasks: Sequence[Task],
        *,
        group_size: int,
        scaffold_version: str,
        max_in_flight: int = 0,
        publish: bool = True,
        reward_weights: tuple[float, float] | None = None,
    ) -> tuple[str, int]:
        if not run_id:
            raise ValueError("run_id is required")
        if group_size < 1:
            raise ValueError(f"group_size {group_size}: at least 1 episode per task")
        if not tasks:
            raise ValueError("no tasks to run")
        if self._stopping:
            raise RuntimeError("rollout is shutting down")
        self._check_room(len(tasks) * group_size)
        if publish and run_id not in self._next_seq:
            start = await self._queue_start(run_id)
            self._next_seq.setdefault(run_id, start)  # a concurrent first submission may have set it
        submission_id = uuid.uuid4().hex[:16]
        sub = _Submission(submission_id, run_id, [], max_in_flight if max_in_flight > 0 else self.max_in_flight)
        seq = self._next_seq.get(run_id, 0)
        for task in tasks:
            group_id = f"{submission_id}:{task.id}"
            for _ in range(group_size):
                labels = {"forgerl/submission": submission_id}
                if publish:  # evaluations never reach the data pool: they take no place in its queue
                    labels[SUBMIT_SEQ_LABEL] = str(seq)
                    seq += 1
                spec = EpisodeSpec(
                    run_id=run_id,
                    task=task,
                    scaffold_version=scaffold_version,
                    group_id=group_id,
                    publish=publish,
                    labels=labels,
                    reward_weights=reward_weights,
                )
                sub.episodes.append(_Episode(spec, sub))
        self._next_seq[run_id] = seq
        sub.remaining = len(sub.episodes)
        self.submissions[submission_id] = sub
        self._log(run_id)
        self.queue.extend(sub.episodes)
        self.stats[run_id].queued += len(sub.episodes)
        self._wakeup.set()
        return submission_id, len(sub.episodes)

    def _check_room(self, episodes: int) -> None:
        if episodes > self.max_submit_episodes:
            raise QueueFull(
                f"the submission has {episodes} episodes (tasks x group_size); one Submit takes at most "
                f"{self.max_submit_episodes} (max_submit_episodes): submit fewer tasks or a smaller group"
            )
        if len(self.queue) + episodes > self.max_queued_episodes:
            raise QueueFull(
                f"the queue holds {len(self.queue)} episodes and takes at most {self.max_queued_episodes} "
                f"(max_queued_episodes): {episodes} more do not fit; retry when episodes have finished"
            )

    async def cancel(self, submission_id: str) -> int:
        """Cancel the submission's episodes that have not ended; returns how many ended cancelled. Running
        ones are waited for: one that was already finishing ends as it would have and is not counted."""
        sub = self.submissions.get(submission_id)
        if sub is None:
            raise KeyError(f"unknown submission {submission_id!r}")
        sub.cancelled = True
        running, open_episodes = [], [ep for ep in sub.episodes if not ep.done]
        for ep in open_episodes:
            if ep.task is not None:
                ep.task.cancel()
                running.append(ep.task)
            else:
                with contextlib.suppress(ValueError):
                    self.queue.remove(ep)
                self.stats[sub.run_id].queued -= 1
                await self._finish(ep, self._event(ep, Kind.EPISODE_EVENT_KIND_FAILED, message="cancelled"))
        await asyncio.gather(*running, return_exceptions=True)
        return sum(ep.cancelled for ep in open_episodes)

    def run_stats(self, run_id: str) -> RunStats:
        return self.stats.get(run_id, RunStats())

    async def events(self, run_id: str = "", submission_id: str = "") -> AsyncIterator[rollout_pb2.EpisodeEvent]:
        """A run's (or one submission's) events from the first kept one on; a submission's stream ends
        when all its episodes have finished or failed, a run's stream when the client goes away."""
        sub = self.submissions.get(submission_id) if submission_id else None
        if submission_id and sub is None:
            raise KeyError(f"unknown submission {submission_id!r}")
        if sub is not None:
            if run_id and run_id != sub.run_id:
                raise KeyError(f"submission {submission_id} belongs to run {sub.run_id!r}, not {run_id!r}")
            run_id = sub.run_id
        if not run_id:
            raise ValueError("name a run_id or a submission_id")
        log_ = self._log(run_id)
        position = log_.first
        while True:
            async with log_.changed:
                end = log_.first + len(log_.events)
                if position >= end:
                    if (sub is not None and sub.finished_event.is_set()) or self._stopping:
                        return
                    await log_.changed.wait()
                    continue
            position = max(position, log_.first)
            end = log_.first + len(log_.events)
            batch = [log_.events[i - log_.first] for i in range(position, end)]
            position = end
            for event in batch:
                if not submission_id or event.submission_id == submission_id:
                    yield event

    # -- internals -------------------------------------------------------------------------------------

    def _log(self, run_id: str) -> _EventLog:
        if run_id not in self.logs:
            self.logs[run_id] = _EventLog(self.event_capacity)
        return self.logs[run_id]

    def _next_ready(self) -> _Episode | None:
        """The first queued episode whose submission has room (submission order, groups together)."""
        for ep in self.queue:
            if ep.submission.in_flight < ep.submission.max_in_flight:
                return ep
        return None

    async def _dispatch(self) -> None:
        while True:
            ep = self._next_ready() if self.in_flight < self.max_in_flight else None
            if ep is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if ep.spec.publish and self.pool_behind is not None and await self._pool_behind(ep.spec.run_id):
                await asyncio.sleep(self.pool_poll_s)
                continue
            self.queue.remove(ep)
            self.stats[ep.spec.run_id].queued -= 1
            self.stats[ep.spec.run_id].in_flight += 1
            self.in_flight += 1
            ep.submission.in_flight += 1
            ep.task = asyncio.create_task(self._run(ep), name=f"episode-{ep.spec.episode_id}")
            self._running.add(ep.task)
            ep.task.add_done_callback(self._running.discard)

    async def _pool_behind(self, run_id: str) -> bool:
        assert self.pool_behind is not None
        try:
            return await self.pool_behind(run_id)
        except Exception as exc:  # the pool being unreachable must not stop rollouts; the gateway will see it
            log.warning("data pool lag check failed: %s", exc)
            return False

    async def _run(self, ep: _Episode) -> None:
        run_id = ep.spec.run_id
        spec = ep.spec
        final: rollout_pb2.EpisodeEvent | None = None
        try:
            while True:
                await self._emit(
                    ep, self._event(ep, Kind.EPISODE_EVENT_KIND_STARTED, message=f"attempt {spec.attempt}")
                )
                try:
                    result = await self.run_episode(spec)
                except InfraError as exc:
                    if spec.attempt >= self.max_attempts:
                        final = self._event(
                            ep, Kind.EPISODE_EVENT_KIND_FAILED,
                            message=f"infrastructure failure, {spec.attempt} attempts: {exc}",
                        )  # fmt: skip
                        break
                    self.stats[run_id].retried += 1
                    await self._emit(
                        ep, self._event(ep, Kind.EPISODE_EVENT_KIND_RETRIED, message=f"attempt {spec.attempt}: {exc}")
                    )
                    # Doubling, capped: an engine that restarts takes a minute or two, a sandbox hiccup none.
                    await asyncio.sleep(min(MAX_RETRY_BACKOFF_S, self.retry_backoff_s * 2 ** (spec.attempt - 1)))
                    spec = dataclasses.replace(spec, attempt=spec.attempt + 1)
                    continue
                except EpisodeError as exc:
                    final = self._event(ep, Kind.EPISODE_EVENT_KIND_FAILED, message=str(exc))
                    break
                final = self._event(
                    ep,
                    Kind.EPISODE_EVENT_KIND_FINISHED,
                    reward=result.reward,
                    success=result.success,
                    wall_clock_s=result.wall_clock_s,
                    trajectory_id=result.trajectory_id,
                    message=f"{result.stopped}; {result.turns} turns; {result.tests.detail}",
                )
                break
        except asyncio.CancelledError:
            final = self._event(ep, Kind.EPISODE_EVENT_KIND_FAILED, message="cancelled")
        except Exception as exc:
            log.exception("episode %s crashed", spec.episode_id)
            final = self._event(ep, Kind.EPISODE_EVENT_KIND_FAILED, message=f"rollout error: {exc!r}")
        finally:
            self.in_flight -= 1
            ep.submission.in_flight -= 1
            self.stats[run_id].in_flight -= 1
            self._wakeup.set()
        await self._finish(ep, final)

    async def _finish(self, ep: _Episode, event: rollout_pb2.EpisodeEvent | None) -> None:
        if ep.done:
            return
        ep.done = True
        ep.cancelled = (
            event is not None and event.kind == Kind.EPISODE_EVENT_KIND_FAILED and event.message == "cancelled"
        )
        stats = self.stats[ep.spec.run_id]
        if event is not None and event.kind == Kind.EPISODE_EVENT_KIND_FINISHED:
            stats.finished += 1
        else:
            stats.failed += 1
        if event is not None:
            await self._emit(ep, event)
        await self._report_if_skipped(ep, event)
        ep.submission.remaining -= 1
        if ep.submission.remaining == 0:
            ep.submission.finished_event.set()
        await self._log(ep.spec.run_id).wake()

    async def _queue_start(self, run_id: str) -> int:
        if self.queue_start is None:
            return 0
        try:
            return max(0, await asyncio.wait_for(self.queue_start(run_id), self.report_timeout_s))
        except Exception as exc:  # numbering from 0 still trains: repeated numbers are served unwindowed
            log.warning("could not ask where run %s's queue goes on (%r); numbering its episodes from 0", run_id, exc)
            return 0

    async def _report_if_skipped(self, ep: _Episode, event: rollout_pb2.EpisodeEvent | None) -> None:
        """Tell the data pool that a publishing episode's queue position will see no trajectory."""
        seq = ep.spec.labels.get(SUBMIT_SEQ_LABEL)
        if seq is None or self.report_skipped is None:
            return
        if event is not None and event.kind == Kind.EPISODE_EVENT_KIND_FINISHED and event.trajectory_id:
            return
        reason = event.message if event is not None and event.message else "ended without a trajectory"
        try:
            await asyncio.wait_for(
                self.report_skipped(ep.spec.run_id, int(seq), ep.spec.episode_id, reason), self.report_timeout_s
            )
        except Exception as exc:  # the pool's gap timeout still frees the window, only later
            log.warning(
                "could not report that episode %s (run %s, submit_seq %s) sent no trajectory (%r); the data pool "
                "holds its window for it until its gap timeout",
                ep.spec.episode_id,
                ep.spec.run_id,
                seq,
                exc,
            )

    async def _emit(self, ep: _Episode, event: rollout_pb2.EpisodeEvent) -> None:
        await self._log(ep.spec.run_id).append(event)

    @staticmethod
    def _event(
        ep: _Episode,
        kind: rollout_pb2.EpisodeEventKind,
        *,
        reward: trajectory_pb2.RewardComponents | None = None,
        success: bool = False,
        wall_clock_s: float = 0.0,
        trajectory_id: str = "",
        message: str = "",
    ) -> rollout_pb2.EpisodeEvent:
        return rollout_pb2.EpisodeEvent(
            submission_id=ep.submission.id,
            episode_id=ep.spec.episode_id,
            task_id=ep.spec.task.id,
            kind=kind,
            reward=reward,
            success=success,
            wall_clock_s=wall_clock_s,
            trajectory_id=trajectory_id,
            message=message[:2000],
        )
