"""services/evolution over gRPC and HTTP: the loop started by StartIteration, the console's JSON API and
its event stream, operator-token checks, approval, rollback; the simulated suite stands in for rollout
(its truths are known), and a second test drives two rounds through a real rollout service."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from forgerl.evolution.testing import DEMO_SCRIPT, ScriptedProposer, SimulatedEvaluator, demo_effect
from forgerl.rollout.scaffold_config import ScaffoldRegistry
from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.services.evolution.main import build
from forgerl.v1 import evolution_pb2, evolution_pb2_grpc, run_pb2

pytestmark = pytest.mark.integration
TOKEN = "op-secret"


def evolution_config(tmp_path: Path, **extra: Any) -> EvolutionConfig:
    values: dict[str, Any] = {
        "state_dir": tmp_path, "http_port": 0, "operator_token": TOKEN, "diagnose_interval_s": 0,
        "dev_tasks": 200, "subset_tasks": 20, "heldout_tasks": 200, "budget_rounds": 2, **extra,
    }  # fmt: skip
    return EvolutionConfig(**values)


async def wait_for_event(client: httpx.AsyncClient, kind: str, timeout_s: float = 60) -> dict[str, Any]:
    """The first server-sent event of `kind` on /api/v1/events."""
    async with asyncio.timeout(timeout_s), client.stream("GET", "/api/v1/events") as stream:
        event = ""
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == kind:
                return json.loads(line.removeprefix("data: "))  # type: ignore[no-any-return]
    raise AssertionError(f"the stream ended before a {kind} event")


async def test_grpc_and_console_api_approval_and_rollback(tmp_path: Path) -> None:
    config = evolution_config(tmp_path)
    registry = ScaffoldRegistry(tmp_path / "scaffolds")
    spec, service = build(config, SimulatedEvaluator(registry, demo_effect, seed=2), ScriptedProposer(DEMO_SCRIPT))
    async with serve_in_process(spec, config) as address, httpx.AsyncClient(base_url=service.http.url) as http:
        stub = evolution_pb2_grpc.EvolutionServiceStub(aio_channel(address))
        page = await http.get("/")
        assert page.status_code == 200 and "Evolution console" in page.text
        assert (await http.get("/static/console.js")).status_code == 200
        waiting = asyncio.create_task(wait_for_event(http, "awaiting_approval"))
        await asyncio.sleep(0.2)  # the stream subscribes before the loop starts
        started = await stub.StartIteration(evolution_pb2.StartIterationRequest(suite="tooluse"))
        assert started.status.state == "running" and started.status.console_url == service.http.url + "/"
        event = await waiting
        iteration_id = event["data"]["iteration"]

        denied = await http.post(f"/api/v1/iterations/{iteration_id}/approve", json={"operator": "eve"})
        assert denied.status_code == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        nameless = await http.post(f"/api/v1/iterations/{iteration_id}/approve", json={}, headers=headers)
        assert nameless.status_code == 400
        detail = (await http.get(f"/api/v1/iterations/{iteration_id}")).json()
        assert detail["state"] == "awaiting_approval"
        assert detail["diff"][0]["path"] == "system_prompts.tooluse"
        assert [s["name"] for s in detail["stages"]] == ["subset", "dev", "heldout"]
        dev = detail["stages"][1]["decision"]
        assert dev["ci_low"] > 0 and len(detail["stages"][1]["per_task"]) == 200  # a planted +15 points

        approved = await http.post(
            f"/api/v1/iterations/{iteration_id}/approve", json={"operator": "alice", "note": "ok"}, headers=headers
        )
        assert approved.status_code == 200 and approved.json()["state"] == "promoted"
        got = await stub.GetIteration(evolution_pb2.GetIterationRequest(iteration_id=iteration_id))
        assert got.iteration.state == run_pb2.ITERATION_STATE_PROMOTED and got.iteration.approved_by == "alice"
        assert got.iteration.ci_low == pytest.approx(dev["ci_low"]) and len(got.evaluations) == 6
        status = (await stub.GetEvolutionStatus(evolution_pb2.GetEvolutionStatusRequest())).status
        assert status.incumbent == "default@1"

        # Round 2 (temperature 0.7, 10 points worse) is rejected; then the budget stops the loop.
        async with asyncio.timeout(60):
            while (await http.get("/api/v1/status")).json()["status"] != "finished":
                await asyncio.sleep(0.05)
        listed = await stub.ListIterations(evolution_pb2.ListIterationsRequest())
        assert listed.iterations[0].state == run_pb2.ITERATION_STATE_REJECTED
        assert listed.iterations[0].ci_high < 0 < listed.iterations[1].ci_low

        rolled = await stub.Rollback(evolution_pb2.RollbackRequest(scaffold_id="default", to_version=0, operator="bob"))
        assert (rolled.scaffold.scaffold_id, rolled.scaffold.version) == ("default", 0)
        versions = (await stub.ListScaffoldVersions(evolution_pb2.ListScaffoldVersionsRequest())).versions
        assert {(v.scaffold_id, v.version, v.parent) for v in versions} >= {("default", 1, "default@0")}
        audit = (await http.get("/api/v1/audit")).json()
        assert audit["verified"] and {"rolled_back", "awaiting_approval"} <= {e["kind"] for e in audit["entries"]}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ApproveCandidate(evolution_pb2.ApproveCandidateRequest(iteration_id=iteration_id, operator="x"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)")
async def test_two_rounds_through_a_real_rollout_service(tmp_path: Path) -> None:
    """The oracle scaffold solves every task whatever a mutation changes: each round's paired differences
    are all zero, so nothing is promoted; the episodes really ran in rollout's sandboxes."""
    import shutil
    import uuid

    from forgerl.services.rollout.config import RolloutConfig
    from forgerl.services.rollout.main import spec_for
    from forgerl.services.rollout.servicer import build_servicer

    sandbox_root = Path("/var/tmp") / f"forgerl-test-{uuid.uuid4().hex[:8]}"  # the sandbox uid must traverse it
    rollout_config = RolloutConfig(state_dir=tmp_path, sandbox_root=str(sandbox_root), max_in_flight=4)
    try:
        async with serve_in_process(spec_for(build_servicer(rollout_config)), rollout_config) as rollout:
            config = evolution_config(
                tmp_path, rollout_address=rollout, base_scaffold="oracle", require_approval=False,
                dev_tasks=4, subset_tasks=0, heldout_tasks=2, budget_rounds=2, budget_episodes=100,
            )  # fmt: skip
            spec, service = build(config)
            async with serve_in_process(spec, config) as address:
                stub = evolution_pb2_grpc.EvolutionServiceStub(aio_channel(address))
                await stub.StartIteration(evolution_pb2.StartIterationRequest())
                async with asyncio.timeout(240):
                    await service.controller.wait()
                status = (await stub.GetEvolutionStatus(evolution_pb2.GetEvolutionStatusRequest())).status
                its = service.controller.iterations
    finally:
        shutil.rmtree(sandbox_root, ignore_errors=True)
    assert (status.state, status.rounds_spent, status.episodes_spent) == ("finished", 2, 2 * 2 * 4 * 3)
    assert status.incumbent == "oracle@0"
    for it in its:
        (dev,) = it.stages
        assert [row["candidate"] for row in dev.per_task] == [1.0] * 4 == [row["incumbent"] for row in dev.per_task]
        assert it.state.value == "rejected" and (dev.decision["ci_low"], dev.decision["ci_high"]) == (0.0, 0.0)
        assert (tmp_path / "scaffolds" / f"{it.candidate}.yaml").exists()  # where rollout read the candidate


@pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)")
async def test_episodes_lost_to_the_infrastructure_judge_nothing(tmp_path: Path) -> None:
    """Every sandbox fails (the sandbox root is replaced by a file once rollout is up): rollout reports each
    episode FAILED, and the round ends inconclusive saying why. Before, each lost episode scored 0 for the
    version it hit, and two versions that never ran were compared and the candidate rejected."""
    import uuid

    from forgerl.services.rollout.config import RolloutConfig
    from forgerl.services.rollout.main import spec_for
    from forgerl.services.rollout.servicer import build_servicer

    sandbox_root = Path("/var/tmp") / f"forgerl-test-{uuid.uuid4().hex[:8]}"
    rollout_config = RolloutConfig(
        state_dir=tmp_path, sandbox_root=str(sandbox_root), max_in_flight=4, max_attempts=1, retry_backoff_s=0
    )
    try:
        async with serve_in_process(spec_for(build_servicer(rollout_config)), rollout_config) as rollout:
            sandbox_root.rmdir()
            sandbox_root.write_text("not a directory: every sandbox fails to prepare")
            config = evolution_config(
                tmp_path, rollout_address=rollout, base_scaffold="oracle", require_approval=False,
                dev_tasks=2, subset_tasks=0, heldout_tasks=2, budget_rounds=1, budget_episodes=100,
            )  # fmt: skip
            spec, service = build(config)
            async with serve_in_process(spec, config):
                service.controller.start("test")
                async with asyncio.timeout(120):
                    await service.controller.wait()
                (it,) = service.controller.iterations
    finally:
        sandbox_root.unlink(missing_ok=True)
    assert it.state.value == "inconclusive" and not it.stages, it.logs
    assert "dev: 12 of 12 episodes failed in the infrastructure" in it.logs[-1], it.logs
    assert "cannot prepare sandbox" in it.logs[-1]
