"""The main job's short form with FORGERL_AUTH_TOKEN set (issue 24, item 4): every internal client sends the
token, streaming calls included (gateway -> inference Generate is unary-stream), so the run finishes through
the real services; anonymous and wrong-token calls are refused, and /metrics takes the token when
`metrics_auth` is on."""

from __future__ import annotations

import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from short_run import FORGERL, cli_env, short_main_job

from forgerl.local.topology import SERVICES, LocalTopology
from forgerl.runtime.client import health_status, insecure_channel
from forgerl.v1 import trainer_pb2, trainer_pb2_grpc

pytestmark = pytest.mark.e2e

TOKEN = "e2e-auth-token"


def _forgerl(env: dict[str, str], *args: str, timeout: float) -> str:
    proc = subprocess.run([*FORGERL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"forgerl {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _metrics_status(url: str, token: str | None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_main_job_short_form_runs_to_the_end_with_auth_on(topology_file: Path, tmp_path: Path) -> None:
    topology = LocalTopology.load(topology_file)
    runs = tmp_path / "runs"
    env = {**cli_env(runs), "FORGERL_AUTH_TOKEN": TOKEN, "FORGERL_METRICS_AUTH": "true"}
    config = short_main_job(tmp_path, rl_steps=2)
    try:
        _forgerl(env, "up", "--detach", "--config", str(topology_file), timeout=600)
        trainer = topology.address("trainer")
        assert health_status(trainer) == "SERVING"  # health stays open for probes
        for token in (None, "wrong"):
            with insecure_channel(trainer, token) as channel, pytest.raises(grpc.RpcError) as err:
                trainer_pb2_grpc.TrainerServiceStub(channel).ListRuns(trainer_pb2.ListRunsRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        metrics = f"http://{topology.host}:{topology.metrics_base_port + SERVICES.index('inference')}/metrics"
        assert [_metrics_status(metrics, t) for t in (None, "wrong", TOKEN)] == [401, 401, 200]

        args = ["run", "start", str(config), "--topology", str(topology_file), "--runs-dir", str(runs)]
        out = _forgerl(env, *args, timeout=900)
    finally:
        subprocess.run([*FORGERL, "down", "--config", str(topology_file)], capture_output=True, timeout=120, env=env)

    match = re.search(r"run (\S+): succeeded", out)
    assert match, out
    assert (runs / match.group(1) / "report" / "summary.json").exists(), out
    logs = "".join((topology.logs_dir / f"{name}.log").read_text() for name in SERVICES)
    assert "missing bearer token" not in logs and "UNAUTHENTICATED" not in logs
