"""Device parameters and the error measure shared by the kernel tests (conftest.py sets the interpreter)."""

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

DEVICES = [
    pytest.param(
        "cpu",
        marks=[pytest.mark.unit, pytest.mark.skipif(not INTERPRETED, reason="CUDA present: the gpu tier runs these")],
    ),
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(INTERPRETED or not torch.cuda.is_available(), reason="needs a GPU")],
    ),
]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error ||a - e|| / ||e|| in float64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
