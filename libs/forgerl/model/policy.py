"""What the trainer needs of a policy model, M2 or M3: the `PolicyModel` protocol.

The trainer's steps (forgerl.trainer.step, forgerl.trainer.sft) and the MTP loss (forgerl.model.mtp) are
typed to this, not to one architecture; `MiniMaxM2ForCausalLM` and `MiniMaxM3ForCausalLM` both satisfy
it. Expert balancing needs no member here: update_expert_bias finds every `SparseMoeBlock` by module type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from forgerl.model.attention import TreeMask
from forgerl.model.config import ModelConfig
from forgerl.model.model import ModelOutput


class Backbone(Protocol):
    @property
    def embed_tokens(self) -> nn.Embedding: ...


@runtime_checkable
class PolicyModel(Protocol):
    training: bool
    lm_head: nn.Linear
    mtp: nn.ModuleList  # the MTP modules, in order; empty when the model has none

    @property
    def config(self) -> ModelConfig: ...

    @property
    def model(self) -> Backbone: ...  # embed_tokens, layers, norm (the checkpoint's `model.`)

    @property
    def prefix_merge_exact(self) -> bool:
        """True when a prefix-tree pack's forward gives every row the logits of its own forward
        (forgerl.rl.prefix_merge); False for M3's sparse layers, whose key blocks are pack slots."""
        ...

    def __call__(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | TreeMask | None = None,
        routed_experts: torch.Tensor | None = None,
    ) -> ModelOutput: ...

    def rope(self, position_ids_BT: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]: ...

    def mtp_loss(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        loss_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> object: ...

    def eval(self) -> object: ...
