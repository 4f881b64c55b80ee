"""MiniMax-M3 checkpoints with the tensor names and config of transformers' `MiniMaxM3VLForCausalLM`.

Shape legend: E experts, F expert FFN width, D hidden.

`save_m3_checkpoint` writes what `transformers.MiniMaxM3VLForCausalLM.from_pretrained` reads (and what its
`save_pretrained` writes): `config.json` of model_type `minimax_m3_vl_text` and safetensors named as that
model's state dict. `load_m3_checkpoint` reads such a directory back. The released VL checkpoint stores
the text model M2-style under `language_model.` (split w1/w3 experts, `index_q_proj`, ...); transformers
renames it on load (its conversion_mapping "minimax_m3_vl"), which this module does not.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from forgerl.model.checkpoint import group_shards, read_checkpoint_tensors, write_shards
from forgerl.model.m3 import MiniMaxM3ForCausalLM
from forgerl.model.m3_config import SPARSE_ATTENTION, SPARSE_MLP, M3Config

# (our names, checkpoint name). Several names of ours are concatenated along dim -2 (the output rows) to
# make the checkpoint's tensor: transformers fuses the routed experts' gate and up into gate_up_proj
# [E, 2F, D], gate first (MiniMaxM3VLExperts._apply_gate chunks it in that order).
Row = tuple[tuple[str, ...], str]
TOP_TABLE: tuple[Row, ...] = (
    (("model.embed_tokens.weight",), "model.embed_tokens.weight"),
    (("model.norm.weight",), "model.norm.weight"),
    (("lm_head.weight",), "lm_head.weight"),
)
ATTENTION_TABLE: tuple[Row, ...] = tuple(
    ((name,), name)
    for name in (
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
    )
)
INDEXER_TABLE: tuple[Row, ...] = tuple(
    ((f"self_attn.indexer.{name}",), f"self_attn.indexer.{name}")
    for name in ("q_proj.weight", "k_proj.weight", "q_norm.weight", "k_norm.weight")
)
DENSE_MLP_TABLE: tuple[Row, ...] = (
    (("mlp.gate_up_proj.weight",), "mlp.gate_up_proj.weight"),
    (("mlp.down_proj.weight",), "mlp.down_proj.weight"),
)
MOE_TABLE: tuple[Row, ...] = (
    (("mlp.gate.weight",), "mlp.gate.weight"),
    (("mlp.e_score_correction_bias",), "mlp.gate.e_score_correction_bias"),
    (("mlp.experts.w1", "mlp.experts.w3"), "mlp.experts.gate_up_proj"),  # [E, 2F, D] <- 2 x [E, F, D]
    (("mlp.experts.w2",), "mlp.experts.down_proj"),  # [E, D, F]
    (("mlp.shared_experts.gate_up_proj.weight",), "mlp.shared_experts.gate_up_proj.weight"),
    (("mlp.shared_experts.down_proj.weight",), "mlp.shared_experts.down_proj.weight"),
)

# Config keys copied both ways; training-only fields go under "forgerl".
HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "intermediate_size", "num_local_experts", "num_experts_per_tok",
    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "dense_intermediate_size", "shared_intermediate_size", "routed_scaling_factor", "rotary_dim", "swiglu_alpha",
    "swiglu_limit", "index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks",
    "index_local_blocks",
)  # fmt: skip
LIST_KEYS = ("mlp_layer_types", "layer_types")
FORGERL_KEYS = ("bias_update_rate", "seq_aux_loss_coef", "attn_backend", "msa_backend")
# The checkpoint's own config nests the indexer under sparse_attention_config with these names (as
# transformers' MiniMaxM3VLTextConfig.__post_init__ reads them).
LEGACY_INDEX_KEYS = {
    "index_n_heads": "sparse_num_index_heads",
    "index_head_dim": "sparse_index_dim",
    "index_block_size": "sparse_block_size",
    "index_topk_blocks": "sparse_topk_blocks",
    "index_local_blocks": "sparse_local_block",
}


def name_table(cfg: M3Config) -> dict[str, tuple[str, ...]]:
    """Checkpoint name -> our parameter/buffer names (one, or several to concatenate along dim -2)."""
    table = {hf: ours for ours, hf in TOP_TABLE}
    if cfg.tie_word_embeddings:
        del table["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        rows = ATTENTION_TABLE
        rows += INDEXER_TABLE if cfg.layer_types[i] == SPARSE_ATTENTION else ()
        rows += MOE_TABLE if cfg.mlp_layer_types[i] == SPARSE_MLP else DENSE_MLP_TABLE
        prefix = f"model.layers.{i}."
        table.update({prefix + hf: tuple(prefix + name for name in ours) for ours, hf in rows})
    return table


def config_to_hf(cfg: M3Config, dtype: torch.dtype) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["MiniMaxM3VLForCausalLM"],
        "model_type": "minimax_m3_vl_text",
        **{key: getattr(cfg, key) for key in HF_KEYS},
        **{key: list(getattr(cfg, key)) for key in LIST_KEYS},
        # transformers' rotary embedding reads partial_rotary_factor, not rotary_dim (absent it rotates
        # every channel), so the factor must be written for both to rotate the same rotary_dim channels.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": cfg.rope_theta,
            "partial_rotary_factor": cfg.rotary_dim / cfg.head_dim,
        },
        "hidden_act": "silu",
        "dtype": dtype_name,
        "forgerl": {key: getattr(cfg, key) for key in FORGERL_KEYS},
    }


def config_from_hf(hf: dict[str, Any]) -> M3Config:
    """Our config from a text config.json, ours or transformers' (legacy indexer keys read too)."""
    hf = hf.get("text_config", hf)
    values = {key: hf[key] for key in HF_KEYS if key in hf}
    values.update({key: tuple(hf[key]) for key in LIST_KEYS if hf.get(key)})
    sparse = hf.get("sparse_attention_config") or {}
    values.update({flat: sparse[legacy] for flat, legacy in LEGACY_INDEX_KEYS.items() if legacy in sparse})
    rope = hf.get("rope_parameters") or {}
    values["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", M3Config.rope_theta))
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    head_dim = values.get("head_dim", M3Config.head_dim)
    if factor is not None:  # what transformers rotates; it wins over a disagreeing rotary_dim
        values["rotary_dim"] = int(head_dim * factor)
    values.update(hf.get("forgerl", {}))
    return M3Config(**values)


