"""forgerl.rl loads its names lazily: the data pool's windowed FIFO comes without torch."""

import subprocess
import sys

import pytest

import forgerl.rl

pytestmark = pytest.mark.unit


def test_windowed_fifo_imports_without_torch() -> None:
    code = "import sys, forgerl.datapool.pool; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_public_name_resolves() -> None:
    for name in forgerl.rl.__all__:
        assert getattr(forgerl.rl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = forgerl.rl.nothing_here
