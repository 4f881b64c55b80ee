"""Experiment tracking read back with TensorBoard's and MLflow's own readers, against the run store (the
trainer's other, independent record of the same run): a run over gRPC, a NaN metric, a failing backend."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.trainer.config import TrainerConfig
from forgerl.services.trainer.main import build
from forgerl.store import Store, default_url
from forgerl.trainer.run_config import run_config_from_dict
from forgerl.trainer.tracking import Tracking, TrackingSettings, open_tracking
from forgerl.trainer.tracking.base import flatten_config
from forgerl.trainer.tracking.mlflow_tracker import RUN_ID_TAG, MlflowTracker
from forgerl.trainer.tracking.tensorboard_tracker import CHECKPOINT_TAG, CONFIG_TAG, TensorBoardTracker
from forgerl.v1 import run_pb2, trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.integration

RUN = {
    "name": "tracked",
    "seed": 0,
    "checkpoint_every": 2,
    "sft": {"steps": 3, "batch_size": 4, "learning_rate": 3e-3},
    "rl": {"steps": 2, "batch_size": 8, "group_size": 4},
}
Series = dict[str, dict[int, float]]  # metric name -> step -> value


# ---- the readers: TensorBoard's event accumulator, MLflow's client ----------------------------------------


def tensorboard_scalars(logdir: Path) -> Series:
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def tensorboard_texts(logdir: Path, tag: str) -> list[tuple[int, str]]:
    events = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    events.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]


def mlflow_run(uri: str, run_id: str) -> Any:
    (run,) = MlflowClient(uri).search_runs(
        [e.experiment_id for e in MlflowClient(uri).search_experiments()],
        filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'",
    )
    return run


def mlflow_metrics(uri: str, mlflow_run_id: str, names: list[str]) -> Series:
    """Every entry of each metric's history; a step logged twice must carry one value."""
    out: Series = {}
    for name in names:
        history: dict[int, set[float]] = defaultdict(set)
        for m in MlflowClient(uri).get_metric_history(mlflow_run_id, name):
            history[m.step].add(m.value)
        assert all(len(v) == 1 or all(math.isnan(x) for x in v) for v in history.values()), (name, history)
        out[name] = {step: next(iter(values)) for step, values in history.items()}
    return out


def store_series(store: Store, run_id: str) -> Series:
    out: Series = defaultdict(dict)
    for m in store.metrics.steps(run_id):
        for name, value in m.values.items():
            out[name][m.step] = value
    return dict(out)


def assert_same(got: Series, want: Series, rel: float) -> None:
    assert set(got) == set(want)
    for name in want:
        assert set(got[name]) == set(want[name]), name
        for step, value in want[name].items():
            if math.isnan(value):
                assert math.isnan(got[name][step]), (name, step)
            else:
                assert got[name][step] == pytest.approx(value, rel=rel, abs=1e-30), (name, step)


# ---- a run over gRPC ---------------------------------------------------------------------------------------


async def _finished_run(address: str) -> run_pb2.Run:
    stub = trainer_pb2_grpc.TrainerServiceStub(aio_channel(address))
    run = (await stub.StartRun(trainer_pb2.StartRunRequest(config=run_config_from_dict(RUN)))).run
    async for _ in stub.StreamMetrics(trainer_pb2.StreamMetricsRequest(run_id=run.run_id)):
        pass  # the stream ends with the run
    for _ in range(600):  # the state follows the stream's end within the tracking's close
        done = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id=run.run_id))).run
        if done.state != run_pb2.RUN_STATE_RUNNING:
            return done
        await asyncio.sleep(0.5)
    raise AssertionError(f"run {run.run_id} still running after 300 s")


async def test_run_metrics_params_and_checkpoints_tracked(config: TrainerConfig) -> None:
    async with serve_in_process(build(config), config) as address:
        run = await _finished_run(address)
    assert run.state == run_pb2.RUN_STATE_SUCCEEDED, run.error
    runs_dir = Path(config.runs_dir)
    store = Store.open(default_url(config.state_dir))
    recorded = store_series(store, run.run_id)
    checkpoints = store.checkpoints.list(run.run_id)
    assert {"loss", "sft/loss", "eval/heldout_success", "policy_version"} <= set(recorded)
    assert sorted(recorded["loss"]) == [1, 2, 3, 4, 5]  # SFT steps 1-3, then RL 4-5: one step axis

    # TensorBoard keeps scalars as float32
    logdir = runs_dir / run.run_id / "tensorboard"
    assert_same(tensorboard_scalars(logdir), recorded, rel=1e-6)
    ((_, config_text),) = tensorboard_texts(logdir, CONFIG_TAG)
    tb_params = json.loads("\n".join(line[4:] for line in config_text.splitlines()))
    assert [step for step, _ in tensorboard_texts(logdir, CHECKPOINT_TAG)] == [c.step for c in checkpoints]

    uri = f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"  # the default store, as the README names it
    mlrun = mlflow_run(uri, run.run_id)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run.run_id
    assert_same(mlflow_metrics(uri, mlrun.info.run_id, list(recorded)), recorded, rel=0)
    assert set(mlrun.data.metrics) == set(recorded)

    # params: the store's RunConfig, read through protobuf's JSON independently of flatten_config
    stored = _leaves(store.runs.get(run.run_id).config)
    assert mlrun.data.params == tb_params
    assert {k: mlrun.data.params[k] for k in stored} == stored
    assert mlrun.data.params["sft.steps"] == "3" and mlrun.data.params["name"] == "tracked"

    client = MlflowClient(uri)
    folders = sorted(a.path for a in client.list_artifacts(mlrun.info.run_id, "checkpoints"))
    assert folders == sorted(f"checkpoints/{Path(c.path).name}" for c in checkpoints)
    for ckpt in checkpoints:
        folder = f"checkpoints/{Path(ckpt.path).name}"
        names = {Path(a.path).name for a in client.list_artifacts(mlrun.info.run_id, folder)}
        assert {"checkpoint.json", "config.json"} <= names
        assert not any(n.endswith(".safetensors") for n in names)  # weights stay in the run's folder
        summary = json.loads(
            Path(client.download_artifacts(mlrun.info.run_id, f"{folder}/checkpoint.json")).read_text()
        )
        assert summary["path"] == ckpt.path and summary["policy_version"] == ckpt.policy_version
        assert any(n.endswith(".safetensors") for n in summary["files"])
    store.close()


