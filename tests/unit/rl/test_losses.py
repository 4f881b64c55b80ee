"""CISPO and the comparison losses: closed-form values, gradients, the stop-gradient, masking."""

from __future__ import annotations

import math

import pytest
import torch

from forgerl.rl.losses import (
    POLICY_LOSSES,
    cispo_loss,
    cispo_weight,
    get_policy_loss,
    gspo_loss,
    ppo_clip_loss,
    reinforce_loss,
)

pytestmark = pytest.mark.unit
DT = torch.float64


def _lp(values: list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=DT, requires_grad=True)


def test_cispo_closed_form_on_hand_made_tokens() -> None:
    # ratios exp(0)=1, exp(0.5)=1.6487 (clipped to 1.2), exp(-1)=0.3679 (no lower clip), masked 4th token.
    logprobs = _lp([[-1.0, -0.5, -2.0, -0.3]])
    old = torch.tensor([[-1.0, -1.0, -1.0, -5.0]], dtype=DT)
    adv = torch.tensor([[2.0, 1.0, -1.0, 7.0]], dtype=DT)
    mask = torch.tensor([[True, True, True, False]])
    loss, metrics = cispo_loss(logprobs, old, adv, mask, eps_high=0.2)
    r3 = math.exp(-1.0)
    expected = -(1.0 * 2.0 * -1.0 + 1.2 * 1.0 * -0.5 + r3 * -1.0 * -2.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["cispo/clip_frac"].item() == pytest.approx(1 / 3)
    assert metrics["cispo/ratio_mean"].item() == pytest.approx((1 + math.exp(0.5) + r3) / 3)
    k3 = [0.0, math.exp(0.5) - 1 - 0.5, r3 - 1 + 1.0]
    assert metrics["cispo/approx_kl"].item() == pytest.approx(sum(k3) / 3)
    assert metrics["cispo/n_tokens"].item() == 3


def test_cispo_lower_bound_applies_only_with_eps_low() -> None:
    logprobs = _lp([[-3.0]])
    old = torch.tensor([[-1.0]], dtype=DT)  # r = exp(-2) = 0.135
    assert cispo_weight(logprobs, old, eps_high=0.2).item() == pytest.approx(math.exp(-2))
    assert cispo_weight(logprobs, old, eps_high=0.2, eps_low=0.2).item() == pytest.approx(0.8)


def test_cispo_gradient_is_minus_clipped_weight_times_advantage_over_n() -> None:
    torch.manual_seed(0)
    logprobs = (torch.randn(3, 7, dtype=DT) - 2).requires_grad_()
    old = (logprobs.detach() + 0.6 * torch.randn(3, 7, dtype=DT)).requires_grad_()
    adv = torch.randn(3, 7, dtype=DT)
    mask = torch.rand(3, 7) > 0.3
    loss, _ = cispo_loss(logprobs, old, adv, mask, eps_high=0.25)
    loss.backward()
    r_hat = torch.exp(logprobs.detach() - old.detach()).clamp(max=1.25)
    expected = -r_hat * adv * mask / mask.sum()
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=0)
    # The ratio is stop-gradient: the behaviour policy's log-probabilities get nothing back.
    assert old.grad is None


def test_cispo_weight_carries_no_graph() -> None:
    logprobs = _lp([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.0]], dtype=DT, requires_grad=True)
    weight = cispo_weight(logprobs, old, eps_high=0.2)
    assert not weight.requires_grad and weight.grad_fn is None
    loss, _ = cispo_loss(logprobs, old, torch.ones(1, 2, dtype=DT), torch.ones(1, 2), eps_high=0.2)
    # The loss graph reaches old_logprobs nowhere: autograd.grad reports it unused.
    (grad_old,) = torch.autograd.grad(loss, old, allow_unused=True)
    assert grad_old is None


def test_cispo_masked_tokens_contribute_nothing() -> None:
    torch.manual_seed(1)
    logprobs = torch.randn(2, 5, dtype=DT).requires_grad_()
    old = torch.randn(2, 5, dtype=DT)
    adv = torch.randn(2, 5, dtype=DT)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.bool)
    loss, metrics = cispo_loss(logprobs, old, adv, mask, eps_high=0.3)
    loss.backward()
    assert torch.all(logprobs.grad[~mask] == 0)
    # Changing anything under the mask changes neither the loss nor the metrics.
    noisy = torch.where(mask, logprobs.detach(), torch.full_like(old, 50.0))
    loss2, metrics2 = cispo_loss(noisy, old, torch.where(mask, adv, 1e6), mask, eps_high=0.3)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-12)
    for key, value in metrics.items():
        assert metrics2[key].item() == pytest.approx(value.item(), rel=1e-12)


def test_cispo_clips_off_policy_tokens_above_one_plus_eps_high() -> None:
    # The behaviour policy made these tokens much less likely than the current policy does: r = e^2.
    logprobs = _lp([[-0.5, -0.5]])
    old = torch.tensor([[-2.5, -0.5]], dtype=DT)
    adv = torch.tensor([[1.0, 1.0]], dtype=DT)
    loss, metrics = cispo_loss(logprobs, old, adv, torch.ones(1, 2), eps_high=0.28)
    loss.backward()
    assert cispo_weight(logprobs, old, eps_high=0.28).tolist() == [[1.28, 1.0]]
    assert logprobs.grad[0].tolist() == pytest.approx([-1.28 / 2, -1.0 / 2])
    assert metrics["cispo/clip_frac"].item() == 0.5
    # Unlike PPO, the clipped token keeps its gradient.
    lp_ppo = logprobs.detach().clone().requires_grad_()
    ppo_clip_loss(lp_ppo, old, adv, torch.ones(1, 2), eps_high=0.28)[0].backward()
    assert lp_ppo.grad[0, 0].item() == 0.0


