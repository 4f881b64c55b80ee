"""The data pool's Kafka clients with TLS and SASL settings, against a real Tansu broker.

TLS: a real TLS endpoint (kafka_tls.TlsTerminator, Python's ssl) in front of Tansu, which advertises
it, so every producer, consumer and admin connection of the pool is TLS; certificates are made here.
SASL: Tansu 0.6.0 runs the SCRAM exchange (`--authentication`) but keeps no user credentials (its
AlterUserScramCredentials answers success and stores nothing, so every login ends `e=unknown-user`);
what can be checked is that the pool's clients start SCRAM with the configured mechanism and user,
as the broker's own log shows, and that a client without SASL is refused.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.net.transport import KafkaSSLTransport
from kafka_tls import Pki, TlsTerminator, make_pki

from forgerl.datapool.broker import TansuBroker, free_port, tansu_binary
from forgerl.datapool.feed import KafkaSettings
from forgerl.datapool.manager import DataPool, PoolSettings, RunPolicy
from forgerl.datapool.producer import TrajectoryProducer, producer_config
from forgerl.datapool.security import KafkaSecurity

pytestmark = pytest.mark.integration

# Clients that must fail give up after this (kafka-python's bootstrap of a new client).
FAIL_FAST: dict[str, Any] = {"bootstrap_timeout_ms": 3000, "request_timeout_ms": 3000}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_broker(pki: Pki, *, require_client_cert: bool) -> tuple[TansuBroker, TlsTerminator]:
    port = free_port()
    terminator = TlsTerminator(f"127.0.0.1:{port}", pki, require_client_cert=require_client_cert)
    return TansuBroker(port=port, advertised=terminator.address), terminator


async def test_pool_round_trip_over_mutual_tls(pki, run_id, make_traj):
    """Produce, rebuild, fetch and ack through TLS with a client certificate: all 12 come back."""
    security = KafkaSecurity(
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )
    broker, terminator = tls_broker(pki, require_client_cert=True)
    with broker, terminator:
        sent = [make_traj(run_id, s, seq=s) for s in range(12)]
        with TrajectoryProducer(terminator.address, security=security) as producer:
            producer.send_many(sent)
        kafka = KafkaSettings(bootstrap=terminator.address, security=security)
        pool = DataPool(PoolSettings(kafka=kafka, default_policy=RunPolicy(window=1, max_staleness=None)))
        await pool.start()
        try:
            got: list[str] = []
            deadline = time.monotonic() + 60
            while len(got) < len(sent) and time.monotonic() < deadline:
                batch = await pool.fetch(run_id, 5, policy_version=10, timeout_s=1.0)
                got += [t.trajectory_id for t in batch.trajectories]
                if batch.trajectories:
                    await pool.ack(run_id, batch.batch_id)
            assert got == [t.trajectory_id for t in sent]
            assert (await pool.stats(run_id)).acknowledged == len(sent)
        finally:
            await pool.stop()
        assert terminator.handshakes >= 3  # producer, pool producer and consumers, admin: all through TLS
        assert terminator.failed_handshakes == 0


@pytest.mark.parametrize("case", ["untrusted broker certificate", "no client certificate"])
def test_tls_refusals(pki, case):
    """A broker certificate from another CA is refused by the client; mutual TLS refuses a client
    without a certificate. Either way the client fails, and the TLS endpoint saw the handshake fail."""
    if case == "untrusted broker certificate":
        security = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(pki.other_ca))
    else:
        security = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(pki.ca))
    broker, terminator = tls_broker(pki, require_client_cert=case == "no client certificate")
    with broker, terminator:
        with pytest.raises(KafkaError):
            KafkaProducer(**producer_config(terminator.address, "tls-refused", security, **FAIL_FAST))
        assert terminator.failed_handshakes >= 1
        assert terminator.handshakes == 0


def test_kafka_pythons_ssl_context_loads_the_files(pki: Pki, tmp_path: Path) -> None:
    """kafka-python builds its TLS context from exactly these kwargs: a real CA and client pair load,
    a file that is not a certificate fails there (we check existence, kafka-python checks content)."""
    good = KafkaSecurity(
        security_protocol="SSL",
        ssl_cafile=str(pki.ca),
        ssl_certfile=str(pki.client_cert),
        ssl_keyfile=str(pki.client_key),
    )
    config = {**KafkaSSLTransport.DEFAULT_CONFIG, **good.client_kwargs()}
    context = KafkaSSLTransport._build_ssl_context(config)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "forgerl-test-ca"),),)]
    (tmp_path / "junk.crt").write_text("not a certificate")
    junk = KafkaSecurity(security_protocol="SSL", ssl_cafile=str(tmp_path / "junk.crt"))
    with pytest.raises(ssl.SSLError):
        KafkaSSLTransport._build_ssl_context({**KafkaSSLTransport.DEFAULT_CONFIG, **junk.client_kwargs()})


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "tansu exited before it listened"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"tansu did not listen on {port} within {timeout_s:.0f}s")


def test_sasl_scram_reaches_tansu_with_the_configured_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # TansuBroker's readiness probe is a Metadata request, which an authenticating broker refuses
    # before SASL: this broker is started by hand and waited for on its port.
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    log_path = tmp_path / "tansu.log"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url, "--authentication"]
    env = {**os.environ, "RUST_LOG": "tansu_auth=debug,warn", "NO_COLOR": "1"}
    monkeypatch.setenv("FORGERL_TEST_KAFKA_PASSWORD", "not-stored-anywhere")
    security = KafkaSecurity(
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="forgerl-pool",
        sasl_password_env="FORGERL_TEST_KAFKA_PASSWORD",
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_for_port(port, proc)
        bootstrap = f"127.0.0.1:{port}"
        with pytest.raises(KafkaError):  # no credential can exist in this Tansu, so the login fails
            KafkaProducer(**producer_config(bootstrap, "sasl-pool", security, **FAIL_FAST))
        with pytest.raises(KafkaError):
            KafkaProducer(**producer_config(bootstrap, "no-sasl", None, **FAIL_FAST))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    broker_log = log_path.read_text(errors="replace")
    assert 'auth_id="forgerl-pool" mechanism=Scram512' in broker_log
    assert "NotAuthenticated" in broker_log  # the client without SASL was refused
