"""MiniMax-M3 backbone against transformers' MiniMaxM3VLForCausalLM (the independent reference): logits,
the lightning indexer's block indices, checkpoints both ways."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_m3
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLConfig, MiniMaxM3VLTextConfig

from forgerl.model.m3 import MiniMaxM3ForCausalLM, SharedExpertMoeBlock
from forgerl.model.m3_checkpoint import config_to_hf, load_m3_checkpoint, save_m3_checkpoint
from forgerl.model.m3_config import M3Config

pytestmark = pytest.mark.unit


def randomised_tiny_model(**overrides: object) -> MiniMaxM3ForCausalLM:
    """Random weights everywhere, norms and routing bias included (their zero init would hide a misplaced
    norm or an ignored bias); the 3-layer tiny preset: layer 0 dense + full attention, 1-2 MoE + indexer."""
    torch.manual_seed(0)
    model = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny", **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2)
        for module in model.modules():
            if isinstance(module, SharedExpertMoeBlock):
                module.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


def reference_model(path: Path) -> hf_m3.MiniMaxM3VLForCausalLM:
    model = hf_m3.MiniMaxM3VLForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def reference_blocks(model: hf_m3.MiniMaxM3VLForCausalLM, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits and, per sparse layer, what transformers' indexer returned (caught with forward hooks)."""
    blocks: dict[int, torch.Tensor] = {}
    hooks = [
        layer.self_attn.indexer.register_forward_hook(lambda module, args, out, i=i: blocks.__setitem__(i, out))
        for i, layer in enumerate(model.model.layers)
        if layer.self_attn.indexer is not None
    ]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, blocks


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[MiniMaxM3ForCausalLM, Path]:
    model = randomised_tiny_model()
    return model, save_m3_checkpoint(model, tmp_path_factory.mktemp("m3"), max_shard_bytes=200_000)


def test_transformers_loads_every_tensor_of_our_checkpoint(saved: tuple[MiniMaxM3ForCausalLM, Path]) -> None:
    _, path = saved
    assert (path / "model.safetensors.index.json").exists()  # sharded: the index is exercised too
    _, info = hf_m3.MiniMaxM3VLForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))


# (batch, length): 5 keeps every block; 37 and 64 exceed (topk 3 + local 1) * block 4 = 16 keys, so the
# indexer drops blocks for most queries.
@pytest.mark.parametrize("shape", [(1, 5), (2, 37), (1, 64)])
def test_logits_and_block_indices_match_transformers(
    saved: tuple[MiniMaxM3ForCausalLM, Path], shape: tuple[int, int]
) -> None:
    model, path = saved
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, shape)
    with torch.no_grad():
        ours = model(ids)
    theirs, their_blocks = reference_blocks(reference_model(path), ids)
    assert (ours.logits - theirs).abs().max().item() <= 1e-5
    assert sorted(ours.block_indices) == sorted(their_blocks) == [1, 2]
    for i, blocks in ours.block_indices.items():
        assert torch.equal(blocks, their_blocks[i])
    visible_blocks_T = torch.arange(shape[1]) // model.config.index_block_size + 1
    kept_T = (ours.block_indices[1] >= 0).sum(-1)[0, 0]
    dropped = (kept_T < visible_blocks_T).any().item()
    assert dropped == (shape[1] > 12)  # more than 3 blocks of 4 visible: something must go


def test_dropped_blocks_change_the_output(saved: tuple[MiniMaxM3ForCausalLM, Path]) -> None:
    """The parity above is not vacuous: keeping every block gives other logits at 64 tokens."""
    model, _ = saved
    dense = MiniMaxM3ForCausalLM(model.config.replace(index_topk_blocks=16)).eval()
    dense.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sparse_logits, dense_logits = model(ids).logits, dense(ids).logits
    assert torch.equal(sparse_logits[:, :12], dense_logits[:, :12])  # nothing dropped yet
    assert (sparse_logits[:, 16:] - dense_logits[:, 16:]).abs().max().item() > 1e-3


