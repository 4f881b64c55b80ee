"""Apply a layout to a MiniMaxM2ForCausalLM: DDP, or expert parallelism + FSDP2 (+ activation
checkpointing); and the two things that must see every shard: the gradient norm and the full state dict.

FSDP2 units as torchtitan has them: the experts of each MoE layer (over the expert mesh, when ep > 1),
each decoder layer and MTP module (over the dense mesh), the root (embedding, final norm, head). With ep
> 1 the experts' FSDP2 group is only efsdp x dp_replicate ranks, but their gradients hold the tokens of
all world ranks (the all-to-all brought them), so they are divided by the world size like every other
gradient (`set_gradient_divide_factor`, as torchtitan's fsdp_gradient_divide_factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from forgerl.distributed.expert_parallel import apply_expert_parallel
from forgerl.distributed.mesh import ParallelMeshes, build_meshes
from forgerl.model.model import MiniMaxM2ForCausalLM
from forgerl.model.sharding import apply_ddp


@dataclass
class ParallelModel:
    """`train_model` runs forward/backward (the DDP wrapper, or the FSDP2 root = `model` itself); `model`
    is the bare MiniMaxM2ForCausalLM whose parameters are now shards."""

    model: MiniMaxM2ForCausalLM
    train_model: nn.Module
    meshes: ParallelMeshes
    expert_params: frozenset[str] = frozenset()  # names of the parameters split over the EP group


def apply_parallelism(
    model: MiniMaxM2ForCausalLM,
    meshes: ParallelMeshes,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    find_unused_parameters: bool = False,
) -> ParallelModel:
    """Wrap or shard `model` in place for `meshes.layout`. param_dtype/reduce_dtype: FSDP2 mixed
    precision (bf16 with float32 reduce on GPU; None keeps the parameters' dtype, float32 on CPU)."""
    layout = meshes.layout
    apply_activation_checkpointing(model, layout.activation_checkpoint_every)
    if not layout.uses_fsdp:
        return ParallelModel(model, apply_ddp(model, find_unused_parameters=find_unused_parameters), meshes)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    expert_params: frozenset[str] = frozenset()
    if layout.ep > 1:
        expert_params = frozenset(name for name, _ in model.named_parameters() if ".experts." in name)
        for experts in apply_expert_parallel(model, meshes.ep_rank, layout.ep, meshes.ep_group):
            unit = fully_shard(experts, mesh=meshes.expert_fsdp, mp_policy=mp)
            unit.set_gradient_divide_factor(float(layout.world_size))
            if meshes.expert.device_type == "cpu" and layout.efsdp > 1:
                # A factor other than the group size is NCCL's PREMUL_SUM, which gloo lacks ("Cannot use
                # ReduceOp.PREMUL_SUM with Gloo", torch 2.13): sum, then divide. Not with efsdp = 1: FSDP2
                # then skips the reduce-scatter and divides in its copy, and would divide a second time.
                unit.set_force_sum_reduction_for_comms(True)
    for block in [*model.model.layers, *model.mtp]:
        fully_shard(block, mesh=meshes.dense, mp_policy=mp)
    fully_shard(model, mesh=meshes.dense, mp_policy=mp)
    register_fsdp_forward_method(model, "mtp_loss")
    return ParallelModel(model, model, meshes, expert_params)


def apply_activation_checkpointing(model: MiniMaxM2ForCausalLM, every: int) -> None:
    """Recompute every `every`-th decoder layer in backward (non-reentrant checkpoint around the layer's
    forward, so its FSDP2 hooks and module names are untouched)."""
    if every <= 0:
        return
    for index, layer in enumerate(model.model.layers):
        if index % every == 0:
            layer.forward = _checkpointed(layer.forward)


def _checkpointed(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _replicas(param: torch.Tensor) -> int | None:
    """How many ranks hold the same shard of a sharded parameter (its mesh's dp_replicate size), None for
    a plain parameter that every rank holds whole (single process or DDP)."""
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        names = mesh.mesh_dim_names or ()
        return mesh.size(names.index("dp_replicate")) if "dp_replicate" in names else 1
    return None


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2) for any layout: plain, DDP, FSDP2 shards on several meshes,
    expert slices. Every rank must call it (it all-reduces the sharded part once)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    whole = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros((), dtype=torch.float64)
    any_sharded = False
    for param in params:
        assert param.grad is not None
        square = _local(param.grad).detach().double().pow(2).sum().cpu()
        replicas = _replicas(param)
        if replicas is None:
            whole += square
        else:
            any_sharded = True
            # Each distinct shard is held by `replicas` ranks: the world sum counts it that often.
            sharded += square / replicas
    if any_sharded and dist.is_available() and dist.is_initialized():
        total_sharded = sharded.to(_local(params[0]).device)
        dist.all_reduce(total_sharded)
        sharded = total_sharded.cpu()
    total = math.sqrt(float(whole + sharded))
    coef = min(1.0, max_norm / (total + 1e-6))  # torch's clip coefficient, clamped at 1
    for param in params:
        assert param.grad is not None
        _local(param.grad).mul_(coef)
    return torch.tensor(total, dtype=torch.float64)


@torch.no_grad()
def full_state_dict(parallel: ParallelModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole, on every rank (FSDP2 shards gathered, expert slices gathered over
    their EP group). For checks and small models: it materialises the full model on each rank."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in parallel.model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if name in parallel.expert_params:
            group = parallel.meshes.ep_group
            parts = [torch.empty_like(full) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, full.contiguous(), group=group)
            full = torch.cat(parts)  # EP rank r holds experts [r*El, (r+1)*El)
        out[name] = full.detach().clone()
    return out


__all__ = [
    "ParallelModel",
    "apply_activation_checkpointing",
    "apply_parallelism",
    "build_meshes",
    "clip_grad_norm_",
    "full_state_dict",
]
