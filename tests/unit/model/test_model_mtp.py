"""Multi-token prediction: which tokens each module predicts, the loss mask, growing K by copying."""

import copy

import pytest
import torch
import torch.nn.functional as F

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.mtp import masked_cross_entropy

pytestmark = pytest.mark.unit


def test_module_losses_follow_the_definition() -> None:
    """Module 1 at position i sees h_i and Emb(x_{i+1}) and predicts x_{i+2}; module 2 chains on it."""
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", num_mtp_modules=2, mtp_loss_weight=0.5)).double()
    ids = torch.randint(0, 4096, (2, 9))
    hidden = model(ids).hidden_states
    loss, metrics = model.mtp_loss(hidden, ids)

    emb, rope = model.model.embed_tokens, model.rope(torch.arange(9).expand(2, 9), torch.float64)
    expected, h = [], hidden
    for k, module in enumerate(model.mtp, start=1):
        n = 9 - k
        x = module.eh_proj(torch.cat([module.enorm(emb(ids[:, k:])), module.hnorm(h[:, :n])], dim=-1))
        h = module.block(x, (rope[0][:, :n], rope[1][:, :n]), None).x_BTD
        logits = model.lm_head(module.shared_head.norm(h))[:, : n - 1]
        expected.append(F.cross_entropy(logits.flatten(0, 1), ids[:, k + 1 :].flatten()))
    assert metrics["mtp/loss_1"] == pytest.approx(expected[0].item(), rel=1e-12)
    assert metrics["mtp/loss_2"] == pytest.approx(expected[1].item(), rel=1e-12)
    assert loss.item() == pytest.approx(0.5 * (expected[0] + expected[1]).item() / 2, rel=1e-12)


def test_loss_mask_selects_target_tokens() -> None:
    logits = torch.randn(1, 4, 10)
    targets = torch.tensor([[1, 2, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 0]])
    expected = F.cross_entropy(logits[0, 1:3], targets[0, 1:3])
    torch.testing.assert_close(masked_cross_entropy(logits, targets, mask), expected)
    assert masked_cross_entropy(logits, targets, torch.zeros(1, 4)).item() == 0.0


def test_mask_entries_of_the_targets_are_used() -> None:
    """Module 1's targets are tokens 2..T-1: the mask entries of tokens 0 and 1 never matter."""
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).double()
    ids = torch.randint(0, 4096, (1, 10))
    hidden = model(ids).hidden_states

    def loss_with_mask_off(*tokens: int) -> float:
        mask = torch.ones(1, 10, dtype=torch.bool)
        mask[0, list(tokens)] = False
        return model.mtp_loss(hidden, ids, mask)[1]["mtp/loss_1"]

    everything = loss_with_mask_off()
    assert loss_with_mask_off(0, 1) == everything
    assert loss_with_mask_off(4) != everything
    assert loss_with_mask_off(0, 1, 2, 3, 4) == loss_with_mask_off(2, 3, 4) != everything


def test_gradients_reach_main_model_and_mtp_but_short_inputs_give_zero() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
    ids = torch.randint(0, 4096, (2, 6))
    loss, _ = model.mtp_loss(model(ids).hidden_states, ids)
    loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0  # through the hidden states
    short = torch.randint(0, 4096, (2, 2))  # no position has a token two ahead
    loss, metrics = model.mtp_loss(model(short).hidden_states, short)
    assert loss.item() == 0.0 and metrics == {}


def test_growing_k_copies_module_one_so_new_modules_start_at_its_loss() -> None:
    """Train K=1 on sequences x_t = (a + t) mod 64, where predicting 2 or 3 ahead from the next token's
    embedding is the same function; grow to K=3 by copying (the report's recipe) and compare with
    freshly initialised modules 2 and 3."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", vocab_size=64, mtp_loss_weight=1.0)
    model = MiniMaxM2ForCausalLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def batch(size: int) -> torch.Tensor:
        return (torch.randint(0, 64, (size, 1)) + torch.arange(24)) % 64

    for _ in range(80):
        ids = batch(16)
        out = model(ids)
        main = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (main + model.mtp_loss(out.hidden_states, ids)[0]).backward()
        optimizer.step()
        optimizer.zero_grad()

    grown, fresh = copy.deepcopy(model), copy.deepcopy(model)
    grown.grow_mtp(3)
    fresh.mtp.extend(MiniMaxM2ForCausalLM(cfg.replace(num_mtp_modules=3)).mtp[1:])
    fresh.config = cfg.replace(num_mtp_modules=3)
    assert grown.config.num_mtp_modules == 3
    assert torch.equal(grown.mtp[2].block.block_sparse_moe.experts.w1, grown.mtp[0].block.block_sparse_moe.experts.w1)
    ids = batch(64)
    with torch.no_grad():
        hidden = grown(ids).hidden_states
        copied_metrics, fresh_metrics = grown.mtp_loss(hidden, ids)[1], fresh.mtp_loss(hidden, ids)[1]
    loss_1 = copied_metrics["mtp/loss_1"]
    assert loss_1 < 0.5  # module 1 has learnt the task (log 64 = 4.2 at chance)
    for k in (2, 3):
        assert copied_metrics[f"mtp/loss_{k}"] == pytest.approx(loss_1, abs=0.1)
        assert fresh_metrics[f"mtp/loss_{k}"] > 2.0  # the loss spike that copying avoids
