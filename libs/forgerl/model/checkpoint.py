"""Checkpoints in the Hugging Face MiniMax-M2 layout: sharded safetensors, `config.json`, tokenizer.

Shape legend: E experts, F expert FFN width, D hidden, O/I a linear layer's output/input width.

The files are what `transformers.MiniMaxM2ForCausalLM.from_pretrained` and vLLM's MiniMaxM2 loader read:
tensor names from NAME_TABLE, the MTP modules as `model.layers.{L + k}.*` after the L main layers (vLLM's
loader skips them when `num_mtp_modules` is set), and the config keys vLLM reads (`scoring_func`,
`rotary_dim`, `use_routing_bias`, `num_local_experts`, ...). Loading also reads the released FP8
checkpoints: a `weight` stored as float8 with a `weight_scale_inv` of per-block scales is dequantized.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from forgerl.model.config import ModelConfig
from forgerl.model.model import MiniMaxM2ForCausalLM

# Every tensor of the model: (our name, checkpoint name). `{e}` marks a tensor we keep stacked over the
# experts ([E, ...]) and the checkpoint keeps one per expert. LAYER rows sit under `model.layers.{i}.` in
# both for main layer i; MTP module k's block is our `mtp.{k}.block.` and the checkpoint's
# `model.layers.{L + k}.`, where MTP_EXTRA rows (our `mtp.{k}.`) also go.
TOP_TABLE: tuple[tuple[str, str], ...] = (
    ("model.embed_tokens.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
LAYER_TABLE: tuple[tuple[str, str], ...] = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("self_attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("self_attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("self_attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("self_attn.q_norm.weight", "self_attn.q_norm.weight"),
    ("self_attn.k_norm.weight", "self_attn.k_norm.weight"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("block_sparse_moe.gate.weight", "block_sparse_moe.gate.weight"),
    ("block_sparse_moe.e_score_correction_bias", "block_sparse_moe.e_score_correction_bias"),
    ("block_sparse_moe.experts.w1", "block_sparse_moe.experts.{e}.w1.weight"),  # [E, F, D] <- E x [F, D]
    ("block_sparse_moe.experts.w2", "block_sparse_moe.experts.{e}.w2.weight"),  # [E, D, F] <- E x [D, F]
    ("block_sparse_moe.experts.w3", "block_sparse_moe.experts.{e}.w3.weight"),  # [E, F, D] <- E x [F, D]
)
MTP_EXTRA_TABLE: tuple[tuple[str, str], ...] = (
    ("enorm.weight", "enorm.weight"),
    ("hnorm.weight", "hnorm.weight"),
    ("eh_proj.weight", "eh_proj.weight"),
    ("shared_head.norm.weight", "shared_head.norm.weight"),
)

# Config keys copied both ways between ModelConfig and config.json; training-only fields go under "forgerl".
HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "rotary_dim", "rope_theta", "max_position_embeddings", "rms_norm_eps", "intermediate_size",
    "num_local_experts", "num_experts_per_tok", "num_mtp_modules", "tie_word_embeddings", "initializer_range",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
FORGERL_KEYS = (
    "mtp_loss_weight", "bias_update_rate", "seq_aux_loss_coef", "attention_type", "attn_backend",
    "msa_block_size", "msa_top_k", "moe_backend",
)  # fmt: skip


def name_table(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter/buffer name -> checkpoint name (with `{e}` for expert-stacked tensors)."""
    table = dict(TOP_TABLE)
    if cfg.tie_word_embeddings:
        del table["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        table.update({f"model.layers.{i}.{ours}": f"model.layers.{i}.{hf}" for ours, hf in LAYER_TABLE})
    for k in range(cfg.num_mtp_modules):
        hf_prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        table.update({f"mtp.{k}.block.{ours}": hf_prefix + hf for ours, hf in LAYER_TABLE})
        table.update({f"mtp.{k}.{ours}": hf_prefix + hf for ours, hf in MTP_EXTRA_TABLE})
    return table


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["MiniMaxM2ForCausalLM"],
        "model_type": "minimax_m2",
        **{key: getattr(cfg, key) for key in HF_KEYS},
        "hidden_act": "silu",
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "use_qk_norm": True,
        "qk_norm_type": "per_layer",  # one norm over the whole q (k) width, not per head
        "shared_intermediate_size": 0,
        "attn_type_list": [1] * cfg.num_hidden_layers,  # 1 = full attention in every layer
        "use_mtp": cfg.num_mtp_modules > 0,
        "mtp_transformer_layers": 1,
        "router_jitter_noise": 0.0,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "forgerl": {key: getattr(cfg, key) for key in FORGERL_KEYS},
    }


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    values = {key: hf[key] for key in HF_KEYS if key in hf}
    rope = hf.get("rope_parameters") or {}
    if "rope_theta" not in values and "rope_theta" in rope:
        values["rope_theta"] = rope["rope_theta"]
    if "rotary_dim" not in values:
        factor = hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        values["rotary_dim"] = int(values.get("head_dim", ModelConfig.head_dim) * factor)
    if not hf.get("use_mtp", True):
        values["num_mtp_modules"] = 0
    values.update(hf.get("forgerl", {}))
    return ModelConfig(**values)


