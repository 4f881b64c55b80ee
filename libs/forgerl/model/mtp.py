"""Multi-token prediction (DeepSeek-V3 sec. 2.2, used by MiniMax-M2 with K = 3).

Shape legend: B batch, T positions, N = T - k positions module k can use, D hidden, V vocab.

Module k (1-based) at position i combines h^{k-1}_i (h^0 = the main model's last hidden state, before the
final norm) with the embedding of token i+k and predicts token i+k+1:
    h^k_i = Block_k(eh_proj([enorm(Emb(x_{i+k})); hnorm(h^{k-1}_i)]))
    logits = lm_head(shared_head.norm(h^k_i))
Embedding and output head are the main model's. The concatenation puts the embedding first, as the
`eh_proj` name says and as vLLM's DeepSeek MTP loader expects. `mtp_loss` works on linear sequences
(token i+k is the k-th next one); on prefix-tree packs, where a shared node has a different k-th next
token on each branch, `forgerl.rl.prefix_mtp` runs module k on the tree of token i+k's nodes instead.

With `train_trunk=False` the loss trains the MTP modules only: h^0, the embeddings and the head's weight
enter detached, so the main model's parameters get no gradient from it (RL's default: the modules learn
to draft the policy's tokens without moving the policy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from forgerl.model.attention import TreeMask
from forgerl.model.block import DecoderLayer
from forgerl.model.config import ModelConfig
from forgerl.model.layers import RMSNorm, compute_dtype

if TYPE_CHECKING:
    from forgerl.model.policy import PolicyModel


class SharedHead(nn.Module):
    """Only the norm: the head matrix is the main model's lm_head (name kept from the checkpoint)."""

    def __init__(self, cfg: ModelConfig, unit_offset: bool = False) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=unit_offset)


class MTPModule(nn.Module):
    """One MTP module around a decoder layer of the main model's kind: `make_block(cfg)` builds it (M2's
    DecoderLayer by default; M3 passes its MoE + sparse-attention layer). Its output must carry `.x_BTD`.
    `unit_offset` norms (x * (1 + w), M3's Gemma style) for enorm, hnorm and the head norm."""

    def __init__(
        self,
        cfg: ModelConfig,
        make_block: Callable[[ModelConfig], nn.Module] = DecoderLayer,
        *,
        unit_offset: bool = False,
    ) -> None:
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=unit_offset)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=unit_offset)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = make_block(cfg)
        self.shared_head = SharedHead(cfg, unit_offset)

    def forward(
        self,
        h_BND: torch.Tensor,
        emb_BND: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | TreeMask | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns h^k (the next module's input) and shared_head.norm(h^k) (the head's input); both in
        forward, where FSDP2 has this module's parameters gathered. `attention_mask` as the model's
        (None: causal)."""
        x_BND = self.eh_proj(torch.cat((self.enorm(emb_BND), self.hnorm(h_BND)), dim=-1))  # [B, N, 2D] -> D
        h_BND = self.block(x_BND, rope_cos_sin, attention_mask).x_BTD
        return h_BND, self.shared_head.norm(h_BND)


def shared_embedding(model: PolicyModel, ids: torch.Tensor, train_trunk: bool) -> torch.Tensor:
    """The main model's embedding of `ids` for an MTP module; detached unless the MTP loss trains the trunk."""
    emb = model.model.embed_tokens(ids)
    return emb if train_trunk else emb.detach()


def shared_head(model: PolicyModel, normed: torch.Tensor, train_trunk: bool) -> torch.Tensor:
    """The main model's lm_head on an MTP module's normed states; with `train_trunk` False the head's weight
    gets no gradient (the states still do: they are the module's)."""
    if train_trunk:
        return model.lm_head(normed)
    return F.linear(normed, model.lm_head.weight.detach())


def masked_cross_entropy(logits_BNV: torch.Tensor, targets_BN: torch.Tensor, mask_BN: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is nonzero, in at least float32."""
    logits = logits_BNV.reshape(-1, logits_BNV.shape[-1]).to(compute_dtype(logits_BNV.dtype))
    ce_BN = F.cross_entropy(logits, targets_BN.reshape(-1), reduction="none").view_as(targets_BN)
    mask = mask_BN.to(ce_BN.dtype)
    return (ce_BN * mask).sum() / mask.sum().clamp(min=1.0)


def mtp_loss(
    model: PolicyModel,
    hidden_BTD: torch.Tensor,
    input_ids_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor | None = None,
    position_ids_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """mtp_loss_weight * mean over modules of each module's masked cross-entropy.

    loss_mask_BT marks the tokens of input_ids that are trained targets (e.g. the completion), the same
    mask as the main loss's: module k's target at position i is token i+k+1 and uses its mask entry.
    Metrics: `mtp/loss_k` per module and `mtp/loss` (their mean), unweighted.
    """
    losses = mtp_module_losses(model, hidden_BTD, input_ids_BT, loss_mask_BT, position_ids_BT)
    if not losses:
        return hidden_BTD.new_zeros(()), {}
    mean_loss = torch.stack(losses).mean()
    return model.config.mtp_loss_weight * mean_loss, mtp_metrics(losses)


class MTPLossMixin:
    """`model.mtp_loss(...)`: the one method M2's and M3's causal LMs share for their MTP modules."""

    def mtp_loss(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted loss of the K MTP modules on one forward's `out.hidden_states`; see mtp_loss."""
        return mtp_loss(cast("PolicyModel", self), hidden_states, input_ids, loss_mask, position_ids)


def mtp_module_losses(
    model: PolicyModel,
    hidden_BTD: torch.Tensor,
    input_ids_BT: torch.Tensor,
    loss_mask_BT: torch.Tensor | None = None,
    position_ids_BT: torch.Tensor | None = None,
    *,
    train_trunk: bool = True,
) -> list[torch.Tensor]:
    """Each module's masked cross-entropy (unweighted), for the modules k with T - k >= 2 (a position
    with both token i+k and target i+k+1). `train_trunk` False: only the MTP modules get gradients."""
    b, t = input_ids_BT.shape
    if loss_mask_BT is None:
        loss_mask_BT = torch.ones_like(input_ids_BT, dtype=torch.bool)
    if position_ids_BT is None:
        position_ids_BT = torch.arange(t, device=input_ids_BT.device).expand(b, t)
    h_BND = hidden_BTD if train_trunk else hidden_BTD.detach()
    losses: list[torch.Tensor] = []
    for k, module in enumerate(model.mtp, start=1):
        n = t - k  # positions i whose token i+k exists
        if n < 2:  # no position also has a target i+k+1
            break
        emb_BND = shared_embedding(model, input_ids_BT[:, k:], train_trunk)
        rope = model.rope(position_ids_BT[:, :n], h_BND.dtype)
        h_BND, normed_BND = module(h_BND[:, :n], emb_BND, rope)
        logits_BNV = shared_head(model, normed_BND[:, : n - 1], train_trunk)
        losses.append(masked_cross_entropy(logits_BNV, input_ids_BT[:, k + 1 :], loss_mask_BT[:, k + 1 :]))
    return losses


def mtp_metrics(losses: list[torch.Tensor]) -> dict[str, float]:
    """`mtp/loss_k` per module and `mtp/loss`, their mean (unweighted)."""
    metrics = {f"mtp/loss_{k}": float(loss.detach()) for k, loss in enumerate(losses, start=1)}
    if losses:
        metrics["mtp/loss"] = sum(metrics.values()) / len(losses)
    return metrics
