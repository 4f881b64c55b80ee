"""MiniMax-M3 checkpoints: we write the layout of transformers' `MiniMaxM3VLForCausalLM` and read it and the
released checkpoint's.

Shape legend: E experts, F expert FFN width, D hidden.

`save_m3_checkpoint` writes what `transformers.MiniMaxM3VLForCausalLM.from_pretrained` reads (and what its
`save_pretrained` writes): `config.json` of model_type `minimax_m3_vl_text` and safetensors named as that
model's state dict, plus MTP modules under vLLM's MiniMaxM3MTP names (transformers ignores them).
`load_m3_checkpoint` reads that back, and also the released VL checkpoint's text model (layout "released"
below). FP8 weights with DeepSeek-style 128x128 `weight_scale_inv` are dequantized by
checkpoint.read_checkpoint_tensors; other quantizations (vLLM reads M3's as ModelOpt MXFP8) are not.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from forgerl.model.checkpoint import group_shards, read_checkpoint_tensors, write_shards
from forgerl.model.m3 import MiniMaxM3ForCausalLM
from forgerl.model.m3_config import SPARSE_ATTENTION, SPARSE_MLP, M3Config

# Rows (our names, checkpoint names). Where one side has several names, their tensors are concatenated
# along dim -2 (the output rows) to make the other side's one tensor, gate before up; a `{e}` in a
# checkpoint name marks one tensor per expert that we keep stacked ([E, ...]). Two layouts:
# - "transformers": MiniMaxM3VLForCausalLM's state dict, which fuses the routed experts' gate and up into
#   gate_up_proj [E, 2F, D] (MiniMaxM3VLExperts._apply_gate chunks it gate first);
# - "released": the MiniMax-M3 checkpoint's text model as vLLM's MiniMaxM3 loader and transformers'
#   conversion_mapping["minimax_m3_vl"] read it: under `language_model.`, MoE layers under
#   `block_sparse_moe` with per-expert w1 / w2 / w3, dense MLP and shared expert with split gate/up
#   projections, indexer tensors as `self_attn.index_*`. Read only: we write the transformers layout.
Row = tuple[tuple[str, ...], tuple[str, ...]]
TRANSFORMERS, RELEASED = "transformers", "released"
_ATTENTION = tuple(
    ((name,), (name,))
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
_INDEXER_PARTS = ("q_proj", "k_proj", "q_norm", "k_norm")
_MLP_PARTS = ("gate_up_proj.weight", "down_proj.weight")
TOP_TABLES: dict[str, tuple[Row, ...]] = {
    TRANSFORMERS: tuple(
        ((name,), (name,)) for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    ),
    RELEASED: tuple(
        ((name,), (f"language_model.{name}",))
        for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
    ),
}
LAYER_PREFIXES = {TRANSFORMERS: "model.layers.{i}.", RELEASED: "language_model.model.layers.{i}."}
# Per layout: the rows of every layer, of sparse-attention layers, of dense-MLP layers, of MoE layers.
LAYER_TABLES: dict[str, dict[str, tuple[Row, ...]]] = {
    TRANSFORMERS: {
        "attention": _ATTENTION,
        "indexer": tuple(
            ((f"self_attn.indexer.{part}.weight",), (f"self_attn.indexer.{part}.weight",)) for part in _INDEXER_PARTS
        ),
        "dense": tuple(((f"mlp.{part}",), (f"mlp.{part}",)) for part in _MLP_PARTS),
        "moe": (
            (("mlp.gate.weight",), ("mlp.gate.weight",)),
            (("mlp.e_score_correction_bias",), ("mlp.gate.e_score_correction_bias",)),
            (("mlp.experts.w1", "mlp.experts.w3"), ("mlp.experts.gate_up_proj",)),  # [E, 2F, D]
            (("mlp.experts.w2",), ("mlp.experts.down_proj",)),  # [E, D, F]
            *(((f"mlp.shared_experts.{part}",), (f"mlp.shared_experts.{part}",)) for part in _MLP_PARTS),
        ),
    },
    RELEASED: {
        "attention": _ATTENTION,
        "indexer": tuple(
            ((f"self_attn.indexer.{part}.weight",), (f"self_attn.index_{part}.weight",)) for part in _INDEXER_PARTS
        ),
        "dense": (
            (("mlp.gate_up_proj.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
            (("mlp.down_proj.weight",), ("mlp.down_proj.weight",)),
        ),
        "moe": (
            (("mlp.gate.weight",), ("block_sparse_moe.gate.weight",)),
            (("mlp.e_score_correction_bias",), ("block_sparse_moe.e_score_correction_bias",)),
            *(((f"mlp.experts.{w}",), (f"block_sparse_moe.experts.{{e}}.{w}.weight",)) for w in ("w1", "w2", "w3")),
            (
                ("mlp.shared_experts.gate_up_proj.weight",),
                ("block_sparse_moe.shared_experts.gate_proj.weight", "block_sparse_moe.shared_experts.up_proj.weight"),
            ),
            (("mlp.shared_experts.down_proj.weight",), ("block_sparse_moe.shared_experts.down_proj.weight",)),
        ),
    },
}
# MTP module k (M3Config.num_mtp_modules), in both layouts named as vLLM's MiniMaxM3MTP.load_weights reads
# them (vllm/models/minimax_m3/nvidia/mtp.py: it strips `language_model.`, maps `.mtp.` away and matches
# its parameters `model.layers.{k}.{enorm, hnorm, eh_proj, final_layernorm, transformer_layer.*}`), with
# the layer in the released naming (per-expert w1 / w2 / w3, split gate / up, `self_attn.index_*`);
# transformers has no MTP and skips every `mtp.` name (_keys_to_ignore_on_load_unexpected).
MTP_PREFIXES = {TRANSFORMERS: "model.mtp.layers.{k}.", RELEASED: "language_model.model.mtp.layers.{k}."}
MTP_ROWS: tuple[Row, ...] = (
    (("enorm.weight",), ("enorm.weight",)),
    (("hnorm.weight",), ("hnorm.weight",)),
    (("eh_proj.weight",), ("eh_proj.weight",)),
    (("shared_head.norm.weight",), ("final_layernorm.weight",)),
    *(
        (tuple(f"block.{n}" for n in ours), tuple(f"transformer_layer.{n}" for n in theirs))
        for part in ("attention", "indexer", "moe")
        for ours, theirs in LAYER_TABLES[RELEASED][part]
    ),
)
# Parts of a released VL checkpoint the text backbone has no place for: vision tower, projector, and MTP
# modules beyond num_mtp_modules (transformers' pattern for the latter).
RELEASED_SKIPPED = re.compile(r"^(vision_tower|multi_modal_projector|patch_merge_mlp)\.|(^|\.)mtp\.")


# Config keys copied both ways; training-only fields go under "forgerl".
HF_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "max_position_embeddings", "rms_norm_eps", "intermediate_size", "num_local_experts", "num_experts_per_tok",
    "tie_word_embeddings", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "dense_intermediate_size", "shared_intermediate_size", "routed_scaling_factor", "rotary_dim", "swiglu_alpha",
    "swiglu_limit", "index_n_heads", "index_head_dim", "index_block_size", "index_topk_blocks",
    "index_local_blocks", "num_mtp_modules",
)  # fmt: skip
LIST_KEYS = ("mlp_layer_types", "layer_types")
FORGERL_KEYS = ("bias_update_rate", "seq_aux_loss_coef", "attn_backend", "msa_backend", "index_backend")
# The checkpoint's own config nests the indexer under sparse_attention_config with these names (as
# transformers' MiniMaxM3VLTextConfig.__post_init__ reads them).
LEGACY_INDEX_KEYS = {
    "index_n_heads": "sparse_num_index_heads",
    "index_head_dim": "sparse_index_dim",
    "index_block_size": "sparse_block_size",
    "index_topk_blocks": "sparse_topk_blocks",
    "index_local_blocks": "sparse_local_block",
}


def name_table(cfg: M3Config, layout: str = TRANSFORMERS) -> tuple[Row, ...]:
    """Every tensor of the model as (our names, checkpoint names) rows, full names, for `layout`."""
    tables = LAYER_TABLES[layout]
    top = TOP_TABLES[layout]
    if cfg.tie_word_embeddings:
        top = tuple(row for row in top if row[0] != ("lm_head.weight",))
    rows = list(top)
    for i in range(cfg.num_hidden_layers):
        layer = tables["attention"]
        layer += tables["indexer"] if cfg.layer_types[i] == SPARSE_ATTENTION else ()
        layer += tables["moe"] if cfg.mlp_layer_types[i] == SPARSE_MLP else tables["dense"]
        ours_prefix, theirs_prefix = f"model.layers.{i}.", LAYER_PREFIXES[layout].format(i=i)
        rows += [
            (tuple(ours_prefix + n for n in ours), tuple(theirs_prefix + n for n in theirs)) for ours, theirs in layer
        ]
    for k in range(cfg.num_mtp_modules):
        ours_prefix, theirs_prefix = f"mtp.{k}.", MTP_PREFIXES[layout].format(k=k)
        rows += [
            (tuple(ours_prefix + n for n in ours), tuple(theirs_prefix + n for n in theirs))
            for ours, theirs in MTP_ROWS
        ]
    return tuple(rows)


# transformers' save_pretrained of the VL model writes the dense layers' MLP under `block_sparse_moe.` (its
# rename is not reversible); the checkpoint and vLLM keep them under `mlp.`. Both are read.
_DENSE_UNDER_MOE = re.compile(r"(layers\.\d+\.)block_sparse_moe\.((?:gate|up|down)_proj\.weight)$")


def _dense_mlp_alias(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_DENSE_UNDER_MOE.sub(r"\1mlp.\2", name): tensor for name, tensor in tensors.items()}


def _split(whole: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    return whole.chunk(count, dim=-2) if count > 1 else (whole,)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


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
    """(checkpoint name, contiguous CPU tensor) for every tensor of the model, transformers layout."""
    state = model.state_dict()
    for ours, theirs in name_table(model.config):
        whole = _join([state[name].detach().cpu() for name in ours])
        for name, part in zip(theirs, _split(whole, len(theirs)), strict=True):
            # Own storage: safetensors refuses shared views. `{e}`: one tensor per expert of [E, ...].
            if "{e}" in name:
                yield from ((name.format(e=e), expert.clone().contiguous()) for e, expert in enumerate(part))
            else:
                yield name, part.clone().contiguous()


def state_from_checkpoint(
    tensors: dict[str, torch.Tensor], cfg: M3Config, layout: str = TRANSFORMERS
) -> dict[str, torch.Tensor]:
    """Our state dict from checkpoint tensors (consumed from `tensors`); raises on any missing tensor."""
    rows = name_table(cfg, layout)
    wanted = [
        n.format(e=e) for _, theirs in rows for n in theirs for e in range(cfg.num_local_experts if "{e}" in n else 1)
    ]
    missing = [name for name in wanted if name not in tensors]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing from the M3 checkpoint ({layout} layout), e.g. {missing[:5]}")
    state: dict[str, torch.Tensor] = {}
    for ours, theirs in rows:
        parts = [
            torch.stack([tensors.pop(n.format(e=e)) for e in range(cfg.num_local_experts)])
            if "{e}" in n
            else tensors.pop(n)
            for n in theirs
        ]
        state.update(zip(ours, _split(_join(parts), len(ours)), strict=True))
    return state


def save_m3_checkpoint(model: MiniMaxM3ForCausalLM, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `config.json` and the safetensors shard(s) that transformers' MiniMaxM3VLForCausalLM loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = model.model.embed_tokens.weight.dtype
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config, dtype), indent=2) + "\n")
    write_shards(group_shards(checkpoint_tensors(model), max_shard_bytes), path)
    return path


def load_m3_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, overrides: Mapping[str, Any] | None = None
) -> MiniMaxM3ForCausalLM:
    """Build the model from `config.json` (ours, transformers' or the released VL one) and load every tensor
    of either layout (the released one when names start with `language_model.`), the config's
    num_mtp_modules MTP modules included. Tensors without a place are an error, except the vision tower,
    the projector and MTP modules the config does not ask for (transformers' text model drops them all).
    `overrides` replaces config fields that leave the tensors as they are (the trainer's kernels)."""
    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf_config).replace(**(overrides or {}))
    dtype = dtype or getattr(torch, hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    tensors = read_checkpoint_tensors(path, hf_config)
    layout = RELEASED if any(name.startswith("language_model.") for name in tensors) else TRANSFORMERS
    if layout == RELEASED:
        tensors = _dense_mlp_alias(tensors)
    state = state_from_checkpoint(tensors, cfg, layout)
    unplaced = sorted(name for name in tensors if not RELEASED_SKIPPED.search(name))
    if unplaced:
        raise ValueError(f"{path}: {len(unplaced)} tensors the M3 model has no place for, e.g. {unplaced[:5]}")
    model = MiniMaxM3ForCausalLM(cfg).to(dtype=dtype)
    # lm_head.weight is absent from the table when tied to the embedding; nothing else may be missing.
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: state mismatch, missing {sorted(missing)}, unexpected {result.unexpected_keys}")
    return model
