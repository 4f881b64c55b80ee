"""Expert parallelism for forgerl.model.moe.Experts, from outside the model (torchtitan's ExpertParallel).

Shape legend: N tokens of this rank, D hidden, K experts per token, E experts, El = E / ep local experts,
R ep ranks, S = N*K (token, expert) pairs of this rank, S' pairs this rank's experts receive.

Each EP rank keeps experts [r*El, (r+1)*El) of every layer (`shard_experts`). The router runs on every
rank's own tokens, unchanged (so the bias, the loads and routing replay are those of one device); a
forward pre-hook and a forward hook on the Experts module move the pairs instead of the weights:

    pre:  sort the S pairs by expert (rank-major: rank r's experts are one block), send the per-(rank,
          local expert) counts with all_to_all_single, then the token rows; hand the local experts the
          S' received rows with their local expert ids (weight 1): Experts.forward regroups them
          expert-major itself (its stable sort by expert id).
    post: the S' outputs go back the same way (swapped splits), arrive in this rank's sorted pair order,
          and are combined exactly as Experts.forward does on one device: times the routing weight in
          the routing dtype, summed per token with index_add in sorted-pair order.

torch's all_to_all_single_autograd is differentiable (its backward is the reverse exchange), so
expert gradients collect every rank's tokens on the rank that owns the expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from forgerl.model.moe import Experts


@dataclass
class _Dispatch:
    """What the post-hook needs from the pre-hook of the same call."""

    x_ND: torch.Tensor
    token_S: torch.Tensor
    weights_S: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]


def shard_experts(experts: Experts, ep_rank: int, ep: int) -> None:
    """Keep this rank's El = E / ep experts of w1/w2/w3 (a copy: the full stack is freed)."""
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        local_experts = full.shape[0] // ep
        local = full.detach()[ep_rank * local_experts : (ep_rank + 1) * local_experts].clone()
        setattr(experts, name, nn.Parameter(local, requires_grad=full.requires_grad))


def _all_to_all(
    x: torch.Tensor, recv_splits: list[int], send_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Differentiable: the backward sends the gradients back with the splits swapped."""
    return all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)


class ExpertParallel:
    """The dispatch/combine hooks of one Experts module over one EP group."""

    def __init__(self, experts: Experts, ep: int, group: dist.ProcessGroup) -> None:
        self.ep, self.group = ep, group
        self.local_experts = experts.w1.shape[0]
        # The pre-hook's state for the post-hook of the same call. One slot, not a stack: a recompute under
        # activation checkpointing may stop early (torch's early_stop) between the two hooks.
        self._pending: _Dispatch | None = None
        experts.register_forward_pre_hook(self._dispatch)
        experts.register_forward_hook(self._combine)

    def _dispatch(self, _module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x_ND, expert_ids_NK, weights_NK, counts_E = args
        k = expert_ids_NK.shape[1]
        order_S = expert_ids_NK.reshape(-1).argsort(stable=True)
        token_S = order_S // k
        send_counts_RL = counts_E.reshape(self.ep, self.local_experts).contiguous()
        # Counts first: how many rows of each of my local experts every rank is about to send.
        recv_counts_RL = torch.empty_like(send_counts_RL)
        dist.all_to_all_single(recv_counts_RL, send_counts_RL, group=self.group)
        send_splits = send_counts_RL.sum(dim=1).tolist()
        recv_splits = recv_counts_RL.sum(dim=1).tolist()
        x_recv = _all_to_all(x_ND[token_S], recv_splits, send_splits, self.group)  # [S', D], rank-major
        # Rows arrive source-rank-major, each source's block sorted by local expert: their local ids.
        local_ids = torch.arange(self.local_experts, device=x_ND.device).repeat(self.ep)
        ids_recv = local_ids.repeat_interleave(recv_counts_RL.reshape(-1))[:, None]  # [S', 1]
        weights_S = weights_NK.reshape(-1)[order_S]
        self._pending = _Dispatch(x_ND, token_S, weights_S, send_splits, recv_splits)
        ones = weights_S.new_ones((x_recv.shape[0], 1))
        return x_recv, ids_recv, ones, recv_counts_RL.sum(dim=0)

    def _combine(self, _module: nn.Module, _args: Any, y_recv: torch.Tensor) -> torch.Tensor:
        d, self._pending = self._pending, None
        assert d is not None, "the Experts forward hook ran without its pre-hook"
        y_SD = _all_to_all(y_recv, d.send_splits, d.recv_splits, self.group)  # back in my sorted pair order
        y_SD = (y_SD * d.weights_S[:, None]).to(d.x_ND.dtype)
        return torch.zeros_like(d.x_ND).index_add_(0, d.token_S, y_SD)


def apply_expert_parallel(model: nn.Module, ep_rank: int, ep: int, group: dist.ProcessGroup) -> list[Experts]:
    """Shard every Experts module of `model` (main layers and MTP) over the group and hook its dispatch;
    returns them (for FSDP2 to shard over efsdp)."""
    found = [m for m in model.modules() if isinstance(m, Experts)]
    for experts in found:
        if experts.w1.shape[0] % ep:
            raise ValueError(f"{experts.w1.shape[0]} experts cannot be split over ep {ep} ranks evenly")
        shard_experts(experts, ep_rank, ep)
        ExpertParallel(experts, ep, group)
    return found
