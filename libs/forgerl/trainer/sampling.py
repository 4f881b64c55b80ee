"""Batched sampling from MiniMaxM2ForCausalLM with a KV cache (and from MiniMaxM3ForCausalLM without
one), in plain torch (no vLLM).

The training model has no cache (it never needs one); this module runs the same modules step by step,
keeping each layer's keys and values, so that generating N tokens for B sequences costs N forwards of
B tokens instead of N forwards of the whole sequence. It serves the trainer's in-process evaluation
(held-out success without services) and the in-process episode source used by tests and experiments;
the real run samples on vLLM behind the inference service.

Shape legend: B rows, T new positions in this call, S cached positions, D hidden, H query heads,
G key/value heads, K head_dim, V vocab, L layers, E experts per token (top-k).

Rows are left-padded: every row's last prompt token sits at the same column, so each decoding step
appends one column; a per-row key mask hides the padding and position ids count real tokens only.

M3 has no cached path here: its sparse layers' lightning indexer picks key blocks by slot from the
sequence's start, so a left-padded row would see other blocks than its own forward (the reason prefix
merging is refused for M3). Each step runs the whole model on right-padded rows (every row's tokens in
slots 0..n-1, as alone) and reads each row's logits at its last token: the training forward's
log-probabilities exactly, at O(T) cost per token (0.09 s a step at 8 rows x 244 tokens on minimax-m3-tiny,
one CPU thread).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from forgerl.model import MiniMaxM2ForCausalLM, MiniMaxM3ForCausalLM
from forgerl.model.layers import apply_rotary

SamplingModel = MiniMaxM2ForCausalLM | MiniMaxM3ForCausalLM


@dataclass
class Generation:
    token_ids: list[list[int]]  # per row: generated ids, the stop token included when one was hit
    logprobs: list[list[float]]  # per row: log-probability of each generated id under the sampling policy
    finish_reasons: list[str]  # "stop" or "length"


class _Cache:
    def __init__(self, num_layers: int) -> None:
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    def append(self, layer: int, k_BGTK: torch.Tensor, v_BGTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.k[layer], self.v[layer]
        k = k_BGTK if old_k is None else torch.cat([old_k, k_BGTK], dim=2)
        v = v_BGTK if old_v is None else torch.cat([old_v, v_BGTK], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


@torch.no_grad()
def _forward_cached(
    model: MiniMaxM2ForCausalLM,
    cache: _Cache,
    input_ids_BT: torch.Tensor,
    position_ids_BT: torch.Tensor,
    mask_BTS: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the last new position [B, V] and the routed experts of the new positions [B, T, L, E]."""
    b, t = input_ids_BT.shape
    x_BTD = model.model.embed_tokens(input_ids_BT)
    cos_sin = model.rope(position_ids_BT, x_BTD.dtype)
    routed = []
    layers: list[Any] = list(model.model.layers)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        h_BTD = layer.input_layernorm(x_BTD)
        q = attn.q_norm(attn.q_proj(h_BTD)).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h_BTD)).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h_BTD).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        q = apply_rotary(q, *cos_sin)
        k = apply_rotary(k, *cos_sin)
        k_all, v_all = cache.append(i, k, v)
        o = F.scaled_dot_product_attention(
            q, k_all, v_all, attn_mask=mask_BTS[:, None], scale=attn.scale, enable_gqa=True
        )
        x_BTD = x_BTD + attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
        moe_BTD, routing, _ = layer.block_sparse_moe(layer.post_attention_layernorm(x_BTD))
        x_BTD = x_BTD + moe_BTD
        routed.append(routing.expert_ids_NK.view(b, t, -1))
    logits_BV = model.lm_head(model.model.norm(x_BTD[:, -1]))
    return logits_BV.float(), torch.stack(routed, dim=2)


