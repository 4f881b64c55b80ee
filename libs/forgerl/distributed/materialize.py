"""Build on the meta device, shard, then materialise: no rank ever allocates the whole model.

The weights come from `seeded_init_`, whose values do not depend on the layout: slice i along dim 0 of
parameter `name` (a row of a matrix, one expert of a stacked [E, ...] tensor) is drawn from its own
generator seeded by (seed, crc32(name), i), N(0, initializer_range) as MiniMaxM2ForCausalLM's
reset_parameters, norms ones, routing biases zero. So each rank draws only the rows it holds, and a
single-device model given `seeded_init_` holds exactly the gathered shards. The price: one generator per
row (about 1 s per 10^5 rows on a CPU core; the M2 embedding has 200k).
"""

from __future__ import annotations

import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from forgerl.distributed.mesh import ParallelMeshes
from forgerl.distributed.parallelize import ParallelModel, apply_parallelism
from forgerl.model.config import ModelConfig
from forgerl.model.model import MiniMaxM2ForCausalLM
from forgerl.model.moe import SparseMoeBlock


def _first_row(param: torch.Tensor, name: str, expert_params: frozenset[str], ep_rank: int) -> int:
    """Global dim-0 index of this rank's first local row of `param`."""
    offset = 0
    if isinstance(param, DTensor):
        _, global_offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        offset = global_offset[0] if global_offset else 0
    if name in expert_params:
        offset += ep_rank * param.shape[0]  # this EP rank's experts start at ep_rank * El
    return offset


@torch.no_grad()
def seeded_init_(
    model: MiniMaxM2ForCausalLM, seed: int, expert_params: frozenset[str] = frozenset(), ep_rank: int = 0
) -> None:
    """Initialise every parameter (whole, or this rank's shard) and reset the routing buffers."""
    std = model.config.initializer_range
    for name, param in model.named_parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if name.endswith("norm.weight"):
            local.fill_(1.0)
            continue
        first = _first_row(param, name, expert_params, ep_rank)
        name_key = zlib.crc32(name.encode())
        for i in range(local.shape[0]):
            g = torch.Generator().manual_seed(seed * 1_000_003 + name_key * 65_537 + first + i)
            local[i].copy_(torch.randn(local.shape[1:], generator=g, dtype=torch.float32) * std)
    for module in model.modules():
        if isinstance(module, SparseMoeBlock):
            module.e_score_correction_bias.zero_()
            module.tokens_per_expert.zero_()


def build_parallel_model(cfg: ModelConfig, meshes: ParallelMeshes, seed: int, device: torch.device) -> ParallelModel:
    """The model for `meshes.layout`, sharded before any weight exists. DDP (a whole replica per rank by
    definition) is built on `device` directly."""
    if not meshes.layout.uses_fsdp:
        with device:
            model = MiniMaxM2ForCausalLM(cfg)
        seeded_init_(model, seed)
        return apply_parallelism(model.train(), meshes)
    with torch.device("meta"):
        model = MiniMaxM2ForCausalLM(cfg)
    parallel = apply_parallelism(model.train(), meshes)
    model.to_empty(device=device)
    ep_rank = meshes.ep_rank if parallel.expert_params else 0
    seeded_init_(model, seed, parallel.expert_params, ep_rank)
    return parallel


def local_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in model.parameters())
