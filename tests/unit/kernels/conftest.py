"""Kernel tests run twice: on CPU under Triton's interpreter (marker unit) and on CUDA (marker gpu).

TRITON_INTERPRET must be set before triton is first imported (triton.jit reads it when a kernel is
decorated), so it is set here, at collection, unless a CUDA device is present: then the kernels compile
for the GPU and the gpu tier covers them. Shared cases and helpers live in kernel_cases.py.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import collections.abc

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread() -> collections.abc.Iterator[None]:
    """The interpreter runs numpy per program; on a shared 2-core box extra torch threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
