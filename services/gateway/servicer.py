"""gRPC admin API of the gateway (OpenEpisode, CloseEpisode, GetEpisode) and the life cycle of the whole
service: the tokenizer, the inference replicas and the HTTP server start in `start`, before SERVING."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from forgerl.gateway.app import GatewayApp, HttpServer
from forgerl.gateway.chat import ChatFormat
from forgerl.gateway.formats import prepare_parsers
from forgerl.gateway.routing import GrpcReplica, ReplicaDown, Router
from forgerl.gateway.service import EpisodeInfo, GatewayCore, GatewaySettings, TrajectoryReleased
from forgerl.runtime.client import aio_channel
from forgerl.services.gateway.config import GatewayConfig
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc, gateway_pb2, gateway_pb2_grpc, trajectory_pb2

logger = logging.getLogger(__name__)


def settings_from_config(config: GatewayConfig) -> GatewaySettings:
    return GatewaySettings(
        model_name=config.model_name,
        max_model_len=config.max_model_len,
        default_max_tokens=config.default_max_tokens,
        return_routed_experts=config.return_routed_experts,
        close_wait_s=config.close_wait_s,
        closed_retention=config.closed_retention,
        closed_trajectories=config.closed_trajectories,
        episode_idle_ttl_s=config.episode_idle_ttl_s,
    )


class DatapoolPublisher:
    """Hands closed trajectories to the data pool's PutTrajectories."""

    def __init__(self, address: str, token: str | None, timeout_s: float = 30.0) -> None:
        self.address = address
        self.channel = aio_channel(address, token)
        self.stub = datapool_pb2_grpc.DatapoolServiceStub(self.channel)
        self.timeout_s = timeout_s

    async def __call__(self, trajectory: trajectory_pb2.Trajectory) -> None:
        await self.stub.PutTrajectories(
            datapool_pb2.PutTrajectoriesRequest(trajectories=[trajectory]), timeout=self.timeout_s
        )

    async def close(self) -> None:
        await self.channel.close()


