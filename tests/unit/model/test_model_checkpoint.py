"""Checkpoint files: HF names, sharding, bit-exact round trips, FP8 block dequantization."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, load_checkpoint, save_checkpoint
from forgerl.model.checkpoint import config_from_hf, config_to_hf, dequantize_fp8_blocks, name_table

pytestmark = pytest.mark.unit


def debug_model(dtype: torch.dtype = torch.float32, **overrides: object) -> MiniMaxM2ForCausalLM:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", **overrides)).to(dtype)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_()
    return model


def stored_names(path: Path) -> set[str]:
    names: set[str] = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize(
    ("dtype", "max_shard_bytes"), [(torch.float32, 300_000), (torch.float64, 10**9), (torch.bfloat16, 100_000)]
)
def test_save_load_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype, max_shard_bytes: int) -> None:
    model = debug_model(dtype, num_mtp_modules=2)
    save_checkpoint(model, None, tmp_path, max_shard_bytes=max_shard_bytes)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config == model.config
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert torch.equal(after[name], tensor), name


def test_sharded_files_and_index(tmp_path: Path) -> None:
    save_checkpoint(debug_model(), None, tmp_path, max_shard_bytes=300_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and {p.name for p in shards} == set(index["weight_map"].values())
    assert set(index["weight_map"]) == stored_names(tmp_path)
    for shard in shards:  # only a tensor larger than the limit (the 1 MB embedding, head) has a shard alone
        tensors = load_file(str(shard))
        assert sum(t.nbytes for t in tensors.values()) <= 300_000 or len(tensors) == 1
    assert not (tmp_path / "model.safetensors").exists()


def test_checkpoint_uses_the_hf_names(tmp_path: Path) -> None:
    save_checkpoint(debug_model(num_mtp_modules=1), None, tmp_path)
    names = stored_names(tmp_path)
    for expected in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_norm.weight",
        "model.layers.0.block_sparse_moe.gate.weight",
        "model.layers.0.block_sparse_moe.e_score_correction_bias",
        "model.layers.0.block_sparse_moe.experts.7.w1.weight",
        "model.layers.1.block_sparse_moe.experts.0.w2.weight",
        # The MTP module follows the 2 main layers.
        "model.layers.2.eh_proj.weight",
        "model.layers.2.enorm.weight",
        "model.layers.2.shared_head.norm.weight",
        "model.layers.2.block_sparse_moe.experts.3.w3.weight",
    ):
        assert expected in names
    tensors = load_file(str(tmp_path / "model.safetensors"))
    assert tensors["model.layers.0.block_sparse_moe.experts.7.w1.weight"].shape == (64, 64)  # [F, D]
    assert tensors["model.layers.2.eh_proj.weight"].shape == (64, 128)  # [D, 2D]
    assert len(names) == 3 + 3 * (10 + 3 * 8) + 4  # top, 3 blocks (10 tensors + 24 expert matrices), MTP extras


@pytest.mark.parametrize(
    "overrides", [{}, {"num_mtp_modules": 0}, {"num_mtp_modules": 3}, {"tie_word_embeddings": True}]
)
def test_name_table_covers_the_state_dict_exactly(overrides: dict[str, object]) -> None:
    model = debug_model(**overrides)
    table = name_table(model.config)
    state = model.state_dict()
    expected = set(state) - ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    assert set(table) == expected
    hf_names = [hf.format(e=e) for hf in table.values() for e in (range(8) if "{e}" in hf else [0])]
    assert len(hf_names) == len(set(hf_names))  # no two tensors share a checkpoint name


def test_config_round_trip_through_config_json() -> None:
    cfg = ModelConfig.from_preset("small", mtp_loss_weight=0.3, seq_aux_loss_coef=1e-4, attn_backend="eager")
    hf = json.loads(json.dumps(config_to_hf(cfg, torch.bfloat16)))
    assert config_from_hf(hf) == cfg
    assert hf["torch_dtype"] == "bfloat16"


def test_missing_tensors_are_an_error_unless_not_strict(tmp_path: Path) -> None:
    model = debug_model()
    save_checkpoint(model, None, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    mtp_names = [name for name in tensors if name.startswith("model.layers.2.")]
    save_file({k: v for k, v in tensors.items() if k not in mtp_names}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="tensors missing"):
        load_checkpoint(tmp_path)
    loaded = load_checkpoint(tmp_path, strict=False)
    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.weight, model.model.layers[1].self_attn.o_proj.weight)


def quantize_fp8_blocks(w_OI: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The format of the released checkpoints: per-block amax / 448 scales, weight / scale in float8."""
    o, i = w_OI.shape
    rows, cols = -(-o // block[0]), -(-i // block[1])
    scale = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            tile = w_OI[r * block[0] : (r + 1) * block[0], c * block[1] : (c + 1) * block[1]]
            scale[r, c] = tile.abs().max() / torch.finfo(torch.float8_e4m3fn).max
    expanded = scale.repeat_interleave(block[0], 0)[:o].repeat_interleave(block[1], 1)[:, :i]
    return (w_OI / expanded).to(torch.float8_e4m3fn), scale


def test_fp8_block_checkpoint_is_dequantized(tmp_path: Path) -> None:
    """A synthetic checkpoint in the released FP8 layout, with blocks that do not tile the matrices."""
    model = debug_model(dtype=torch.bfloat16)
    save_checkpoint(model, None, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    block = (24, 40)
    quantized = [n for n in tensors if n.endswith(("proj.weight", "w1.weight", "w2.weight", "w3.weight"))]
    for name in quantized:
        tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name].float(), block)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": list(block)}
    (tmp_path / "config.json").write_text(json.dumps(config))

    loaded = load_checkpoint(tmp_path)
    w = loaded.model.layers[0].block_sparse_moe.experts.w2[5]
    expected = dequantize_fp8_blocks(
        tensors["model.layers.0.block_sparse_moe.experts.5.w2.weight"],
        tensors["model.layers.0.block_sparse_moe.experts.5.w2.weight_scale_inv"],
        block,
    ).to(torch.bfloat16)
    assert torch.equal(w, expected)
    original = model.model.layers[0].block_sparse_moe.experts.w2[5].float()
    # float8_e4m3fn keeps 3 mantissa bits: relative error <= 2^-4 per element, plus bf16 rounding.
    assert ((w.float() - original).abs() <= original.abs() * 0.07 + 1e-6).all()
    # Unquantized tensors (norms, router, bias, embedding, head) are untouched.
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(
        loaded.model.layers[1].block_sparse_moe.gate.weight, model.model.layers[1].block_sparse_moe.gate.weight
    )
