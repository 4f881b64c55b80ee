"""Configuration of the datapool service (env `FORGERL_DATAPOOL_<KEY>` or `--key value`)."""

from __future__ import annotations

import dataclasses

from pydantic import Field, model_validator

from forgerl.datapool.security import KafkaSecurity, SaslMechanism, SecurityProtocol
from forgerl.runtime import ServiceConfig


class DatapoolConfig(ServiceConfig):
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, host:port[,host:port].")
    kafka_security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="How the pool's Kafka clients connect: TLS (SSL), SASL, both, or neither."
    )
    kafka_sasl_mechanism: SaslMechanism = Field("", description="SASL mechanism (SASL_* protocols only).")
    kafka_sasl_username: str = Field("", description="SASL username (SASL_* protocols only).")
    kafka_sasl_password_file: str = Field("", description="File holding the SASL password (a mounted Secret).")
    kafka_sasl_password_env: str = Field("", description="Or: the environment variable holding the SASL password.")
    kafka_ssl_cafile: str = Field("", description="CA bundle (PEM) the broker certificates are checked against.")
    kafka_ssl_certfile: str = Field("", description="Client certificate (PEM) for mutual TLS.")
    kafka_ssl_keyfile: str = Field("", description="Client private key (PEM) for mutual TLS.")
    kafka_ssl_check_hostname: bool = Field(True, description="Check that broker certificates name the broker host.")
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

    @model_validator(mode="after")
    def _kafka_security_is_consistent(self) -> DatapoolConfig:
        self.kafka_security()  # raises KafkaSecurityError (a ValueError) naming what is wrong
        return self

    def kafka_security(self) -> KafkaSecurity:
        """The kafka_* security keys as the data pool's KafkaSecurity (same names, less the prefix)."""
        names = {f.name for f in dataclasses.fields(KafkaSecurity)}
        return KafkaSecurity(**{n: getattr(self, f"kafka_{n}") for n in names})
