"""Capacity planner: the mesh a GPU pool would use for a model, and what each GPU then holds.

Shape legend: P parameters, D hidden, F expert width, E experts, K experts per token, V vocab, T tokens
per GPU per step (one sequence of `seq` tokens), L MoE layers (main + MTP).

Everything is counted from the ModelConfig (ParamCounts) under the layout apply_parallelism builds:
- dp_shard = every GPU (FSDP2 over the whole pool), ep = the largest power of two dividing both E and the
  pool, at most `gpus_per_node` (the all-to-all stays on NVLink), efsdp = dp_shard / ep. Experts are
  split over ep and sharded over efsdp, the rest over dp_shard: every parameter is 1 / gpus per GPU.
- Sharded state per parameter: float32 master weights (4 B), float32 gradients (4 B, reduce_dtype),
  AdamW's two float32 moments (8 B) = 16 B (torchtitan's mixed precision).
- Working set of FSDP2: the bf16 unsharded parameters of two units at a time (the one computing and the
  one prefetched: a layer's attention + router + norms, and its E / ep local experts), plus the root
  (embedding and head, kept unsharded through forward and backward).
- Activations saved for backward, bf16 (2 B) unless noted, per token and MoE layer: residual input and
  its norm (2D), q/k/v (H + 2 KV) hd, attention output H hd, softmax log-sum-exp (H, float32), residual
  after attention and its norm (2D), router scores (E, float32), and per routed pair the expert input D,
  w1 and w3 outputs 2F, their SwiGLU product F and the expert output D. The trainer's logits are [T, V] in
  bf16 plus the float32 copy its log-softmax works on (6 B V per token). With activation checkpointing
  every layer keeps its input (D) and one layer's activations are live again while it recomputes.
- All-to-all per step and GPU: each routed pair's D-vector crosses the network unless its expert is
  local (probability 1/ep under uniform routing): dispatch and combine in forward, both again in
  backward, and a third forward pass's worth with checkpointing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from forgerl.model.config import ModelConfig

BF16, FP32 = 2, 4
SHARDED_BYTES_PER_PARAM = FP32 + FP32 + 2 * FP32  # master weight, gradient, AdamW exp_avg + exp_avg_sq
GIB = 1024**3


@dataclass(frozen=True)
class Plan:
    gpus: int
    dp_shard: int
    ep: int
    efsdp: int
    params: int  # trained parameters of the main model and the MTP modules
    sharded_params_bytes: int  # float32 master weights on one GPU
    sharded_grads_bytes: int
    optimizer_bytes: int
    working_params_bytes: int  # bf16 unsharded units held at once
    activations_bytes: int  # without activation checkpointing
    activations_checkpointed_bytes: int
    all_to_all_bytes: int
    all_to_all_checkpointed_bytes: int
    gpu_memory_bytes: int

    def total_bytes(self, checkpointing: bool) -> int:
        state = self.sharded_params_bytes + self.sharded_grads_bytes + self.optimizer_bytes + self.working_params_bytes
        return state + (self.activations_checkpointed_bytes if checkpointing else self.activations_bytes)

    def fits(self, checkpointing: bool) -> bool:
        return self.total_bytes(checkpointing) <= self.gpu_memory_bytes


def choose_ep(num_experts: int, gpus: int, gpus_per_node: int) -> int:
    ep = 1
    while ep * 2 <= gpus_per_node and num_experts % (ep * 2) == 0 and gpus % (ep * 2) == 0:
        ep *= 2
    return ep


def activation_bytes_per_token_layer(cfg: ModelConfig) -> int:
    d, f, k, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts_per_tok, cfg.num_local_experts
    h, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    attention = BF16 * (2 * d + (h + 2 * kv) * hd + h * hd) + FP32 * h
    moe = BF16 * 2 * d + FP32 * e + BF16 * k * (d + 2 * f + f + d)
    return attention + moe


def plan(
    cfg: ModelConfig,
    gpus: int,
    gpu_memory_bytes: int,
    seq: int,
    gpus_per_node: int = 8,
    ep: int | None = None,
) -> Plan:
    if gpus < 1 or seq < 1:
        raise ValueError(f"gpus {gpus} and seq {seq} must be >= 1")
    ep = ep or choose_ep(cfg.num_local_experts, gpus, gpus_per_node)
    if gpus % ep or cfg.num_local_experts % ep:
        raise ValueError(f"ep {ep} must divide both the {gpus} GPUs and the {cfg.num_local_experts} experts")
    counts = cfg.param_counts()
    moe_layers = cfg.num_hidden_layers + cfg.num_mtp_modules
    # ParamCounts' router includes the correction bias: a buffer, neither sharded nor trained.
    router = counts.per_layer_router - cfg.num_local_experts
    params = counts.total + counts.mtp - moe_layers * cfg.num_local_experts
    per_gpu = math.ceil(params / gpus)
    dense_unit = counts.per_layer_attention + router + counts.per_layer_norms
    unit = dense_unit + cfg.num_local_experts // ep * counts.per_expert
    working = BF16 * (2 * unit + counts.embedding + counts.head)
    per_layer = seq * activation_bytes_per_token_layer(cfg)
    logits = seq * cfg.vocab_size * (BF16 + FP32)
    checkpointed = moe_layers * seq * cfg.hidden_size * BF16 + per_layer + logits
    remote = (ep - 1) / ep
    pair_bytes = seq * cfg.num_experts_per_tok * cfg.hidden_size * BF16 * moe_layers
    return Plan(
        gpus=gpus,
        dp_shard=gpus,
        ep=ep,
        efsdp=gpus // ep,
        params=params,
        sharded_params_bytes=FP32 * per_gpu,
        sharded_grads_bytes=FP32 * per_gpu,
        optimizer_bytes=2 * FP32 * per_gpu,
        working_params_bytes=working,
        activations_bytes=moe_layers * per_layer + logits,
        activations_checkpointed_bytes=checkpointed,
        all_to_all_bytes=round(4 * pair_bytes * remote),
        all_to_all_checkpointed_bytes=round(6 * pair_bytes * remote),
        gpu_memory_bytes=gpu_memory_bytes,
    )


def parse_bytes(text: str) -> int:
    """ "80GiB", "141GB", "1024MiB" -> bytes."""
    units = {"gib": GIB, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "tib": 1024**4, "tb": 10**12}
    lowered = text.strip().lower()
    for suffix, scale in sorted(units.items(), key=lambda item: -len(item[0])):
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * scale)
    raise ValueError(f"memory size {text!r}: give a number with a unit, e.g. 80GiB or 141GB")


def render(cfg_name: str, seq: int, p: Plan) -> str:
    def gib(n: int) -> str:
        return f"{n / GIB:8.2f} GiB"

    lines = [
        f"model {cfg_name}: {p.params / 1e9:.1f}B parameters (with MTP), seq {seq} tokens per GPU per step",
        f"mesh: dp_shard {p.dp_shard} (FSDP2 over all {p.gpus} GPUs), ep {p.ep}, efsdp {p.efsdp}",
        f"  parameters (fp32 shard)     {gib(p.sharded_params_bytes)}",
        f"  gradients (fp32 shard)      {gib(p.sharded_grads_bytes)}",
        f"  AdamW moments (fp32 shard)  {gib(p.optimizer_bytes)}",
        f"  unsharded bf16 working set  {gib(p.working_params_bytes)}",
    ]
    pairs = (
        ("activations", p.activations_bytes, p.activations_checkpointed_bytes),
        ("total", p.total_bytes(False), p.total_bytes(True)),
        ("all-to-all per step", p.all_to_all_bytes, p.all_to_all_checkpointed_bytes),
    )
    lines += [f"  {name:<27} {gib(plain)}   with checkpointing {gib(ac)}" for name, plain, ac in pairs]
    for checkpointing, label in ((False, "without"), (True, "with")):
        over = p.total_bytes(checkpointing) - p.gpu_memory_bytes
        verdict = f"fits ({gib(-over).strip()} free)" if over <= 0 else f"does NOT fit: {gib(over).strip()} over"
        lines.append(f"{label} activation checkpointing: {verdict} of {gib(p.gpu_memory_bytes).strip()}")
    return "\n".join(lines)
