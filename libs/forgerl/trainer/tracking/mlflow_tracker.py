"""An MLflow run per ForgeRL run: params = the flattened RunConfig, metrics = every step's metrics (one
step axis for SFT then RL), artifacts under `checkpoints/<stage>-<step>/` per checkpoint.

Checkpoint artifacts are the small files (config, tokenizer, safetensors index) and a `checkpoint.json`
naming the weights' path; the weights themselves are copied only with `copy_weights`: a full-size M2
checkpoint is ~230 GB, and the run's checkpoint folder already keeps them. A resumed run continues the
MLflow run tagged with its run id.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from forgerl.v1 import run_pb2

RUN_ID_TAG = "forgerl.run_id"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MAX_BATCH_PARAMS = 100  # MLflow's log_batch limits
MAX_BATCH_METRICS = 1000
_INVALID_KEY_CHARS = re.compile(r"[^\w\-./ ]")  # what MLflow accepts in a metric or param name


def mlflow_key(name: str) -> str:
    return _INVALID_KEY_CHARS.sub("_", name)


class MlflowTracker:
    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_id: str,
        *,
        artifact_location: str | None = None,
        copy_weights: bool = False,
    ) -> None:
        from mlflow.tracking import MlflowClient  # lazy: ~5 s to import

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.copy_weights = copy_weights
        experiment_id = self._experiment(experiment, artifact_location)
        found = self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'", max_results=1
        )
        if found:
            self.run = found[0].info.run_id
            self.client.update_run(self.run, status="RUNNING")
        else:
            self.run = self.client.create_run(experiment_id, run_name=run_id, tags={RUN_ID_TAG: run_id}).info.run_id

    def _experiment(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            return str(existing.experiment_id)
        try:
            return str(self.client.create_experiment(name, artifact_location=artifact_location))
        except MlflowException:  # another trainer created it meanwhile
            again = self.client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), v) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run, params=items[i : i + MAX_BATCH_PARAMS])

    def log_metrics(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), float(v), now_ms, step) for k, v in values.items()]
        for i in range(0, len(items), MAX_BATCH_METRICS):
            self.client.log_batch(self.run, metrics=items[i : i + MAX_BATCH_METRICS])

    def log_checkpoint(self, checkpoint: run_pb2.Checkpoint) -> None:
        folder = Path(checkpoint.path)
        artifact_path = f"checkpoints/{folder.name}"
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            if self.copy_weights or not path.name.endswith(WEIGHT_SUFFIXES):
                sub = path.parent.relative_to(folder).as_posix()
                self.client.log_artifact(self.run, str(path), artifact_path if sub == "." else f"{artifact_path}/{sub}")
        summary: dict[str, Any] = {
            "checkpoint_id": checkpoint.checkpoint_id,
            "path": str(folder),
            "stage": checkpoint.stage,
            "step": checkpoint.step,
            "policy_version": checkpoint.policy_version,
            "weights_copied": self.copy_weights,
            "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in files},
        }
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "checkpoint.json").write_text(json.dumps(summary, indent=1))
            self.client.log_artifact(self.run, str(Path(tmp) / "checkpoint.json"), artifact_path)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run, status)
