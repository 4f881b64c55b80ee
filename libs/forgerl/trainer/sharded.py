"""The trainer's model under a sharded layout (`trainer.parallel` with dp_shard > 1 or ep > 1), built the
way forgerl.distributed does it: the meshes from the layout, the model on the meta device, experts split
over the EP ranks and everything sharded with FSDP2, then materialised (forgerl.distributed.materialize's
layout-independent seeded values, or this rank's rows of `init_checkpoint`). No rank holds the whole model
while it trains; the optimizer is built over the shards afterwards by the caller.

What needs every rank, and what each does:
- state: torch.distributed.checkpoint, each rank its shards of model and AdamW (`save` / `load`; any
  layout resumes it, forgerl.distributed.checkpoint);
- published weights: a Hugging Face checkpoint written from the shards, one tensor gathered at a time
  (forgerl.distributed.export);
- in-process generation (held-out evaluation, `--local-episodes` sampling): forgerl.trainer.sampling
  calls the layers' submodules directly, which FSDP2 shards do not support, so every rank gathers a
  plain replica for it (`replica`). That holds the whole model on each rank: fine for the CPU presets
  these paths serve; at scale, episodes and evaluation go through inference.

MTP growth (`rl.grow_mtp_to`) happens at build time here, not at the start of RL: FSDP2 cannot add
modules to a sharded model. The new modules are copies of module 1 as grow_mtp makes them, and module 1
is the same then and after SFT (SFT gives MTP no gradient and routes no token through it, so neither
AdamW nor the expert-bias update changes it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from forgerl.distributed import ParallelModel, ResolvedParallel, build_meshes, full_state_dict
from forgerl.distributed.checkpoint import load_training_state, save_training_state
from forgerl.distributed.export import export_hf
from forgerl.distributed.load_hf import load_hf_shards
from forgerl.distributed.materialize import build_parallel_model
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def _copy_module(source: nn.Module, target: nn.Module) -> None:
    """`target` := `source`, shard by shard (two MTP modules share their sharding)."""
    sources = [*source.parameters(), *source.buffers()]
    targets = [*target.parameters(), *target.buffers()]
    for src, dst in zip(sources, targets, strict=True):
        _local(dst).copy_(_local(src))


class ShardedModel:
    """The trainer's model, sharded over the ranks of `layout`; `model` is the bare MiniMaxM2ForCausalLM
    (its parameters are shards), `train_model` what forward/backward runs through."""

    def __init__(self, parallel: ParallelModel) -> None:
        self.parallel = parallel
        self._replica: MiniMaxM2ForCausalLM | None = None

    @classmethod
    def build(
        cls, cfg: ModelConfig, layout: ResolvedParallel, seed: int, init_checkpoint: str, mtp_modules: int
    ) -> ShardedModel:
        """`cfg` with `mtp_modules` MTP modules (rl.grow_mtp_to, when above the config's); from
        `init_checkpoint` when given (tensors it lacks keep the seeded values), else seeded values."""
        have = cfg.num_mtp_modules
        if mtp_modules > have and have < 1:
            raise ValueError(f"rl.grow_mtp_to {mtp_modules}: the model has no MTP module to copy")
        full_cfg = cfg.replace(num_mtp_modules=max(have, mtp_modules))
        device = torch.device("cpu")
        parallel = build_parallel_model(full_cfg, build_meshes(layout, device.type), seed, device)
        if init_checkpoint:
            load_hf_shards(parallel, init_checkpoint)
        for k in range(have, full_cfg.num_mtp_modules):
            _copy_module(parallel.model.mtp[0], parallel.model.mtp[k])
        return cls(parallel)

    @property
    def model(self) -> MiniMaxM2ForCausalLM:
        return self.parallel.model

    @property
    def train_model(self) -> nn.Module:
        return self.parallel.train_model

    def save(self, path: Path, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
        save_training_state(path, self.parallel, optimizer, extra)

    def load(self, path: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return load_training_state(path, self.parallel, optimizer)

    def export(self, path: Path, tokenizer: Any) -> None:
        """A Hugging Face checkpoint in float32 (what save_checkpoint writes for the trainer's model)."""
        export_hf(self.parallel, path, tokenizer, dtype=torch.float32)

    def replica(self) -> MiniMaxM2ForCausalLM:
        """A plain copy of the current weights on this rank (a collective: every rank calls it)."""
        state = full_state_dict(self.parallel)
        if self._replica is None:
            with torch.random.fork_rng():  # its throwaway initialisation must not move the run's RNG
                self._replica = MiniMaxM2ForCausalLM(self.model.config)
        self._replica.load_state_dict(state)
        return self._replica


def all_ranks_mean(values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
    """The mean over ranks of `values[key]` for each key present (one all-reduce)."""
    present = [k for k in keys if k in values]
    if not present or not (dist.is_available() and dist.is_initialized()):
        return {k: values[k] for k in present}
    summed = torch.tensor([values[k] for k in present], dtype=torch.float64)
    dist.all_reduce(summed)
    return dict(zip(present, (summed / dist.get_world_size()).tolist(), strict=True))