def test_indexer_contract_left_packed_deduplicated_local(saved: tuple[MiniMaxM3ForCausalLM, Path]) -> None:
    model, _ = saved
    ids = torch.randint(0, model.config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        blocks_BGTN = model(ids).block_indices[2]
    cfg = model.config
    assert blocks_BGTN.shape == (2, cfg.num_key_value_heads, 50, cfg.index_topk_blocks)
    own_T = torch.arange(50) // cfg.index_block_size
    for row_TN in blocks_BGTN.reshape(-1, 50, cfg.index_topk_blocks).unbind(0):
        for t, kept in enumerate(row_TN.tolist()):
            valid = [b for b in kept if b >= 0]
            assert kept == valid + [-1] * (len(kept) - len(valid))  # left-packed, -1 padded
            assert len(set(valid)) == len(valid) and own_T[t].item() in valid  # no repeats, own block kept
            assert all(b <= own_T[t].item() for b in valid)  # no future block
            assert len(valid) == min(cfg.index_topk_blocks, own_T[t].item() + 1)


def test_we_load_a_transformers_checkpoint(tmp_path: Path) -> None:
    cfg = M3Config.from_preset("minimax-m3-tiny")
    torch.manual_seed(4)
    reference = hf_m3.MiniMaxM3VLForCausalLM(MiniMaxM3VLTextConfig(**config_to_hf(cfg, torch.float32)))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2)
    reference.save_pretrained(tmp_path)
    model = load_m3_checkpoint(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    reference = reference_model(tmp_path)
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max().item() <= 1e-5


def test_we_load_the_released_layout_transformers_writes_for_the_vl_model(tmp_path: Path) -> None:
    """transformers' MiniMaxM3SparseForConditionalGeneration saves the checkpoint's own layout (its
    conversion mapping reversed: language_model.*, block_sparse_moe, per-expert w1/w2/w3, index_*_proj);
    we load its text model and give its logits on text."""
    cfg = M3Config.from_preset("minimax-m3-tiny")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = MiniMaxM3VLConfig(text_config=config_to_hf(cfg, torch.float32), vision_config=vision)
    torch.manual_seed(5)
    reference = hf_m3.MiniMaxM3SparseForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.2)
    reference.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "language_model.model.layers.1.block_sparse_moe.experts.7.w3.weight" in names
    assert "language_model.model.layers.2.self_attn.index_q_proj.weight" in names
    model = load_m3_checkpoint(tmp_path).eval()
    reference = hf_m3.MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 40), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(ids).logits - reference(input_ids=ids).logits).abs().max().item() <= 1e-5


def test_checkpoint_round_trip_is_exact(saved: tuple[MiniMaxM3ForCausalLM, Path]) -> None:
    model, path = saved
    loaded = load_m3_checkpoint(path)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_preview_preset_is_the_transformers_default_shape() -> None:
    cfg = M3Config.from_preset("minimax-m3-preview")
    exported = config_to_hf(cfg, torch.bfloat16)
    reference = MiniMaxM3VLTextConfig()
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "dense_intermediate_size", "shared_intermediate_size",
                "num_local_experts", "num_experts_per_tok", "routed_scaling_factor", "index_n_heads",
                "index_head_dim", "index_block_size", "index_topk_blocks", "index_local_blocks",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "rotary_dim"):  # fmt: skip
        assert exported[key] == getattr(reference, key), key
    assert exported["rope_parameters"]["rope_theta"] == reference.rope_parameters["rope_theta"]
    # The checkpoint's pattern (vLLM's config: moe_layer_freq = sparse_attention_freq = [0] * 3 + [1] * 57).
    legacy = MiniMaxM3VLTextConfig(moe_layer_freq=[0] * 3 + [1] * 57,
                                   sparse_attention_config={"sparse_attention_freq": [0] * 3 + [1] * 57})  # fmt: skip
    assert exported["mlp_layer_types"] == legacy.mlp_layer_types
    assert exported["layer_types"] == legacy.layer_types


def test_config_json_round_trips_through_transformers(saved: tuple[MiniMaxM3ForCausalLM, Path]) -> None:
    model, path = saved
    hf = MiniMaxM3VLTextConfig(**json.loads((path / "config.json").read_text()))
    assert hf.rope_parameters["partial_rotary_factor"] * hf.head_dim == model.config.rotary_dim
    assert hf.layer_types == list(model.config.layer_types)


@pytest.mark.parametrize("preset", ["minimax-m3-tiny", "minimax-m3-preview"])
def test_counts_from_config_match_an_instantiated_model(preset: str) -> None:
    cfg = M3Config.from_preset(preset)
    with torch.device("meta"):  # the preview has 426B parameters: count them without memory
        model = MiniMaxM3ForCausalLM(cfg)
    counts = cfg.m3_param_counts()
    assert sum(t.numel() for t in model.state_dict().values()) == counts.total
    per_token = 0
    for layer in model.model.layers:
        mlp = layer.mlp
        per_token += sum(p.numel() for p in layer.parameters())
        if isinstance(mlp, SharedExpertMoeBlock):  # only top-k of the experts, plus the routing bias
            unused = cfg.num_local_experts - cfg.num_experts_per_tok
            per_token += mlp.e_score_correction_bias.numel() - unused * sum(
                p[0].numel() for p in mlp.experts.parameters()
            )
    assert per_token == counts.active
    with pytest.raises(TypeError, match="m3_param_counts"):
        cfg.param_counts()
