"""Configuration of the rollout service (env `FORGERL_ROLLOUT_<KEY>` or `--key value`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgerl.runtime import ServiceConfig


class RolloutConfig(ServiceConfig):
    gateway_address: str = Field(
        "", description="GatewayService host:port; empty: only scripted scaffolds (oracle, noop) can run."
    )
    datapool_address: str = Field(
        "",
        description="DatapoolService host:port: back-pressure on the run's lag, and skip markers for publishing "
        "episodes that end without a trajectory (else the pool's window waits its gap timeout); empty: neither.",
    )
    max_pool_lag: int = Field(
        0, ge=0, description="Hold new publishing episodes while the pool's lag exceeds this; 0: never."
    )
    model: str = Field("forgerl", description="Model name the agents send to the gateway.")
    max_in_flight: int = Field(8, ge=1, description="Episodes running at once, over all submissions.")
    max_submit_episodes: int = Field(4096, ge=1, description="Most episodes (tasks x group_size) one Submit may ask.")
    max_queued_episodes: int = Field(16384, ge=1, description="Most episodes waiting to run, over all submissions.")
    max_attempts: int = Field(
        10,
        ge=1,
        description="Attempts per episode that fails for infrastructure reasons (sandbox, gateway, inference). "
        "With the doubling backoff, 10 attempts span ~2 min: an inference engine restarting on CPU takes 1-2 min.",
    )
    retry_backoff_s: float = Field(
        0.5, ge=0, description="Wait before the first retry; it doubles with each attempt, up to 30 s."
    )
    scaffold_dir: str = Field(
        "", description="Directory of scaffold versions (<version>.yaml); default <state_dir>/scaffolds."
    )
    sandbox: Literal["local", "kubernetes"] = Field("local", description="Where episodes run.")
    sandbox_root: str = Field("", description="Local sandboxes' parent directory; default /var/tmp/forgerl-sandboxes.")
    sandbox_uid_base: int = Field(200_000, ge=1000, description="First of the uids local sandboxes run as.")
    sandbox_memory_mb: int = Field(1024, ge=64, description="Memory (address space) per sandbox command.")
    sandbox_file_size_mb: int = Field(64, ge=1, description="Largest file a sandbox command may write.")
    sandbox_processes: int = Field(64, ge=4, description="Processes and threads per sandbox.")
    sandbox_cpu_s: int = Field(120, ge=1, description="CPU seconds per sandbox command.")
    sandbox_command_timeout_s: float = Field(60.0, gt=0, description="Wall clock per sandbox command by default.")
    task_env_root: str = Field(
        "",
        description="Where local sandboxes' task environments (virtualenvs) are built; default <sandbox_root>/.envs.",
    )
    task_env_pip_args: str = Field(
        "",
        description="Extra pip arguments for building task environments, e.g. '--no-index --find-links /wheels' "
        "offline or '--index-url https://mirror/simple'; empty: pip's own configuration.",
    )
    k8s_namespace: str = Field("forgerl-sandboxes", description="Namespace of sandbox Pods.")
    k8s_image: str = Field("python:3.11-slim", description="Image of sandbox Pods.")
    k8s_kubeconfig: str = Field("", description="Kubeconfig file; empty: in-cluster, then the default kubeconfig.")
    k8s_runtime_class: str = Field("", description="RuntimeClass of sandbox Pods (e.g. gvisor); empty: the default.")
    reward_alpha: float = Field(0.1, description="Weight of the process reward.")
    reward_beta: float = Field(0.1, description="Weight of the speed reward.")
    speed_fn: str = Field("tanh_log", description="Speed shaping h: tanh_log, linear or exp.")
