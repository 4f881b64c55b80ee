"""KafkaSecurity: inconsistent settings refused with the setting named; kwargs that kafka-python's own
config tables accept; the datapool service's keys mapped onto it. (kafka-python's TLS context built from
them, and the clients against a real broker: tests/integration/datapool/test_datapool_kafka_security.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from forgerl.datapool.security import KafkaSecurity, KafkaSecurityError
from forgerl.runtime import ConfigError, load_config
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.servicer import settings_from_config

pytestmark = pytest.mark.unit

SCRAM: dict[str, Any] = {"sasl_mechanism": "SCRAM-SHA-256", "sasl_username": "pool", "sasl_password_env": "KAFKA_PW"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"security_protocol": "TLS"}, "security_protocol 'TLS': must be one of PLAINTEXT, SSL, SASL_PLAINTEXT"),
        ({"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}, "sasl_mechanism 'GSSAPI': must be one of"),
        ({"security_protocol": "SASL_SSL"}, "SASL_SSL needs sasl_mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512)"),
        ({"security_protocol": "SASL_PLAINTEXT", **SCRAM, "sasl_username": ""}, "SASL_PLAINTEXT needs sasl_username"),
        (
            {"security_protocol": "SASL_SSL", **SCRAM, "sasl_password_env": ""},
            "needs the SASL password from exactly one of sasl_password_file",
        ),
        ({"security_protocol": "SASL_SSL", **SCRAM, "sasl_password_file": "/p"}, "got both"),
        ({"sasl_mechanism": "PLAIN"}, "sasl_mechanism set with security_protocol PLAINTEXT: use SASL_PLAINTEXT"),
        (
            {"security_protocol": "SASL_PLAINTEXT", **SCRAM, "ssl_cafile": "/ca"},
            "ssl_cafile set with security_protocol",
        ),
        ({"security_protocol": "SSL", "ssl_keyfile": "/k"}, "ssl_keyfile without ssl_certfile"),
    ],
)
def test_inconsistent_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(KafkaSecurityError, match="Kafka security settings") as refused:
        KafkaSecurity(**settings)
    assert message in str(refused.value)


def test_sasl_ssl_kwargs_with_password_file_and_client_certificate(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("password", "ca.crt", "tls.crt", "tls.key")}
    for path in files.values():
        path.write_text("x\n")
    files["password"].write_text("s3cret\n")
    security = KafkaSecurity(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="pool",
        sasl_password_file=str(files["password"]),
        ssl_cafile=str(files["ca.crt"]),
        ssl_certfile=str(files["tls.crt"]),
        ssl_keyfile=str(files["tls.key"]),
        ssl_check_hostname=False,
    )
    assert security.client_kwargs() == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "pool",
        "sasl_plain_password": "s3cret",  # the file's trailing newline is not part of it
        "ssl_check_hostname": False,
        "ssl_cafile": str(files["ca.crt"]),
        "ssl_certfile": str(files["tls.crt"]),
        "ssl_keyfile": str(files["tls.key"]),
    }
    assert "s3cret" not in repr(security)  # the spec names where the password is, never holds it


def test_plaintext_is_the_default_and_sets_only_the_protocol() -> None:
    assert KafkaSecurity().client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_password_from_environment_and_missing_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    security = KafkaSecurity(security_protocol="SASL_PLAINTEXT", **SCRAM)
    monkeypatch.setenv("KAFKA_PW", "from-env")
    assert security.client_kwargs()["sasl_plain_password"] == "from-env"
    monkeypatch.setenv("KAFKA_PW", "")
    with pytest.raises(KafkaSecurityError, match="empty or unset: environment variable KAFKA_PW"):
        security.client_kwargs()
    missing = KafkaSecurity(
        security_protocol="SASL_PLAINTEXT", **{**SCRAM, "sasl_password_env": ""}, sasl_password_file="/nope/pw"
    )
    with pytest.raises(KafkaSecurityError, match="sasl_password_file /nope/pw does not exist"):
        missing.client_kwargs()
    no_ca = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(tmp_path / "ca.crt"))
    with pytest.raises(KafkaSecurityError, match=r"ssl_cafile .*ca.crt does not exist or is not a file"):
        no_ca.client_kwargs()


def test_kwargs_are_known_to_every_kafka_python_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each client refuses unknown kwargs ('Unrecognized configs') by its DEFAULT_CONFIG table."""
    (tmp_path / "ca.crt").write_text("x")
    monkeypatch.setenv("KAFKA_PW", "pw")
    kwargs = KafkaSecurity(security_protocol="SASL_SSL", **SCRAM, ssl_cafile=str(tmp_path / "ca.crt")).client_kwargs()
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):
        assert set(kwargs) <= set(client.DEFAULT_CONFIG), client.__name__


def test_datapool_keys_reach_the_pool_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    environ = {
        "FORGERL_DATAPOOL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "FORGERL_DATAPOOL_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "FORGERL_DATAPOOL_KAFKA_SASL_USERNAME": "pool",
        "FORGERL_DATAPOOL_KAFKA_SASL_PASSWORD_FILE": "/etc/forgerl/kafka-sasl/password",
        "FORGERL_DATAPOOL_KAFKA_SSL_CAFILE": str(ca),
    }
    security = settings_from_config(load_config(DatapoolConfig, "datapool", [], environ)).kafka.security
    assert security == KafkaSecurity(
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="pool",
        sasl_password_file="/etc/forgerl/kafka-sasl/password",
        ssl_cafile=str(ca),
    )


def test_datapool_config_names_the_bad_key() -> None:
    with pytest.raises(ConfigError, match="FORGERL_DATAPOOL_KAFKA_SECURITY_PROTOCOL"):
        load_config(DatapoolConfig, "datapool", [], {"FORGERL_DATAPOOL_KAFKA_SECURITY_PROTOCOL": "TLS"})
    with pytest.raises(ConfigError, match="SASL_SSL needs sasl_username"):
        load_config(DatapoolConfig, "datapool", ["--kafka-security-protocol", "SASL_SSL"], {})