def _unwrap(model: nn.Module) -> MiniMaxM2ForCausalLM:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(inner, MiniMaxM2ForCausalLM):
        raise TypeError(f"expected a MiniMaxM2ForCausalLM (or a DDP wrapper of one), got {type(inner).__name__}")
    return inner


def checkpoint_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, CPU tensor) for every tensor of the model, experts split; gathers FSDP2 shards
    (a collective: call it on every rank)."""
    inner = _unwrap(model)
    state = inner.state_dict()
    for ours, hf in name_table(inner.config).items():
        tensor = state[ours]
        if hasattr(tensor, "full_tensor"):  # a DTensor from FSDP2
            tensor = tensor.full_tensor()
        tensor = tensor.detach().cpu()
        if "{e}" in hf:
            for e in range(tensor.shape[0]):
                yield hf.format(e=e), tensor[e].clone()  # own storage: safetensors refuses shared views
        else:
            yield hf, tensor.contiguous()


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any | None,
    path: str | Path,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors` shards of at most
    max_shard_bytes plus `model.safetensors.index.json`) and, if given, the tokenizer's files (whose eos
    and pad ids then fill the config's when it has none).
    Under torch.distributed every rank must call it (FSDP2 shards are gathered); rank 0 writes."""
    inner = _unwrap(model)
    path = Path(path)
    shards = group_shards(checkpoint_tensors(model), max_shard_bytes)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return path
    path.mkdir(parents=True, exist_ok=True)
    cfg = inner.config
    if tokenizer is not None and cfg.eos_token_id is None:  # so that servers stop at the end of a turn
        cfg = cfg.replace(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    dtype = inner.model.embed_tokens.weight.dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
    write_shards(shards, path)
    if tokenizer is not None:
        # Imported here: transformers takes ~3.5 s to import and the model itself does not need it.
        from forgerl.model.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, path)
    return path


def group_shards(
    named_tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int
) -> list[dict[str, torch.Tensor]]:
    """Consecutive tensors packed into shards of at most max_shard_bytes (a larger tensor alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in named_tensors:
        if shards[-1] and shard_bytes + tensor.nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
    return shards


def write_shards(shards: list[dict[str, torch.Tensor]], path: Path) -> None:
    """`model.safetensors`, or numbered shards plus `model.safetensors.index.json`, into `path`."""
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / filename), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.nbytes for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def dequantize_fp8_blocks(w_OI: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Block-scaled FP8 -> float32: w[o, i] * scale_inv[o // block_o, i // block_i] (DeepSeek-V3 format)."""
    o, i = w_OI.shape
    scale_OI = scale_inv.float().repeat_interleave(block[0], 0)[:o].repeat_interleave(block[1], 1)[:, :i]
    return w_OI.float() * scale_OI


def read_checkpoint_tensors(path: str | Path, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint by name, FP8 blocks dequantized to float32 and the scales dropped."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for filename in files:
        with safe_open(str(path / filename), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[name] = f.get_tensor(name)
    block = tuple((hf_config.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    for scale_name in [n for n in tensors if n.endswith(".weight_scale_inv")]:
        weight_name = scale_name.removesuffix("_scale_inv")
        tensors[weight_name] = dequantize_fp8_blocks(tensors[weight_name], tensors.pop(scale_name), block)
    return tensors


def load_checkpoint(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    strict: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> MiniMaxM2ForCausalLM:
    """Build the model from `config.json` and load its tensors (in `dtype`: default the config's).

    strict=False tolerates missing tensors (they keep their fresh initialisation), e.g. MTP modules of a
    checkpoint released without them; unexpected tensors are always an error. `overrides` replaces fields
    of the saved config that leave the tensors as they are (the trainer's kernels: moe_backend, attn_backend)."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf_config).replace(**(overrides or {}))
    dtype = dtype or getattr(torch, hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    tensors = read_checkpoint_tensors(path, hf_config)
    model = MiniMaxM2ForCausalLM(cfg).to(device=device, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for ours, hf in name_table(cfg).items():
        names = [hf.format(e=e) for e in range(cfg.num_local_experts)] if "{e}" in hf else [hf]
        if not all(name in tensors for name in names):
            missing.extend(name for name in names if name not in tensors)
            continue
        parts = [tensors.pop(name) for name in names]
        state[ours] = torch.stack(parts) if "{e}" in hf else parts[0]
    if tensors:
        raise ValueError(f"{path}: {len(tensors)} tensors the model has no place for, e.g. {sorted(tensors)[:5]}")
    if missing and strict:
        raise ValueError(
            f"{path}: {len(missing)} tensors missing, e.g. {missing[:5]}; pass strict=False to keep those "
            "parameters freshly initialised"
        )
    model.load_state_dict(state, strict=False)
    return model
