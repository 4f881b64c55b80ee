"""gRPC front of rollout: RolloutService over `forgerl.rollout.manager.RolloutManager`."""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc

from forgerl.datapool.topics import lost_marker, skip_marker
from forgerl.rollout.episode import EpisodeRunner, GrpcGateway
from forgerl.rollout.manager import QueueFull, QueueStart, ReportSkipped, RolloutManager
from forgerl.rollout.rewards import RewardSettings
from forgerl.rollout.sandbox.base import SandboxFactory, SandboxLimits
from forgerl.rollout.scaffold_config import ScaffoldRegistry
from forgerl.rollout.tasks import Suite, get_suite, suite_names
from forgerl.runtime.client import aio_channel
from forgerl.services.rollout.config import RolloutConfig
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, rollout_pb2, rollout_pb2_grpc

log = logging.getLogger("forgerl.rollout")


def sandbox_limits(config: RolloutConfig) -> SandboxLimits:
    return SandboxLimits(
        memory_bytes=config.sandbox_memory_mb << 20,
        file_size_bytes=config.sandbox_file_size_mb << 20,
        processes=config.sandbox_processes,
        cpu_seconds=config.sandbox_cpu_s,
        command_timeout_s=config.sandbox_command_timeout_s,
    )


def make_sandbox_factory(config: RolloutConfig) -> SandboxFactory:
    limits = sandbox_limits(config)
    if config.sandbox == "kubernetes":
        from forgerl.rollout.sandbox.kubernetes import KubernetesSandboxFactory

        return KubernetesSandboxFactory(
            config.k8s_namespace,
            limits,
            image=config.k8s_image,
            kubeconfig=config.k8s_kubeconfig or None,
            runtime_class=config.k8s_runtime_class or None,
        )
    from forgerl.rollout.sandbox.environments import EnvironmentBuilder
    from forgerl.rollout.sandbox.local import DEFAULT_PATH, DEFAULT_ROOT, LocalSandboxFactory

    root = Path(config.sandbox_root or DEFAULT_ROOT)
    environments = EnvironmentBuilder(
        config.task_env_root or root / ".envs",
        search_path=DEFAULT_PATH,
        pip_options=shlex.split(config.task_env_pip_args),
    )
    return LocalSandboxFactory(root, limits, uid_base=config.sandbox_uid_base, environments=environments)


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, manager: RolloutManager, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
        self.manager = manager
        self._on_stop = on_stop

    async def start(self) -> None:
        await self.manager.start()

    async def stop(self) -> None:
        await self.manager.stop()
        if self._on_stop is not None:
            await self._on_stop()

    async def Submit(
        self, request: rollout_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.SubmitResponse:
        try:
            tasks = self.manager.resolve_tasks(request.suite, request.split or "train", list(request.task_ids))
            submission_id, episodes = await self.manager.submit(
                request.run_id,
                tasks,
                group_size=request.group_size or 1,
                scaffold_version=request.scaffold_version or "default",
                max_in_flight=request.max_in_flight,
                publish=request.publish,
                reward_weights=(
                    (request.reward_weights.alpha, request.reward_weights.beta)
                    if request.HasField("reward_weights")
                    else None
                ),
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except RuntimeError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return rollout_pb2.SubmitResponse(submission_id=submission_id, episodes=episodes)

    async def StreamEpisodeEvents(
        self, request: rollout_pb2.StreamEpisodeEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rollout_pb2.StreamEpisodeEventsResponse]:
        try:
            events = self.manager.events(request.run_id, request.submission_id)
            async for event in events:
                yield rollout_pb2.StreamEpisodeEventsResponse(event=event)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Cancel(
        self, request: rollout_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.CancelResponse:
        try:
            cancelled = await self.manager.cancel(request.submission_id)
        except KeyError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc.args[0]))
        return rollout_pb2.CancelResponse(cancelled=cancelled)

    async def GetRolloutStats(
        self, request: rollout_pb2.GetRolloutStatsRequest, context: grpc.aio.ServicerContext
    ) -> rollout_pb2.GetRolloutStatsResponse:
        if not request.run_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id is required")
        s = self.manager.run_stats(request.run_id)
        return rollout_pb2.GetRolloutStatsResponse(
            in_flight=s.in_flight, queued=s.queued, finished=s.finished, retried=s.retried, failed=s.failed
        )


def pool_lag_check(channel: grpc.aio.Channel, max_lag: int, cache_s: float = 1.0) -> Callable[[str], Awaitable[bool]]:
    """True while the data pool reports more than `max_lag` unconsumed trajectories for the run."""
    stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
    cache: dict[str, tuple[float, bool]] = {}

    async def behind(run_id: str) -> bool:
        now = time.monotonic()
        hit = cache.get(run_id)
        if hit is not None and now - hit[0] < cache_s:
            return hit[1]
        try:
            stats = await stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id), timeout=5.0)
            value = stats.lag > max_lag
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            value = False  # none of the run's trajectories reached the pool yet: nothing to lag behind
        cache[run_id] = (now, value)
        return value

    return behind


