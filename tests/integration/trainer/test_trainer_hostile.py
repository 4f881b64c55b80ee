"""Hostile requests to the trainer (issue 24, item 7): a property-based test sends random and mutated requests
to its methods: only clean statuses, and the trainer still serves. StartRun is left out: a random config
that passes validation starts real training on this machine's CPUs (its validation has its own tests)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from forgerl.runtime.fuzz import fuzz_service
from forgerl.runtime.testing import free_port, serve_in_process, serve_in_thread
from forgerl.services.trainer.config import TrainerConfig
from forgerl.services.trainer.main import build
from forgerl.v1 import trainer_pb2

pytestmark = pytest.mark.integration

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]


@pytest.fixture
def trainer(tmp_path: Path) -> Iterator[str]:
    nowhere = f"127.0.0.1:{free_port()}"  # never another topology's default ports
    config = TrainerConfig(
        state_dir=tmp_path / "state",
        runs_dir=str(tmp_path / "runs"),
        rollout_address=nowhere,
        datapool_address=nowhere,
        inference_address=nowhere,
        log_level="warning",
    )
    with serve_in_thread(lambda: serve_in_process(build(config), config)) as address:
        yield address


def test_random_requests_get_clean_statuses(trainer: str) -> None:
    with grpc.insecure_channel(trainer) as channel:
        seen = fuzz_service(
            channel, SERVICE, max_examples=80, timeout_s=5, skip=["StartRun"], subscriptions=["StreamMetrics"]
        )
    assert {key.split()[1] for key in seen} >= {"OK", "NOT_FOUND"}, seen
