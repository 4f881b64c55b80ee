"""Configuration of the gateway service (env `FORGERL_GATEWAY_<KEY>` or `--key value`)."""

from __future__ import annotations

from pydantic import Field

from forgerl.runtime import ServiceConfig


class GatewayConfig(ServiceConfig):
    http_port: int = Field(8080, ge=0, le=65535, description="Port of the OpenAI-compatible HTTP API; 0 picks one.")
    public_base_url: str = Field(
        "", description="Base URL OpenEpisode hands to agents; default http://<host>:<http_port>/v1."
    )
    inference_address: str = Field("127.0.0.1:50051", description="The inference service (one replica).")
    inference_replicas: str = Field(
        "", description="Comma-separated inference replicas, host:port,...; when set, inference_address is unused."
    )
    datapool_address: str = Field(
        "", description="Data pool to hand closed trajectories to (PutTrajectories); empty: do not publish."
    )
    tokenizer_path: str = Field(
        "", description="Directory of the served model's tokenizer; empty: the model_path inference reports."
    )
    model_name: str = Field("forgerl", description="The model id of /v1/models (requests may name any model).")
    max_model_len: int = Field(
        0, ge=0, description="The engine's context, to refuse over-long histories early; 0: the engine checks it."
    )
    default_max_tokens: int = Field(
        0, ge=0, description="max_tokens of a request that sets none; 0: up to the context."
    )
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest HTTP request body accepted.")
    return_routed_experts: bool = Field(
        False, description="Record routed expert ids per generated token (needs inference routing_replay)."
    )
    replica_probe_s: float = Field(2.0, gt=0, description="How often replicas marked down are probed.")
    startup_timeout_s: float = Field(
        300.0, gt=0, description="How long start-up waits for an inference replica to report its model."
    )
    close_wait_s: float = Field(30.0, ge=0, description="CloseEpisode waits this long for a turn in flight.")
    closed_retention: int = Field(1024, ge=0, description="Closed episodes remembered (their keys answer 'closed').")
    closed_trajectories: int = Field(
        16, ge=0, description="Newest closed episodes that keep their trajectory (a repeated close returns it)."
    )
    episode_idle_ttl_s: float = Field(
        3600.0, ge=0, description="An open episode without a request for this long is dropped unpublished; 0: never."
    )

    def replica_addresses(self) -> list[str]:
        raw = self.inference_replicas or self.inference_address
        return [a.strip() for a in raw.split(",") if a.strip()]
