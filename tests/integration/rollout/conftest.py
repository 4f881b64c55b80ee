"""Fixtures of the rollout integration tier: local sandboxes (root only) in a throw-away root directory."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from forgerl.rollout.sandbox.base import SandboxLimits

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)")


@pytest.fixture
def sandbox_root() -> Iterator[Path]:
    # Not under pytest's tmp_path: /tmp/pytest-of-root is 0700, which the sandbox's uid cannot traverse.
    root = Path("/var/tmp") / f"forgerl-test-{uuid.uuid4().hex[:8]}"
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def limits() -> SandboxLimits:
    return SandboxLimits(
        memory_bytes=512 << 20, file_size_bytes=8 << 20, processes=32, cpu_seconds=30, command_timeout_s=60.0
    )
