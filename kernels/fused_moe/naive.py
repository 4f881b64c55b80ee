"""Float32 reference for the fused MoE layer: the semantics of `forgerl.model.moe` written out per expert.

Shape legend: N tokens, D hidden, E experts, F expert FFN width, K experts per token.
Routing: scores = sigmoid(x gate^T); the top-k is chosen on scores + bias (the bias picks experts, it never
weights them); weights = the chosen unbiased scores renormalised to sum to one. Experts are SwiGLU:
y_e(x) = w2[e] (silu(w1[e] x) * w3[e] x); the output is sum_k weight_k y_{e_k}(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive_route(
    x_ND: torch.Tensor, gate_ED: torch.Tensor, bias_E: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """expert ids [N, K] (descending biased score) and renormalised float32 weights [N, K]."""
    scores_NE = F.linear(x_ND.float(), gate_ED.float()).sigmoid()
    with torch.no_grad():
        expert_ids_NK = torch.topk(scores_NE + bias_E.float(), top_k, dim=-1).indices
    weights_NK = scores_NE.gather(1, expert_ids_NK)
    return expert_ids_NK, weights_NK / weights_NK.sum(dim=-1, keepdim=True)


def naive_fused_moe(
    x_ND: torch.Tensor,
    gate_ED: torch.Tensor,
    bias_E: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns float32 y [N, D], expert ids [N, K] and weights [N, K], looping over experts."""
    x_ND = x_ND.float()
    expert_ids_NK, weights_NK = naive_route(x_ND, gate_ED, bias_E, top_k)
    y_ND = torch.zeros_like(x_ND)
    for expert in range(w1_EFD.shape[0]):
        token_M, slot_M = (expert_ids_NK == expert).nonzero(as_tuple=True)
        if token_M.numel() == 0:
            continue
        x_MD = x_ND[token_M]
        h_MF = F.silu(x_MD @ w1_EFD[expert].float().T) * (x_MD @ w3_EFD[expert].float().T)
        y_MD = (h_MF @ w2_EDF[expert].float().T) * weights_NK[token_M, slot_M, None]
        y_ND = y_ND.index_add(0, token_M, y_MD)
    return y_ND, expert_ids_NK, weights_NK
