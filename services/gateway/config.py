"""Configuration of the gateway service (env `FORGERL_GATEWAY_<KEY>` or `--key value`)."""

from forgerl.runtime import ServiceConfig


class GatewayConfig(ServiceConfig):
    """The shared service keys; the gateway's own keys arrive with its implementation."""
