"""Load a Hugging Face checkpoint (MiniMax-M2 names, one file or several with an index) straight into the
shards of a parallelised model: each rank reads only its own rows of each tensor (safetensors slices)
and its own experts, so no rank ever holds the whole model; export_hf is the way back.

Every parameter FSDP2 shards is split on dim 0 (`Shard(0)`, replicated over dp_replicate), and an EP
rank's expert stack [El, ...] covers global experts [ep_rank * El, (ep_rank + 1) * El): a rank's rows are
one range along dim 0 of the full tensor, which is what it reads.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from forgerl.distributed.parallelize import ParallelModel
from forgerl.model.checkpoint import name_table


def _weight_files(path: Path) -> dict[str, str]:
    """Checkpoint tensor name -> the file holding it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _row_range(tensor: torch.Tensor, name: str, parallel: ParallelModel) -> tuple[int, int]:
    """[first, last) global dim-0 rows of `name` that this rank holds."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    first = 0
    if isinstance(tensor, DTensor):
        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        first = offset[0] if offset else 0
    if name in parallel.expert_params:
        first += parallel.meshes.ep_rank * tensor.shape[0]
    return first, first + local.shape[0]


def _expected_names(cfg: Any) -> set[str]:
    out: set[str] = set()
    for hf in name_table(cfg).values():
        out.update([hf.format(e=e) for e in range(cfg.num_local_experts)] if "{e}" in hf else [hf])
    return out


def _read_rows(files: dict[str, Any], hf: str, first: int, last: int, whole: bool) -> torch.Tensor | None:
    """Rows [first, last) of `hf` (an expert-stacked name: experts first .. last - 1, stacked), None when
    the checkpoint lacks any of them."""
    if "{e}" in hf:
        names = [hf.format(e=e) for e in range(first, last)]
        if any(n not in files for n in names):
            return None
        return torch.stack([files[n].get_tensor(n) for n in names])
    if hf not in files:
        return None
    return files[hf].get_tensor(hf) if whole else files[hf].get_slice(hf)[first:last]


@torch.no_grad()
def load_hf_shards(parallel: ParallelModel, path: str | Path) -> list[str]:
    """Copy this rank's part of every tensor from the checkpoint at `path` into the (materialised) model;
    returns the names of our tensors the checkpoint lacks (they keep their values), MTP modules past the
    checkpoint's `num_mtp_modules` aside. Tensors the model has no place for are an error, as in
    load_checkpoint."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    if hf_config.get("quantization_config"):
        raise ValueError(
            f"{path} is quantized (FP8 blocks): load it into a sharded layout after dequantizing it with "
            "forgerl.model.load_checkpoint and save_checkpoint, or train it without trainer.parallel"
        )
    model = parallel.model
    weight_files = _weight_files(path)
    unexpected = sorted(set(weight_files) - _expected_names(model.config))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors the model has no place for, e.g. {unexpected[:5]}")
    # MTP modules past the checkpoint's are left alone (the trainer grows them as copies of module 1).
    table = name_table(model.config.replace(num_mtp_modules=min(len(model.mtp), hf_config.get("num_mtp_modules", 0))))
    targets = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    missing: list[str] = []
    with ExitStack() as stack:
        opened = {f: stack.enter_context(safe_open(str(path / f), "pt")) for f in set(weight_files.values())}
        files = {name: opened[f] for name, f in weight_files.items()}
        for ours, hf in table.items():
            target = targets[ours]
            first, last = _row_range(target, ours, parallel)
            rows = _read_rows(files, hf, first, last, whole=not isinstance(target, DTensor))
            if rows is None:
                missing.append(ours)
                continue
            local = target.to_local() if isinstance(target, DTensor) else target
            local.copy_(rows)
    return missing
