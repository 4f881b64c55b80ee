"""gRPC front of the data pool: DatapoolService over `forgerl.datapool.manager.DataPool`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from kafka.errors import KafkaError

from forgerl.datapool.feed import KafkaSettings
from forgerl.datapool.manager import AckError, DataPool, PoolBehindError, PoolSettings, RunPolicy, UnknownRun
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc

log = logging.getLogger("forgerl.datapool")

T = TypeVar("T")
MAX_FETCH_TIMEOUT_S = 3600.0  # FetchBatch waits at most an hour for a full batch (the trainer asks for 120 s at most)


def settings_from_config(config: DatapoolConfig) -> PoolSettings:
    return PoolSettings(
        kafka=KafkaSettings(
            bootstrap=config.kafka_bootstrap,
            group_id=config.group_id,
            topic_prefix=config.topic_prefix,
            partitions=config.partitions,
            security=config.kafka_security(),
        ),
        default_policy=RunPolicy(
            window=config.fifo_window, max_staleness=None if config.max_staleness < 0 else config.max_staleness
        ),
        ack_timeout_s=config.ack_timeout_s,
        gap_timeout_s=config.gap_timeout_s,
        max_lag=config.max_lag,
        runs=tuple(r.strip() for r in config.runs.split(",") if r.strip()),
    )


def store_policy_lookup(config: DatapoolConfig) -> Callable[[str], RunPolicy | None]:
    """A run's window and staleness bound from its RunConfig in the run store (None when unknown)."""
    from forgerl.store import Store, default_url

    url = config.database_url or default_url(config.state_dir)
    store: list[Store] = []
    default = settings_from_config(config).default_policy

    def lookup(run_id: str) -> RunPolicy | None:
        if not store:
            store.append(Store.open(url, migrate=False))
        run = store[0].runs.find(run_id)
        if run is None or not run.config.HasField("rl"):
            return None
        rl = run.config.rl
        return RunPolicy(
            window=rl.fifo_window if 0 < rl.fifo_window <= 1 else default.window,
            max_staleness=rl.max_staleness if rl.max_staleness > 0 else default.max_staleness,
        )

    return lookup


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_TRAJECTORIES_TAG = bytes([(2 << 3) | 2])  # FetchBatchResponse.trajectories: field 2, length-delimited


@dataclass(slots=True)
class RawFetchBatchResponse:
    """A FetchBatchResponse whose trajectories are already serialized (the Kafka record values)."""

    batch_id: str
    payloads: list[bytes]
    dropped_stale: int

    def SerializeToString(self) -> bytes:
        head = datapool_pb2.FetchBatchResponse(batch_id=self.batch_id, dropped_stale=self.dropped_stale)
        parts = [head.SerializeToString()]
        for payload in self.payloads:
            parts += (_TRAJECTORIES_TAG, _varint(len(payload)), payload)
        return b"".join(parts)


def _serialize_fetch(response: RawFetchBatchResponse | datapool_pb2.FetchBatchResponse) -> bytes:
    return response.SerializeToString()


def add_to_server(servicer: DatapoolServicer, server: grpc.aio.Server) -> None:
    """The generated registration, with FetchBatch answering from raw trajectory bytes."""
    handlers = {
        "PutTrajectories": grpc.unary_unary_rpc_method_handler(
            servicer.PutTrajectories,
            request_deserializer=datapool_pb2.PutTrajectoriesRequest.FromString,
            response_serializer=datapool_pb2.PutTrajectoriesResponse.SerializeToString,
        ),
        "FetchBatch": grpc.unary_unary_rpc_method_handler(
            servicer.FetchBatch,
            request_deserializer=datapool_pb2.FetchBatchRequest.FromString,
            response_serializer=_serialize_fetch,
        ),
        "Ack": grpc.unary_unary_rpc_method_handler(
            servicer.Ack,
            request_deserializer=datapool_pb2.AckRequest.FromString,
            response_serializer=datapool_pb2.AckResponse.SerializeToString,
        ),
        "GetPoolStats": grpc.unary_unary_rpc_method_handler(
            servicer.GetPoolStats,
            request_deserializer=datapool_pb2.GetPoolStatsRequest.FromString,
            response_serializer=datapool_pb2.GetPoolStatsResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


SERVICE_NAME = "forgerl.v1.DatapoolService"


class DatapoolServicer(datapool_pb2_grpc.DatapoolServiceServicer):
    def __init__(self, pool: DataPool) -> None:
        self.pool = pool

    async def start(self) -> None:
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except PoolBehindError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except UnknownRun as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except AckError as exc:
            code = grpc.StatusCode.NOT_FOUND if exc.code == "unknown" else grpc.StatusCode.FAILED_PRECONDITION
            await context.abort(code, str(exc))
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except (KafkaError, TimeoutError, ConnectionError) as exc:
            log.warning("Kafka unavailable: %s", exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"Kafka is unavailable: {exc!r}; retry")
        except RuntimeError as exc:
            log.exception("data pool failure")
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable")  # context.abort raises

    async def PutTrajectories(
        self, request: datapool_pb2.PutTrajectoriesRequest, context: grpc.aio.ServicerContext
    ) -> datapool_pb2.PutTrajectoriesResponse:
        for i, traj in enumerate(request.trajectories):
            if not traj.trajectory_id or not traj.run_id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"trajectories[{i}]: trajectory_id and run_id are required",
                )
        accepted = await self._call(context, lambda: self.pool.put(list(request.trajectories)))
        return datapool_pb2.PutTrajectoriesResponse(accepted=accepted)

    async def FetchBatch(
        self, request: datapool_pb2.FetchBatchRequest, context: grpc.aio.ServicerContext
    ) -> datapool_pb2.FetchBatchResponse:
        if not request.run_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id is required")
        if request.size <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"size {request.size}: ask for at least one")
        if not 0.0 <= request.timeout_s <= MAX_FETCH_TIMEOUT_S:  # also NaN and inf: a fetch never left
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_s {request.timeout_s}: must be in [0, {MAX_FETCH_TIMEOUT_S:.0f}] seconds",
            )
        timeout_s = request.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:  # answer before the client's deadline, with what is there
            timeout_s = min(timeout_s, max(0.0, remaining - 0.2))
        batch = await self._call(
            context,
            lambda: self.pool.fetch(request.run_id, request.size, request.policy_version, timeout_s),
        )
        # The trajectories go out as they are on Kafka, never parsed and serialized again.
        return RawFetchBatchResponse(batch.batch_id, batch.payloads, batch.dropped_stale)  # type: ignore[return-value]

    async def Ack(
        self, request: datapool_pb2.AckRequest, context: grpc.aio.ServicerContext
    ) -> datapool_pb2.AckResponse:
        if not request.run_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id is required")
        committed = await self._call(context, lambda: self.pool.ack(request.run_id, request.batch_id))
        return datapool_pb2.AckResponse(committed=committed)

    async def GetPoolStats(
        self, request: datapool_pb2.GetPoolStatsRequest, context: grpc.aio.ServicerContext
    ) -> datapool_pb2.GetPoolStatsResponse:
        if not request.run_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "run_id is required")
        s = await self._call(context, lambda: self.pool.stats(request.run_id))
        return datapool_pb2.GetPoolStatsResponse(
            lag=s.lag,
            buffered=s.buffered,
            dropped_stale=s.dropped_stale,
            dead_lettered=s.dead_lettered,
            duplicates=s.duplicates,
            served=s.served,
            acknowledged=s.acknowledged,
            in_flight=s.in_flight,
            redelivered=s.redelivered,
            skipped=s.skipped,
            next_submit_seq=s.next_submit_seq,
        )
