"""seeded_init_: each row from its own generator (so shards can draw only their rows), the distribution
of reset_parameters, routing buffers reset."""

import zlib

import pytest
import torch

from forgerl.distributed.materialize import seeded_init_
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig

pytestmark = pytest.mark.unit


def test_rows_by_hand_and_distribution() -> None:
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
    model.model.layers[0].block_sparse_moe.e_score_correction_bias.fill_(3.0)
    seeded_init_(model, seed=7)
    std = model.config.initializer_range
    name = "model.layers.1.block_sparse_moe.experts.w2"
    g = torch.Generator().manual_seed(7 * 1_000_003 + zlib.crc32(name.encode()) * 65_537 + 5)
    torch.testing.assert_close(model.get_parameter(name)[5], torch.randn(64, 64, generator=g) * std, rtol=0, atol=0)
    head = model.lm_head.weight
    assert abs(head.mean().item()) < 1e-3 and head.std().item() == pytest.approx(std, rel=0.01)
    assert torch.equal(model.model.norm.weight, torch.ones(64))
    assert not model.model.layers[0].block_sparse_moe.e_score_correction_bias.any()
    other = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
    seeded_init_(other, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters(), strict=True))
    seeded_init_(other, seed=8)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)
