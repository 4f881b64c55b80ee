"""ForgeRL's Triton kernels: one package per op (float32 reference, Triton variant, public function)."""

from __future__ import annotations

import os

import torch


def require_runtime(x: torch.Tensor, knob: str) -> None:
    """RuntimeError saying what to do when a Triton kernel is asked to run where Triton cannot: on CPU
    tensors without Triton's interpreter (Triton itself says only "0 active drivers")."""
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"{knob} runs a Triton kernel, which needs a GPU, or TRITON_INTERPRET=1 set before Triton is imported "
            f"on the CPU (its interpreter: for tests, slow); here the tensors are on the CPU. Set {knob} to the "
            "torch path in the run config (trainer.moe_backend: torch, trainer.attn_backend: sdpa); a checkpoint "
            "keeps the backends it was trained with in config.json's 'forgerl' block"
        )