def checkpoint_tensors(model: MiniMaxM3ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, contiguous CPU tensor) for every tensor of the model."""
    state = model.state_dict()
    for hf, ours in name_table(model.config).items():
        parts = [state[name].detach().cpu() for name in ours]
        yield hf, (torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0].clone()).contiguous()


def state_from_checkpoint(tensors: dict[str, torch.Tensor], cfg: M3Config) -> dict[str, torch.Tensor]:
    """Our state dict from checkpoint tensors (consumed from `tensors`); raises on any missing tensor."""
    missing = [hf for hf in name_table(cfg) if hf not in tensors]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the M3 checkpoint, e.g. {missing[:5]}")
    state: dict[str, torch.Tensor] = {}
    for hf, ours in name_table(cfg).items():
        tensor = tensors.pop(hf)
        parts = tensor.chunk(len(ours), dim=-2) if len(ours) > 1 else (tensor,)
        state.update(zip(ours, parts, strict=True))
    return state


def save_m3_checkpoint(model: MiniMaxM3ForCausalLM, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `config.json` and the safetensors shard(s) that transformers' MiniMaxM3VLForCausalLM loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.model.embed_tokens.weight.dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")
    write_shards(group_shards(checkpoint_tensors(model), max_shard_bytes), path)
    return path


def load_m3_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> MiniMaxM3ForCausalLM:
    """Build the model from `config.json` and load every tensor; tensors without a place are an error,
    except the `mtp.*` module, which transformers drops as well (the M3 backbone has no MTP yet)."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf_config)
    dtype = dtype or getattr(torch, hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    tensors = read_checkpoint_tensors(path, hf_config)
    state = state_from_checkpoint(tensors, cfg)
    unplaced = sorted(name for name in tensors if not name.startswith("mtp."))
    if unplaced:
        raise ValueError(f"{path}: {len(unplaced)} tensors the M3 model has no place for, e.g. {unplaced[:5]}")
    model = MiniMaxM3ForCausalLM(cfg).to(dtype=dtype)
    # lm_head.weight is absent from the table when tied to the embedding; nothing else may be missing.
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: state mismatch, missing {sorted(missing)}, unexpected {result.unexpected_keys}")
    return model
