"""Configuration of the evolution service (env `FORGERL_EVOLUTION_<KEY>` or `--key value`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgerl.runtime import ServiceConfig


class EvolutionConfig(ServiceConfig):
    rollout_address: str = Field("", description="RolloutService host:port, which runs the evaluations.")
    trainer_address: str = Field("", description="TrainerService host:port, to stop a run whose anomaly is approved.")
    http_port: int = Field(18090, ge=0, le=65535, description="The operator console's HTTP port; 0 picks one.")
    operator_token: str = Field(
        "", description="Bearer token of the console's mutating calls; empty: auth_token, else a random one "
        "written to <state_dir>/evolution/operator-token.",
    )  # fmt: skip
    database_url: str | None = Field(None, description="Run store URL (diagnosis); default: SQLite in state_dir.")
    scaffold_dir: str = Field(
        "", description="Directory of scaffold versions, shared with rollout; default <state_dir>/scaffolds."
    )
    base_scaffold: str = Field("default", description="The incumbent scaffold the first round improves on.")
    suite: str = Field("tooluse", description="Suite the scaffolds are evaluated on.")
    split: str = Field("test", description="The suite's split the dev and sealed held-out task sets come from.")
    dev_tasks: int = Field(200, ge=2, description="Tasks of the dev set (200 x 3 seeds finds +10 points 98.7%).")
    subset_tasks: int = Field(40, ge=0, description="First-stage subset of the dev set; 0: no subset stage.")
    heldout_tasks: int = Field(200, ge=2, description="Tasks of the sealed held-out set (disjoint from dev).")
    task_seed: int = Field(0, description="Seed of the shuffle that draws the dev and held-out task sets.")
    seeds: int = Field(3, ge=3, description="Episodes per task and version in each comparison.")
    margin: float = Field(0.0, description="Promote only when the interval's lower bound exceeds this.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Two-sided confidence of the bootstrap interval.")
    require_approval: bool = Field(True, description="Promotions wait for the operator's approval.")
    budget_rounds: int = Field(10, ge=1, description="Rounds the loop may run.")
    budget_wall_time_s: float = Field(7200.0, gt=0, description="Wall time the loop may run.")
    budget_episodes: int = Field(20_000, ge=1, description="Evaluation episodes the loop may spend.")
    proposer: Literal["mutation", "model"] = Field("mutation", description="Built-in mutation operators, or a model.")
    proposer_base_url: str = Field("", description="OpenAI-compatible base URL of the model proposer (the gateway).")
    proposer_model: str = Field("forgerl", description="Model name the proposer asks for.")
    proposer_api_key: str = Field("", description="API key of the proposer's endpoint.")
    proposer_seed: int = Field(0, description="Seed of the mutation operators' choices.")
    evaluation_in_flight: int = Field(0, ge=0, description="Episodes per evaluation at once; 0: rollout's limit.")
    diagnose_interval_s: float = Field(30.0, ge=0, description="Scan the run store for anomalies this often; 0: off.")
    autostart: bool = Field(False, description="Start the iteration loop when the service starts.")
