"""Data-parallel wrappers for MiniMaxM2ForCausalLM: DDP and FSDP2. The model code knows nothing of them.

Both keep the MoE routing state right:
- `e_score_correction_bias` is a buffer that balance.update_expert_bias changes identically on every rank
  (it all-reduces the loads), and `tokens_per_expert` holds each rank's own counts until then; so DDP must
  not broadcast rank 0's buffers over them at every forward (`forward_sync_buffers=False`).
- `mtp_loss` is a method of its own, called after forward: FSDP2 is told to unshard around it
  (`register_fsdp_forward_method`); under DDP its gradients reach the same reducer hooks, so every
  parameter gets its gradient in the one backward as long as the loss includes the MTP loss whenever
  the model has MTP modules (else pass find_unused_parameters=True).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from forgerl.model.model import MiniMaxM2ForCausalLM


def apply_ddp(
    model: MiniMaxM2ForCausalLM,
    device_ids: list[int] | None = None,
    process_group: dist.ProcessGroup | None = None,
    find_unused_parameters: bool = False,
) -> DistributedDataParallel:
    """Replicate the model; gradients are averaged over ranks in backward. Call `.module.mtp_loss`."""
    return DistributedDataParallel(
        model,
        device_ids=device_ids,
        process_group=process_group,
        forward_sync_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


def apply_fsdp(
    model: MiniMaxM2ForCausalLM,
    mesh: DeviceMesh | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> FSDPModule:
    """Shard parameters over `mesh` (default: all ranks), one FSDP unit per decoder layer and per MTP
    module, the root holding embedding, final norm and head (torchtitan's layout). param_dtype=bf16 with
    reduce_dtype=float32 gives the usual mixed precision over float32 master weights. Modifies `model`
    in place and returns it (now also an FSDPModule)."""
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in [*model.model.layers, *model.mtp]:
        fully_shard(unit, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    root = fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "mtp_loss")
    return root
