"""The service runtime: configuration, the gRPC server bootstrap, interceptors and logs."""

from forgerl.runtime.config import ConfigError, ServiceConfig, env_key, load_config
from forgerl.runtime.placeholder import placeholder_spec, unimplemented_handler
from forgerl.runtime.server import ServiceSpec, run_service, serve, started_server

__all__ = [
    "ConfigError",
    "ServiceConfig",
    "ServiceSpec",
    "env_key",
    "load_config",
    "placeholder_spec",
    "run_service",
    "serve",
    "started_server",
    "unimplemented_handler",
]
