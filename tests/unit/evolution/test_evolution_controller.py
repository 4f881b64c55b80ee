"""The controller over the simulated suite: budget halts, guard refusals logged, approval, rollback,
pause/resume, the held-out re-check; the built-in and model proposers."""

import asyncio
import json
import random
from pathlib import Path

import pytest

from forgerl.evolution import guard
from forgerl.evolution.controller import Controller, Settings
from forgerl.evolution.guard import Proposal
from forgerl.evolution.ledger import BudgetLimits
from forgerl.evolution.proposers import OPERATORS, Failure, MutationProposer, ProposalContext, parse_model_proposal
from forgerl.evolution.records import State
from forgerl.evolution.testing import SimulatedEvaluator, task_ids
from forgerl.rollout.scaffold_config import ScaffoldConfig, ScaffoldRegistry

pytestmark = pytest.mark.unit

IDS = task_ids(260)
SETTINGS = Settings(
    suite="tooluse", split="test", subset_tasks=tuple(IDS[:20]), dev_tasks=tuple(IDS[:200]),
    heldout_tasks=tuple(IDS[200:]), seeds=3, require_approval=False,
)  # fmt: skip


class FixedProposer:
    """Proposes the given changes in turn (a stand-in for a model whose answers the test chooses)."""

    name = "fixed"

    def __init__(self, *changes: dict[str, object]) -> None:
        self.changes = list(changes)

    async def propose(self, context: ProposalContext) -> Proposal:
        change = self.changes[(context.round_index - 1) % len(self.changes)]
        return Proposal(change, f"round {context.round_index}", self.name, operator="fixed")


def hinted(config: ScaffoldConfig) -> float:
    """The simulated truth: a temperature of 0.5 gains 15 points of success, anything else nothing."""
    return 0.15 if config.sampling.temperature == 0.5 else 0.0


def controller(tmp_path: Path, proposer: object, limits: BudgetLimits, settings: Settings = SETTINGS) -> Controller:
    registry = ScaffoldRegistry(tmp_path / "scaffolds")
    evaluator = SimulatedEvaluator(registry, hinted, seed=5)
    return Controller(settings, evaluator, proposer, registry, limits, tmp_path / "evo")  # type: ignore[arg-type]


async def test_the_loop_halts_when_the_round_budget_is_spent(tmp_path: Path) -> None:
    c = controller(tmp_path, MutationProposer(seed=1), BudgetLimits(rounds=3, wall_time_s=600, episodes=10**6))
    c.start()
    await asyncio.wait_for(c.wait(), 60)
    assert (c.status, c.halt_reason) == ("finished", "rounds spent: 3 of 3")
    assert len(c.iterations) == 3
    assert c.audit.verify() == []
    assert [e["kind"] for e in c.audit.entries()][-1] == "budget_spent"


async def test_the_episode_budget_stops_a_round_before_it_overspends(tmp_path: Path) -> None:
    # 2 versions x 20 subset tasks x 3 seeds = 120 episodes, then 1200 for dev: only the subset fits.
    c = controller(tmp_path, FixedProposer({"sampling.top_p": 0.9}), BudgetLimits(5, 600, episodes=500))
    c.start()
    await asyncio.wait_for(c.wait(), 60)
    assert c.iterations[0].state == State.INCONCLUSIVE
    assert c.evaluator.episodes <= 500  # type: ignore[attr-defined]
    assert c.ledger.view().episodes <= 500


async def test_a_grader_edit_is_rejected_and_logged(tmp_path: Path) -> None:
    c = controller(tmp_path, FixedProposer({"graders.tooluse": "always pass"}), BudgetLimits(1, 600, 10**6))
    it = await c.round()
    assert it.state == State.REJECTED and not it.candidate and not it.stages
    refusals = [e for e in c.audit.entries() if e["kind"] == "guard_rejected"]
    assert len(refusals) == 1 and "graders.tooluse" in refusals[0]["data"]["violations"]
    assert "guard refused" in c.memory.recent()
    assert c.evaluator.episodes == 0  # type: ignore[attr-defined]


async def test_a_real_gain_is_promoted_after_approval_and_rolled_back(tmp_path: Path) -> None:
    settings = Settings(**{**SETTINGS.__dict__, "require_approval": True})
    c = controller(tmp_path, FixedProposer({"sampling.temperature": 0.5}), BudgetLimits(1, 600, 10**6), settings)
    events = c.subscribe()
    c.start()
    while True:  # the console's view: wait for the approval event
        event = await asyncio.wait_for(events.get(), 60)
        if event["kind"] == "awaiting_approval":
            break
    it = c.iterations[0]
    assert it.state == State.AWAITING_APPROVAL and [s.name for s in it.stages] == ["subset", "dev", "heldout"]
    dev = it.stages[1].decision
    assert dev["verdict"] == "promote" and dev["ci_low"] > 0 and dev["ci_low"] < 0.15 < dev["ci_high"] + 0.05
    with pytest.raises(ValueError, match="operator"):
        c.approve(it.id, True, "")
    c.approve(it.id, True, "alice", "looks right")
    await asyncio.wait_for(c.wait(), 60)
    assert (it.state, it.approved_by, c.incumbent) == (State.PROMOTED, "alice", "default-e1")
    c.rollback("default", "bob")
    assert c.incumbent == "default" and it.state == State.ROLLED_BACK
    with pytest.raises(ValueError, match="only the root or a promoted"):
        c.rollback("default-e1", "bob")
    reloaded = controller(tmp_path, FixedProposer({}), BudgetLimits(1, 600, 10**6))
    assert reloaded.incumbent == "default" and reloaded.iterations[0].state == State.ROLLED_BACK
    assert json.loads((tmp_path / "evo" / "state.json").read_text())["incumbent"] == "default"


