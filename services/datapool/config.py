"""Configuration of the datapool service (env `FORGERL_DATAPOOL_<KEY>` or `--key value`)."""

from forgerl.runtime import ServiceConfig


class DatapoolConfig(ServiceConfig):
    """The shared service keys; the datapool's own keys arrive with its implementation."""