def skip_reporter(channel: grpc.aio.Channel, attempts: int = 3, backoff_s: float = 1.0) -> ReportSkipped:
    """Publishes a skip marker for an episode that ended without a trajectory (topics.skip_marker)."""
    stub = datapool_pb2_grpc.DatapoolServiceStub(channel)

    async def report(run_id: str, seq: int, episode_id: str, reason: str) -> None:
        request = datapool_pb2.PutTrajectoriesRequest(trajectories=[skip_marker(run_id, seq, episode_id, reason)])
        for attempt in range(1, attempts + 1):
            try:
                await stub.PutTrajectories(request, timeout=5.0)
                return
            except grpc.aio.AioRpcError as err:
                # RESOURCE_EXHAUSTED: the run lags; UNAVAILABLE: the pool restarts. Both pass in seconds.
                if attempt == attempts or err.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise
                await asyncio.sleep(backoff_s * attempt)

    return report


def pool_queue_start(channel: grpc.aio.Channel) -> QueueStart:
    """The data pool's next_submit_seq of a run: where this process goes on numbering its episodes.

    Asked before this process queues anything of the run, so a seq below it that the pool still awaits
    belonged to a rollout process that is gone (one rollout service per run): a lost marker says so,
    instead of the pool holding its window for them until its gap timeout (600 s by default)."""
    stub = datapool_pb2_grpc.DatapoolServiceStub(channel)

    async def start(run_id: str) -> int:
        try:
            stats = await stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id), timeout=5.0)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:  # no trajectory of the run reached the pool yet
                return 0
            raise
        if stats.next_submit_seq > 0:
            reason = "rollout restarted: episodes queued before it that never arrived were lost"
            marker = lost_marker(run_id, stats.next_submit_seq, reason)
            try:
                await stub.PutTrajectories(datapool_pb2.PutTrajectoriesRequest(trajectories=[marker]), timeout=5.0)
            except grpc.aio.AioRpcError as err:  # the numbering is right all the same; the window waits longer
                log.warning(
                    "could not tell the data pool that run %s's episodes below %d were lost (%s); it waits for "
                    "them until its gap timeout",
                    run_id,
                    stats.next_submit_seq,
                    err.code().name,
                )
        return int(stats.next_submit_seq)

    return start


def build_servicer(
    config: RolloutConfig,
    *,
    sandboxes: SandboxFactory | None = None,
    suites: dict[str, Suite] | None = None,
) -> RolloutServicer:
    suites = suites or {name: get_suite(name) for name in suite_names()}
    sandboxes = sandboxes or make_sandbox_factory(config)
    scaffold_dir = Path(config.scaffold_dir) if config.scaffold_dir else config.state_dir / "scaffolds"
    channels: list[grpc.aio.Channel] = []
    gateway = None
    if config.gateway_address:
        channel = aio_channel(config.gateway_address, config.auth_token)
        channels.append(channel)
        gateway = GrpcGateway(channel)
    pool_behind = None
    report_skipped = queue_start = None
    if config.datapool_address:
        channel = aio_channel(config.datapool_address, config.auth_token)
        channels.append(channel)
        report_skipped = skip_reporter(channel)
        queue_start = pool_queue_start(channel)
        if config.max_pool_lag > 0:
            pool_behind = pool_lag_check(channel, config.max_pool_lag)
    runner = EpisodeRunner(
        sandboxes,
        suites,
        scaffolds=ScaffoldRegistry(scaffold_dir),
        gateway=gateway,
        rewards=RewardSettings(alpha=config.reward_alpha, beta=config.reward_beta, speed_fn=config.speed_fn),
        model=config.model,
    )
    manager = RolloutManager(
        runner.run,
        suites,
        max_in_flight=config.max_in_flight,
        max_attempts=config.max_attempts,
        retry_backoff_s=config.retry_backoff_s,
        pool_behind=pool_behind,
        report_skipped=report_skipped,
        queue_start=queue_start,
        max_submit_episodes=config.max_submit_episodes,
        max_queued_episodes=config.max_queued_episodes,
    )

    async def close_clients() -> None:
        for channel in channels:
            await channel.close()
        await sandboxes.aclose()

    return RolloutServicer(manager, on_stop=close_clients)
