"""Device meshes for a ResolvedParallel layout, the torchtitan way: one dense mesh for everything but the
experts, and an expert mesh that carves EP out of the data-sharding ranks.

Ranks are laid out row-major, so rank = r * dp_shard + s with s = f * ep + e:

    dense  ("dp_replicate", "dp_shard")        [R, S]          attention, norms, router, embeddings, head
    expert ("dp_replicate", "efsdp", "ep")     [R, S / ep, ep] experts: split over ep, sharded over efsdp

The ep ranks of a group are consecutive (on one node when ep <= GPUs per node, where the all-to-all is
cheapest), and the dense shard index s of a rank equals its (efsdp, ep) index flattened, so both meshes
see the same data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from forgerl.distributed.config import ResolvedParallel


@dataclass(frozen=True)
class ParallelMeshes:
    layout: ResolvedParallel
    dense: DeviceMesh  # ("dp_replicate", "dp_shard")
    expert: DeviceMesh  # ("dp_replicate", "efsdp", "ep")

    @property
    def expert_fsdp(self) -> DeviceMesh:
        """What fully_shard gets for the experts: replicate over dp_replicate, shard over efsdp."""
        return self.expert["dp_replicate", "efsdp"]

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.expert.get_group("ep")

    @property
    def ep_rank(self) -> int:
        return self.expert.get_local_rank("ep")


def build_meshes(layout: ResolvedParallel, device_type: str) -> ParallelMeshes:
    """Both meshes over the default process group (torch.distributed must be initialised with
    layout.world_size ranks); `device_type` is "cpu" (gloo) or "cuda" (NCCL)."""
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"the layout needs {layout.world_size} ranks (dp_replicate {layout.dp_replicate} x dp_shard "
            f"{layout.dp_shard}) but torch.distributed has {world}"
        )
    dense = init_device_mesh(
        device_type, (layout.dp_replicate, layout.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )
    expert = init_device_mesh(
        device_type, (layout.dp_replicate, layout.efsdp, layout.ep), mesh_dim_names=("dp_replicate", "efsdp", "ep")
    )
    return ParallelMeshes(layout, dense, expert)
