"""GQA full attention with QK RMSNorm and partial RoPE, behind two swap points.

Shape legend: B batch, T query positions, S key positions (S == T here: no KV cache in training),
D hidden, H query heads, G key/value heads, K head_dim.

Swap points:
- ATTENTION_BACKENDS: the kernel, `(q_BHTK, k_BGSK, v_BGSK, mask_BTS | None, scale) -> o_BHTK`. A GPU
  tree-attention kernel for prefix-tree merging registers here and is picked by `cfg.attn_backend`.
- ATTENTION_MODULES: the whole module, picked by `cfg.attention_type`; MiniMax Sparse Attention (which
  adds an index branch with parameters of its own) registers here.

Mask contract: `mask_BTS` is bool [B, T, S], True where query t may attend key s; None means causal; or a
`TreeMask`, the same ancestor-only mask of a preorder prefix-tree pack in O(T) ints, which a tree kernel
reads as is and every other backend expands with `.dense()`. A dense mask is honoured exactly, so
prefix-tree packing (ancestor-only mask, depth position ids) computes the same thing as the unpacked
sequences. A query with no visible key gets a zero output, not NaN.
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
from forgerl.model.layers import RMSNorm, apply_rotary


@dataclass(frozen=True)
class TreeMask:
    """The attention mask of a preorder-packed prefix forest, one int per token instead of T^2 bools.

    In preorder every subtree is the contiguous range [s, subtree_end[s]), so query t may attend key s
    exactly when s <= t < subtree_end[s] (`forgerl.rl.prefix_tree.TreePack.subtree_end`). The model passes
    it to its backend untouched: the tree-attention kernel prunes tiles with it, and a backend that needs
    the dense mask builds it with `dense()`, the same bools as `TreePack.ancestor_mask()`.
    """

    subtree_end_BT: torch.Tensor  # [B, T] int: one past the last token of each token's subtree

    def dense(self) -> torch.Tensor:
        """bool [B, T, T]: True where query t may attend key s."""
        t = self.subtree_end_BT.shape[-1]
        nodes = torch.arange(t, device=self.subtree_end_BT.device)
        causal_TS = nodes[None, :] <= nodes[:, None]
        return causal_TS[None] & (nodes[None, :, None] < self.subtree_end_BT[:, None, :])


class AttentionBackend(Protocol):
    def __call__(
        self,
        q_BHTK: torch.Tensor,
        k_BGSK: torch.Tensor,
        v_BGSK: torch.Tensor,
        mask_BTS: torch.Tensor | TreeMask | None,
        scale: float,
    ) -> torch.Tensor: ...


def sdpa_attention(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    mask_BTS: torch.Tensor | TreeMask | None,
    scale: float,
) -> torch.Tensor:
    """torch's scaled_dot_product_attention: flash/efficient kernels on GPU, exact maths in float64."""
    if isinstance(mask_BTS, TreeMask):
        mask_BTS = mask_BTS.dense()
    if mask_BTS is None:
        return F.scaled_dot_product_attention(q_BHTK, k_BGSK, v_BGSK, is_causal=True, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(
        q_BHTK, k_BGSK, v_BGSK, attn_mask=mask_BTS[:, None], scale=scale, enable_gqa=True
    )


def eager_attention(
    q_BHTK: torch.Tensor,
    k_BGSK: torch.Tensor,
    v_BGSK: torch.Tensor,
    mask_BTS: torch.Tensor | TreeMask | None,
    scale: float,
) -> torch.Tensor:
    """The written-out reference: softmax(q k^T * scale + mask) v, softmax in at least float32."""
    if isinstance(mask_BTS, TreeMask):
        mask_BTS = mask_BTS.dense()
    groups = q_BHTK.shape[1] // k_BGSK.shape[1]
    k_BHSK = k_BGSK.repeat_interleave(groups, dim=1)
    v_BHSK = v_BGSK.repeat_interleave(groups, dim=1)
    scores_BHTS = (q_BHTK @ k_BHSK.transpose(-1, -2)) * scale
    t, s = scores_BHTS.shape[-2:]
    if mask_BTS is None:
        mask_BTS = torch.ones(t, s, dtype=torch.bool, device=q_BHTK.device).tril()[None]
    visible_B1TS = mask_BTS[:, None]
    scores_BHTS = scores_BHTS.masked_fill(~visible_B1TS, float("-inf"))
    ct = torch.promote_types(scores_BHTS.dtype, torch.float32)
    probs_BHTS = torch.softmax(scores_BHTS, dim=-1, dtype=ct)
    probs_BHTS = probs_BHTS.nan_to_num(0.0).to(q_BHTK.dtype)  # rows with no visible key -> zero output
    return probs_BHTS @ v_BHSK


ATTENTION_BACKENDS: dict[str, AttentionBackend] = {"sdpa": sdpa_attention, "eager": eager_attention}


def register_attention_backend(name: str, backend: AttentionBackend) -> None:
    ATTENTION_BACKENDS[name] = backend


# Triton kernels, imported when a model first asks for one (importing forgerl.model never imports
# Triton): name -> "module:factory", the factory taking the ModelConfig and returning the backend.
KERNEL_BACKENDS: dict[str, str] = {
    "tree": "forgerl.kernels.tree_attention.adapter:tree_backend_for",
    "msa": "forgerl.kernels.msa.adapter:msa_backend_for",
}


def get_attention_backend(name: str) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ValueError(
            f"attn_backend {name!r} is not registered: choose one of {sorted({*ATTENTION_BACKENDS, *KERNEL_BACKENDS})}"
        )
    return ATTENTION_BACKENDS[name]


def attention_backend_for(cfg: ModelConfig) -> AttentionBackend:
    """The backend `cfg.attn_backend` names: a registered one, or a Triton kernel built for `cfg`."""
    if cfg.attn_backend in KERNEL_BACKENDS and cfg.attn_backend not in ATTENTION_BACKENDS:
        module, factory = KERNEL_BACKENDS[cfg.attn_backend].split(":")
        backend: AttentionBackend = getattr(importlib.import_module(module), factory)(cfg)
        return backend
    return get_attention_backend(cfg.attn_backend)


class Attention(nn.Module):
    """MiniMax-M2 attention: q/k RMSNorm over the whole projected width (all heads at once), then
    partial RoPE, then GQA. Parameter names follow the HF checkpoint (q_proj ... o_proj, q_norm, k_norm)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=False)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(q_width, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(kv_width, cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self.backend = attention_backend_for(cfg)

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope_cos_sin: tuple[torch.Tensor, torch.Tensor],
        mask_BTS: torch.Tensor | TreeMask | None,
    ) -> torch.Tensor:
        b, t, _ = x_BTD.shape
        q_BTHK = self.q_norm(self.q_proj(x_BTD)).view(b, t, self.n_heads, self.head_dim)
        k_BTGK = self.k_norm(self.k_proj(x_BTD)).view(b, t, self.n_kv_heads, self.head_dim)
        v_BTGK = self.v_proj(x_BTD).view(b, t, self.n_kv_heads, self.head_dim)
        cos_BTR, sin_BTR = rope_cos_sin
        q_BHTK = apply_rotary(q_BTHK.transpose(1, 2), cos_BTR, sin_BTR)
        k_BGTK = apply_rotary(k_BTGK.transpose(1, 2), cos_BTR, sin_BTR)
        o_BHTK = self.backend(q_BHTK, k_BGTK, v_BTGK.transpose(1, 2), mask_BTS, self.scale)
        o_BTD = o_BHTK.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # [B, T, H*K]
        return self.o_proj(o_BTD)


AttentionFactory = Callable[[ModelConfig], nn.Module]
ATTENTION_MODULES: dict[str, AttentionFactory] = {"full": Attention}


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention_type not in ATTENTION_MODULES:
        raise ValueError(
            f"attention_type {cfg.attention_type!r} is not registered: choose one of {sorted(ATTENTION_MODULES)}"
        )
    return ATTENTION_MODULES[cfg.attention_type](cfg)
