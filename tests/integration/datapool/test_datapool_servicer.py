"""DatapoolService over the real gRPC server (in process) on a real broker: the answers and the codes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from forgerl.runtime.client import aio_channel
from forgerl.runtime.testing import serve_in_process
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.datapool.main import build
from forgerl.v1 import datapool_pb2, datapool_pb2_grpc

pytestmark = pytest.mark.integration


async def test_put_fetch_ack_stats_and_errors(broker, run_id, make_traj, tmp_path):
    config = DatapoolConfig(
        kafka_bootstrap=broker.bootstrap,
        max_staleness=1,
        max_lag=40,
        run_policy_from_store=False,
        state_dir=tmp_path,
        grace_s=1.0,
        log_level="warning",
    )
    async with serve_in_process(build(config), config) as address:
        channel = aio_channel(address)
        stub = datapool_pb2_grpc.DatapoolServiceStub(channel)
        fresh = [make_traj(run_id, i, version=10) for i in range(30)]
        stale = [make_traj(run_id, 100 + i, version=7) for i in range(5)]
        put = await stub.PutTrajectories(datapool_pb2.PutTrajectoriesRequest(trajectories=fresh + stale))
        assert put.accepted == 35

        got = []
        dropped = 0
        while len(got) < 30:
            resp = await stub.FetchBatch(
                datapool_pb2.FetchBatchRequest(run_id=run_id, size=16, policy_version=10, timeout_s=2.0)
            )
            assert resp.batch_id
            got += list(resp.trajectories)
            dropped += resp.dropped_stale
            ack = await stub.Ack(datapool_pb2.AckRequest(run_id=run_id, batch_id=resp.batch_id))
            assert ack.committed == len(resp.trajectories)
        assert sorted(t.trajectory_id for t in got) == sorted(t.trajectory_id for t in fresh)
        by_id = {t.trajectory_id: t for t in fresh}
        assert all(t == by_id[t.trajectory_id] for t in got), "served byte for byte as put"
        assert dropped == 5

        stats = await stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id))
        assert (stats.acknowledged, stats.served, stats.dropped_stale, stats.buffered) == (30, 30, 5, 0)

        empty = await stub.FetchBatch(datapool_pb2.FetchBatchRequest(run_id=run_id, size=4, timeout_s=0.1))
        assert empty.batch_id == "" and not empty.trajectories

        async def code(call, request) -> grpc.StatusCode:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(request)
            return err.value.code()

        assert await code(stub.FetchBatch, datapool_pb2.FetchBatchRequest(size=1)) == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            await code(stub.FetchBatch, datapool_pb2.FetchBatchRequest(run_id=run_id, size=0))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        assert (
            await code(stub.Ack, datapool_pb2.AckRequest(run_id=run_id, batch_id="nope-1")) == grpc.StatusCode.NOT_FOUND
        )
        bad = make_traj(run_id, 999)
        bad.ClearField("trajectory_id")
        assert (
            await code(stub.PutTrajectories, datapool_pb2.PutTrajectoriesRequest(trajectories=[bad]))
            == grpc.StatusCode.INVALID_ARGUMENT
        )
        # Backpressure: 45 unacknowledged records is past max_lag=40.
        await stub.PutTrajectories(
            datapool_pb2.PutTrajectoriesRequest(trajectories=[make_traj(run_id, 200 + i) for i in range(45)])
        )
        for _ in range(50):
            if (await stub.GetPoolStats(datapool_pb2.GetPoolStatsRequest(run_id=run_id))).lag >= 40:
                break
            await asyncio.sleep(0.1)
        behind = datapool_pb2.PutTrajectoriesRequest(trajectories=[make_traj(run_id, 300)])
        assert await code(stub.PutTrajectories, behind) == grpc.StatusCode.RESOURCE_EXHAUSTED
        await channel.close()
