"""Fine-grained sparse mixture of experts with sigmoid routing and a selection-only correction bias.

Shape legend: N tokens (B*T flattened), D hidden, E experts, F expert FFN width, K experts per token
(top_k), S = N*K routed (token, expert) pairs.

Routing (as MiniMax-M2 and DeepSeek-V3): scores = sigmoid(x W_gate^T) in at least float32; the top-k is
chosen on scores + e_score_correction_bias, but the weights are the *unbiased* scores of the chosen
experts, renormalised to sum to one. The bias is a buffer, moved by balance.update_expert_bias after each
optimizer step (aux-loss-free balancing), never by gradients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from forgerl.model.config import ModelConfig
from forgerl.model.layers import compute_dtype


@dataclass
class Routing:
    expert_ids_NK: torch.Tensor  # long: the chosen experts, or the replayed ones
    weights_NK: torch.Tensor  # compute dtype: renormalised sigmoid scores of the chosen experts
    scores_NE: torch.Tensor  # compute dtype: all sigmoid scores (for the sequence balance loss)


def route(
    x_ND: torch.Tensor,
    gate_ED: torch.Tensor,
    bias_E: torch.Tensor,
    top_k: int,
    replay_ids_NK: torch.Tensor | None = None,
) -> Routing:
    ct = compute_dtype(x_ND.dtype)
    scores_NE = F.linear(x_ND.to(ct), gate_ED.to(ct)).sigmoid()
    if replay_ids_NK is None:
        with torch.no_grad():
            expert_ids_NK = torch.topk(scores_NE + bias_E.to(ct), top_k, dim=-1, sorted=False).indices
    else:
        expert_ids_NK = replay_ids_NK
    weights_NK = scores_NE.gather(1, expert_ids_NK)
    weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    return Routing(expert_ids_NK, weights_NK, scores_NE)


def _grouped_matmul(x_SI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """Row block e of x (counts_E[e] rows, sorted by expert) times w[e]^T: [S, I] x [E, O, I] -> [S, O].

    torch's grouped_mm kernel (float32/bf16, rows a multiple of 16 bytes) does it in one call without
    leaving the device; other dtypes (float64) loop over the non-empty experts.
    """
    w_EIO = w_EOI.transpose(-1, -2)
    itemsize = x_SI.element_size()
    if (
        hasattr(F, "grouped_mm")
        and x_SI.dtype in (torch.float32, torch.bfloat16)
        and (x_SI.shape[-1] * itemsize) % 16 == 0
        and (w_EOI.shape[-1] * itemsize) % 16 == 0
    ):
        return F.grouped_mm(x_SI, w_EIO, offs=counts_E.cumsum(0).to(torch.int32))
    counts = counts_E.tolist()
    blocks = x_SI.split(counts)
    return torch.cat([blocks[e] @ w_EIO[e] for e, count in enumerate(counts) if count])


GluActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def silu_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU (M2): silu(gate) * up."""
    return F.silu(gate) * up


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """SwiGLU-OAI (gpt-oss; M3 with alpha 1.702, limit 7): gate clamped from above only, up to [-limit,
    limit], then gate * sigmoid(alpha * gate) * (up + 1), as transformers' MiniMaxM3VLExperts._apply_gate."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(gate * alpha) * (up + 1.0)


class ExpertsKernel(Protocol):
    """A fused implementation of `Experts.forward` (SwiGLU): y [N, D] in x's dtype, differentiable in x,
    the weights and the three stacks."""

    def __call__(
        self,
        x_ND: torch.Tensor,
        expert_ids_NK: torch.Tensor,
        weights_NK: torch.Tensor,
        w1_EFD: torch.Tensor,
        w2_EDF: torch.Tensor,
        w3_EFD: torch.Tensor,
    ) -> torch.Tensor: ...


# `moe_backend` -> "module:function" of an ExpertsKernel, imported when a model first asks for it
# (importing forgerl.model never imports Triton); "torch" is Experts' own forward.
MOE_KERNELS: dict[str, str] = {"triton": "forgerl.kernels.fused_moe:fused_experts"}


def experts_kernel(name: str, activation: GluActivation) -> ExpertsKernel | None:
    """The kernel `moe_backend` names, None for "torch"; ValueError for an unknown name, or a kernel
    asked for an activation it does not implement."""
    if name == "torch":
        return None
    if name not in MOE_KERNELS:
        raise ValueError(f"moe_backend {name!r}: choose one of {sorted({'torch', *MOE_KERNELS})}")
    if activation is not silu_glu:
        raise ValueError(f"moe_backend {name!r} implements SwiGLU (M2) only: use moe_backend 'torch' for M3")
    module, function = MOE_KERNELS[name].split(":")
    kernel: ExpertsKernel = getattr(importlib.import_module(module), function)
    return kernel


class Experts(nn.Module):
    """E gated experts stored stacked (one tensor per projection, as torchtitan does): w2(act(w1 x, w3 x)),
    act SwiGLU for M2 and SwiGLU-OAI for M3.

    w1[e] / w2[e] / w3[e] are the HF checkpoint's `experts.{e}.w1.weight` etc. ([out, in] layout)."""

    def __init__(self, cfg: ModelConfig, activation: GluActivation = silu_glu) -> None:
        super().__init__()
        e, d, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        self.w1 = nn.Parameter(torch.empty(e, f, d))  # gate projection  [E, F, D]
        self.w2 = nn.Parameter(torch.empty(e, d, f))  # down projection  [E, D, F]
        self.w3 = nn.Parameter(torch.empty(e, f, d))  # up projection    [E, F, D]
        self.activation = activation
        self.kernel = experts_kernel(getattr(cfg, "moe_backend", "torch"), activation)

    def forward(
        self, x_ND: torch.Tensor, expert_ids_NK: torch.Tensor, weights_NK: torch.Tensor, counts_E: torch.Tensor
    ) -> torch.Tensor:
        """counts_E: how many of the N*K (token, expert) pairs go to each expert (bincount of the ids)."""
        if self.kernel is not None:
            return self.kernel(x_ND, expert_ids_NK, weights_NK, self.w1, self.w2, self.w3)
        k = expert_ids_NK.shape[1]
        # Sort the pairs by expert so that each expert sees one contiguous block.
        order_S = expert_ids_NK.reshape(-1).argsort(stable=True)
        token_S = order_S // k
        x_SD = x_ND[token_S]
        h_SF = self.activation(_grouped_matmul(x_SD, self.w1, counts_E), _grouped_matmul(x_SD, self.w3, counts_E))
        y_SD = _grouped_matmul(h_SF, self.w2, counts_E)
        # Weight in the routing dtype (>= float32), then sum each token's K outputs in expert order.
        y_SD = (y_SD * weights_NK.reshape(-1)[order_S, None]).to(x_ND.dtype)
        return torch.zeros_like(x_ND).index_add_(0, token_S, y_SD)


