"""Presets and parameter counts: the config's arithmetic against instantiated models and the report."""

import pytest
import torch

from forgerl.model import PRESETS, MiniMaxM2ForCausalLM, ModelConfig

pytestmark = pytest.mark.unit


def tensor_count(model: torch.nn.Module) -> int:
    """Parameters plus the routing-bias buffers: every tensor a checkpoint stores."""
    return sum(t.numel() for t in model.state_dict().values())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_counts_from_config_match_an_instantiated_model(preset: str) -> None:
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):  # the full model has 240B parameters: count them without memory
        model = MiniMaxM2ForCausalLM(cfg)
    counts = cfg.param_counts()
    assert tensor_count(model) == counts.total + counts.mtp
    assert tensor_count(model.mtp) == counts.mtp


def test_minimax_m2_matches_the_report() -> None:
    counts = ModelConfig.from_preset("minimax-m2").param_counts()
    # Report: 229.9B total, 9.8B activated per token. Ours: 228.69B (embedding, 62 layers, final norm and
    # head; MTP apart). The 1.2B gap (about 2 x vocab x hidden) is not explained by the public config.
    assert round(counts.total / 1e9, 2) == 228.69
    assert abs(counts.total - 229.9e9) / 229.9e9 < 0.006
    # Activated: attention + router + 8 of 256 experts in each of 62 layers (no embedding or head): 9.80B.
    assert round(counts.active / 1e9, 2) == 9.80
    assert abs(counts.active - 9.8e9) / 9.8e9 < 0.001
    # Per layer: 44.0M attention, 256 experts of 14.2M (w1, w2, w3 of 3072 x 1536).
    assert (counts.per_layer_attention, counts.per_expert) == (44_040_192, 14_155_776)


def test_debug_and_small_sizes() -> None:
    debug, small = ModelConfig.from_preset("debug").param_counts(), ModelConfig.from_preset("small").param_counts()
    assert 0.5e6 < debug.total + debug.mtp < 1.5e6  # "about 1M"
    assert 10e6 < small.total + small.mtp < 100e6  # "tens of millions"


def test_overrides_and_validation() -> None:
    cfg = ModelConfig.from_preset("debug", num_mtp_modules=3, vocab_size=128)
    assert (cfg.num_mtp_modules, cfg.vocab_size, cfg.num_key_value_groups) == (3, 128, 2)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="rotary_dim"):
        ModelConfig(rotary_dim=3)
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig(num_experts_per_tok=9)


@pytest.mark.parametrize(("knob", "value"), [("moe_backend", "triton"), ("attn_backend", "tree")])
def test_a_triton_backend_on_the_cpu_says_what_to_do(knob: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without Triton's interpreter, a kernel backend on CPU tensors (e.g. a checkpoint trained with the
    kernels, loaded on a CPU box) raises naming the knob and the fix; Triton itself said '0 active drivers'."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", **{knob: value}))
    with pytest.raises(RuntimeError, match=f"{knob} '{value}' runs a Triton kernel.*TRITON_INTERPRET=1"):
        model(torch.tensor([[1, 2, 3]]))
