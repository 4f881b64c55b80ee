"""`trainer.parallel`: how the ranks of a training job split the work (torchtitan's ParallelDims, cut to
what ForgeRL trains with).

- `dp_replicate`: groups holding a whole copy of the (sharded) model; gradients are all-reduced between
  them (HSDP's outer dimension; with dp_shard = 1 and ep = 1 it is plain DDP, today's default).
- `dp_shard`: ranks over which FSDP2 shards every parameter (ZeRO-3).
- `ep`: expert parallelism carved out of the dp_shard ranks, as torchtitan does: each of the ep ranks of a
  group holds E / ep whole experts of every MoE layer and exchanges tokens with its peers; the experts
  are then sharded over the remaining efsdp = dp_shard / ep ranks.
- `activation_checkpoint_every`: recompute every n-th decoder layer in backward instead of keeping its
  activations (0: none, 1: every layer).

Every rank is a data-parallel rank (ep does not reduce the number of batch shards): world size =
dp_replicate * dp_shard.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelConfig:
    dp_replicate: int = -1  # -1: whatever dp_shard leaves of the world size
    dp_shard: int = 1  # -1: whatever dp_replicate leaves of the world size
    ep: int = 1
    activation_checkpoint_every: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ParallelConfig:
        """From the `trainer.parallel` mapping of a run file; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"trainer.parallel: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)

    def resolve(self, world_size: int, num_experts: int) -> ResolvedParallel:
        """The layout for `world_size` ranks and a model of `num_experts` experts per MoE layer; raises
        ValueError saying what does not fit and what to change."""
        if world_size < 1:
            raise ValueError(f"world size {world_size}: must be >= 1")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ValueError("trainer.parallel: dp_replicate and dp_shard are both -1; set at most one to -1")
        for name in ("dp_replicate", "dp_shard"):
            value = getattr(self, name)
            if value == 0 or value < -1:
                raise ValueError(f"trainer.parallel.{name} {value}: must be >= 1, or -1 to fill the world size")
        replicate, shard = self.dp_replicate, self.dp_shard
        if replicate == -1:
            replicate, remainder = divmod(world_size, shard)
            if remainder:
                raise ValueError(f"world size {world_size} is not a multiple of trainer.parallel.dp_shard {shard}")
        if shard == -1:
            shard, remainder = divmod(world_size, replicate)
            if remainder:
                raise ValueError(
                    f"world size {world_size} is not a multiple of trainer.parallel.dp_replicate {replicate}"
                )
        if replicate * shard != world_size:
            raise ValueError(
                f"trainer.parallel: dp_replicate {replicate} x dp_shard {shard} = {replicate * shard} ranks, but "
                f"the job has {world_size} (torchrun --nproc-per-node x nodes); make the product equal, or set "
                f"one of them to -1"
            )
        _check_ep(self.ep, shard, num_experts)
        if self.activation_checkpoint_every < 0:
            raise ValueError(
                f"trainer.parallel.activation_checkpoint_every {self.activation_checkpoint_every}: must be >= 0 "
                f"(0 off, 1 every layer, n every n-th layer)"
            )
        return ResolvedParallel(replicate, shard, self.ep, self.activation_checkpoint_every)


def _check_ep(ep: int, dp_shard: int, num_experts: int) -> None:
    if ep < 1:
        raise ValueError(f"trainer.parallel.ep {ep}: must be >= 1 (1: no expert parallelism)")
    if dp_shard % ep:
        raise ValueError(
            f"trainer.parallel.ep {ep} must divide dp_shard {dp_shard}: expert parallelism is carved out of the "
            f"data-sharding ranks (efsdp = dp_shard / ep)"
        )
    if num_experts % ep:
        raise ValueError(
            f"trainer.parallel.ep {ep} must divide the model's {num_experts} experts per layer (each EP rank "
            f"holds the same number of whole experts)"
        )


@dataclass(frozen=True)
class ResolvedParallel:
    """A ParallelConfig checked against a world size: every degree is a positive integer."""

    dp_replicate: int
    dp_shard: int
    ep: int
    activation_checkpoint_every: int

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Ranks over which each EP rank's experts are sharded (torchtitan's dp_shard_mod_ep)."""
        return self.dp_shard // self.ep

    @property
    def uses_fsdp(self) -> bool:
        """FSDP2 for anything but the pure-replica layout, which stays DDP (as the trainer always was)."""
        return self.dp_shard > 1 or self.ep > 1
