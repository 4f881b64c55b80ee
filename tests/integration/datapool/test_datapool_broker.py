"""The Tansu launcher: free port, readiness by a real Metadata request, clean stop, restart on the same port."""

from __future__ import annotations

import os

import pytest

from forgerl.datapool.broker import TansuBroker, free_port, kafka_metadata_ok

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_start_stop_kill_restart(tmp_path):
    broker = TansuBroker(log_path=tmp_path / "tansu.log")
    assert not kafka_metadata_ok("127.0.0.1", broker.port)
    with broker:
        pid = broker.pid
        assert pid is not None and broker.running
        assert kafka_metadata_ok("127.0.0.1", broker.port)
        port = broker.port
        broker.kill()
        assert not _alive(pid) and not broker.running
        broker.start()
        assert broker.port == port and kafka_metadata_ok("127.0.0.1", port)
        pid = broker.pid
    assert pid is not None and not _alive(pid)
    assert "tansu" in (tmp_path / "tansu.log").read_text()


def test_metadata_probe_rejects_non_kafka():
    port = free_port()
    assert not kafka_metadata_ok("127.0.0.1", port, timeout_s=0.5)