async def tokenizer_path(config: GatewayConfig, router: Router) -> str:
    """The configured tokenizer directory, or the model path an inference replica reports (waiting for one)."""
    if config.tokenizer_path:
        return config.tokenizer_path
    deadline = time.monotonic() + config.startup_timeout_s
    errors: dict[str, str] = {}
    while True:
        for address, replica in router.replicas.items():
            try:
                status = await replica.client.status(timeout_s=2.0)
            except ReplicaDown as err:
                errors[address] = str(err)
                continue
            if status.model_path:
                return status.model_path
            errors[address] = "it reports no model_path"
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"no inference replica reported its model within {config.startup_timeout_s:.0f} s "
                f"({'; '.join(f'{a}: {e}' for a, e in errors.items())}); set --tokenizer-path to start without one"
            )
        await asyncio.sleep(1.0)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.core: GatewayCore | None = None
        self.http: HttpServer | None = None
        self.router: Router | None = None
        self.publisher: DatapoolPublisher | None = None
        self._expiry: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        if self.config.public_base_url:
            return self.config.public_base_url.rstrip("/")
        assert self.http is not None
        return self.http.base_url

    async def start(self) -> None:
        from forgerl.model.tokenizer import load_tokenizer

        config = self.config
        self.router = Router(
            [GrpcReplica(address, config.auth_token) for address in config.replica_addresses()],
            probe_interval_s=config.replica_probe_s,
        )
        path = await tokenizer_path(config, self.router)
        fmt = ChatFormat(await asyncio.to_thread(load_tokenizer, path))
        await asyncio.to_thread(prepare_parsers, fmt)  # vLLM's parsers import in seconds: not in a request
        if config.datapool_address:
            self.publisher = DatapoolPublisher(config.datapool_address, config.auth_token)
        self.core = GatewayCore(fmt, self.router, settings_from_config(config), self.publisher)
        app = GatewayApp(self.core, config.max_request_bytes)
        self.http = HttpServer(app.app, config.host, config.http_port, config.grace_s, config.log_level)
        await self.http.start()
        self.router.start()
        if config.episode_idle_ttl_s:
            self._expiry = asyncio.create_task(self._expire_idle(self.core, config.episode_idle_ttl_s))
        logger.info(
            "gateway serving %s for replicas %s (tokenizer %s)", self.base_url, ", ".join(self.router.addresses), path
        )

    @staticmethod
    async def _expire_idle(core: GatewayCore, ttl_s: float) -> None:
        while True:  # an episode lives at most ttl_s plus a quarter of it (a minute at most) past its last request
            await asyncio.sleep(min(ttl_s / 4, 60.0))
            core.expire_idle()

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.http is not None:
            await self.http.stop()
        if self.router is not None:
            await self.router.close()
        if self.publisher is not None:
            await self.publisher.close()

    def failure(self) -> str | None:
        """The agents' HTTP API is what the gateway is for: NOT_SERVING once its server task has ended."""
        task = getattr(self.http, "task", None)
        if task is not None and task.done():
            error = None if task.cancelled() else task.exception()
            return f"the HTTP server on port {self.config.http_port} stopped ({error!r})"
        return None

    async def _core(self, context: grpc.aio.ServicerContext) -> GatewayCore:
        if self.core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the gateway is still starting: retry shortly")
        assert self.core is not None
        return self.core

    async def OpenEpisode(
        self, request: gateway_pb2.OpenEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.OpenEpisodeResponse:
        core = await self._core(context)
        episode = core.open_episode(
            EpisodeInfo(
                run_id=request.run_id,
                task_id=request.task_id,
                group_id=request.group_id,
                scaffold_version=request.scaffold_version,
                strip_reasoning=request.strip_reasoning,
                suite=request.suite,
                split=request.split,
                labels=dict(request.labels),
            )
        )
        return gateway_pb2.OpenEpisodeResponse(episode_id=episode.id, episode_key=episode.key, base_url=self.base_url)

    async def CloseEpisode(
        self, request: gateway_pb2.CloseEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CloseEpisodeResponse:
        core = await self._core(context)
        if not request.episode_key:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "episode_key is empty: send OpenEpisode's key")
        episode = core.find(request.episode_key)
        if episode is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown episode key (never opened, or closed long ago)")
        assert episode is not None
        if request.publish and not episode.closed and not episode.info.run_id and core.publisher is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"episode {episode.id} has no run_id, which the data pool needs: close it with publish=false",
            )
        try:
            trajectory = await core.close_episode(
                request.episode_key,
                step_rewards=list(request.step_rewards),
                reward=request.reward if request.HasField("reward") else None,
                success=request.success,
                wall_clock_s=request.wall_clock_s,
                baseline_s=request.baseline_s,
                publish=request.publish,
            )
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except TrajectoryReleased as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except grpc.aio.AioRpcError as err:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the data pool did not take the trajectory ({err.code().name}: {err.details()}); the episode "
                "stays open with everything recorded: retry CloseEpisode",
            )
        if request.publish and core.publisher is None:
            logger.warning("episode %s: publish asked but no datapool_address is set; not published", episode.id)
        return gateway_pb2.CloseEpisodeResponse(trajectory=trajectory)

    async def GetEpisode(
        self, request: gateway_pb2.GetEpisodeRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetEpisodeResponse:
        core = await self._core(context)
        episode = core.find(request.episode_key)
        if episode is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown episode key (never opened, or closed long ago)")
        assert episode is not None
        return gateway_pb2.GetEpisodeResponse(
            episode_id=episode.id,
            turns=episode.turn_count,
            generated_tokens=episode.generated_tokens,
            replica=episode.route.replica or (episode.route.history[-1] if episode.route.history else ""),
            closed=episode.closed,
        )
