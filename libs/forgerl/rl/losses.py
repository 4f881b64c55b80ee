"""Policy-gradient losses: CISPO and the baselines it is compared with (PPO-clip, GSPO, REINFORCE).

Every loss is a pure function on tensors and floats with one signature (the `PolicyLoss` protocol) and
returns `(loss, metrics)`; `get_policy_loss(name)` picks one by name. Shapes, for a batch of B response
sequences padded to T tokens:

    logprobs       [B, T]  log pi_theta(y_t | y_<t), with gradient
    old_logprobs   [B, T]  the behaviour (rollout) policy's log-probabilities; never differentiated
    advantages     [B, T]  per-token advantages (or [B, 1]: one per sequence, broadcast over tokens)
    mask           [B, T]  bool or 0/1: which tokens are response tokens that the loss covers
    entropy        [B, T]  optional per-token entropy of pi_theta, reported as a metric only

Metrics are detached 0-dim tensors (no host sync inside the loss) under the loss's namespace, e.g.
"cispo/clip_frac": the fraction of masked tokens whose importance ratio lies outside the clip range.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

Metrics = dict[str, Tensor]


class PolicyLoss(Protocol):
    """The signature every registered loss has. `eps_high`/`eps_low` bound the importance ratio."""

    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        eps_high: float,
        eps_low: float | None = None,
        entropy: Tensor | None = None,
    ) -> tuple[Tensor, Metrics]: ...


def cispo_weight(logprobs: Tensor, old_logprobs: Tensor, *, eps_high: float, eps_low: float | None = None) -> Tensor:
    """CISPO's clipped importance-sampling weight `clip(r, lower, 1 + eps_high)`, with no gradient.

    r = pi_theta / pi_old per token. MiniMax-M1 (2025), eq. 4-5: the weight is stop-gradient and only its
    upper bound matters in practice, so `lower` is 0 when `eps_low` is None, else `1 - eps_low`.
    """
    lower, upper = _clip_bounds("cispo", eps_high, eps_low, default_low=None)
    ratio = torch.exp(logprobs.detach() - old_logprobs.detach())
    return ratio.clamp(min=lower, max=upper)


def cispo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float,
    eps_low: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """CISPO: `-sum(sg(r_hat) * A * logprobs * mask) / sum(mask)`, normalised over every masked token.

    Unlike PPO, a clipped token still gets gradient (through `logprobs`); the clip only caps its weight.
    The gradient with respect to `logprobs` is exactly `-r_hat * A * mask / N`, N the number of masked
    tokens in the whole batch (token-level normalisation, MiniMax-M1 eq. 4).
    """
    mask_f = _check_inputs(logprobs, old_logprobs, advantages, mask)
    weight = cispo_weight(logprobs, old_logprobs, eps_high=eps_high, eps_low=eps_low)
    loss = -(weight * advantages * logprobs * mask_f).sum() / _token_count(mask_f)
    lower, upper = _clip_bounds("cispo", eps_high, eps_low, default_low=None)
    return loss, _ratio_metrics("cispo", logprobs, old_logprobs, mask_f, lower, upper, entropy)


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float,
    eps_low: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO-clip (Schulman et al. 2017, eq. 7) with DAPO's decoupled bounds; token-level normalisation.

    Per token `-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)`; `eps_low` defaults to `eps_high`.
    A clipped token gets no gradient, which is the behaviour CISPO was designed to avoid.
    """
    mask_f = _check_inputs(logprobs, old_logprobs, advantages, mask)
    lower, upper = _clip_bounds("ppo", eps_high, eps_low, default_low=eps_high)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(lower, upper) * advantages)
    loss = -(surrogate * mask_f).sum() / _token_count(mask_f)
    return loss, _ratio_metrics("ppo", logprobs, old_logprobs, mask_f, lower, upper, entropy)


