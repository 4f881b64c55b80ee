"""Configuration of the datapool service (env `FORGERL_DATAPOOL_<KEY>` or `--key value`)."""

from __future__ import annotations

from pydantic import Field

from forgerl.runtime import ServiceConfig


class DatapoolConfig(ServiceConfig):
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    group_id: str = Field("forgerl-datapool", description="Consumer group whose committed offsets the pool owns.")
    topic_prefix: str = Field("forgerl", description="Topics are <prefix>.<run>.trajectories and friends.")
    partitions: int = Field(4, ge=1, description="Partitions of a new run's trajectory topic.")
    fifo_window: float = Field(0.3, gt=0, le=1, description="Windowed FIFO window, fraction of the queue.")
    max_staleness: int = Field(
        4, ge=-1, description="Drop trajectories older than this many policy versions; -1: keep all."
    )
    ack_timeout_s: float = Field(300.0, gt=0, description="A batch not acknowledged within this is served again.")
    gap_timeout_s: float = Field(600.0, gt=0, description="Give up on an in-flight submission sequence after this.")
    max_lag: int = Field(50_000, ge=0, description="PutTrajectories refuses a run this far behind (0: never).")
    runs: str = Field("", description="Comma-separated run ids to open (and rebuild) at start.")
    run_policy_from_store: bool = Field(
        True, description="Read a run's fifo_window and max_staleness from the run store when it has them."
    )
    database_url: str | None = Field(None, description="Run store URL; default: SQLite under state_dir.")