def _leaves(config: run_pb2.RunConfig) -> dict[str, str]:
    """Each scalar the RunConfig sets (descriptor walk, the text proto's values) -> the param text."""
    out: dict[str, str] = {}
    for field, value in config.ListFields():
        if field.message_type is not None:
            out.update({f"{field.name}.{k}": v for k, v in _leaves(value).items()})
        elif isinstance(value, str):
            out[field.name] = value
        else:
            out[field.name] = json.dumps(value)
    return out


# ---- a NaN metric, a failing backend -----------------------------------------------------------------------


def test_nan_metric_same_in_store_tensorboard_and_mlflow(tmp_path: Path) -> None:
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    store.runs.create(run_pb2.Run(run_id="nan-run", config=run_config_from_dict(RUN)))
    tracking = open_tracking(TrackingSettings(), tmp_path / "runs", "nan-run")
    steps = {1: {"loss": 0.5, "grad_norm": 2.0}, 2: {"loss": float("nan"), "grad_norm": float("nan")}}
    for step, values in steps.items():
        store.metrics.add(run_pb2.StepMetrics(run_id="nan-run", stage="rl", step=step, values=values))
        tracking.log_metrics(step, values)
    tracking.close("FAILED")
    assert tracking.disabled == []
    recorded = store_series(store, "nan-run")
    assert math.isnan(recorded["loss"][2])  # the store keeps NaN (SQLite)
    assert_same(tensorboard_scalars(tmp_path / "runs" / "nan-run" / "tensorboard"), recorded, rel=1e-6)
    uri = f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    mlrun = mlflow_run(uri, "nan-run")
    assert mlrun.info.status == "FAILED"
    assert_same(mlflow_metrics(uri, mlrun.info.run_id, ["loss", "grad_norm"]), recorded, rel=0)
    store.close()


class _BreaksOnSecondStep:
    """A backend that raises on its second metrics call (stands in for a disk or server that goes away)."""

    name = "breaks"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_params(self, params: Mapping[str, str]) -> None: ...

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        if self.steps:
            raise OSError("disk gone")
        self.steps.append(step)

    def log_checkpoint(self, checkpoint: run_pb2.Checkpoint) -> None: ...

    def close(self, status: str) -> None: ...


def test_failing_backends_are_dropped_once_and_the_others_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    breaks = _BreaksOnSecondStep()
    tracking = Tracking(
        [
            ("mlflow", lambda: MlflowTracker("nosuchscheme://here", "forgerl", "r")),  # fails to open
            ("breaks", lambda: breaks),
            ("tensorboard", lambda: TensorBoardTracker(tmp_path / "tb")),
        ]
    )
    with caplog.at_level(logging.ERROR, logger="forgerl.trainer.tracking"):
        for step in range(1, 5):
            tracking.log_metrics(step, {"loss": 1.0 / step})
        tracking.close()
    assert tracking.disabled == ["mlflow", "breaks"]
    assert [r.getMessage() for r in caplog.records if r.name == "forgerl.trainer.tracking"] == [
        "tracking backend mlflow failed in open: disabled for the rest of this run",
        "tracking backend breaks failed in log_metrics: disabled for the rest of this run",
    ]
    assert breaks.steps == [1]
    assert tensorboard_scalars(tmp_path / "tb") == {"loss": {s: pytest.approx(1.0 / s) for s in range(1, 5)}}


def test_flatten_config_has_every_field_of_every_section() -> None:
    def paths(descriptor: Any, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for field in descriptor.fields:
            if field.message_type is not None:
                out |= paths(field.message_type, f"{prefix}{field.name}.")
            elif not field.has_presence:  # an unset `optional` is left out
                out.add(prefix + field.name)
        return out

    flat = flatten_config(run_pb2.RunConfig(name="x"))  # every section unset
    assert set(flat) == paths(run_pb2.RunConfig.DESCRIPTOR)
    assert flat["name"] == "x" and flat["rl.prefix_merge"] == "false" and flat["sft.learning_rate"] == "0.0"
