"""Configuration of the evolution service (env `FORGERL_EVOLUTION_<KEY>` or `--key value`)."""

from forgerl.runtime import ServiceConfig


class EvolutionConfig(ServiceConfig):
    """The shared service keys; the evolution's own keys arrive with its implementation."""