def test_entropy_metric_is_reported_when_given() -> None:
    logprobs = _lp([[-1.0, -1.0]])
    entropy = torch.tensor([[2.0, 4.0]], dtype=DT)
    _, metrics = cispo_loss(
        logprobs, logprobs.detach(), torch.ones(1, 2, dtype=DT), torch.tensor([[1, 0]]), eps_high=0.2, entropy=entropy
    )
    assert metrics["cispo/entropy"].item() == 2.0
    _, without = cispo_loss(logprobs, logprobs.detach(), torch.ones(1, 2, dtype=DT), torch.ones(1, 2), eps_high=0.2)
    assert "cispo/entropy" not in without


def test_ppo_clip_closed_form() -> None:
    logprobs = _lp([[math.log(1.5), math.log(0.5), math.log(1.1)]])
    old = torch.zeros(1, 3, dtype=DT)
    adv = torch.tensor([[1.0, -1.0, -2.0]], dtype=DT)
    loss, metrics = ppo_clip_loss(logprobs, old, adv, torch.ones(1, 3), eps_high=0.2)
    # min(1.5*1, 1.2*1) = 1.2; min(0.5*-1, 0.8*-1) = -0.8; min(1.1*-2, 1.1*-2) = -2.2
    assert loss.item() == pytest.approx(-(1.2 - 0.8 - 2.2) / 3)
    assert metrics["ppo/clip_frac"].item() == pytest.approx(2 / 3)


def test_gspo_uses_one_length_normalised_ratio_per_sequence() -> None:
    logprobs = _lp([[-1.0, -1.0, -1.0], [-2.0, -2.0, 0.0]])
    old = torch.tensor([[-1.0, -1.2, -1.4], [-2.0, -2.0, 0.0]], dtype=DT)
    adv = torch.tensor([[1.0], [-1.0]], dtype=DT)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = gspo_loss(logprobs, old, adv, mask, eps_high=1.0)
    s1 = math.exp((0 + 0.2 + 0.4) / 3)  # within [0, 2]: unclipped
    assert loss.item() == pytest.approx(-(s1 * 1.0 + 1.0 * -1.0) / 2)
    assert metrics["gspo/seq_ratio_mean"].item() == pytest.approx((s1 + 1) / 2)
    loss.backward()
    # d/d logprob_t of -(1/G) (1/|y_i|) sum_t s_i A_i: every token of sequence 1 gets -s1 / (2 * 3).
    assert logprobs.grad[0].tolist() == pytest.approx([-s1 / 6] * 3)
    assert logprobs.grad[1].tolist() == pytest.approx([1 / 4, 1 / 4, 0.0])


def test_reinforce_ignores_the_behaviour_policy() -> None:
    logprobs = _lp([[-1.0, -3.0]])
    adv = torch.tensor([[2.0, 1.0]], dtype=DT)
    loss_a, _ = reinforce_loss(logprobs, torch.zeros(1, 2, dtype=DT), adv, torch.ones(1, 2), eps_high=0.2)
    loss_b, _ = reinforce_loss(logprobs, torch.full((1, 2), -9.0, dtype=DT), adv, torch.ones(1, 2), eps_high=0.2)
    assert loss_a.item() == loss_b.item() == pytest.approx(-(2 * -1 + 1 * -3) / 2)


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_registry_losses_share_a_signature_and_namespace(name: str) -> None:
    loss_fn = get_policy_loss(name)
    torch.manual_seed(2)
    logprobs = torch.randn(2, 4, dtype=DT).requires_grad_()
    loss, metrics = loss_fn(
        logprobs, logprobs.detach(), torch.randn(2, 4, dtype=DT), torch.ones(2, 4), eps_high=0.2, eps_low=0.2
    )
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(logprobs.grad).all()
    assert metrics and all(key.startswith(f"{name}/") for key in metrics)
    # On-policy, every ratio is 1: nothing clipped, no KL.
    assert metrics[f"{name}/clip_frac"].item() == 0.0
    assert metrics[f"{name}/approx_kl"].item() == pytest.approx(0.0, abs=1e-15)


def test_on_policy_cispo_ppo_and_reinforce_agree() -> None:
    torch.manual_seed(3)
    logprobs = torch.randn(2, 6, dtype=DT)
    adv, mask = torch.randn(2, 6, dtype=DT), torch.rand(2, 6) > 0.2
    grads = []
    for loss_fn in (cispo_loss, ppo_clip_loss, reinforce_loss):
        lp = logprobs.clone().requires_grad_()
        loss_fn(lp, logprobs, adv, mask, eps_high=0.2)[0].backward()
        grads.append(lp.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grads[0], grads[2], rtol=1e-12, atol=0)


def test_errors_say_what_to_fix() -> None:
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown policy loss 'dpo'"):
        get_policy_loss("dpo")
    with pytest.raises(ValueError, match="one shape"):
        cispo_loss(lp, torch.zeros(2, 4), lp, torch.ones(2, 3), eps_high=0.2)
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        cispo_loss(lp, lp, torch.zeros(2), torch.ones(2, 3), eps_high=0.2)
    with pytest.raises(ValueError, match="eps_low"):
        cispo_loss(lp, lp, lp, torch.ones(2, 3), eps_high=0.2, eps_low=1.5)


def test_empty_mask_gives_zero_loss_not_nan() -> None:
    lp = torch.zeros(1, 3, requires_grad=True)
    loss, metrics = cispo_loss(lp, lp.detach(), torch.ones(1, 3), torch.zeros(1, 3), eps_high=0.2)
    loss.backward()
    assert loss.item() == 0.0 and metrics["cispo/clip_frac"].item() == 0.0
