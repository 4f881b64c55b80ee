"""Configuration of the trainer service (env `FORGERL_TRAINER_<KEY>` or `--key value`)."""

from forgerl.runtime import ServiceConfig


class TrainerConfig(ServiceConfig):
    """The shared service keys; the trainer's own keys arrive with its implementation."""
