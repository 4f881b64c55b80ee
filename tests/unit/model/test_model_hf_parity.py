"""Our checkpoint, loaded by transformers' own MiniMaxM2ForCausalLM, gives our logits."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint

pytestmark = pytest.mark.unit


def randomised_debug_model(num_mtp_modules: int = 1) -> MiniMaxM2ForCausalLM:
    """Random weights everywhere, including norms and the correction bias (zero/one at init would hide
    a misplaced norm or an ignored bias)."""
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", num_mtp_modules=num_mtp_modules))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
        for layer in model.model.layers:
            layer.block_sparse_moe.e_score_correction_bias.normal_(0.0, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[MiniMaxM2ForCausalLM, Path]:
    model = randomised_debug_model()
    path = save_checkpoint(model, None, tmp_path_factory.mktemp("ckpt"), max_shard_bytes=1_000_000)
    return model, path


def test_transformers_loads_every_main_tensor(saved: tuple[MiniMaxM2ForCausalLM, Path]) -> None:
    _, path = saved
    _, info = transformers.MiniMaxM2ForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    # Only the MTP module (model.layers.2.*, after the 2 main layers) is unknown to transformers.
    assert info["unexpected_keys"] and all(key.startswith("model.layers.2.") for key in info["unexpected_keys"])


@pytest.mark.parametrize("shape", [(1, 1), (3, 40), (2, 97)])
def test_logits_match_transformers(saved: tuple[MiniMaxM2ForCausalLM, Path], shape: tuple[int, int]) -> None:
    model, path = saved
    reference = transformers.MiniMaxM2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, shape)
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_config_json_carries_what_vllm_reads(saved: tuple[MiniMaxM2ForCausalLM, Path]) -> None:
    _, path = saved
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["MiniMaxM2ForCausalLM"] and config["model_type"] == "minimax_m2"
    assert config["scoring_func"] == "sigmoid" and config["use_routing_bias"] is True
    assert (config["rotary_dim"], config["head_dim"], config["rope_theta"]) == (8, 16, 5e6)
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 64)
    assert config["num_mtp_modules"] == 1 and config["use_mtp"] is True
    hf_config = transformers.AutoConfig.from_pretrained(path)
    assert hf_config.rope_parameters["partial_rotary_factor"] == 0.5
