"""The data pool across runs, for an asyncio server: Kafka work runs in threads, the loop stays free.

    pool = DataPool(PoolSettings(kafka=KafkaSettings(bootstrap="127.0.0.1:9092")))
    await pool.start()
    await pool.put([traj, ...])
    batch = await pool.fetch("run-1", size=32, policy_version=7, timeout_s=5)
    await pool.ack("run-1", batch.batch_id)

A run is opened the first time an RPC names it (or at start, `PoolSettings.runs`): its state is rebuilt
from Kafka before the call proceeds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from kafka import KafkaAdminClient, KafkaProducer
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from forgerl.datapool.feed import KafkaSettings, RunFeed
from forgerl.datapool.pool import AckError, PoolCounters, RunPool
from forgerl.datapool.producer import PoolBehindError, producer_config, producer_failure
from forgerl.datapool.topics import RunTopics, encode_trajectory
from forgerl.v1 import trajectory_pb2

__all__ = ["DataPool", "FetchedBatch", "PoolSettings", "PoolStats", "RunPolicy"]

log = logging.getLogger("forgerl.datapool")


@dataclass(frozen=True)
class RunPolicy:
    """How a run's trajectories are served: the FIFO window and the staleness bound (None: no bound)."""

    window: float | int = 0.3
    max_staleness: int | None = 4


@dataclass(frozen=True)
class PoolSettings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    default_policy: RunPolicy = field(default_factory=RunPolicy)
    ack_timeout_s: float = 300.0
    gap_timeout_s: float = 600.0
    # PutTrajectories answers RESOURCE_EXHAUSTED while a run has this many unsettled records (0: never).
    max_lag: int = 50_000
    # Runs to open (and rebuild) at start rather than at their first RPC.
    runs: tuple[str, ...] = ()
    housekeeping_s: float = 1.0
    # How often a run's policy is read again (from `policy_for`): its staleness bound may change, or the
    # run may be registered after the pool first saw it. The FIFO window is fixed when a run is opened.
    policy_refresh_s: float = 30.0


@dataclass
class FetchedBatch:
    batch_id: str
    # The trajectories as serialized on Kafka; `trajectories` parses them.
    payloads: list[bytes]
    dropped_stale: int

    @property
    def trajectories(self) -> list[trajectory_pb2.Trajectory]:
        return [trajectory_pb2.Trajectory.FromString(p) for p in self.payloads]

    def __len__(self) -> int:
        return len(self.payloads)


@dataclass
class PoolStats:
    lag: int
    buffered: int
    in_flight: int
    dropped_stale: int
    dead_lettered: int
    duplicates: int
    served: int
    acknowledged: int
    redelivered: int
    skipped: int = 0
    next_submit_seq: int = 0


def _log_commit_failure(future: concurrent.futures.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("offset commit failed; the next one retries: %s", future.exception())


class _Run:
    def __init__(self, run_id: str, pool: RunPool, feed: RunFeed, policy: RunPolicy) -> None:
        self.run_id = run_id
        self.pool = pool
        self.feed = feed
        self.policy = policy
        self.lock = feed.lock
        self.data = asyncio.Event()
        self.commit_queued = False
        self.ack_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"datapool-ack-{run_id}")


class _Collector(Collector):
    """Exports the pool's counters per run at scrape time (they survive restarts via the state log)."""

    def __init__(self, pool: DataPool) -> None:
        self._pool = pool

    def collect(self):
        fields = ("served", "acknowledged", "dropped_stale", "dead_lettered", "duplicates", "redelivered", "skipped")
        families = {
            f: CounterMetricFamily(f"forgerl_datapool_{f}", f"Trajectories {f.replace('_', ' ')}", labels=["run_id"])
            for f in fields
        }
        buffered = GaugeMetricFamily("forgerl_datapool_buffered", "Trajectories waiting", labels=["run_id"])
        lag = GaugeMetricFamily("forgerl_datapool_lag", "Records past the committed offsets", labels=["run_id"])
        for run in list(self._pool._runs.values()):
            with run.lock:
                counters: PoolCounters = run.pool.counters
                values = {f: getattr(counters, f) for f in fields}
                n_buffered = run.pool.buffered
            for f, v in values.items():
                families[f].add_metric([run.run_id], v)
            buffered.add_metric([run.run_id], n_buffered)
            lag.add_metric([run.run_id], run.feed.lag())
        yield from families.values()
        yield buffered
        yield lag


class UnknownRun(LookupError):
    """No trajectory of this run ever reached the pool (it has no topics on Kafka)."""


