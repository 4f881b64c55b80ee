"""Configuration of the inference service (env `FORGERL_INFERENCE_<KEY>` or `--key value`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgerl.runtime import ServiceConfig


class InferenceConfig(ServiceConfig):
    model_path: str = Field("", description="Checkpoint directory to serve first (config.json + safetensors).")
    policy_version: int = Field(1, ge=0, description="Policy version of the checkpoint at model_path.")
    resume_latest_policy: bool = Field(
        True,
        description="Serve the policy version the running run published last (from the run store), not model_path: "
        "an engine that replaces a dead one continues the run. Off: model_path (a fresh start: `forgerl up`).",
    )
    database_url: str | None = Field(None, description="Run store URL; default: SQLite under state_dir.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Compute dtype of the engine; float32 on CPU for exact parity."
    )
    max_model_len: int = Field(2048, ge=16, description="Context: prompt plus generated tokens.")
    kv_cache_bytes: int = Field(256 * 1024 * 1024, ge=1024 * 1024, description="Memory for the KV cache.")
    in_flight: Literal["finish", "abort"] = Field(
        "finish", description="On UpdateWeights, requests in flight finish on the old version, or abort."
    )
    routing_replay: bool = Field(False, description="Capture the routed expert ids of generated tokens.")
    enable_prefix_caching: bool = Field(True, description="Reuse the KV cache of shared prompt prefixes.")
    max_num_seqs: int = Field(64, ge=1, description="Requests the engine batches at once.")
    seed: int = Field(0, description="Engine seed for sampling without a per-request seed.")
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = Field(
        "raw_logprobs", description="Logprobs of the model's distribution, or after temperature/top-k/top-p."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs vLLM shards the model over (tensor parallel); the chart sets inference.gpu.count."
    )
    executor: Literal["mp", "uni"] = Field(
        "mp",
        description="vLLM executor: model worker in its own process (mp) or in the engine core (uni). vLLM's CPU "
        "platform turns uni into mp while its engine core runs in a process of its own (the default).",
    )
