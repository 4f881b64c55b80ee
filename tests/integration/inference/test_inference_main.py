"""The inference process refuses to start without a model, with a message instead of a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "set --model-path or FORGERL_INFERENCE_MODEL_PATH"),
        (["--model-path", "/nonexistent/ckpt"], "'/nonexistent/ckpt' does not exist"),
    ],
)
def test_exits_with_a_message(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "forgerl.services.inference.main", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