async def test_an_operator_rejection_keeps_the_incumbent(tmp_path: Path) -> None:
    settings = Settings(**{**SETTINGS.__dict__, "require_approval": True})
    c = controller(tmp_path, FixedProposer({"sampling.temperature": 0.5}), BudgetLimits(1, 600, 10**6), settings)
    task = asyncio.create_task(c.round())
    while not c.iterations or c.iterations[0].state != State.AWAITING_APPROVAL:
        await asyncio.sleep(0.01)
        assert not task.done()
    c.approve(c.iterations[0].id, False, "carol", "not convinced")
    it = await asyncio.wait_for(task, 10)
    assert (it.state, c.incumbent) == (State.REJECTED, "default")


async def test_a_no_op_change_is_not_promoted(tmp_path: Path) -> None:
    c = controller(tmp_path, FixedProposer({"sampling.top_p": 0.9}), BudgetLimits(1, 600, 10**6))
    it = await c.round()
    assert it.state in (State.REJECTED, State.INCONCLUSIVE) and c.incumbent == "default"


async def test_pause_holds_the_next_round_and_resume_releases_it(tmp_path: Path) -> None:
    c = controller(tmp_path, FixedProposer({"sampling.top_p": 0.9}), BudgetLimits(50, 600, 10**6))
    c.start()
    c.pause("op")
    await asyncio.sleep(0)  # the loop reaches its gate
    rounds = len(c.iterations)
    await asyncio.sleep(0.2)
    assert len(c.iterations) == rounds <= 1 and c.status == "paused"
    c.resume("op")
    deadline = asyncio.get_running_loop().time() + 30
    while len(c.iterations) < rounds + 2:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    c.halt("op", "enough")
    await c.wait()
    assert c.status == "halted" and [e["kind"] for e in c.audit.entries()].count("paused") == 1


async def test_mutation_proposals_pass_the_guard_and_vary_by_round(tmp_path: Path) -> None:
    c = controller(tmp_path, MutationProposer(seed=3), BudgetLimits(1, 600, 10**6))
    proposer = MutationProposer(seed=3)
    ops = set()
    for r in range(1, 13):
        ctx = ProposalContext(c.registry.get("default"), "tooluse", "", [], c.ledger.view(), r)
        p = await proposer.propose(ctx)
        ops.add(p.operator)
        assert p.changes and p.rationale
        guard.apply(ctx.incumbent, p, f"x{r}")  # every operator yields a valid scaffold
    assert len(ops) >= 4


def test_a_model_answer_is_parsed_into_a_proposal() -> None:
    p = parse_model_proposal('Sure.\n{"changes": {"sampling.temperature": 0.3}, "rationale": "less noise"}', "m")
    assert (dict(p.changes), p.rationale, p.proposer) == ({"sampling.temperature": 0.3}, "less noise", "model")
    with pytest.raises(ValueError, match="no JSON"):
        parse_model_proposal("I would lower the temperature.", "m")


async def test_the_proposer_sees_dev_failures_never_the_sealed_held_out_ones(tmp_path: Path) -> None:
    contexts: list[ProposalContext] = []

    class Recording(FixedProposer):
        async def propose(self, context: ProposalContext) -> Proposal:
            contexts.append(context)
            return await super().propose(context)

    c = controller(tmp_path, Recording({"sampling.temperature": 0.5}), BudgetLimits(2, 600, 10**6))
    first = await c.round()
    assert first.state == State.PROMOTED and [s.name for s in first.stages] == ["subset", "dev", "heldout"]
    await c.round()
    failures = {f.task_id for f in contexts[1].failures}
    assert contexts[0].failures == [] and failures
    assert failures <= set(SETTINGS.dev_tasks) and not failures & set(SETTINGS.heldout_tasks)
    assert "promoted default-e1" in contexts[1].memory  # the memory notes of round 1


async def test_the_wall_time_budget_stops_the_loop(tmp_path: Path) -> None:
    now = [0.0]

    class Slow(FixedProposer):
        async def propose(self, context: ProposalContext) -> Proposal:
            now[0] += 400  # each round takes 400 s on the ledger's clock
            return await super().propose(context)

    registry = ScaffoldRegistry(tmp_path / "scaffolds")
    c = Controller(
        SETTINGS, SimulatedEvaluator(registry), Slow({"sampling.top_p": 0.9}), registry,
        BudgetLimits(rounds=100, wall_time_s=1000, episodes=10**6), tmp_path / "evo", clock=lambda: now[0],
    )  # fmt: skip
    c.start()
    await asyncio.wait_for(c.wait(), 60)
    assert (len(c.iterations), c.halt_reason) == (3, "wall time spent: 1200 s of 1000 s")


async def test_the_turn_operator_raises_the_budget_when_failures_ran_out_of_turns(tmp_path: Path) -> None:
    c = controller(tmp_path, FixedProposer({}), BudgetLimits(1, 600, 10**6))
    failures = [Failure("t/1", "turn_budget; 4 turns; no answer"), Failure("t/2", "answer; 2 turns; expected 7")]
    ctx = ProposalContext(c.registry.get("default"), "tooluse", "", failures, c.ledger.view(), 1)
    changes, why = OPERATORS["turn_budget"](ctx.incumbent, ctx, random.Random(0))
    assert changes == {"max_turns_by_suite.tooluse": 5} and "1 failures ran out of turns" in why
