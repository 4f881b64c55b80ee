"""Distributed training checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own
shards of the model and optimizer state in parallel, and any layout can read them back (save on 4 ranks
with EP 2, resume on 2 ranks with EP 2 or without EP: DCP reads the byte ranges each new shard needs).

Layout on disk (one directory per checkpoint):
    <dir>/.metadata        DCP's index: every tensor's global shape and which file holds which chunk
    <dir>/__<rank>_0.distcp  each rank's shards of "model" (parameters, routing bias) and "optim" (AdamW)
    <dir>/extra.pt         what the caller adds (counters, data-pool offsets, RNG states), written by rank 0

FSDP2 parameters are DTensors already; DCP saves their shards by global offset. Expert parameters under
EP are not: each EP rank's DTensor covers only its El = E / ep experts (sharded over efsdp), so they are
re-described here as one [E, ...] DTensor on a ("dp_replicate", "ep", "efsdp") mesh, sharded on dim 0 by
ep and then efsdp -- exactly where each rank's rows sit in the full stack -- and DCP sees one tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from forgerl.distributed.parallelize import ParallelModel

StateDicts = tuple[dict[str, Any], dict[str, Any]]


def _expert_checkpoint_mesh(parallel: ParallelModel) -> DeviceMesh | None:
    if not parallel.expert_params:
        return None
    layout = parallel.meshes.layout
    ranks = torch.arange(layout.world_size).view(layout.dp_replicate, layout.efsdp, layout.ep).transpose(1, 2)
    device_type = parallel.meshes.expert.device_type
    return DeviceMesh(device_type, ranks, mesh_dim_names=("dp_replicate", "ep", "efsdp"))


def _to_global(tensor: DTensor, mesh: DeviceMesh, ep: int) -> DTensor:
    """An EP rank's expert DTensor [El, ...] (on the efsdp mesh) as its shard of the whole [E, ...]."""
    shape = torch.Size((tensor.shape[0] * ep, *tensor.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    placements = (Replicate(), Shard(0), Shard(0))
    return DTensor.from_local(tensor.to_local(), mesh, placements, run_check=False, shape=shape, stride=stride)


def _to_local_layout(loaded: DTensor, like: DTensor) -> DTensor:
    """Back from the whole-stack description to the EP rank's own DTensor (same local rows)."""
    return DTensor.from_local(
        loaded.to_local(), like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def _map_experts(
    parallel: ParallelModel, state: StateDicts, like: StateDicts, convert: Callable[[DTensor, DTensor], DTensor]
) -> StateDicts:
    """`state` with every expert parameter and its optimizer moments replaced by convert(it, its
    counterpart in `like`)."""
    model_sd, optim_sd = state
    model_sd = dict(model_sd)
    optim_sd = {**optim_sd, "state": {k: dict(v) for k, v in optim_sd.get("state", {}).items()}}
    for name in parallel.expert_params:
        model_sd[name] = convert(model_sd[name], like[0][name])
        for key, value in optim_sd["state"].get(name, {}).items():
            if isinstance(value, DTensor):
                optim_sd["state"][name][key] = convert(value, like[1]["state"][name][key])
    return model_sd, optim_sd


def _global_state(parallel: ParallelModel, optimizer: torch.optim.Optimizer) -> tuple[StateDicts, StateDicts]:
    """(the state dicts as DCP must see them, the state dicts of this layout)."""
    local = get_state_dict(parallel.model, optimizer)
    mesh = _expert_checkpoint_mesh(parallel)
    if mesh is None:
        return local, local
    ep = parallel.meshes.layout.ep
    return _map_experts(parallel, local, local, lambda t, _like: _to_global(t, mesh, ep)), local


def save_training_state(
    path: str | Path, parallel: ParallelModel, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> None:
    """Every rank calls it; returns when the checkpoint is complete on disk."""
    path = Path(path)
    (model_sd, optim_sd), _ = _global_state(parallel, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        torch.save(extra, path / "extra.pt")
    dist.barrier()


def load_training_state(path: str | Path, parallel: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Into an already parallelised model and its optimizer, whatever layout saved it; returns `extra`."""
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{path} is not a distributed checkpoint (no .metadata); pass the step directory")
    (model_sd, optim_sd), (local_model, local_optim) = _global_state(parallel, optimizer)
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if parallel.expert_params:
        model_sd, optim_sd = _map_experts(parallel, (model_sd, optim_sd), (local_model, local_optim), _to_local_layout)
    set_state_dict(parallel.model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
    return dict(torch.load(path / "extra.pt", weights_only=False))
