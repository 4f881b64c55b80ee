"""Aux-loss-free balancing: the bias step rule, and that it brings a skewed router to balance."""

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, expert_load_metrics, update_expert_bias
from forgerl.model.balance import moe_blocks, register_bias_update
from forgerl.model.moe import SparseMoeBlock

pytestmark = pytest.mark.unit


def skewed_block() -> tuple[SparseMoeBlock, torch.Tensor]:
    """A router that sends every token to experts 0 and 1: its inputs share a large component along
    channel 0 and only those two experts' gate rows read it."""
    torch.manual_seed(0)
    block = SparseMoeBlock(ModelConfig.from_preset("debug")).train()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
        block.gate.weight[:2, 0] = 2.0
    direction = torch.zeros(64)
    direction[0] = 3.0
    return block, direction


def test_bias_update_balances_a_skewed_router() -> None:
    block, direction = skewed_block()

    def load_over(steps: int, rate: float) -> torch.Tensor:
        total = torch.zeros(8)
        for _ in range(steps):
            with torch.no_grad():
                _, _, load = block(torch.randn(4, 64, 64) + direction)
            total += load
            if rate:
                update_expert_bias(block, rate)
        return total

    before = expert_load_metrics(load_over(20, rate=0.0)[None])["moe/max_violation"]
    assert before > 2.9  # (nearly) all tokens on 2 of 8 experts: max load = 4x the mean
    load_over(200, rate=0.01)  # DeepSeek-V3 used u = 1e-3 over many more steps
    after = expert_load_metrics(load_over(100, rate=0.01)[None])["moe/max_violation"]
    assert after < 0.1
    # Over-loaded experts were pushed down, the others up.
    bias = block.e_score_correction_bias
    assert (bias[:2] < 0).all() and (bias[2:] > 0).all()


def test_one_step_follows_the_sign_rule_and_resets_the_counts() -> None:
    block, _ = skewed_block()
    block.tokens_per_expert.copy_(torch.tensor([10.0, 0, 5, 5, 5, 5, 5, 5]))  # mean 5
    metrics = update_expert_bias(block, rate=0.5)
    assert torch.equal(block.e_score_correction_bias, torch.tensor([-0.5, 0.5, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(block.tokens_per_expert, torch.zeros(8))
    assert metrics["moe/layer_0/max_violation"] == pytest.approx(1.0)


def test_counts_accumulate_in_training_forwards_only_over_all_layers_and_mtp() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", num_mtp_modules=2))
    ids = torch.randint(0, 4096, (2, 8))
    blocks = moe_blocks(model)
    assert len(blocks) == 2 + 2  # main layers, then the MTP blocks
    model.eval()
    model(ids)
    assert all(block.tokens_per_expert.sum() == 0 for block in blocks)
    model.train()
    out = model(ids)
    out = model(ids)
    model.mtp_loss(out.hidden_states, ids)
    assert torch.equal(torch.stack([b.tokens_per_expert for b in blocks[:2]]), 2 * out.expert_load)
    assert blocks[2].tokens_per_expert.sum() == 2 * 7 * 2  # module 1 sees T - 1 = 7 positions, top-2
    assert blocks[3].tokens_per_expert.sum() == 2 * 6 * 2
    metrics = update_expert_bias(model, rate=1e-3)
    assert set(metrics) == {f"moe/layer_{i}/max_violation" for i in range(4)} | {"moe/max_violation"}
    assert all(block.e_score_correction_bias.abs().sum() > 0 for block in blocks)


def test_optimizer_hook_updates_after_each_step() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    handle = register_bias_update(optimizer, model, rate=1e-3)
    model(torch.randint(0, 4096, (2, 8))).logits.sum().backward()
    optimizer.step()
    bias = model.model.layers[0].block_sparse_moe.e_score_correction_bias
    assert torch.all((bias == 0) | torch.isclose(bias.abs(), torch.tensor(1e-3))) and bias.abs().sum() > 0
    handle.remove()
