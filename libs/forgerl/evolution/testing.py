"""A simulated suite for the controller's tests and the console's browser test: no model, known truths.

Each task has a fixed success probability (spread over 5%-95%, like the tool-use suite's four levels);
a scaffold version adds `effect(config)` to every task's probability. Episodes are Bernoulli draws from a
seeded generator, so a test knows the true difference it planted and measures how often the rule finds it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from forgerl.evolution.evaluation import EvaluationResult
from forgerl.evolution.guard import Proposal
from forgerl.evolution.proposers import Failure, ProposalContext
from forgerl.rollout.scaffold_config import ScaffoldConfig, ScaffoldRegistry


def task_ids(count: int, split: str = "test", suite: str = "sim") -> list[str]:
    return [f"{suite}/{split}/{i:05d}" for i in range(count)]


class SimulatedEvaluator:
    def __init__(
        self,
        registry: ScaffoldRegistry,
        effect: Callable[[ScaffoldConfig], float] = lambda config: 0.0,
        seed: int = 0,
    ) -> None:
        self.registry = registry
        self.effect = effect
        self.rng = random.Random(seed)
        self.episodes = 0

    @staticmethod
    def base_probability(task_id: str) -> float:
        index = int(task_id.rsplit("/", 1)[-1])
        return 0.05 + 0.9 * ((index * 37) % 101) / 100

    async def evaluate(
        self, scaffold: str, suite: str, split: str, task_ids: Sequence[str], seeds: int
    ) -> EvaluationResult:
        shift = self.effect(self.registry.get(scaffold))
        scores: dict[str, list[float]] = {}
        failures = []
        for task in task_ids:
            p = min(1.0, max(0.0, self.base_probability(task) + shift))
            scores[task] = [1.0 if self.rng.random() < p else 0.0 for _ in range(seeds)]
            failures += [Failure(task, "wrong answer") for s in scores[task] if s == 0.0]
        self.episodes += len(task_ids) * seeds
        return EvaluationResult(scaffold, split, scores, failures, len(task_ids) * seeds)


class ScriptedProposer:
    """Proposes the given changes in turn, round after round (a stand-in for a model whose answers a test
    chooses)."""

    name = "scripted"

    def __init__(self, script: Sequence[tuple[dict[str, Any], str]]) -> None:
        self.script = list(script)

    async def propose(self, context: ProposalContext) -> Proposal:
        changes, rationale = self.script[(context.round_index - 1) % len(self.script)]
        return Proposal(changes, rationale, self.name, operator="script")


def demo_effect(config: ScaffoldConfig) -> float:
    """The simulated truth the demo script plays against: an answer-format instruction in the tool-use prompt
    gains 15 points, asking to retry failed tool calls 12 more, a temperature under 1 costs 10, everything else
    is neutral."""
    prompt = config.system_prompts.get("tooluse", "")
    gain = (0.15 if "exactly" in prompt else 0.0) + (0.12 if "call it again" in prompt else 0.0)
    return gain - (0.10 if config.sampling.temperature < 1.0 else 0.0)


DEMO_SCRIPT: tuple[tuple[dict[str, Any], str], ...] = (
    (
        {"system_prompts.tooluse": "Solve the task with one tool call, then reply with exactly the tool's output."},
        "12 of 40 failures answered with extra words around the right value: ask for the output exactly",
    ),
    ({"sampling.temperature": 0.7}, "failures vary between seeds: sample less randomly"),
    ({"graders.tooluse.normalise": "lenient"}, "answers are nearly right: grade them leniently"),
    ({"sampling.top_p": 0.9}, "cut the sampling tail"),
    ({"max_turns_by_suite.tooluse": 3}, "no episode used its fourth turn"),
    (
        {
            "system_prompts.tooluse": "Solve the task with one tool call, then reply with exactly the tool's output. "
            "If a tool call fails, fix the arguments and call it again."
        },
        "9 of 31 failures gave up after a tool error: ask the agent to retry with fixed arguments",
    ),
)
