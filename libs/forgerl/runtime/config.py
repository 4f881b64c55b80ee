"""Typed service configuration, read once at start from flags and the environment.

Precedence, highest first: command-line flags (`--port 50051`), the service's environment
(`FORGERL_<SERVICE>_<KEY>`, the keys the Helm chart sets), the project-wide environment for keys every
service shares (`FORGERL_<KEY>`, e.g. `FORGERL_AUTH_TOKEN`), then the defaults of the config class.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# Keys that may come from a project-wide variable as well as from the service's own.
SHARED_KEYS = ("auth_token", "metrics_auth", "log_level", "log_format", "state_dir", "host")


class ConfigError(ValueError):
    """A configuration value was missing or malformed; the message names the flag or variable."""


class ServiceConfig(BaseModel):
    """What every service needs; each service subclasses it with its own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 only inside a pod.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 turns it off.")
    grace_s: float = Field(10.0, ge=0, description="On SIGTERM, in-flight RPCs get this long to finish.")
    auth_token: str | None = Field(None, description="When set, every RPC but health needs this bearer token.")
    metrics_auth: bool = Field(False, description="When on, /metrics needs the bearer token too (auth_token).")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$")
    log_format: str = Field("json", pattern="^(json|console)$")
    state_dir: Path = Field(Path(".forgerl"), description="Local state: logs, SQLite, checkpoints.")

    @model_validator(mode="after")
    def _metrics_auth_needs_a_token(self) -> ServiceConfig:
        if self.metrics_auth and not self.auth_token:
            raise ValueError("metrics_auth is on but auth_token is unset: set FORGERL_AUTH_TOKEN or turn it off")
        return self


ConfigT = TypeVar("ConfigT", bound=ServiceConfig)


def env_key(service: str, field: str) -> str:
    """The environment variable of one field: `env_key("datapool", "port") == "FORGERL_DATAPOOL_PORT"`."""
    return f"FORGERL_{service.upper()}_{field.upper()}"


def load_config(
    cls: type[ConfigT],
    service: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ConfigT:
    """Build `cls` from flags, then `FORGERL_<SERVICE>_<KEY>`, then `FORGERL_<KEY>` for shared keys."""
    environ = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name in cls.model_fields:
        shared = environ.get(f"FORGERL_{name.upper()}") if name in SHARED_KEYS else None
        value = environ.get(env_key(service, name), shared)
        if value is not None:
            values[name] = value
    values.update(_parse_flags(list(argv or []), cls))
    try:
        return cls.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(_describe(service, error) for error in err.errors())
        raise ConfigError(f"{service} configuration is invalid: {problems}") from None


def _parse_flags(argv: list[str], cls: type[ServiceConfig]) -> dict[str, str]:
    flags: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --port 50051")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(argv):
                raise ConfigError(f"flag --{key} needs a value")
            value = argv[i + 1]
            i += 1
        name = key.replace("-", "_")
        if name not in cls.model_fields:
            known = ", ".join(f"--{f.replace('_', '-')}" for f in cls.model_fields)
            raise ConfigError(f"unknown flag --{key}; known flags: {known}")
        flags[name] = value
        i += 1
    return flags


def _describe(service: str, error: Mapping[str, object]) -> str:
    loc = error.get("loc", ())
    if not (isinstance(loc, tuple) and loc):  # a check across fields names them in its message
        return str(error.get("msg"))
    field = str(loc[0])
    return f"{field} (--{field.replace('_', '-')} or {env_key(service, field)}): {error.get('msg')}"