@torch.no_grad()
def generate(
    model: SamplingModel,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...],
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> Generation:
    """Sample (temperature > 0) or decode greedily (temperature == 0) up to max_new_tokens per row."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("generate needs at least one prompt, each with at least one token")
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, MiniMaxM3ForCausalLM):
            return _generate_uncached(model, prompts, max_new_tokens, stop_token_ids, temperature, generator)
        return _generate(model, prompts, max_new_tokens, stop_token_ids, temperature, generator, pad_token_id)
    finally:
        model.train(was_training)


def _generate(
    model: MiniMaxM2ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...],
    temperature: float,
    generator: torch.Generator | None,
    pad_token_id: int,
) -> Generation:
    device = model.lm_head.weight.device
    b = len(prompts)
    # The longest prefix every prompt shares (a system prompt, a group's task) is computed once, at batch
    # size 1, and its keys and values are shared by every row; the rest is left-padded after it.
    common = _common_prefix_len(prompts)
    common = min(common, min(len(p) for p in prompts) - 1)
    cache = _Cache(len(model.model.layers))
    prefix_valid = torch.ones(b, common, dtype=torch.bool, device=device)
    if common > 0:
        prefix_ids = torch.tensor([prompts[0][:common]], device=device)
        prefix_pos = torch.arange(common, device=device)[None]
        causal = torch.ones(common, common, dtype=torch.bool, device=device).tril()[None]
        _forward_cached(model, cache, prefix_ids, prefix_pos, causal)
        for i in range(len(cache.k)):
            cache.k[i] = cache.k[i].expand(b, -1, -1, -1)  # type: ignore[union-attr]
            cache.v[i] = cache.v[i].expand(b, -1, -1, -1)  # type: ignore[union-attr]
    rests = [p[common:] for p in prompts]
    width = max(len(r) for r in rests)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long, device=device)
    valid = torch.zeros(b, width, dtype=torch.bool, device=device)
    for row, rest in enumerate(rests):
        ids[row, width - len(rest) :] = torch.tensor(rest, device=device)
        valid[row, width - len(rest) :] = True
    positions = common + (valid.long().cumsum(1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    # Padding queries attend to themselves only (their outputs are never read), so no row is all-masked.
    mask_rest = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)[None]
    mask = torch.cat([prefix_valid[:, None, :].expand(b, width, common), mask_rest], dim=2)
    logits, _ = _forward_cached(model, cache, ids, positions, mask)
    valid = torch.cat([prefix_valid, valid], dim=1)
    key_valid = valid
    next_pos = positions[:, -1] + 1
    out_ids: list[list[int]] = [[] for _ in range(b)]
    out_lp: list[list[float]] = [[] for _ in range(b)]
    done = [False] * b
    finish = ["length"] * b
    stops = set(stop_token_ids)
    for _ in range(max_new_tokens):
        token, token_lp = _pick(logits, temperature, generator)
        for row in range(b):
            if done[row]:
                continue
            tok = int(token[row])
            out_ids[row].append(tok)
            out_lp[row].append(float(token_lp[row]))
            if tok in stops:
                done[row], finish[row] = True, "stop"
        if all(done):
            break
        key_valid = torch.cat([key_valid, torch.ones(b, 1, dtype=torch.bool, device=device)], dim=1)
        logits, _ = _forward_cached(model, cache, token[:, None], next_pos[:, None], key_valid[:, None, :])
        next_pos = next_pos + 1
    return Generation(out_ids, out_lp, finish)


def _pick(
    logits_BV: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every row [B] (sampled at `temperature`, greedy at 0) and its log-probability [B]
    under the sampling policy."""
    if temperature > 0:
        probs = torch.softmax(logits_BV / temperature, dim=-1)
        token_B = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        logp_BV = torch.log_softmax(logits_BV / temperature, dim=-1)
    else:
        token_B = logits_BV.argmax(dim=-1)
        logp_BV = torch.log_softmax(logits_BV, dim=-1)
    return token_B, logp_BV.gather(1, token_B[:, None]).squeeze(1)


def _generate_uncached(
    model: MiniMaxM3ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...],
    temperature: float,
    generator: torch.Generator | None,
) -> Generation:
    """generate() for a model without a cached path: every step one causal forward of the unfinished rows,
    right-padded (padding after a row's last token is never attended by it), logits read at each row's end."""
    device = model.lm_head.weight.device
    seqs = [list(p) for p in prompts]
    out_ids: list[list[int]] = [[] for _ in prompts]
    out_lp: list[list[float]] = [[] for _ in prompts]
    finish = ["length"] * len(prompts)
    live = list(range(len(prompts)))
    stops = set(stop_token_ids)
    for _ in range(max_new_tokens):
        if not live:
            break
        lengths = torch.tensor([len(seqs[row]) for row in live], device=device)
        ids_BT = torch.zeros(len(live), int(lengths.max()), dtype=torch.long, device=device)
        for i, row in enumerate(live):
            ids_BT[i, : len(seqs[row])] = torch.tensor(seqs[row], device=device)
        logits_BTV = model(ids_BT).logits
        logits_BV = logits_BTV[torch.arange(len(live), device=device), lengths - 1].float()
        token_B, token_lp_B = _pick(logits_BV, temperature, generator)
        for i, row in enumerate(live):
            tok = int(token_B[i])
            seqs[row].append(tok)
            out_ids[row].append(tok)
            out_lp[row].append(float(token_lp_B[i]))
            if tok in stops:
                finish[row] = "stop"
        live = [row for row in live if finish[row] != "stop"]
    return Generation(out_ids, out_lp, finish)


def _common_prefix_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return n
