"""Experiment tracking: a run's metrics, parameters and checkpoints also in TensorBoard and MLflow.

Where a run lands, by default (runs_dir is the trainer's `runs_dir`):
- TensorBoard: `<runs_dir>/<run_id>/tensorboard/` (`tensorboard --logdir <runs_dir>`)
- MLflow: the SQLite store `<runs_dir>/mlflow.db`, artifacts under `<runs_dir>/mlartifacts/`
  (`mlflow ui --backend-store-uri sqlite:///<runs_dir>/mlflow.db`); one store for all runs, so the UI
  compares them. A tracking URI (a server, another database) replaces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from forgerl.trainer.tracking.base import Tracker, Tracking, flatten_config
from forgerl.trainer.tracking.mlflow_tracker import MlflowTracker
from forgerl.trainer.tracking.tensorboard_tracker import TensorBoardTracker

__all__ = ["Tracker", "Tracking", "TrackingSettings", "flatten_config", "open_tracking"]


@dataclass(frozen=True)
class TrackingSettings:
    tensorboard: bool = True
    mlflow: bool = True
    mlflow_tracking_uri: str = ""  # "": the SQLite store <runs_dir>/mlflow.db
    mlflow_experiment: str = "forgerl"
    mlflow_copy_weights: bool = False  # checkpoint weights as MLflow artifacts too (a copy of each)


def default_mlflow_uri(runs_dir: Path) -> str:
    return f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}"


def open_tracking(settings: TrackingSettings, runs_dir: Path, run_id: str) -> Tracking:
    """The run's backends, opened by the tracking thread (returns at once)."""
    openers: list[tuple[str, Callable[[], Tracker]]] = []
    if settings.tensorboard:
        openers.append(("tensorboard", lambda: TensorBoardTracker(runs_dir / run_id / "tensorboard")))
    if settings.mlflow:
        uri, artifacts = settings.mlflow_tracking_uri, None
        if not uri:  # the default store, and its artifacts beside it (else MLflow picks ./mlartifacts)
            runs_dir.mkdir(parents=True, exist_ok=True)
            uri, artifacts = default_mlflow_uri(runs_dir), (runs_dir / "mlartifacts").resolve().as_uri()
        openers.append(
            (
                "mlflow",
                lambda: MlflowTracker(
                    uri,
                    settings.mlflow_experiment,
                    run_id,
                    artifact_location=artifacts,
                    copy_weights=settings.mlflow_copy_weights,
                ),
            )
        )
    return Tracking(openers)