class SparseMoeBlock(nn.Module):
    """Router + experts. Named `block_sparse_moe` in the decoder layer, as in the HF checkpoint."""

    e_score_correction_bias: torch.Tensor
    tokens_per_expert: torch.Tensor

    def __init__(self, cfg: ModelConfig, activation: GluActivation = silu_glu) -> None:
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.num_local_experts
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = Experts(cfg, activation)
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_local_experts))
        # Tokens routed to each expert since the last bias update (training forwards only); not saved.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_local_experts), persistent=False)

    def forward(
        self, x_BTD: torch.Tensor, replay_ids_BTK: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Routing, torch.Tensor]:
        """Returns the output [B, T, D], the routing, and the per-expert token counts [E] of this call."""
        b, t, d = x_BTD.shape
        x_ND = x_BTD.reshape(b * t, d)
        replay_ids_NK = None if replay_ids_BTK is None else replay_ids_BTK.reshape(b * t, self.top_k)
        routing = route(x_ND, self.gate.weight, self.e_score_correction_bias, self.top_k, replay_ids_NK)
        counts_E = torch.bincount(routing.expert_ids_NK.reshape(-1), minlength=self.n_experts)
        y_ND = self.experts(x_ND, routing.expert_ids_NK, routing.weights_NK, counts_E)
        load_E = counts_E.to(self.tokens_per_expert.dtype)
        if self.training:
            self.tokens_per_expert += load_E
        return y_ND.view(b, t, d), routing, load_E


def sequence_balance_loss(scores_BTE: torch.Tensor, expert_ids_BTK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20, per sequence then averaged: sum_e f_e * P_e with
    f_e = E / (K T) * #{t: e in topk_t} and P_e = mean_t of the scores normalised over experts."""
    b, t, e = scores_BTE.shape
    k = expert_ids_BTK.shape[-1]
    counts_BE = torch.zeros(b, e, dtype=scores_BTE.dtype, device=scores_BTE.device)
    counts_BE.scatter_add_(1, expert_ids_BTK.reshape(b, t * k), torch.ones_like(counts_BE[:, :1]).expand(b, t * k))
    f_BE = counts_BE * (e / (k * t))
    p_BE = (scores_BTE / scores_BTE.sum(-1, keepdim=True)).mean(dim=1)
    return (f_BE * p_BE).sum(-1).mean()
