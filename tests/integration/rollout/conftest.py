"""Fixtures of the rollout integration tier: local sandboxes (root only) in a throw-away root directory."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rollout_wheels import wheel_from_files, wheelhouse_with_pytest

from forgerl.rollout.sandbox.base import SandboxLimits, TaskEnvironment
from forgerl.rollout.sandbox.environments import EnvironmentBuilder

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


@pytest.fixture(scope="session")
def env_with_pytest() -> Iterator[tuple[EnvironmentBuilder, TaskEnvironment]]:
    """A task environment with pytest and a tiny package (`demo_units`) that the machine's python3 lacks,
    installed from wheels made here (no package index); built once per session (about 8 s)."""
    base = Path("/var/tmp") / f"forgerl-test-envs-{uuid.uuid4().hex[:8]}"
    wheels = base / "wheels"
    pinned_pytest = wheelhouse_with_pytest(wheels)
    wheel_from_files(wheels, "forgerl-demo-units", "1.0", {"demo_units.py": "METRES_PER_KM = 1000\n"})
    builder = EnvironmentBuilder(base / "envs", pip_options=("--no-index", "--find-links", str(wheels)))
    yield builder, TaskEnvironment(python="3", requirements=(pinned_pytest, "forgerl-demo-units==1.0"))
    shutil.rmtree(base, ignore_errors=True)
