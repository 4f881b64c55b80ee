"""Kernel tests run twice: on CPU under Triton's interpreter (marker unit) and on CUDA (marker gpu).

TRITON_INTERPRET must be set before our kernels are imported (triton.jit reads it when a kernel is
decorated), so it is set here, at collection, unless a CUDA device is present: then the kernels compile
for the GPU and the gpu tier covers them. Once collection is done it is put back, so that the rest of a
whole-suite run (vLLM subprocesses, other areas) never sees it, and set again around each kernel test
(the launchers read it to pick interpreter-safe tiles). Shared cases and helpers live in kernel_cases.py.
"""

import os

import torch

_WE_SET_INTERPRET = not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
if _WE_SET_INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402


def pytest_collection_finish(session: pytest.Session) -> None:
    if _WE_SET_INTERPRET:
        os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if _WE_SET_INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
