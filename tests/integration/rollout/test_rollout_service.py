"""services/rollout over gRPC: Submit, the event stream, retries of infrastructure failures only, Cancel,
stats, and the model path through a gateway stand-in. Real local sandboxes; no model needed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from rollout_fake_gateway import running_fake_gateway

from forgerl.rollout.sandbox.base import Sandbox, SandboxFactory, SandboxInfraError, SandboxRequest
from forgerl.rollout.sandbox.local import LocalSandboxFactory
from forgerl.rollout.scaffold_config import ORACLE, ScaffoldRegistry
from forgerl.rollout.tasks import get_suite
from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.rollout.config import RolloutConfig
from forgerl.services.rollout.main import spec_for
from forgerl.services.rollout.servicer import build_servicer, sandbox_limits
from forgerl.v1 import rollout_pb2, rollout_pb2_grpc

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
K = rollout_pb2.EpisodeEventKind


class FlakySandboxes(SandboxFactory):
    """Fails the first `failures` sandbox creations the way a broken node would."""

    def __init__(self, inner: SandboxFactory, failures: int) -> None:
        self.inner = inner
        self.failures = failures
        self.created = 0

    async def create(self, request: SandboxRequest) -> Sandbox:
        self.created += 1
        if self.created <= self.failures:
            raise SandboxInfraError("node lost: launcher could not start")
        return await self.inner.create(request)


def config(tmp_path: Path, sandbox_root: Path, **extra: object) -> RolloutConfig:
    values: dict[str, object] = {"max_in_flight": 4, "retry_backoff_s": 0.0, **extra}
    return RolloutConfig(state_dir=tmp_path, sandbox_root=str(sandbox_root), **values)  # type: ignore[arg-type]


async def stream(stub: rollout_pb2_grpc.RolloutServiceStub, submission_id: str) -> list[rollout_pb2.EpisodeEvent]:
    call = stub.StreamEpisodeEvents(rollout_pb2.StreamEpisodeEventsRequest(submission_id=submission_id), timeout=240)
    return [reply.event async for reply in call]


async def test_submit_stream_stats_and_infrastructure_retries(tmp_path: Path, sandbox_root: Path) -> None:
    cfg = config(tmp_path, sandbox_root)
    sandboxes = FlakySandboxes(LocalSandboxFactory(sandbox_root, sandbox_limits(cfg)), failures=2)
    # An evolved scaffold version written where the service reads versions: the oracle with a tool timeout
    # far too short, so its tool calls time out (the agent's own trouble: rewarded, never retried).
    ScaffoldRegistry(tmp_path / "scaffolds").put(ORACLE.derive("oracle-hasty", tool_timeout_s=0.001))
    servicer = build_servicer(cfg, sandboxes=sandboxes)
    async with serve_in_process(spec_for(servicer), cfg) as address:
        channel = aio_channel(address)
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        tool_tasks = [t.id for t in get_suite("tooluse").tasks("test")[:3]]
        sub = await stub.Submit(rollout_pb2.SubmitRequest(
            run_id="run-1", suite="tooluse", split="test", task_ids=tool_tasks, group_size=2,
            scaffold_version="oracle", publish=False, reward_weights=rollout_pb2.RewardWeights(alpha=0.1, beta=0.0),
        ))  # fmt: skip
        assert sub.episodes == 6
        swe = await stub.Submit(rollout_pb2.SubmitRequest(
            run_id="run-1", suite="swe", split="test", group_size=1, scaffold_version="noop", max_in_flight=2,
        ))  # fmt: skip
        hasty = await stub.Submit(rollout_pb2.SubmitRequest(
            run_id="run-1", suite="swe", split="train", task_ids=[get_suite("swe").tasks("train")[0].id],
            group_size=1, scaffold_version="oracle-hasty", reward_weights=rollout_pb2.RewardWeights(alpha=0.5),
        ))  # fmt: skip
        events, swe_events, hasty_events = await asyncio.gather(
            stream(stub, sub.submission_id), stream(stub, swe.submission_id), stream(stub, hasty.submission_id)
        )
        finished = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
        assert len(finished) == 6
        # The run's weights, not the service's (beta 0.1): no speed term in the total.
        assert all(e.success and e.reward.performance == 1.0 and e.reward.total == 1.0 for e in finished)
        assert all(e.reward.speed > 0 for e in finished)  # the component is still reported
        assert {e.task_id for e in finished} == set(tool_tasks)
        swe_finished = [e for e in swe_events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
        assert swe.episodes == len(swe_finished) == len(get_suite("swe").tasks("test"))
        assert all(not e.success and e.reward.total == 0.0 for e in swe_finished)
        (hasty_final,) = [e for e in hasty_events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
        assert not hasty_final.success and hasty_final.reward.process < 0
        assert hasty_final.reward.total == pytest.approx(0.5 * hasty_final.reward.process)
        assert K.EPISODE_EVENT_KIND_RETRIED not in [e.kind for e in hasty_events]
        retried = [e for e in events + swe_events if e.kind == K.EPISODE_EVENT_KIND_RETRIED]
        assert len(retried) == 2 and all("node lost" in e.message for e in retried)
        for e in retried:  # the retried episodes still finished
            assert any(f.episode_id == e.episode_id for f in finished + swe_finished)
        stats = await stub.GetRolloutStats(rollout_pb2.GetRolloutStatsRequest(run_id="run-1"))
        assert (stats.finished, stats.retried, stats.failed, stats.in_flight, stats.queued) == (
            6 + swe.episodes + 1, 2, 0, 0, 0,
        )  # fmt: skip
        await channel.close()
    assert not [p for p in sandbox_root.iterdir() if not p.name.startswith(".")]


async def test_errors_and_cancel(tmp_path: Path, sandbox_root: Path) -> None:
    cfg = config(tmp_path, sandbox_root, max_in_flight=1)
    async with serve_in_process(spec_for(build_servicer(cfg)), cfg) as address:
        channel = aio_channel(address)
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        for bad, what in [
            (rollout_pb2.SubmitRequest(run_id="r", suite="nope", group_size=1), "unknown suite"),
            (rollout_pb2.SubmitRequest(run_id="r", suite="swe", split="dev", group_size=1), "no split"),
            (rollout_pb2.SubmitRequest(run_id="", suite="swe", group_size=1), "run_id"),
            (rollout_pb2.SubmitRequest(run_id="r", suite="swe", task_ids=["swe/train/x"]), "unknown task"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Submit(bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream(stub, "no-such-submission")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # The default scaffold needs the model, and this service has no gateway: failed, never retried.
        sub = await stub.Submit(rollout_pb2.SubmitRequest(
            run_id="r", suite="tooluse", split="test", task_ids=["tooluse/test/00000"], group_size=1,
        ))  # fmt: skip
        events = await stream(stub, sub.submission_id)
        assert [e.kind for e in events] == [K.EPISODE_EVENT_KIND_STARTED, K.EPISODE_EVENT_KIND_FAILED]
        assert "needs the gateway" in events[-1].message
        many = await stub.Submit(rollout_pb2.SubmitRequest(
            run_id="r2", suite="swe", split="train", group_size=2, scaffold_version="oracle",
        ))  # fmt: skip
        await asyncio.sleep(0.5)
        cancelled = await stub.Cancel(rollout_pb2.CancelRequest(submission_id=many.submission_id))
        assert 0 < cancelled.cancelled <= many.episodes
        events = await stream(stub, many.submission_id)
        assert (
            sum(e.kind == K.EPISODE_EVENT_KIND_FAILED and e.message == "cancelled" for e in events)
            == cancelled.cancelled
        )
        stats = await stub.GetRolloutStats(rollout_pb2.GetRolloutStatsRequest(run_id="r2"))
        assert stats.in_flight == 0 and stats.queued == 0 and stats.finished + stats.failed == many.episodes
        await channel.close()
    await asyncio.sleep(0.2)
    assert not [p for p in sandbox_root.iterdir() if not p.name.startswith(".")]


async def test_model_episodes_through_the_gateway_are_published(tmp_path: Path, sandbox_root: Path) -> None:
    suites = {"tooluse": get_suite("tooluse"), "swe": get_suite("swe")}
    async with running_fake_gateway(suites) as (gateway, gateway_address):
        cfg = config(tmp_path, sandbox_root, gateway_address=gateway_address)
        async with serve_in_process(spec_for(build_servicer(cfg)), cfg) as address:
            channel = aio_channel(address)
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            sub = await stub.Submit(rollout_pb2.SubmitRequest(
                run_id="run-m", suite="tooluse", split="test", task_ids=["tooluse/test/00000", "tooluse/test/00003"],
                group_size=2, scaffold_version="default", publish=True,
            ))  # fmt: skip
            events = await stream(stub, sub.submission_id)
            finished = [e for e in events if e.kind == K.EPISODE_EVENT_KIND_FINISHED]
            assert len(finished) == 4 and all(e.success and e.trajectory_id for e in finished)
            assert {t.trajectory_id for t in gateway.published} == {e.trajectory_id for e in finished}
            groups = {t.task_id: t.group_id for t in gateway.published}
            assert len(set(groups.values())) == 2  # one group per task, shared by its episodes
            await channel.close()
