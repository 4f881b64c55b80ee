"""Real services for the gateway's integration tests: the gateway itself, scripted inference replicas and a
capturing data pool, each a grpc.aio server on a free 127.0.0.1 port inside the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from forgerl.gateway.testing import ScriptedInference
from forgerl.model.tokenizer import load_tokenizer
from forgerl.rollout.third_party import MINI_SWE_AGENT, ensure_mini_swe_agent_env
from forgerl.runtime.testing import serve_in_process
from forgerl.services.gateway.config import GatewayConfig
from forgerl.services.gateway.main import build
from forgerl.services.gateway.servicer import GatewayServicer
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, gateway_pb2_grpc, inference_pb2_grpc


@dataclass
class ScriptedServer:
    inference: ScriptedInference
    server: grpc.aio.Server
    address: str

    async def kill(self) -> None:
        await self.server.stop(0)


@asynccontextmanager
async def scripted_replicas(n: int, tokenizer_dir: Path, **kwargs: Any) -> AsyncIterator[list[ScriptedServer]]:
    eos = load_tokenizer(tokenizer_dir).eos_token_id
    servers = []
    try:
        for _ in range(n):
            inference = ScriptedInference(eos_id=eos, model_path=str(tokenizer_dir), **kwargs)
            server = grpc.aio.server()
            inference_pb2_grpc.add_InferenceServiceServicer_to_server(inference, server)
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            servers.append(ScriptedServer(inference, server, f"127.0.0.1:{port}"))
        yield servers
    finally:
        for s in servers:
            await s.server.stop(0)


@dataclass
class CapturingDatapool(datapool_pb2_grpc.DatapoolServiceServicer):
    received: list[Any] = field(default_factory=list)
    failures_left: int = 0

    async def PutTrajectories(self, request, context):
        if self.failures_left:
            self.failures_left -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the data pool is restarting")
        self.received.extend(request.trajectories)
        return datapool_pb2.PutTrajectoriesResponse(accepted=len(request.trajectories))


@asynccontextmanager
async def capturing_datapool() -> AsyncIterator[tuple[CapturingDatapool, str]]:
    pool = CapturingDatapool()
    server = grpc.aio.server()
    datapool_pb2_grpc.add_DatapoolServiceServicer_to_server(pool, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield pool, f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


@dataclass
class RunningGateway:
    address: str
    stub: gateway_pb2_grpc.GatewayServiceStub
    servicer: GatewayServicer
    channel: grpc.aio.Channel

    @property
    def base_url(self) -> str:
        return self.servicer.base_url


@asynccontextmanager
async def running_gateway(replicas: list[str], **overrides: Any) -> AsyncIterator[RunningGateway]:
    values: dict[str, Any] = {
        "http_port": 0,
        "inference_replicas": ",".join(replicas),
        "replica_probe_s": 0.2,
        "log_format": "console",
        "grace_s": 1.0,
    }
    values.update(overrides)
    config = GatewayConfig(**values)
    servicer = GatewayServicer(config)
    async with AsyncExitStack() as stack:
        address = await stack.enter_async_context(serve_in_process(build(config, servicer), config))
        channel = grpc.aio.insecure_channel(address)
        stack.push_async_callback(channel.close)
        yield RunningGateway(address, gateway_pb2_grpc.GatewayServiceStub(channel), servicer, channel)


REPO = Path(__file__).resolve().parents[3]
MINI_SWE_AGENT_VENV = REPO / ".forgerl" / "venvs" / MINI_SWE_AGENT.replace("==", "-")


def mini_swe_agent_python() -> Path:
    """$FORGERL_MINI_SWE_AGENT_PYTHON, or the environment built once under .forgerl/venvs."""
    import os

    override = os.environ.get("FORGERL_MINI_SWE_AGENT_PYTHON")
    return Path(override) if override else ensure_mini_swe_agent_env(MINI_SWE_AGENT_VENV)


async def run_mini_swe_agent(
    base_url: str, key: str, workdir: Path, step_limit: int, task: str, max_tokens: int = 256, timeout_s: float = 300.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, saved trajectory) of one mini-swe-agent episode, run as a subprocess in `workdir`."""
    import asyncio
    import json
    import os

    python = mini_swe_agent_python()
    output = workdir / "mini-swe-agent.traj.json"
    script = Path(__file__).with_name("mini_swe_agent_episode.py")
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    process = await asyncio.create_subprocess_exec(
        str(python),
        str(script),
        base_url,
        key,
        str(workdir),
        str(step_limit),
        str(max_tokens),
        task,
        str(output),
        cwd=str(workdir),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        raise
    if process.returncode != 0:
        raise AssertionError(f"mini-swe-agent failed ({process.returncode}):\n{stderr.decode()[-4000:]}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    return summary, json.loads(output.read_text())
