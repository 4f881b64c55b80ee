"""forgerl.deploy.checks' failure paths (its passing paths run in e2e_tests/test_deployment.py and the
chart's helm tests): what it says when a target is malformed, unknown or unreachable."""

from __future__ import annotations

import socket
import time

import pytest

from forgerl.deploy.checks import CheckFailed, main, wait_serving

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    """A loopback port nothing listens on: bound, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_service_fails_after_the_timeout_naming_it() -> None:
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    with pytest.raises(CheckFailed, match=rf"gateway.*{address}: UNREACHABLE"):
        wait_serving({"gateway": address}, timeout_s=1.0, poll_s=0.2)
    assert 1.0 <= time.monotonic() - started < 10.0


def test_unknown_service_is_refused_before_any_call() -> None:
    with pytest.raises(CheckFailed, match=r"unknown services \['gatway'\]"):
        wait_serving({"gatway": "127.0.0.1:1"}, timeout_s=0)


def test_cli_reports_a_malformed_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--timeout", "0", "gateway:50051"]) == 1
    assert "expected service=host:port" in capsys.readouterr().err
