"""Per-token log-probabilities of a batch, computed once per prefix tree instead of once per sequence.

`forward_merged` runs a causal LM once per `TreePack` of a `PrefixForest` and maps every sequence's
per-token log-probabilities back; `forward_unmerged` is the plain one-row-per-sequence computation it
replaces. Both return the same `[B, L - 1]` layout (entry t: log p(token t+1 | tokens <= t)), so a loss
written for one works on the other, and since the merged graph computes each shared node once, the
gradient of a loss summed over sequences' tokens accumulates over every sequence through a node exactly
as the separate computations would.

The model is anything with the call signature of `forgerl.model.MiniMaxM2ForCausalLM` (`CausalLM`). How
a pack's tree structure reaches the model's attention is a `TreeAttention` hook: `dense_ancestor_mask`
builds the bool [T, T] mask once per pack, for any backend that honours masks (SDPA on CPU);
`subtree_end_mask` hands over the pack's O(T) `TreeMask`, which the tree-attention kernel reads without
the T^2 mask ever existing. By default the hook follows the model's `config.attn_backend`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from forgerl.model.attention import TreeMask
from forgerl.rl.prefix_tree import PrefixForest, TreePack


class LogitsOutput(Protocol):
    @property
    def logits(self) -> Tensor: ...  # [B, T, V]

    @property
    def hidden_states(self) -> Tensor: ...  # [B, T, D]: the last layer's states (read with `with_hidden`)


class CausalLM(Protocol):
    """The model call prefix merging needs (the contract of forgerl.model.MiniMaxM2ForCausalLM)."""

    def __call__(
        self,
        input_ids: Tensor,  # [B, T] long
        position_ids: Tensor | None = None,  # [B, T] long; None: 0..T-1
        attention_mask: Tensor | TreeMask | None = None,  # bool [B, T, T] or TreeMask; None: causal
        routed_experts: Tensor | None = None,  # long [B, T, n_layers, top_k]: routing to replay
    ) -> LogitsOutput: ...


class TreeAttention(Protocol):
    """Model keyword arguments (batched, leading dim 1) that make attention follow a pack's tree."""

    def __call__(self, pack: TreePack) -> dict[str, Tensor | TreeMask]: ...


def dense_ancestor_mask(pack: TreePack) -> dict[str, Tensor | TreeMask]:
    """The dense bool [1, T, T] ancestor-only mask: exact with any attention kernel that honours masks."""
    return {"attention_mask": pack.ancestor_mask()[None]}


def subtree_end_mask(pack: TreePack) -> dict[str, Tensor | TreeMask]:
    """The pack's subtree ends [1, T] as a `TreeMask`: O(T) memory for a backend that reads them directly
    (the tree-attention kernel); any other backend rebuilds the dense mask from it in every layer."""
    return {"attention_mask": TreeMask(pack.subtree_end()[None])}


TREE_ATTENTION: Mapping[str, TreeAttention] = {"dense": dense_ancestor_mask, "subtree_end": subtree_end_mask}

# Attention backends (`ModelConfig.attn_backend`) that take a pack's subtree ends; every other backend
# gets the dense mask, built once per pack rather than once per layer.
SUBTREE_END_BACKENDS = frozenset({"tree"})


def tree_attention_for(model: CausalLM) -> TreeAttention:
    """`subtree_end_mask` when the model's `config.attn_backend` reads subtree ends, else
    `dense_ancestor_mask` (also for a model without a config). A DDP wrapper is looked through."""
    core = getattr(model, "module", model)
    backend = getattr(getattr(core, "config", None), "attn_backend", None)
    return subtree_end_mask if backend in SUBTREE_END_BACKENDS else dense_ancestor_mask


@dataclass(frozen=True)
class TokenOutputs:
    logprobs: Tensor  # [B, L - 1]: log p(token t+1 | tokens <= t); 0 past a sequence's end
    entropy: Tensor | None  # [B, L - 1]: entropy of that next-token distribution, when asked for
    # Per pack of the forest (in `forest.packs` order), the model's hidden states [T, D], when asked for:
    # the input of multi-token prediction (forgerl.rl.prefix_mtp).
    pack_hidden: tuple[Tensor, ...] | None = None


