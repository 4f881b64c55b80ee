"""How ForgeRL's Kafka clients authenticate and encrypt: one spec, turned into kafka-python's kwargs.

    security = KafkaSecurity(
        security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="forgerl",
        sasl_password_file="/etc/forgerl/kafka-sasl/password", ssl_cafile="/etc/forgerl/kafka-tls/ca.crt",
    )
    KafkaProducer(bootstrap_servers=..., **security.client_kwargs())

The spec never holds a password: it names a file (a mounted Secret) or an environment variable, read
each time `client_kwargs()` builds a client. The kwarg names are kafka-python's (KafkaProducer,
KafkaConsumer and KafkaAdminClient share them: `security_protocol`, `sasl_mechanism`,
`sasl_plain_username`, `sasl_plain_password`, `ssl_cafile`, `ssl_certfile`, `ssl_keyfile`,
`ssl_check_hostname`). Inconsistent settings fail when the spec is made; missing or unreadable
files and unset variables fail in `client_kwargs()`, naming the setting to fix. The field names are
the datapool service's keys less their `kafka_` prefix (`ssl_cafile` is FORGERL_DATAPOOL_KAFKA_SSL_CAFILE).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = ["PROTOCOLS", "SASL_MECHANISMS", "KafkaSecurity", "KafkaSecurityError", "SaslMechanism", "SecurityProtocol"]

log = logging.getLogger("forgerl.datapool")

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
PROTOCOLS: tuple[str, ...] = get_args(SecurityProtocol)
SASL_MECHANISMS: tuple[str, ...] = tuple(m for m in get_args(SaslMechanism) if m)
SASL_FIELDS = ("sasl_mechanism", "sasl_username", "sasl_password_file", "sasl_password_env")
TLS_FIELDS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile")


class KafkaSecurityError(ValueError):
    """The Kafka security settings are inconsistent, or a file or variable they name is unusable."""


@dataclass(frozen=True)
class KafkaSecurity:
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    # Exactly one of these names where the SASL password is: a file, or an environment variable.
    sasl_password_file: str = ""
    sasl_password_env: str = ""
    # PEM files; no CA file: the system's trust store. A cert file may hold the key too.
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_check_hostname: bool = True

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise KafkaSecurityError("Kafka security settings: " + "; ".join(problems))

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def _problems(self) -> list[str]:
        protocol = self.security_protocol
        if protocol not in PROTOCOLS:
            return [f"security_protocol {protocol!r}: must be one of {', '.join(PROTOCOLS)}"]
        if self.sasl_mechanism and self.sasl_mechanism not in SASL_MECHANISMS:
            return [f"sasl_mechanism {self.sasl_mechanism!r}: must be one of {', '.join(SASL_MECHANISMS)}"]
        problems = []
        sasl_set = [name for name in SASL_FIELDS if getattr(self, name)]
        if self.uses_sasl:
            if not self.sasl_mechanism:
                problems.append(f"{protocol} needs sasl_mechanism ({', '.join(SASL_MECHANISMS)})")
            if not self.sasl_username:
                problems.append(f"{protocol} needs sasl_username")
            if bool(self.sasl_password_file) == bool(self.sasl_password_env):
                got = "both" if self.sasl_password_file else "neither"
                problems.append(
                    f"{protocol} needs the SASL password from exactly one of sasl_password_file (a file) "
                    f"or sasl_password_env (an environment variable's name); got {got}"
                )
        elif sasl_set:
            problems.append(
                f"{', '.join(sasl_set)} set with security_protocol {protocol}: use SASL_PLAINTEXT or SASL_SSL"
            )
        tls_set = [name for name in TLS_FIELDS if getattr(self, name)]
        if tls_set and not self.uses_tls:
            problems.append(f"{', '.join(tls_set)} set with security_protocol {protocol}: use SSL or SASL_SSL")
        if self.ssl_keyfile and not self.ssl_certfile:
            problems.append("ssl_keyfile without ssl_certfile: a client key needs its certificate")
        return problems

    def client_kwargs(self) -> dict[str, Any]:
        """kafka-python kwargs for any client (producer, consumer, admin); reads the password now."""
        kwargs: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.uses_sasl:
            if self.sasl_mechanism == "PLAIN" and not self.uses_tls:
                log.warning("SASL PLAIN over SASL_PLAINTEXT sends the Kafka password unencrypted; use SASL_SSL")
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self._password(),
            )
        if self.uses_tls:
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
            for name in TLS_FIELDS:
                path = getattr(self, name)
                if path:
                    kwargs[name] = _readable(path, name)
        return kwargs

    def _password(self) -> str:
        if self.sasl_password_file:
            password = Path(_readable(self.sasl_password_file, "sasl_password_file")).read_text().rstrip("\r\n")
            where = f"file {self.sasl_password_file}"
        else:
            password = os.environ.get(self.sasl_password_env, "")
            where = f"environment variable {self.sasl_password_env}"
        if not password:
            raise KafkaSecurityError(f"the SASL password is empty or unset: {where}")
        return password


def _readable(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise KafkaSecurityError(f"{what} {path} does not exist or is not a file (is the Secret mounted?)")
    if not os.access(path, os.R_OK):
        raise KafkaSecurityError(f"{what} {path} is not readable by uid {os.getuid()}")
    return path
