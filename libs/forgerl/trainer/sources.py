"""Where the trainer's pieces outside the model live: episodes, weight publication, evaluation tasks.

- `ServiceEpisodes`: the real loop. Asks rollout to keep episodes in flight (`Submit`, topped up from
  `GetRolloutStats`), takes batches from the data pool (`FetchBatch` with the trainer's policy version,
  so stale trajectories are dropped there) and acknowledges them (`Ack`). Every trajectory it returns
  came through Kafka.
- `LocalEpisodes`: in-process sampling with the trainer's own model (tests, experiments, no services).
- `InferencePublisher` / `NullPublisher`: `UpdateWeights(checkpoint_path, version)` on inference, or
  (`stream`, run config `trainer.publish: stream`) the weights in buckets over `StreamWeights`, with
  UpdateWeights of the same step's checkpoint as the fallback when the stream fails.

All blocking (sync gRPC): the training loop runs in its own thread. Every call waits for a peer that is
restarting (UNAVAILABLE), with backoff, up to `retry_deadline_s` (forgerl.runtime.retry), instead of
failing the run: a data pool, rollout or inference brought back by its supervisor continues the run.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import torch

from forgerl.inference.buckets import Bucket, stream_requests
from forgerl.runtime.client import insecure_channel
from forgerl.runtime.retry import retry_call
from forgerl.trainer.local_env import LocalEpisodeRunner, suite_episode_specs
from forgerl.v1 import (
    datapool_pb2,
    datapool_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
    trajectory_pb2,
)


@dataclass
class FetchedBatch:
    batch_id: str
    trajectories: list[trajectory_pb2.Trajectory]
    dropped_stale: int = 0


class EpisodeSource(Protocol):
    def start(self, run_id: str, rl: Any, suite: str, task_ids: Sequence[str], seed: int, cursor: int) -> None: ...

    def fetch(self, size: int, policy_version: int, timeout_s: float) -> FetchedBatch: ...

    def ack(self, batch_id: str) -> None: ...

    def cursor(self) -> int:
        """How many tasks have been handed out (persisted in the trainer state, for resume)."""
        ...

    def close(self) -> None: ...


class TaskCursor:
    """Training tasks in a seeded, epoch-wise shuffled order; position = how many were handed out."""

    def __init__(self, task_ids: Sequence[str], seed: int, position: int = 0) -> None:
        if not task_ids:
            raise ValueError("no training tasks")
        self.task_ids, self.seed, self.position = list(task_ids), seed, position

    def take(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            epoch, index = divmod(self.position, len(self.task_ids))
            order = list(range(len(self.task_ids)))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            out.append(self.task_ids[order[index]])
            self.position += 1
        return out


# How long a call waits for a restarting peer: vLLM's CPU engine takes ~1-2 min to come back on 2 busy
# cores (benchmarks/README.md, "Chaos"); the data pool, rollout and the gateway take seconds.
RETRY_DEADLINE_S = 600.0

log = logging.getLogger("forgerl.trainer")


class ServiceEpisodes:
    def __init__(
        self,
        rollout_address: str,
        datapool_address: str,
        token: str | None = None,
        retry_deadline_s: float = RETRY_DEADLINE_S,
    ) -> None:
        self.retry_deadline_s = retry_deadline_s
        self._rollout_channel = insecure_channel(rollout_address, token)
        self._datapool_channel = insecure_channel(datapool_address, token)
        self.rollout = rollout_pb2_grpc.RolloutServiceStub(self._rollout_channel)
        self.datapool = datapool_pb2_grpc.DatapoolServiceStub(self._datapool_channel)
        self.run_id = ""
        self._tasks: TaskCursor | None = None
        self._rl: Any = None
        self._suite = ""

    def start(self, run_id: str, rl: Any, suite: str, task_ids: Sequence[str], seed: int, cursor: int) -> None:
        self.run_id, self._rl, self._suite = run_id, rl, suite
        self._tasks = TaskCursor(task_ids, seed, cursor)
        self.top_up()

    def top_up(self) -> None:
        """Submit groups of tasks until rollout has `episodes_in_flight` episodes running or queued."""
        assert self._tasks is not None
        stats = retry_call(
            lambda: self.rollout.GetRolloutStats(rollout_pb2.GetRolloutStatsRequest(run_id=self.run_id), timeout=30),
            "rollout GetRolloutStats",
            self.retry_deadline_s,
        )
        outstanding = stats.in_flight + stats.queued
        group = max(1, self._rl.group_size)
        want = max(self._rl.episodes_in_flight, self._rl.batch_size)
        missing = want - outstanding
        if missing < group:
            return
        task_ids = self._tasks.take(missing // group)
        request = rollout_pb2.SubmitRequest(
            run_id=self.run_id,
            suite=self._suite,
            split="train",
            task_ids=task_ids,
            group_size=group,
            scaffold_version=self._rl.scaffold_version,
            max_in_flight=self._rl.episodes_in_flight,
            publish=True,
            reward_weights=rollout_pb2.RewardWeights(alpha=self._rl.alpha_process, beta=self._rl.beta_speed),
        )
        # A Submit lost with a rollout that died is topped up again at the next fetch (it counts what runs).
        retry_call(lambda: self.rollout.Submit(request, timeout=30), "rollout Submit", self.retry_deadline_s)

    def fetch(self, size: int, policy_version: int, timeout_s: float) -> FetchedBatch:
        self.top_up()
        request = datapool_pb2.FetchBatchRequest(
            run_id=self.run_id, size=size, policy_version=policy_version, timeout_s=timeout_s
        )
        # A batch served by a pool that then died was never acknowledged: the restarted pool serves its
        # trajectories again, and the trainer skips any it trained already.
        resp = retry_call(
            lambda: self.datapool.FetchBatch(request, timeout=timeout_s + 30),
            "data pool FetchBatch",
            self.retry_deadline_s,
        )
        return FetchedBatch(resp.batch_id, list(resp.trajectories), resp.dropped_stale)

    def ack(self, batch_id: str) -> None:
        request = datapool_pb2.AckRequest(run_id=self.run_id, batch_id=batch_id)
        try:
            retry_call(lambda: self.datapool.Ack(request, timeout=60), "data pool Ack", self.retry_deadline_s)
        except grpc.RpcError as err:
            # Acknowledged before the crash we are resuming from, or served by a pool that died since (the
            # new one serves those trajectories again, and they are skipped as trained): nothing left to do.
            if err.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                raise

    def cursor(self) -> int:
        return self._tasks.position if self._tasks else 0

    def stats(self) -> dict[str, float]:
        try:
            s = self.datapool.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=self.run_id), timeout=10)
        except grpc.RpcError:
            return {}
        return {
            "pool/lag": float(s.lag),
            "pool/buffered": float(s.buffered),
            "pool/dropped_stale": float(s.dropped_stale),
            "pool/served": float(s.served),
            "pool/acknowledged": float(s.acknowledged),
        }

    def close(self) -> None:
        self._rollout_channel.close()
        self._datapool_channel.close()


class LocalEpisodes:
    """In-process episodes sampled from the trainer's current model (on-policy, policy lag 0)."""

    def __init__(self, model_ref: Any, tokenizer: Any, *, max_new_tokens: int = 48, seed: int = 0) -> None:
        self.model_ref = model_ref  # a callable returning the current model
        self.runner = LocalEpisodeRunner(tokenizer, max_new_tokens=max_new_tokens)
        self.generator = torch.Generator().manual_seed(seed)
        self._tasks: TaskCursor | None = None
        self.run_id, self._suite, self._rl = "", "", None

    def start(self, run_id: str, rl: Any, suite: str, task_ids: Sequence[str], seed: int, cursor: int) -> None:
        self.run_id, self._rl, self._suite = run_id, rl, suite
        self._tasks = TaskCursor(task_ids, seed, cursor)
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + cursor)

    def fetch(self, size: int, policy_version: int, timeout_s: float) -> FetchedBatch:
        assert self._tasks is not None and self._rl is not None
        group = max(1, self._rl.group_size)
        task_ids = self._tasks.take(max(1, size // group))
        specs = suite_episode_specs(self._suite, "train", task_ids, group_size=group, group_prefix=f"{self.cursor()}:")
        self.runner.policy_version = policy_version
        self.runner.alpha_process = self._rl.alpha_process
        trajs = self.runner.run(self.model_ref(), specs, temperature=1.0, generator=self.generator, run_id=self.run_id)
        return FetchedBatch(uuid.uuid4().hex, trajs)

    def ack(self, batch_id: str) -> None:
        pass

    def cursor(self) -> int:
        return self._tasks.position if self._tasks else 0

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class _Pulled:
    """The buckets, pulled by gRPC's request thread during the call and by the caller after it (`drain`):
    a lock keeps the two from running the generator at once."""

    def __init__(self, buckets: Iterable[Bucket]) -> None:
        self._buckets = iter(buckets)
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[Bucket]:
        return self

    def __next__(self) -> Bucket:
        with self._lock:
            return next(self._buckets)

    def drain(self) -> None:
        for _ in self:
            pass


class Publisher(Protocol):
    def publish(self, checkpoint_path: str, version: int) -> tuple[int, float]:
        """Serve the checkpoint as `version` or newer; returns (the version served, reload seconds)."""
        ...

    def stream(self, buckets: Iterable[Bucket], checkpoint_path: str, version: int) -> tuple[int, float]:
        """Serve the streamed buckets (every tensor of the model under its HF name) as `version` or newer;
        `checkpoint_path` holds the same weights, the fallback. Pulls every bucket, whatever happens: the
        trainer's ranks produce them together. Returns (the version served, seconds the engine paused)."""
        ...

    def ensure(self, checkpoint_path: str, version: int) -> None:
        """Serve the checkpoint as `version` unless the engine serves `version` or newer already (a resumed
        run's policy, on an engine that started from the initial checkpoint)."""
        ...

    def close(self) -> None: ...


class NullPublisher:
    def publish(self, checkpoint_path: str, version: int) -> tuple[int, float]:
        return version, 0.0

    def stream(self, buckets: Iterable[Bucket], checkpoint_path: str, version: int) -> tuple[int, float]:
        for _ in buckets:  # the other ranks are sending them
            pass
        return version, 0.0

    def ensure(self, checkpoint_path: str, version: int) -> None:
        pass

    def close(self) -> None:
        pass


class InferencePublisher:
    def __init__(
        self,
        inference_address: str,
        token: str | None = None,
        timeout_s: float = 300.0,
        retry_deadline_s: float = RETRY_DEADLINE_S,
    ) -> None:
        self._channel = insecure_channel(inference_address, token)
        self.stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self.timeout_s = timeout_s
        self.retry_deadline_s = retry_deadline_s

    def _served(self) -> int:
        return int(
            retry_call(
                lambda: self.stub.GetStatus(inference_pb2.GetStatusRequest(), timeout=30),
                "inference GetStatus",
                self.retry_deadline_s,
            ).policy_version
        )

    def _update(self, checkpoint_path: str, version: int) -> inference_pb2.UpdateWeightsResponse:
        request = inference_pb2.UpdateWeightsRequest(
            checkpoint_path=checkpoint_path, version=version, in_flight=inference_pb2.IN_FLIGHT_POLICY_FINISH
        )
        return retry_call(
            lambda: self.stub.UpdateWeights(request, timeout=self.timeout_s),
            "inference UpdateWeights",
            self.retry_deadline_s,
        )

    def publish(self, checkpoint_path: str, version: int) -> tuple[int, float]:
        # Versions only go up on the engine, which may serve a newer one than the trainer knows (it starts
        # at 1 with the initial checkpoint, or kept running while the trainer restarted).
        resp = self._update(checkpoint_path, max(version, self._served() + 1))
        return int(resp.policy_version), float(resp.reload_s)

    def stream(self, buckets: Iterable[Bucket], checkpoint_path: str, version: int) -> tuple[int, float]:
        """One StreamWeights call (not retried: the buckets are produced once), then, if it failed,
        UpdateWeights of `checkpoint_path` (retried like `publish`). Inference restores nothing after a stream
        over streamed weights fails (they have no checkpoint; it refuses requests until an update succeeds)
        and reloads the previous checkpoint after one over checkpoint weights: either way the reload of this
        step's checkpoint is what brings the new weights. The rest of the buckets is pulled after a failure,
        so that the other ranks' sends complete."""
        pulled = _Pulled(buckets)
        try:
            target = max(version, self._served() + 1)
            messages = stream_requests(pulled, target, inference_pb2.IN_FLIGHT_POLICY_FINISH)
            resp = self.stub.StreamWeights(messages, timeout=self.timeout_s)
            return int(resp.policy_version), float(resp.reload_s)
        except grpc.RpcError as err:
            log.warning("StreamWeights to version %d failed (%s); reloading %s instead", version, err, checkpoint_path)
        finally:
            pulled.drain()
        return self.publish(checkpoint_path, version)

    def ensure(self, checkpoint_path: str, version: int) -> None:
        if checkpoint_path and self._served() < version:
            self._update(checkpoint_path, version)

    def close(self) -> None:
        self._channel.close()
