"""Hugging Face export straight from the shards: MiniMax-M2 names, sharded safetensors files and
`model.safetensors.index.json`, without gathering the model on one rank.

Who writes what: rank 0 the dense tensors (each gathered from its FSDP2 shards one at a time), and each
EP rank of the first efsdp/replica group (ranks 0 .. ep-1) its own experts, as `...experts.{e}...` with e
its global expert ids. Each writer flushes a file when the next tensor would pass `max_shard_bytes`, so a
rank holds at most one file's worth plus one tensor. The files get their `model-0000i-of-0000n` names
once every writer's count is known; rank 0 then writes the index, config.json and the tokenizer. The
directory must be on storage every rank sees (as for the DCP checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from forgerl.distributed.parallelize import ParallelModel
from forgerl.model.checkpoint import config_to_hf, name_table


def _my_tensors(parallel: ParallelModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of what this rank writes. Every rank walks every tensor: the gathers are
    collectives over the tensor's mesh."""
    model, rank = parallel.model, dist.get_rank()
    ep = parallel.meshes.layout.ep
    ep_rank = parallel.meshes.ep_rank if parallel.expert_params else 0
    state = model.state_dict()
    for ours, hf in name_table(model.config).items():
        tensor = state[ours]
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        is_expert_slice = ours in parallel.expert_params
        if (rank >= ep) if is_expert_slice else (rank != 0):
            continue
        full = full.detach().to(device="cpu", dtype=dtype if full.is_floating_point() else full.dtype)
        if "{e}" not in hf:
            yield hf, full.contiguous()
            continue
        first = ep_rank * full.shape[0] if is_expert_slice else 0
        for i in range(full.shape[0]):
            yield hf.format(e=first + i), full[i].clone()  # own storage: safetensors refuses shared views


def _write_files(
    path: Path, tensors: Iterator[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> list[tuple[list[str], int]]:
    """Write this rank's tensors as `part-r<rank>-<i>.safetensors`; returns each file's tensor names and
    tensor bytes."""
    rank = dist.get_rank()
    files: list[tuple[list[str], int]] = []
    pending: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal pending, size
        if pending:
            save_file(pending, str(path / f"part-r{rank}-{len(files)}.safetensors"), metadata={"format": "pt"})
            files.append((sorted(pending), size))
        pending, size = {}, 0

    for name, tensor in tensors:
        if pending and size + tensor.nbytes > max_shard_bytes:
            flush()
        pending[name] = tensor
        size += tensor.nbytes
    flush()
    return files


def export_hf(
    parallel: ParallelModel,
    path: str | Path,
    tokenizer: Any | None = None,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Every rank calls it; returns when the checkpoint is complete on disk."""
    path = Path(path)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    mine = _write_files(path, _my_tensors(parallel, dtype), max_shard_bytes)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    total_files = sum(len(files) for files in everyone)
    number = sum(len(files) for files in everyone[: dist.get_rank()])
    for i in range(len(mine)):
        number += 1
        (path / f"part-r{dist.get_rank()}-{i}.safetensors").rename(
            path / f"model-{number:05d}-of-{total_files:05d}.safetensors"
        )
    dist.barrier()
    if dist.get_rank() == 0:
        _write_index(path, everyone, total_files, parallel, tokenizer, dtype)
    dist.barrier()
    return path


def _write_index(
    path: Path,
    everyone: list[Any],
    total_files: int,
    parallel: ParallelModel,
    tokenizer: Any | None,
    dtype: torch.dtype,
) -> None:
    weight_map: dict[str, str] = {}
    number = 0
    total = 0
    for files in everyone:
        for names, size in files:
            number += 1
            weight_map.update(dict.fromkeys(names, f"model-{number:05d}-of-{total_files:05d}.safetensors"))
            total += size
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = parallel.model.config
    if tokenizer is not None and cfg.eos_token_id is None:  # as save_checkpoint: servers stop at end of turn
        cfg = cfg.replace(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    if tokenizer is not None:
        from forgerl.model.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, path)
