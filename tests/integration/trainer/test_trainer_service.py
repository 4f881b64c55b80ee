"""TrainerService over gRPC (in-process episodes, no other service): StartRun, StreamMetrics live to the
end, GetRun, ListCheckpoints (HF checkpoints that load), the report, StopRun and errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, load_checkpoint, save_checkpoint
from forgerl.model.tokenizer import load_tokenizer
from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.trainer.config import TrainerConfig
from forgerl.services.trainer.main import build
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path: Path, tokenizer_dir: Path) -> TrainerConfig:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    save_checkpoint(MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=len(tok))), tok, tmp_path / "init")
    return TrainerConfig(
        state_dir=tmp_path / "state",
        runs_dir=str(tmp_path / "runs"),
        inference_model_path=str(tmp_path / "init"),
        local_episodes=True,
        eval_tasks=4,
        eval_every=2,
        max_new_tokens=12,
    )


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
