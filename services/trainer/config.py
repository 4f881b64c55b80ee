"""Configuration of the trainer service (env `FORGERL_TRAINER_<KEY>` or `--key value`)."""

from __future__ import annotations

from pydantic import Field

from forgerl.runtime import ServiceConfig
from forgerl.trainer.tracking import TrackingSettings


class TrainerConfig(ServiceConfig):
    rollout_address: str = Field("127.0.0.1:50054", description="Rollout service: episodes in flight.")
    datapool_address: str = Field("127.0.0.1:50052", description="Data pool service: FetchBatch / Ack.")
    inference_address: str = Field("127.0.0.1:50051", description="Inference service: UpdateWeights.")
    inference_model_path: str = Field(
        "", description="The checkpoint inference starts from; a run without init_checkpoint starts from it."
    )
    database_url: str | None = Field(None, description="Run store URL; default: SQLite under state_dir.")
    runs_dir: str = Field("runs", description="Run directories (state, checkpoints, report): <runs_dir>/<run-id>.")
    threads: int = Field(1, ge=1, description="torch CPU threads of the training loop.")
    eval_tasks: int = Field(256, ge=1, description="Held-out tasks evaluated greedily in-process.")
    eval_every: int = Field(10, ge=1, description="RL steps between held-out evaluations.")
    fetch_timeout_s: float = Field(120.0, gt=0, description="FetchBatch waits up to this long for a full batch.")
    max_new_tokens: int = Field(48, ge=1, description="Per-turn generation cap of the in-process evaluation.")
    local_episodes: bool = Field(
        False, description="Sample RL episodes in-process instead of rollout + data pool (no Kafka; tests)."
    )
    retry_deadline_s: float = Field(
        600.0, gt=0, description="How long a call to the data pool, rollout or inference waits for it to come back."
    )
    resume_on_start: bool = Field(
        True,
        description="Resume runs the store shows RUNNING (this trainer replaces one that crashed); off: mark them "
        "INTERRUPTED (a fresh start: `forgerl up`), resumable with StartRun(resume_run_id).",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files: <runs_dir>/<run-id>/tensorboard.")
    mlflow: bool = Field(True, description="Log each run to MLflow: params, step metrics, checkpoint artifacts.")
    mlflow_tracking_uri: str = Field(
        "", description="MLflow tracking URI (a server, a database); default: SQLite <runs_dir>/mlflow.db."
    )
    mlflow_experiment: str = Field("forgerl", description="The MLflow experiment runs are logged under.")
    mlflow_copy_weights: bool = Field(
        False,
        description="Copy checkpoint weights into MLflow's artifacts too (default: config, tokenizer and a "
        "checkpoint.json naming the weights' path; the run's checkpoint folder keeps the weights).",
    )

    def tracking(self) -> TrackingSettings:
        return TrackingSettings(
            tensorboard=self.tensorboard,
            mlflow=self.mlflow,
            mlflow_tracking_uri=self.mlflow_tracking_uri,
            mlflow_experiment=self.mlflow_experiment,
            mlflow_copy_weights=self.mlflow_copy_weights,
        )
