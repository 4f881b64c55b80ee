"""TrainerService over gRPC (in-process episodes, no other service): StartRun, StreamMetrics live to the
end, GetRun, ListCheckpoints (HF checkpoints that load), the report, StopRun and errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from forgerl.model import MiniMaxM2ForCausalLM, load_checkpoint
from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.trainer.config import TrainerConfig
from forgerl.services.trainer.main import build
from forgerl.store import Store, default_url
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.integration


RUN = {
    "name": "svc",
    "seed": 0,
    "checkpoint_every": 2,
    "sft": {"steps": 3, "batch_size": 4, "learning_rate": 3e-3},
    "rl": {"steps": 2, "batch_size": 8, "group_size": 4},
}


async def test_run_over_grpc(config: TrainerConfig, tmp_path: Path) -> None:
    async with serve_in_process(build(config), config) as address:
        stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
        run = (await stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(RUN)))).run
        assert run.run_id.startswith("svc-") and run.config.sft.steps == 3
        with pytest.raises(grpc.aio.AioRpcError) as busy:
            await stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(RUN)))
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        seen = []
        async for resp in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run.run_id)):
            seen.append((resp.metrics.stage, resp.metrics.step, dict(resp.metrics.values)))
        losses = [(stage, step) for stage, step, values in seen if "loss" in values]
        assert losses == [("sft", 1), ("sft", 2), ("sft", 3), ("rl", 4), ("rl", 5)]
        assert any("eval/heldout_success" in v for _, _, v in seen)
        for _ in range(50):
            done = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run.run_id))).run
            if done.state != run_pb2.RUN_STATE_RUNNING:
                break
            await asyncio.sleep(0.2)
        assert done.state == run_pb2.RUN_STATE_SUCCEEDED, done.error
        assert done.policy_version == 2
        ckpts = (await stub.ListCheckpoints(trainer_pb2.ListCheckpointsRequest(run_id=run.run_id))).checkpoints
        assert [(c.stage, c.step, c.policy_version) for c in ckpts] == [("sft", 3, 1), ("rl", 5, 2)]
        model = load_checkpoint(ckpts[-1].path)
        assert isinstance(model, MiniMaxM2ForCausalLM)
        report = Path(config.runs_dir) / run.run_id / "report"
        assert (report / "summary.json").exists() and (report / "reward.png").exists()
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await stub.GetRun(trainer_pb2.GetRunRequest(run_id="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_stop_run(config: TrainerConfig) -> None:
    run_config = dict(RUN, sft={"steps": 500, "batch_size": 4, "learning_rate": 3e-3})
    async with serve_in_process(build(config), config) as address:
        stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
        run = (await stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(run_config)))).run
        async for resp in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run.run_id)):
            if resp.metrics.step >= 2:
                break
        stopped = (await stub.StopRun(trainer_pb2.StopRunRequest(run_id=run.run_id))).run
        assert stopped.state == run_pb2.RUN_STATE_STOPPED
        assert 2 <= stopped.step < 500


async def _until_step(stub: trainer_pb2_grpc.TrainerServiceStub, run_id: str, step: int) -> None:
    async for resp in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run_id)):
        if resp.metrics.step >= step:
            return


async def test_shutdown_interrupts_the_run_and_a_new_run_starts(config: TrainerConfig) -> None:
    """A trainer shut down mid-run (Ctrl-C, SIGTERM, topology down) leaves its run INTERRUPTED: the next
    trainer neither trains it nor refuses a new run, and StartRun(resume_run_id) continues it."""
    long_sft = run_config_from_dict(dict(RUN, sft={"steps": 500, "batch_size": 4, "learning_rate": 3e-3}))
    async with serve_in_process(build(config), config) as address:
        stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
        first = (await stub.StartRun(trainer_pb2.StartRunRequest(config=long_sft))).run
        await _until_step(stub, first.run_id, 2)
    async with serve_in_process(build(config), config) as address:
        stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
        interrupted = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=first.run_id))).run
        assert interrupted.state == run_pb2.RUN_STATE_INTERRUPTED and 2 <= interrupted.step < 500
        listed = await stub.ListRuns(trainer_pb2.ListRunsRequest(states=[run_pb2.RUN_STATE_INTERRUPTED]))
        assert [r.run_id for r in listed.runs] == [first.run_id]
        second = (await stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(RUN)))).run
        await _until_step(stub, second.run_id, 2)
        assert (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=first.run_id))).run.state == (
            run_pb2.RUN_STATE_INTERRUPTED
        )
        await stub.StopRun(trainer_pb2.StopRunRequest(run_id=second.run_id))
        resumed = (await stub.StartRun(trainer_pb2.StartRunRequest(resume_run_id=first.run_id))).run
        assert resumed.state == run_pb2.RUN_STATE_RUNNING
        await _until_step(stub, first.run_id, interrupted.step + 1)
        await stub.StopRun(trainer_pb2.StopRunRequest(run_id=first.run_id))


async def test_a_fresh_trainer_marks_a_crashed_run_interrupted(config: TrainerConfig) -> None:
    """A run left RUNNING by a trainer that died (kill -9) is resumed by a trainer that replaces it
    (resume_on_start), and marked INTERRUPTED by one started fresh (resume_on_start off)."""
    async with serve_in_process(build(config), config) as address:
        stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
        run = (await stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(RUN)))).run
        await _until_step(stub, run.run_id, 1)
    # What a kill -9 leaves: the store still says RUNNING (the shutdown above had marked it interrupted).
    Store.open(default_url(config.state_dir)).runs.update(run.run_id, state=run_pb2.RUN_STATE_RUNNING)
    fresh = config.model_copy(update={"resume_on_start": False})
    async with serve_in_process(build(fresh), fresh) as address:
        stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
        left = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run.run_id))).run
        assert left.state == run_pb2.RUN_STATE_INTERRUPTED
