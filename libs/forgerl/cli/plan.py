"""`forgerl plan`: the mesh and per-GPU memory a GPU pool would train a model preset with."""

from __future__ import annotations

from typing import Annotated

import typer

from forgerl.distributed.planner import parse_bytes, plan, render
from forgerl.model.config import PRESETS, ModelConfig


def plan_command(
    model: Annotated[str, typer.Option("--model", help=f"A model preset: {', '.join(PRESETS)}.")] = "minimax-m2",
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs in the pool (the job's world size).")] = 64,
    gpu_memory: Annotated[str, typer.Option("--gpu-memory", help="Memory of one GPU, e.g. 80GiB.")] = "80GiB",
    seq: Annotated[int, typer.Option("--seq", help="Tokens per GPU per step (one sequence).")] = 131072,
    ep: Annotated[int | None, typer.Option("--ep", help="Expert parallel degree (default: chosen).")] = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="Largest EP degree chosen.")] = 8,
) -> None:
    """Print the mesh, per-GPU memory and all-to-all volume; exit 1 when it does not fit even with
    activation checkpointing."""
    result = plan(ModelConfig.from_preset(model), gpus, parse_bytes(gpu_memory), seq, gpus_per_node, ep)
    typer.echo(render(model, seq, result))
    if not result.fits(checkpointing=True):
        raise typer.Exit(1)
