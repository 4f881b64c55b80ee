"""Fixtures of the data pool's integration tier: a real Tansu broker on a free 127.0.0.1 port."""

from __future__ import annotations

import uuid

import pytest

from forgerl.datapool.broker import TansuBroker
from forgerl.v1 import trajectory_pb2


@pytest.fixture(scope="module")
def broker():
    with TansuBroker() as b:
        yield b


@pytest.fixture
def run_id() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


def _make_traj(run_id: str, i: int, *, seq: int | None = None, version: int = 10, payload: int = 64):
    """A small trajectory; `payload` generated token ids (4 bytes-ish each)."""
    t = trajectory_pb2.Trajectory(
        schema_version=1,
        trajectory_id=f"{run_id}-t{i}",
        run_id=run_id,
        task_id=f"task-{i // 4}",
        group_id=f"g{i // 4}",
        episode_id=f"e{i}",
        turns=[
            trajectory_pb2.Turn(
                prompt_token_ids=list(range(16)),
                generated_token_ids=[(i * 7 + k) % 50000 for k in range(payload)],
                policy_version=version,
            )
        ],
    )
    if seq is not None:
        t.labels["forgerl/submit_seq"] = str(seq)
    return t


@pytest.fixture
def make_traj():
    return _make_traj