def forward_merged(
    model: CausalLM,
    forest: PrefixForest,
    *,
    routed_experts: Tensor | None = None,
    tree_attention: TreeAttention | None = None,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> TokenOutputs:
    """One model call per pack; `routed_experts` [B, L, n_layers, top_k] is packed alongside the tokens.

    `tree_attention` None picks the hook by the model's attention backend (`tree_attention_for`)."""
    if tree_attention is None:
        tree_attention = tree_attention_for(model)
    routes = forest.pack_per_token(routed_experts) if routed_experts is not None else [None] * len(forest.packs)
    outputs = [
        forward_pack(
            model,
            pack,
            routed_experts=route,
            tree_attention=tree_attention,
            with_entropy=with_entropy,
            with_hidden=with_hidden,
        )
        for pack, route in zip(forest.packs, routes, strict=True)
    ]
    width = int(forest.lengths.max()) - 1
    rows = torch.cat([pack.sequence_rows for pack in forest.packs])
    inverse = torch.argsort(rows)  # packed order -> batch order
    logprobs = torch.cat([_pad_right(out.logprobs, width) for out in outputs])[inverse]
    entropy = None
    if with_entropy:
        entropy = torch.cat([_pad_right(out.entropy, width) for out in outputs])[inverse]  # type: ignore[arg-type]
    pack_hidden = tuple(h for out in outputs for h in out.pack_hidden or ()) if with_hidden else None
    return TokenOutputs(logprobs, entropy, pack_hidden)


def forward_pack(
    model: CausalLM,
    pack: TreePack,
    *,
    routed_experts: Tensor | None = None,
    tree_attention: TreeAttention | None = None,
    with_entropy: bool = False,
    with_hidden: bool = False,
) -> TokenOutputs:
    """One pack: outputs [S, L_pack - 1] for the pack's sequences (rows `pack.sequence_rows`), and with
    `with_hidden` the pack's hidden states ([T, D], a one-element `pack_hidden`).

    For gradient accumulation pack by pack, call this per pack and backward each pack's loss.
    `tree_attention` None picks the hook by the model's attention backend (`tree_attention_for`).
    """
    if tree_attention is None:
        tree_attention = tree_attention_for(model)
    out = model(
        pack.input_ids[None],
        position_ids=pack.position_ids[None],
        routed_experts=None if routed_experts is None else routed_experts[None],
        **tree_attention(pack),
    )
    logits_TV = out.logits[0]
    logits_TV = logits_TV.to(torch.promote_types(logits_TV.dtype, torch.float32))
    lse_T = torch.logsumexp(logits_TV, dim=-1)
    # Node i's token is predicted at its parent's position; roots (parent -1) are never read.
    parent_T = pack.parent.clamp(min=0)
    node_logprob_T = logits_TV[parent_T, pack.input_ids] - lse_T[parent_T]
    length_S = pack.lengths
    steps = torch.arange(pack.node_index.shape[1] - 1, device=length_S.device)
    valid_SL = steps[None, :] < (length_S[:, None] - 1)
    logprobs = torch.where(valid_SL, node_logprob_T[pack.node_index[:, 1:]], 0.0)
    entropy = None
    if with_entropy:
        entropy_T = _entropy(logits_TV, lse_T)
        entropy = torch.where(valid_SL, entropy_T[pack.node_index[:, :-1]], 0.0)
    return TokenOutputs(logprobs, entropy, (out.hidden_states[0],) if with_hidden else None)


def forward_unmerged(
    model: CausalLM,
    input_ids: Tensor,
    lengths: Tensor | None = None,
    *,
    routed_experts: Tensor | None = None,
    with_entropy: bool = False,
) -> TokenOutputs:
    """The reference: every row of `input_ids` [B, L] (right-padded) through the model, causal mask."""
    out = model(input_ids, routed_experts=routed_experts)
    logits_BLV = out.logits
    logits_BLV = logits_BLV.to(torch.promote_types(logits_BLV.dtype, torch.float32))[:, :-1]
    lse_BL = torch.logsumexp(logits_BLV, dim=-1)
    logprobs = logits_BLV.gather(-1, input_ids[:, 1:, None]).squeeze(-1) - lse_BL
    if lengths is None:
        valid_BL = torch.ones_like(logprobs, dtype=torch.bool)
    else:
        steps = torch.arange(input_ids.shape[1] - 1, device=input_ids.device)
        valid_BL = steps[None, :] < (lengths.to(input_ids.device)[:, None] - 1)
    logprobs = torch.where(valid_BL, logprobs, 0.0)
    entropy = torch.where(valid_BL, _entropy(logits_BLV, lse_BL), 0.0) if with_entropy else None
    return TokenOutputs(logprobs, entropy)


def _entropy(logits: Tensor, lse: Tensor) -> Tensor:
    log_probs = logits - lse[..., None]
    return -(log_probs.exp() * log_probs).sum(dim=-1)


def _pad_right(x: Tensor, width: int) -> Tensor:
    return F.pad(x, (0, width - x.shape[-1]))
