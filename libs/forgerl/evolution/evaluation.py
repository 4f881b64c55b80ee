"""Evaluating scaffold versions: per-task scores over seeds, through the rollout service.

A scaffold is scored on named tasks with `seeds` episodes each (rollout's group size); an episode scores 1
when its tests pass and 0 otherwise, so a task's mean is its success rate and a paired difference of +0.1
is ten points of success. Evaluations never publish to the data pool (`publish=False`).
"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from forgerl.evolution.proposers import Failure
from forgerl.v1 import rollout_pb2, rollout_pb2_grpc


@dataclass
class EvaluationResult:
    scaffold: str
    split: str
    scores: dict[str, list[float]]  # task id -> one score per seed
    failures: list[Failure] = field(default_factory=list)
    episodes: int = 0
    # Episodes the infrastructure lost (the sandbox or the model endpoint failed after every retry): the agent
    # was never judged, so they have no score, and a stage with any of them compares nothing (controller).
    infra_failures: list[Failure] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        values = [s for scores in self.scores.values() for s in scores]
        return sum(values) / len(values) if values else 0.0


class Evaluator(Protocol):
    async def evaluate(
        self, scaffold: str, suite: str, split: str, task_ids: Sequence[str], seeds: int
    ) -> EvaluationResult: ...


class RolloutEvaluator:
    """Submits `seeds` episodes per task to RolloutService and collects the finished episodes' success."""

    def __init__(self, channel: grpc.aio.Channel, run_id: str = "evolution", max_in_flight: int = 0) -> None:
        self.stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        self.run_id = run_id
        self.max_in_flight = max_in_flight

    async def evaluate(
        self, scaffold: str, suite: str, split: str, task_ids: Sequence[str], seeds: int
    ) -> EvaluationResult:
        run_id = f"{self.run_id}-{uuid.uuid4().hex[:8]}"
        submitted = await self.stub.Submit(
            rollout_pb2.SubmitRequest(
                run_id=run_id,
                suite=suite,
                split=split,
                task_ids=list(task_ids),
                group_size=seeds,
                scaffold_version=scaffold,
                max_in_flight=self.max_in_flight,
                publish=False,
            )
        )
        scores: dict[str, list[float]] = defaultdict(list)
        failures: list[Failure] = []
        infra: list[Failure] = []
        request = rollout_pb2.StreamEpisodeEventsRequest(run_id=run_id, submission_id=submitted.submission_id)
        async for response in self.stub.StreamEpisodeEvents(request):
            event = response.event
            if event.kind == rollout_pb2.EPISODE_EVENT_KIND_FINISHED:
                scores[event.task_id].append(1.0 if event.success else 0.0)
                if not event.success:
                    failures.append(Failure(event.task_id, event.message))
            elif event.kind == rollout_pb2.EPISODE_EVENT_KIND_FAILED:
                # Failed after every retry: the agent was never judged. Scoring it 0 would count an outage
                # against whichever version it hit.
                infra.append(Failure(event.task_id, f"infrastructure failure: {event.message}"))
        return EvaluationResult(scaffold, split, dict(scores), failures, submitted.episodes, infra)


def draw_task_sets(
    all_ids: Sequence[str], dev: int, subset: int, heldout: int, seed: int = 0
) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(subset, dev, held-out) task ids: a seeded shuffle of the split, dev and held-out disjoint, the subset
    the first tasks of dev. Raises ValueError when the split is too small for the sizes asked."""
    if dev + heldout > len(all_ids):
        raise ValueError(f"dev {dev} + held-out {heldout} tasks exceed the split's {len(all_ids)}: ask for fewer")
    if subset > dev:
        raise ValueError(f"subset {subset} is larger than the dev set {dev}")
    ids = sorted(all_ids)
    random.Random(seed).shuffle(ids)
    return tuple(ids[:subset]), tuple(ids[:dev]), tuple(ids[dev : dev + heldout])
