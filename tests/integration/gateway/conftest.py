"""Fixtures of the gateway's integration tier: the gateway service in-process (gRPC admin + HTTP on
127.0.0.1 free ports), scripted inference replicas and a capturing data pool over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_services import scripted_replicas

from forgerl.model.tokenizer import save_tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gateway-tokenizer")
    save_tokenizer(train_tokenizer(), path)
    return path


@pytest.fixture
async def replicas(tokenizer_dir: Path) -> AsyncIterator[list]:
    async with scripted_replicas(2, tokenizer_dir) as running:
        yield running
