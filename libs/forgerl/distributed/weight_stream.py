"""Weight sync from a sharded trainer: every tensor of the model under its MiniMax-M2 Hugging Face name,
streamed to one sender rank in buckets of at most `bucket_bytes`, so that no rank ever holds the whole
state dict (the full-gather way, `full_state_dict`, holds it on every rank).

The plan (`plan_weight_stream`, once per run: one all_gather_object of two ints per tensor): which rank
holds which rows of each tensor -- an FSDP2 shard is a block of rows, an expert stack under EP is this
EP rank's El = E / ep experts sharded over efsdp, a DDP replica holds every row -- and, for each block
of rows, the lowest rank holding it (HSDP replicas hold the same blocks). Then every rank walks the
checkpoint's name table in order (the order of `checkpoint_tensors`): the block owners send their rows
to the sender (point-to-point: NCCL and gloo alike, and no rank but the sender allocates anything), the
sender receives them into one buffer of the whole tensor, casts it, splits an expert stack into
`...experts.{e}.w1.weight` tensors, and adds them to the bucket; a tensor that would take the bucket
past `bucket_bytes` first flushes it (yields it).

So the sender holds at most one bucket plus the one whole tensor in flight, every other rank nothing.
The names are the checkpoint's, so the buckets are what vLLM's own loader takes: in a vLLM worker,
`model_runner.reload_weights(weights_iterator=chain.from_iterable(buckets), is_checkpoint_format=True)`
(vLLM 0.32's in-place reload: `MiniMaxM2ForCausalLM.load_weights` stacks the experts into its fused
w13/w2 and fuses q/k/v, then the layers are processed again). The transport from the sender to the
inference service's workers is not part of this module.

```python
for bucket in stream_weight_buckets(parallel, bucket_bytes=512 * 2**20, dtype=torch.bfloat16):
    send(bucket)                     # rank 0 only: the other ranks' iterators yield nothing
```
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from forgerl.distributed.materialize import _first_row
from forgerl.distributed.parallelize import ParallelModel, full_state_dict
from forgerl.model.checkpoint import name_table

Bucket = list[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class _Block:
    """Rows [first, first + rows) of a tensor, sent by `rank`."""

    rank: int
    first: int
    rows: int


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


StreamPlan = dict[str, list[_Block]]


def plan_weight_stream(parallel: ParallelModel) -> StreamPlan:
    """Per tensor, the blocks of rows that cover it once, each from the lowest rank holding it. A
    collective; the layout does not change during a run, so compute it once and pass it to every sync."""
    state = parallel.model.state_dict()
    ep_rank = parallel.meshes.ep_rank if parallel.expert_params else 0
    mine = {
        name: (_first_row(t, name, parallel.expert_params, ep_rank), _local(t).shape[0]) for name, t in state.items()
    }
    everyone: list[dict[str, tuple[int, int]]] = [mine]
    if dist.is_initialized():
        everyone = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(everyone, mine)
    experts = parallel.model.config.num_local_experts
    plan: StreamPlan = {}
    for name, tensor in state.items():
        owners: dict[int, _Block] = {}
        for rank, table in enumerate(everyone):
            first, rows = table[name]
            if rows and first not in owners:
                owners[first] = _Block(rank, first, rows)
        blocks = sorted(owners.values(), key=lambda b: b.first)
        total = experts if name in parallel.expert_params else tensor.shape[0]
        covered = 0
        for block in blocks:
            covered = block.first + block.rows if block.first == covered else -1
        if covered != total:
            raise RuntimeError(f"{name}: the ranks' row blocks {blocks} do not cover its {total} rows once")
        plan[name] = blocks
    return plan


def _whole_on_sender(tensor: torch.Tensor, blocks: list[_Block], rank: int, sender: int) -> torch.Tensor | None:
    """The whole tensor on the sender (its owners' rows received into one buffer), None elsewhere."""
    local = _local(tensor).detach()
    if rank != sender:
        for block in blocks:
            if block.rank == rank:
                dist.send(local.contiguous(), dst=sender)
        return None
    if len(blocks) == 1 and blocks[0].rank == sender:
        return local  # held whole here already (DDP, or one rank): no copy
    rows = blocks[-1].first + blocks[-1].rows
    out = torch.empty((rows, *local.shape[1:]), dtype=local.dtype, device=local.device)
    for block in blocks:
        view = out[block.first : block.first + block.rows]
        if block.rank == sender:
            view.copy_(local)
        else:
            dist.recv(view, src=block.rank)
    return out


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None, copy: bool = False) -> torch.Tensor:
    """`tensor` in `dtype` (floating tensors only), contiguous; `copy`: in storage of its own."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.detach().to(dtype=target, copy=copy).contiguous()


def _sender_views(parallel: ParallelModel, plan: StreamPlan, sender: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(HF name, a view of the whole tensor, whether the bucket needs a copy of its own) on the sender,
    in the name table's order; every rank takes part in the sends. No reference to a whole tensor
    outlives its turn (the memory bound depends on it)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = parallel.model.state_dict()
    for ours, hf in name_table(parallel.model.config).items():
        whole = _whole_on_sender(state.pop(ours), plan[ours], rank, sender)
        if whole is None:
            continue
        if "{e}" in hf:  # one tensor per expert: a copy each, so the stack is freed after its turn
            for e in range(whole.shape[0]):
                yield hf.format(e=e), whole[e], True
        else:
            yield hf, whole, False
        del whole


def stream_weight_buckets(
    parallel: ParallelModel,
    bucket_bytes: int,
    dtype: torch.dtype | None = None,
    sender: int = 0,
    plan: StreamPlan | None = None,
) -> Iterator[Bucket]:
    """The model's (HF name, tensor) pairs in buckets of at most `bucket_bytes` (or one tensor, if it is
    larger), yielded on rank `sender`; every rank must iterate to the end (the sends are collective
    work). `dtype`: cast floating tensors (bf16 for a bf16 server); None keeps the trainer's dtype.
    `plan`: from plan_weight_stream (None: computed now, a collective)."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes {bucket_bytes}: must be >= 1")
    plan = plan_weight_stream(parallel) if plan is None else plan
    bucket: Bucket = []
    size = 0
    for name, view, own in _sender_views(parallel, plan, sender):
        target = dtype if dtype is not None and view.is_floating_point() else view.dtype
        nbytes = view.numel() * target.itemsize
        if bucket and size + nbytes > bucket_bytes:  # flushed before the next tensor exists
            yield bucket
            bucket, size = [], 0  # the consumer is done with it: hold no second bucket
        bucket.append((name, _cast(view, dtype, copy=own)))
        size += nbytes
        del view
    if bucket:
        yield bucket


def full_gather_tensors(parallel: ParallelModel, dtype: torch.dtype | None = None) -> Bucket:
    """The baseline the buckets replace: the whole state dict gathered on every rank, then named and
    split per expert (every rank returns it)."""
    state = full_state_dict(parallel)
    out: Bucket = []
    for ours, hf in name_table(parallel.model.config).items():
        full = _cast(state.pop(ours), dtype)
        if "{e}" in hf:
            out += [(hf.format(e=e), _cast(full[e], None, copy=True)) for e in range(full.shape[0])]
        else:
            out.append((hf, full))
    return out


def largest_tensor_bytes(parallel: ParallelModel) -> int:
    """Bytes of the largest whole parameter or buffer in the trainer's dtype (an expert stack whole,
    [E, ...]): the most the sender holds in flight besides its bucket."""
    experts = parallel.model.config.num_local_experts
    largest = 0
    for ours, tensor in parallel.model.state_dict().items():
        whole = tensor.numel() * (experts // tensor.shape[0] if ours in parallel.expert_params else 1)
        largest = max(largest, whole * tensor.element_size())
    return largest