def gspo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float,
    eps_low: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """GSPO-token (Zheng et al. 2025, eq. 13-14): one length-normalised ratio per sequence.

    s_i = exp(mean_t (logprobs - old_logprobs)) over sequence i's masked tokens; per token the ratio is
    `sg(s_i) * pi_theta / sg(pi_theta)` (value s_i, gradient s_i * grad log pi_theta) and the PPO-style
    clipped surrogate applies to it. Sequences are averaged with equal weight (sequence-level
    normalisation), each over its own tokens. `eps_low` defaults to `eps_high`; the paper's bounds are
    tiny (3e-4, 4e-4) because a sequence ratio is a geometric mean.
    """
    mask_f = _check_inputs(logprobs, old_logprobs, advantages, mask)
    lower, upper = _clip_bounds("gspo", eps_high, eps_low, default_low=eps_high)
    tokens_per_seq = mask_f.sum(dim=-1)
    seq_log_ratio = ((logprobs - old_logprobs) * mask_f).sum(dim=-1) / tokens_per_seq.clamp(min=1)
    token_log_ratio = seq_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()
    ratio = torch.exp(token_log_ratio)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(lower, upper) * advantages)
    per_seq = (surrogate * mask_f).sum(dim=-1) / tokens_per_seq.clamp(min=1)
    has_tokens = (tokens_per_seq > 0).to(per_seq.dtype)
    loss = -(per_seq * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    metrics = _ratio_metrics("gspo", logprobs, old_logprobs, mask_f, lower, upper, entropy)
    with torch.no_grad():
        seq_ratio = torch.exp(seq_log_ratio)
        seq_clipped = ((seq_ratio < lower) | (seq_ratio > upper)).to(per_seq.dtype)
        metrics["gspo/seq_ratio_mean"] = (seq_ratio * has_tokens).sum() / has_tokens.sum().clamp(min=1)
        metrics["gspo/seq_clip_frac"] = (seq_clipped * has_tokens).sum() / has_tokens.sum().clamp(min=1)
    return loss, metrics


def reinforce_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_high: float,
    eps_low: float | None = None,
    entropy: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Plain REINFORCE, `-sum(A * logprobs * mask) / sum(mask)`: no importance correction at all.

    The clip bounds are accepted so that every loss has one signature, and are used only to report how
    many tokens a clipped loss would have clipped; `old_logprobs` feeds the off-policy metrics.
    """
    mask_f = _check_inputs(logprobs, old_logprobs, advantages, mask)
    lower, upper = _clip_bounds("reinforce", eps_high, eps_low, default_low=None)
    loss = -(advantages * logprobs * mask_f).sum() / _token_count(mask_f)
    return loss, _ratio_metrics("reinforce", logprobs, old_logprobs, mask_f, lower, upper, entropy)


POLICY_LOSSES: Mapping[str, PolicyLoss] = {
    "cispo": cispo_loss,
    "ppo": ppo_clip_loss,
    "gspo": gspo_loss,
    "reinforce": reinforce_loss,
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The registered loss called `name` (one of `POLICY_LOSSES`)."""
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        known = ", ".join(sorted(POLICY_LOSSES))
        raise ValueError(f"unknown policy loss {name!r}: choose one of {known}") from None


def _clip_bounds(
    name: str, eps_high: float, eps_low: float | None, *, default_low: float | None
) -> tuple[float, float]:
    if eps_high < 0:
        raise ValueError(f"{name}: eps_high {eps_high} must be >= 0")
    low = default_low if eps_low is None else eps_low
    if low is None:
        return 0.0, 1.0 + eps_high
    if not 0.0 <= low <= 1.0:
        raise ValueError(f"{name}: eps_low {low} must lie in [0, 1] (the lower bound is 1 - eps_low)")
    return 1.0 - low, 1.0 + eps_high


def _check_inputs(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Checks shapes and returns the mask in `logprobs`' dtype."""
    if old_logprobs.shape != logprobs.shape or mask.shape != logprobs.shape:
        raise ValueError(
            "logprobs, old_logprobs and mask must have one shape: got "
            f"{tuple(logprobs.shape)}, {tuple(old_logprobs.shape)}, {tuple(mask.shape)}"
        )
    try:
        broadcast = torch.broadcast_shapes(advantages.shape, logprobs.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != logprobs.shape:
        raise ValueError(
            f"advantages of shape {tuple(advantages.shape)} do not broadcast to logprobs' "
            f"{tuple(logprobs.shape)}: pass [B, T], or [B, 1] for one advantage per sequence"
        )
    return mask.to(logprobs.dtype)


def _token_count(mask_f: Tensor) -> Tensor:
    # An empty batch gives a zero loss (still attached to the graph) rather than 0/0.
    return mask_f.sum().clamp(min=1)


def _ratio_metrics(
    prefix: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    mask_f: Tensor,
    lower: float,
    upper: float,
    entropy: Tensor | None,
) -> Metrics:
    with torch.no_grad():
        n_tokens = _token_count(mask_f)
        log_ratio = logprobs.detach() - old_logprobs.detach()
        ratio = torch.exp(log_ratio)
        clipped = ((ratio < lower) | (ratio > upper)).to(mask_f.dtype)
        # k3 estimator of KL(pi_old || pi_theta) on samples from pi_old: (r - 1) - log r >= 0
        # (Schulman, "Approximating KL divergence", 2020): unbiased, lower variance than -log r.
        approx_kl = (ratio - 1) - log_ratio
        metrics = {
            f"{prefix}/clip_frac": (clipped * mask_f).sum() / n_tokens,
            f"{prefix}/ratio_mean": (ratio * mask_f).sum() / n_tokens,
            f"{prefix}/approx_kl": (approx_kl * mask_f).sum() / n_tokens,
            f"{prefix}/n_tokens": mask_f.sum(),
        }
        if entropy is not None:
            metrics[f"{prefix}/entropy"] = (entropy.detach() * mask_f).sum() / n_tokens
    return metrics
