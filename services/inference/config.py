"""Configuration of the inference service (env `FORGERL_INFERENCE_<KEY>` or `--key value`)."""

from forgerl.runtime import ServiceConfig


class InferenceConfig(ServiceConfig):
    """The shared service keys; the inference's own keys arrive with its implementation."""
