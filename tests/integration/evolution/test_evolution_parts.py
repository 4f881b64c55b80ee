"""The pieces around the controller: the model proposer against an OpenAI-compatible HTTP endpoint, the
diagnosis scan over a real run store, the task sets, and `forgerl evolve` against a live service."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from typer.testing import CliRunner

from forgerl.cli.main import app as cli
from forgerl.evolution.diagnosis import diagnose
from forgerl.evolution.evaluation import draw_task_sets
from forgerl.evolution.ledger import BudgetLedger, BudgetLimits
from forgerl.evolution.proposers import Failure, ModelProposer, ProposalContext
from forgerl.evolution.testing import DEMO_SCRIPT, ScriptedProposer, SimulatedEvaluator, demo_effect
from forgerl.rl.losses import cispo_loss
from forgerl.rollout.scaffold_config import DEFAULT, ScaffoldRegistry
from forgerl.runtime import ServiceConfig, ServiceSpec
from forgerl.runtime.http import HttpServer
from forgerl.runtime.testing import serve_in_process
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.services.evolution.main import build
from forgerl.services.evolution.servicer import runs_anomalies
from forgerl.store import Store
from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.integration


async def test_the_model_proposer_asks_an_openai_compatible_endpoint() -> None:
    seen: list[dict[str, Any]] = []

    async def completions(request: Request) -> JSONResponse:
        seen.append({"body": await request.json(), "auth": request.headers.get("authorization")})
        answer = 'Here is my change:\n{"changes": {"sampling.temperature": 0.6}, "rationale": "seeds disagree"}'
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

    endpoint = Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"])])
    server = HttpServer(endpoint, "127.0.0.1", 0)
    await server.start()
    try:
        proposer = ModelProposer(server.base_url, "policy", api_key="k")
        budget = BudgetLedger(BudgetLimits(10, 60, 100)).view()
        context = ProposalContext(DEFAULT, "tooluse", "## Round 1: rejected\n", [Failure("t/1", "wrong")], budget, 2)
        proposal = await proposer.propose(context)
    finally:
        await server.stop()
    assert (dict(proposal.changes), proposal.rationale) == ({"sampling.temperature": 0.6}, "seeds disagree")
    (call,) = seen
    assert call["auth"] == "Bearer k" and call["body"]["model"] == "policy"
    prompt = call["body"]["messages"][1]["content"]
    assert "## Round 1: rejected" in prompt and "t/1: wrong" in prompt and "system_prompts" in prompt


def _diverged_loss() -> float:
    """The CISPO loss of a model whose logits overflowed: log_softmax over an inf logit is NaN."""
    logits = torch.tensor([[[0.5, math.inf, -1.0], [0.1, 0.2, 0.3]]])
    logprobs = torch.log_softmax(logits, dim=-1)[..., 0]
    loss, _ = cispo_loss(logprobs, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), eps_high=0.2)
    return float(loss.detach())


def test_the_diagnosis_scan_reads_a_runs_metrics_from_the_store(tmp_path: Path) -> None:
    nan_loss = _diverged_loss()
    assert math.isnan(nan_loss)
    faults = {"clean": {}, "diverged": {12: nan_loss}, "overflowed": {7: -math.inf}}
    with Store.open(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        for run_id, fault in faults.items():
            store.runs.create(run_pb2.Run(run_id=run_id))
            for step in range(20):
                # as the trainer records a step (TrainerServicer._on_metrics)
                metrics = run_pb2.StepMetrics(run_id=run_id, stage="rl", step=step)
                metrics.values["loss"] = fault.get(step, 1.0 - 0.02 * step)
                metrics.time.GetCurrentTime()
                store.metrics.add(metrics)
        found = sorted(runs_anomalies(store))
        stored = store.metrics.series("diverged", "loss")[12]
    assert stored[0] == 12 and math.isnan(stored[1])
    assert [(run, [(a.kind, a.metric, a.step, a.action) for a in anomalies]) for run, anomalies in found] == [
        ("diverged", [("non_finite", "rl/loss", 12, "stop")]),
        ("overflowed", [("non_finite", "rl/loss", 7, "stop")]),
    ]


def test_task_sets_are_disjoint_seeded_and_sized() -> None:
    ids = [f"s/test/{i:05d}" for i in range(50)]
    subset, dev, heldout = draw_task_sets(ids, dev=20, subset=5, heldout=30, seed=1)
    assert (len(subset), len(dev), len(heldout)) == (5, 20, 30)
    assert set(subset) <= set(dev) and not set(dev) & set(heldout) and set(dev) | set(heldout) == set(ids)
    assert draw_task_sets(ids, 20, 5, 30, seed=1) == (subset, dev, heldout) != draw_task_sets(ids, 20, 5, 30, 2)
    with pytest.raises(ValueError, match="exceed"):
        draw_task_sets(ids, dev=30, subset=5, heldout=30)


async def test_forgerl_evolve_start_status_approve_rollback(tmp_path: Path) -> None:
    config = EvolutionConfig(
        state_dir=tmp_path, http_port=0, operator_token="t", diagnose_interval_s=0, dev_tasks=200, subset_tasks=0,
        heldout_tasks=200, budget_rounds=1,
    )  # fmt: skip
    registry = ScaffoldRegistry(tmp_path / "scaffolds")
    spec, service = build(config, SimulatedEvaluator(registry, demo_effect, seed=2), ScriptedProposer(DEMO_SCRIPT))
    runner = CliRunner()

    async def evolve(*args: str) -> str:
        result = await asyncio.to_thread(runner.invoke, cli, ["evolve", *args], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    async with serve_in_process(spec, config) as address:
        assert "running" in await evolve("start", "--address", address, "--seeds", "3")
        async with asyncio.timeout(60):
            while not service.controller.snapshot()["awaiting_approval"]:
                await asyncio.sleep(0.05)
        (iteration,) = service.controller.snapshot()["awaiting_approval"]
        status = await evolve("status", "--address", address)
        assert f"awaiting approval: {iteration}" in status and "default@1" in status
        assert "promoted" in await evolve("approve", iteration, "--operator", "carol", "--address", address)
        rolled = await evolve("rollback", "default@0", "--operator", "carol", "--address", address)
        assert "incumbent: default@0" in rolled
    audit = [json.loads(line) for line in (tmp_path / "evolution" / "audit.jsonl").read_text().splitlines()]
    assert [(e["kind"], e["actor"]) for e in audit if e["actor"] == "carol"] == [
        ("iteration_finished", "carol"),
        ("rolled_back", "carol"),
    ]


class StoppingTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    """A trainer stand-in that answers StopRun only (a real trainer needs a model and a data pool)."""

    def __init__(self) -> None:
        self.stopped: list[str] = []

    async def StopRun(self, request: trainer_pb2.StopRunRequest, context: Any) -> trainer_pb2.StopRunResponse:
        self.stopped.append(request.run_id)
        run = run_pb2.Run(run_id=request.run_id, state=run_pb2.RUN_STATE_STOPPED)
        return trainer_pb2.StopRunResponse(run=run)


async def test_an_approved_stop_stops_the_run_and_other_actions_are_recorded(tmp_path: Path) -> None:
    trainer = StoppingTrainer()
    trainer_spec = ServiceSpec(
        name="trainer",
        services=[trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]],
        register=lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(trainer, server),
    )
    base = EvolutionConfig(state_dir=tmp_path, http_port=0, operator_token="t", diagnose_interval_s=0)
    async with serve_in_process(trainer_spec, ServiceConfig()) as trainer_address:
        config = base.model_copy(update={"trainer_address": trainer_address})
        spec, service = build(
            config, SimulatedEvaluator(ScaffoldRegistry(tmp_path / "s")), ScriptedProposer(DEMO_SCRIPT)
        )
        metrics = {"loss": [(s, math.nan if s == 5 else 1.0) for s in range(20)]}
        metrics["entropy"] = [(s, 2.0 * 0.8**s) for s in range(20)]
        records = {r.anomaly["kind"]: r for r in service.controller.report_anomalies("run-7", diagnose(metrics))}
        nan, collapse = records["non_finite"], records["entropy_collapse"]
        auth = {"Authorization": "Bearer t"}
        async with serve_in_process(spec, config), httpx.AsyncClient(base_url=service.http.url, headers=auth) as http:
            stop = await http.post(f"/api/v1/anomalies/{nan.id}/decide", json={"operator": "dan", "approve": True})
            assert stop.json()["outcome"] == "run run-7 stopped (stopped)" and trainer.stopped == ["run-7"]
            kept = await http.post(f"/api/v1/anomalies/{collapse.id}/decide", json={"operator": "dan", "approve": True})
            assert kept.json()["outcome"].startswith("recorded: rollback") and trainer.stopped == ["run-7"]
            again = await http.post(f"/api/v1/anomalies/{nan.id}/decide", json={"operator": "dan", "approve": True})
            assert again.status_code == 400 and "already approved" in again.json()["error"]
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "evolution" / "audit.jsonl").read_text().splitlines()]
    assert kinds == ["anomalies", "anomaly_decided", "anomaly_action", "anomaly_decided", "anomaly_action"]