class DataPool:
    def __init__(
        self,
        settings: PoolSettings,
        *,
        policy_for: Callable[[str], RunPolicy | None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self._policy_for = policy_for
        self._runs: dict[str, _Run] = {}
        self._opening: dict[str, asyncio.Future[_Run]] = {}
        self._producer: KafkaProducer | None = None
        self._admin: KafkaAdminClient | None = None  # one, for topic lookups: clients cost threads
        self._io = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="datapool-io")
        self._housekeeping: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.registry = registry or CollectorRegistry()
        self.registry.register(_Collector(self))
        self._dead_letters = Counter(
            "forgerl_datapool_dead_letter_events",
            "Records sent to a dead-letter topic, by reason",
            ["run_id", "reason"],
            registry=self.registry,
        )

    async def _in_thread(self, fn: Callable[..., object], *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._producer = await self._loop.run_in_executor(
            self._io,
            lambda: KafkaProducer(
                **producer_config(self.settings.kafka.bootstrap, "forgerl-datapool", self.settings.kafka.security)
            ),
        )
        for run_id in self.settings.runs:
            await self._run(run_id)
        self._housekeeping = asyncio.create_task(self._housekeep(), name="datapool-housekeeping")

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        loop = asyncio.get_running_loop()
        for run in list(self._runs.values()):
            try:
                await loop.run_in_executor(run.ack_executor, run.feed.flush_and_commit)
            except Exception:
                log.warning("final commit of run %s failed", run.run_id, exc_info=True)
            await loop.run_in_executor(self._io, run.feed.close)
            run.ack_executor.shutdown(wait=True)
        self._runs.clear()
        if self._producer is not None:
            producer = self._producer
            self._producer = None
            await loop.run_in_executor(self._io, lambda: producer.close(timeout=10))
        if self._admin is not None:
            admin, self._admin = self._admin, None
            await loop.run_in_executor(self._io, admin.close)
        self._io.shutdown(wait=False)

    def failure(self) -> str | None:
        """Why the pool cannot take or serve trajectories now (its producer is unusable), or None."""
        if self._loop is None:
            return "the data pool has not started"
        return producer_failure(self._producer)

    async def _housekeep(self) -> None:
        loop = asyncio.get_running_loop()
        next_refresh = loop.time() + self.settings.policy_refresh_s
        while True:
            await asyncio.sleep(self.settings.housekeeping_s)
            if self._policy_for is not None and loop.time() >= next_refresh:
                next_refresh = loop.time() + self.settings.policy_refresh_s
                for run in list(self._runs.values()):
                    policy = await loop.run_in_executor(self._io, self._policy, run.run_id, True)
                    if policy.max_staleness != run.policy.max_staleness:
                        log.info(
                            "run %s: staleness bound %s -> %s",
                            run.run_id,
                            run.policy.max_staleness,
                            policy.max_staleness,
                        )
                    run.policy = RunPolicy(window=run.policy.window, max_staleness=policy.max_staleness)
            for run in list(self._runs.values()):
                with run.lock:
                    returned = run.pool.expire()
                if returned:
                    log.info("served %d trajectories of run %s again: their Ack was overdue", returned, run.run_id)
                    run.data.set()
                try:
                    await loop.run_in_executor(run.ack_executor, run.feed.flush_and_commit)
                except Exception:
                    log.warning("commit of run %s failed; retrying", run.run_id, exc_info=True)

    # -- runs -------------------------------------------------------------------------------------

    def _policy(self, run_id: str, quiet: bool = False) -> RunPolicy:
        policy = None
        if self._policy_for is not None:
            try:
                policy = self._policy_for(run_id)
            except Exception as exc:
                if not quiet:
                    log.warning("could not read the policy of run %s (%s); using the default", run_id, exc)
        return policy or self.settings.default_policy

    async def _run(self, run_id: str) -> _Run:
        run = self._runs.get(run_id)
        if run is not None:
            if run.feed.error is not None:
                raise RuntimeError(f"the Kafka consumer of run {run_id!r} failed: {run.feed.error}")
            return run
        pending = self._opening.get(run_id)
        if pending is not None:
            return await asyncio.shield(pending)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Run] = loop.create_future()
        self._opening[run_id] = future
        try:
            policy = await loop.run_in_executor(self._io, self._policy, run_id)
            run = await self._open(run_id, policy)
            self._runs[run_id] = run
            future.set_result(run)
            return run
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody else waits
            raise
        finally:
            self._opening.pop(run_id, None)

    async def _open(self, run_id: str, policy: RunPolicy) -> _Run:
        loop = asyncio.get_running_loop()
        assert self._producer is not None, "DataPool.start() first"
        pool = RunPool(
            run_id,
            window=policy.window,
            ack_timeout_s=self.settings.ack_timeout_s,
            gap_timeout_s=self.settings.gap_timeout_s,
        )
        lock = threading.Lock()
        holder: list[_Run] = []

        def on_data() -> None:
            if holder:
                loop.call_soon_threadsafe(holder[0].data.set)

        def on_dead_letter(run_id: str, reason: str) -> None:
            self._dead_letters.labels(run_id=run_id, reason=reason).inc()

        feed = RunFeed(run_id, self.settings.kafka, pool, lock, self._producer, on_data, on_dead_letter)
        run = _Run(run_id, pool, feed, policy)
        holder.append(run)
        await loop.run_in_executor(self._io, feed.open)
        run.data.set()
        return run

    # -- API --------------------------------------------------------------------------------------

    async def put(self, trajectories: Sequence[trajectory_pb2.Trajectory], timeout_s: float = 30.0) -> int:
        """Publish trajectories to their runs' topics (acks=all); PoolBehindError when a run lags."""
        if not trajectories:
            return 0
        for run_id in {t.run_id for t in trajectories}:
            if not run_id:
                raise ValueError("every trajectory needs a run_id")
            run = await self._run(run_id)
            if self.settings.max_lag and run.feed.lag() >= self.settings.max_lag:
                raise PoolBehindError(
                    f"run {run_id!r} has {run.feed.lag()} trajectories not yet acknowledged by the trainer "
                    f"(limit {self.settings.max_lag}); retry later"
                )
        producer = self._producer
        assert producer is not None
        prefix = self.settings.kafka.topic_prefix

        def send() -> int:
            futures = []
            for traj in trajectories:
                key, value, headers = encode_trajectory(traj)
                futures.append(
                    producer.send(RunTopics(traj.run_id, prefix).trajectories, key=key, value=value, headers=headers)
                )
            producer.flush(timeout=timeout_s)
            for f in futures:
                f.get(timeout=timeout_s)
            return len(futures)

        return int(await self._in_thread(send))  # type: ignore[call-overload]

    async def fetch(self, run_id: str, size: int, policy_version: int = 0, timeout_s: float = 0.0) -> FetchedBatch:
        """Up to `size` trajectories: waits up to timeout_s for a full batch, then returns what is there."""
        if size <= 0:
            raise ValueError(f"size {size}: ask for at least one trajectory")
        run = await self._run(run_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        got: list = []
        dropped = 0
        try:
            while True:
                run.data.clear()
                with run.lock:
                    entries, d = run.pool.take(size - len(got), policy_version, run.policy.max_staleness)
                got.extend(entries)
                dropped += d
                if len(got) >= size:
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if run.feed.error is not None:
                    raise RuntimeError(f"the Kafka consumer of run {run_id!r} failed: {run.feed.error}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.data.wait(), timeout=min(remaining, 1.0))
            with run.lock:
                batch = run.pool.serve(got) if got else None
        except BaseException:
            with run.lock:
                run.pool.give_back(got)
            run.data.set()
            raise
        if dropped:
            log.info("dropped %d stale trajectories of run %s at policy version %d", dropped, run_id, policy_version)
        return FetchedBatch(
            batch_id=batch.batch_id if batch else "",
            payloads=[e.payload for e in got],
            dropped_stale=dropped,
        )

    async def ack(self, run_id: str, batch_id: str) -> int:
        """Acknowledge a batch: answers once its record is durable in the run's state topic, with how many
        trajectories it settled; 0 for a batch acknowledged before (a retried Ack, also across a restart
        of the pool, succeeds). Raises pool.AckError when the batch is unknown (served by an earlier
        incarnation and never acknowledged: its trajectories are served again) or expired and served
        again. A trainer should train on a batch only once its Ack succeeded."""
        if not batch_id:
            return 0
        run = await self._run(run_id)
        loop = asyncio.get_running_loop()
        n = int(await loop.run_in_executor(run.ack_executor, run.feed.ack, batch_id, False))
        # The Ack is durable in the state log already; commit the offsets behind the answer (one
        # queued commit covers every Ack before it runs).
        if n and not run.commit_queued:
            run.commit_queued = True
            run.ack_executor.submit(self._commit, run).add_done_callback(_log_commit_failure)
        return n

    @staticmethod
    def _commit(run: _Run) -> None:
        run.commit_queued = False
        run.feed.flush_and_commit()

    def _known(self, run_id: str) -> bool:
        """Whether the run's trajectory topic exists (a metadata request; nothing is created)."""
        if self._admin is None:
            kafka = self.settings.kafka
            self._admin = KafkaAdminClient(**kafka.connection(f"{kafka.client_id}-lookup"))
        topic = RunTopics(run_id, self.settings.kafka.topic_prefix).trajectories
        return topic in set(self._admin.list_topics())

    async def stats(self, run_id: str) -> PoolStats:
        """The run's counters; UnknownRun, creating nothing, for a run the pool never held (asking for 20
        unknown runs created 60 topics and 81 threads, issue 24)."""
        if run_id not in self._runs and run_id not in self._opening and not await self._in_thread(self._known, run_id):
            raise UnknownRun(
                f"run {run_id!r} is unknown to the data pool: no trajectory of it was ever put; check the run id"
            )
        run = await self._run(run_id)
        with run.lock:
            c = run.pool.counters
            stats = PoolStats(
                lag=0,
                buffered=run.pool.buffered,
                in_flight=run.pool.in_flight,
                dropped_stale=c.dropped_stale,
                dead_lettered=c.dead_lettered,
                duplicates=c.duplicates,
                served=c.served,
                acknowledged=c.acknowledged,
                redelivered=c.redelivered,
                skipped=c.skipped,
                next_submit_seq=run.pool.next_seq,
            )
        stats.lag = run.feed.lag()
        return stats

    @property
    def run_ids(self) -> Iterable[str]:
        return list(self._runs)


__all__ += ["AckError", "PoolBehindError"]
