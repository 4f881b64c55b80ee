"""Configuration of the rollout service (env `FORGERL_ROLLOUT_<KEY>` or `--key value`)."""

from forgerl.runtime import ServiceConfig


class RolloutConfig(ServiceConfig):
    """The shared service keys; the rollout's own keys arrive with its implementation."""
