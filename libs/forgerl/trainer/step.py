"""One RL optimizer step on a batch of trajectories: advantages, prefix-merged forward, CISPO, AdamW,
expert-bias update, metrics.

From trajectories to training rows: every turn of a trajectory is one row, `prompt_token_ids +
generated_token_ids`; its generated tokens are the trained targets (where the turn's loss_mask is 1),
with the behaviour log-probabilities the rollout recorded. A turn's prompt is the previous turn's row
plus the new messages, and every episode of a group starts from the same prompt, so the rows of a batch
share long prefixes: with `prefix_merge` they are packed into prefix trees (forgerl.rl.prefix_tree) and
the model runs once per tree; without, once per row (the same numbers, more compute). The MTP loss
(`mtp_loss_weight`) runs on the same trees, each module on the tree of its k-ahead tokens
(forgerl.rl.prefix_mtp), and equals the per-row loss too.

Routing replay: vLLM records with generated token j the experts of the forward that sampled it, the
forward of input position p - 1 + j; `build_batch` keeps them there and `fill_routes` completes the
rest (see both).

Advantages (forgerl.rl.rewards): the step rewards of a trajectory (one per turn; the composite
alpha*process + beta*speed + performance the rollout computed) -> reward-to-go with `gamma` -> minus
the mean return of the trajectory's group (same task) -> every generated token of turn t gets A_t.

Shape legend: B rows (turns), L their padded length, N trajectories, S turns per trajectory (padded),
nL MoE layers, K experts per token.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from forgerl.distributed.parallelize import clip_grad_norm_
from forgerl.model import update_expert_bias
from forgerl.model.mtp import mtp_module_losses
from forgerl.model.policy import PolicyModel
from forgerl.rl.losses import get_policy_loss
from forgerl.rl.prefix_merge import TokenOutputs, forward_merged
from forgerl.rl.prefix_mtp import mtp_module_losses_merged
from forgerl.rl.prefix_tree import PrefixForest
from forgerl.rl.rewards import group_baseline_advantages, reward_to_go
from forgerl.v1 import trajectory_pb2


@dataclass
class RlStepConfig:
    loss: str = "cispo"
    eps_high: float = 0.28
    eps_low: float | None = None
    gamma: float = 1.0
    normalize_std: bool = False
    prefix_merge: bool = True
    max_tokens_per_pack: int | None = 2048
    mtp_loss_weight: float = 0.0
    # False: the MTP loss trains the MTP modules only (run config rl.mtp_trains_trunk).
    mtp_trains_trunk: bool = False
    routing_replay: bool = False
    max_grad_norm: float = 1.0
    bias_update_rate: float = 1e-3


@dataclass
class RlBatch:
    input_ids: torch.Tensor  # [B, L] long, right-padded
    lengths: torch.Tensor  # [B] long
    old_logprobs: torch.Tensor  # [B, L - 1] float: entry t is the behaviour logprob of token t + 1
    advantages: torch.Tensor  # [B, L - 1]
    mask: torch.Tensor  # [B, L - 1] bool: trained targets
    # [B, L, nL, K] long: entry t is the routing of input position t (the forward that sampled token
    # t + 1), as vLLM recorded it; -1 where the rollout recorded none
    routed_experts: torch.Tensor | None
    stats: dict[str, float] = field(default_factory=dict)


def trajectory_step_rewards(traj: trajectory_pb2.Trajectory) -> list[float]:
    """One reward per turn: the recorded step rewards, or the total reward on the last turn."""
    rewards = [0.0] * max(1, len(traj.turns))
    if traj.step_rewards:
        for sr in traj.step_rewards:
            if 0 <= sr.turn_index < len(rewards):
                rewards[sr.turn_index] += sr.components.total
    else:
        rewards[-1] = traj.reward.total
    return rewards


def build_batch(
    trajectories: Sequence[trajectory_pb2.Trajectory],
    *,
    gamma: float,
    policy_version: int,
    normalize_std: bool = False,
    num_layers: int | None = None,
    top_k: int | None = None,
) -> RlBatch:
    if not trajectories:
        raise ValueError("build_batch needs at least one trajectory")
    n = len(trajectories)
    per_traj = [trajectory_step_rewards(t) for t in trajectories]
    s = max(len(r) for r in per_traj)
    rewards_NS = torch.zeros(n, s, dtype=torch.float64)
    step_mask_NS = torch.zeros(n, s, dtype=torch.bool)
    for i, r in enumerate(per_traj):
        rewards_NS[i, : len(r)] = torch.tensor(r, dtype=torch.float64)
        step_mask_NS[i, : len(r)] = True
    group_names = {name: i for i, name in enumerate(dict.fromkeys(t.group_id or t.task_id for t in trajectories))}
    group_ids = torch.tensor([group_names[t.group_id or t.task_id] for t in trajectories])
    returns_NS = reward_to_go(rewards_NS, step_mask_NS, gamma)
    adv_NS = group_baseline_advantages(returns_NS, step_mask_NS, group_ids, normalize_std=normalize_std)

    rows: list[list[int]] = []
    row_meta: list[tuple[int, int, int]] = []  # (trajectory, turn, prompt length)
    staleness: list[float] = []
    for i, traj in enumerate(trajectories):
        for j, turn in enumerate(traj.turns):
            if not turn.generated_token_ids:
                continue
            rows.append(list(turn.prompt_token_ids) + list(turn.generated_token_ids))
            row_meta.append((i, j, len(turn.prompt_token_ids)))
            staleness.append(float(policy_version - turn.policy_version))
    if not rows:
        raise ValueError("no trajectory in the batch has generated tokens")
    b, width = len(rows), max(len(r) for r in rows)
    input_ids = torch.zeros(b, width, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    old = torch.zeros(b, width - 1)
    adv = torch.zeros(b, width - 1)
    mask = torch.zeros(b, width - 1, dtype=torch.bool)
    routed = None
    want_routes = num_layers is not None and top_k is not None
    if want_routes and any(t.turns and any(u.routed_experts.expert_ids for u in t.turns) for t in trajectories):
        routed = torch.full((b, width, num_layers, top_k), -1, dtype=torch.long)  # type: ignore[arg-type]
    for row, (tokens, (i, j, p)) in enumerate(zip(rows, row_meta, strict=True)):
        turn = trajectories[i].turns[j]
        g = len(turn.generated_token_ids)
        input_ids[row, : len(tokens)] = torch.tensor(tokens)
        lps = list(turn.behaviour_logprobs) or [0.0] * g
        lm = list(turn.loss_mask) or [1] * g
        old[row, p - 1 : p - 1 + g] = torch.tensor(lps[:g])
        mask[row, p - 1 : p - 1 + g] = torch.tensor(lm[:g], dtype=torch.bool)
        adv[row, p - 1 : p - 1 + g] = float(adv_NS[i, j])
        ids = list(turn.routed_experts.expert_ids)
        if routed is not None and ids and len(ids) == g * num_layers * top_k:  # type: ignore[operator]
            # Generated token j was sampled by the forward of input position p - 1 + j, and vLLM records
            # that forward's routing with it (forgerl.vllm_plugin.routing keeps positions from the last
            # prompt token on): the rows are positions p - 1 .. p + g - 2. The last generated token was
            # never fed; its routing comes from fill_routes.
            routed[row, p - 1 : p - 1 + g] = torch.tensor(ids).view(g, num_layers, top_k)  # type: ignore[arg-type]
    stats = {
        "batch/trajectories": float(n),
        "batch/rows": float(b),
        "batch/groups": float(len(group_names)),
        "staleness/mean": sum(staleness) / len(staleness),
        "staleness/max": max(staleness),
        "reward/mean": float(sum(t.reward.total for t in trajectories) / n),
        "reward/process": float(sum(t.reward.process for t in trajectories) / n),
        "reward/speed": float(sum(t.reward.speed for t in trajectories) / n),
        "reward/performance": float(sum(t.reward.performance for t in trajectories) / n),
        "success_rate": float(sum(t.success for t in trajectories) / n),
        "turns/mean": float(sum(len(t.turns) for t in trajectories) / n),
        "advantage/abs_mean": float(adv_NS.abs().sum() / step_mask_NS.sum()),
    }
    return RlBatch(input_ids, lengths, old, adv, mask, routed, stats)


def shard_rows(batch: RlBatch, rank: int, world: int) -> RlBatch:
    """This rank's rows (every world-th, from `rank`) for data-parallel training; the advantages were
    computed on the whole batch, so groups split over ranks keep their baseline."""
    rows = torch.arange(rank, batch.input_ids.shape[0], world)
    width = int(batch.lengths[rows].max()) if rows.numel() else 2
    return RlBatch(
        input_ids=batch.input_ids[rows, :width],
        lengths=batch.lengths[rows],
        old_logprobs=batch.old_logprobs[rows, : width - 1],
        advantages=batch.advantages[rows, : width - 1],
        mask=batch.mask[rows, : width - 1],
        routed_experts=None if batch.routed_experts is None else batch.routed_experts[rows, :width],
        stats=dict(batch.stats),
    )


def _forward(
    model: nn.Module, core: PolicyModel, batch: RlBatch, routed: torch.Tensor | None, cfg: RlStepConfig
) -> tuple[TokenOutputs, torch.Tensor | None, dict[str, float]]:
    """The policy's token outputs (merged or not), this rank's part of the weighted MTP loss, metrics."""
    with_mtp = _with_mtp(core, cfg.mtp_loss_weight)
    if cfg.prefix_merge:
        outs, mtp_losses, mtp_counts, metrics = _merged_forward(model, core, batch, routed, cfg)
    else:
        outs, mtp_losses, mtp_counts = _unmerged_forward(model, core, batch, routed, with_mtp, cfg.mtp_trains_trunk)
        metrics = {
            "tokens/input": float(batch.lengths.sum()),
            "tokens/packed": float(batch.input_ids.numel()),
            "tokens/merged": 0.0,
        }
    if not with_mtp:
        return outs, None, metrics
    mtp_loss, mtp_metrics = global_mtp_loss(
        mtp_losses, mtp_counts, len(core.mtp), cfg.mtp_loss_weight, batch.mask.device
    )
    return outs, mtp_loss, {**metrics, **mtp_metrics}


def _unmerged_forward(
    model: nn.Module,
    core: PolicyModel,
    batch: RlBatch,
    routed: torch.Tensor | None,
    with_mtp: bool,
    mtp_trains_trunk: bool,
) -> tuple[TokenOutputs, list[torch.Tensor], list[float]]:
    """One row per sequence, causal; also each MTP module's loss on the trained tokens and their count
    when asked for."""
    ids = batch.input_ids
    out = model(ids, routed_experts=routed)
    logits = out.logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, ids[:, 1:, None]).squeeze(-1) - lse
    steps = torch.arange(ids.shape[1] - 1)
    valid = steps[None, :] < (batch.lengths[:, None] - 1)
    logprobs = torch.where(valid, logprobs, 0.0)
    logp_all = logits - lse[..., None]
    entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    if not with_mtp:
        return TokenOutputs(logprobs, entropy), [], []
    target_mask = mtp_target_mask(batch)
    losses = mtp_module_losses(core, out.hidden_states, ids, target_mask, train_trunk=mtp_trains_trunk)
    # Module k predicts token i+k+1 from position i: its targets are the mask's columns k+1.. .
    counts = [float(target_mask[:, k + 1 :].sum()) for k in range(1, len(losses) + 1)]
    return TokenOutputs(logprobs, entropy), losses, counts


def _merged_forward(
    model: nn.Module, core: PolicyModel, batch: RlBatch, routed: torch.Tensor | None, cfg: RlStepConfig
) -> tuple[TokenOutputs, list[torch.Tensor], list[float], dict[str, float]]:
    """One forward per prefix-tree pack; the MTP module losses on the same packs (forgerl.rl.prefix_mtp),
    equal to the unmerged ones."""
    forest = PrefixForest.build(batch.input_ids, batch.lengths, max_tokens_per_pack=cfg.max_tokens_per_pack)
    with_mtp = _with_mtp(core, cfg.mtp_loss_weight)
    outs = forward_merged(model, forest, routed_experts=routed, with_entropy=True, with_hidden=with_mtp)
    metrics = {
        "tokens/input": float(forest.num_input_tokens),
        "tokens/packed": float(forest.num_packed_tokens),
        "tokens/merged": float(forest.num_input_tokens - forest.num_packed_tokens),
        "tokens/packs": float(len(forest.packs)),
    }
    if not with_mtp or outs.pack_hidden is None:
        return outs, [], [], metrics
    losses, counts = mtp_module_losses_merged(
        core, forest, outs.pack_hidden, mtp_target_mask(batch), train_trunk=cfg.mtp_trains_trunk
    )
    return outs, losses, counts, metrics


def _with_mtp(core: PolicyModel, weight: float) -> bool:
    return weight > 0 and len(core.mtp) > 0


def _data_parallel_world() -> int:
    """Ranks that train their own rows: every rank (EP carves the experts out of the data-parallel ranks,
    forgerl.distributed.mesh), 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def global_token_mean(loss: torch.Tensor, local_tokens: torch.Tensor) -> torch.Tensor:
    """This rank's share of a token mean over every data-parallel rank: `loss`, the mean over this rank's
    `local_tokens` tokens, times local * world / global tokens, so that the gradient DDP and FSDP2 average
    over the ranks is the gradient of the mean over all their tokens (and the mean of the returned values
    over the ranks is that mean). One all-reduce; `loss` itself without torch.distributed."""
    world = _data_parallel_world()
    if world == 1:
        return loss
    local_n = local_tokens.to(torch.float64)
    total_n = local_n.clone()
    dist.all_reduce(total_n)
    return loss * (local_n.clamp(min=1) * world / total_n.clamp(min=1)).to(loss.dtype)


def global_mtp_loss(
    losses: Sequence[torch.Tensor], counts: Sequence[float], num_modules: int, weight: float, device: torch.device
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """This rank's part of `weight` * the mean over modules of each module's cross-entropy averaged over
    the trained targets of every data-parallel rank, and `mtp/loss_k`, `mtp/loss` of that global loss.

    DDP and FSDP2 average the gradients over the ranks, so each module's local mean is scaled by
    (local targets * world / global targets), as rl_step scales the policy loss: the averaged gradient is
    the single process's. Module k counts when any rank's longest row reaches it, as it counts for the
    whole batch. Collective: every rank calls it whenever MTP is on, one with no module to count too;
    `device` is where the process group reduces (the batch's)."""
    world = _data_parallel_world()
    stats = torch.zeros(3, num_modules, dtype=torch.float64)  # per module: CE sum, targets, ranks that ran it
    for k, (loss, count) in enumerate(zip(losses, counts, strict=True)):
        stats[:, k] = torch.tensor([float(loss.detach()) * max(count, 1.0), count, 1.0])
    if world > 1:
        stats = stats.to(device)
        dist.all_reduce(stats)
        stats = stats.cpu()
    depth = int((stats[2] > 0).sum())
    if depth == 0:
        return None, {}
    totals = stats[1].clamp(min=1.0)
    global_losses = (stats[0] / totals).tolist()
    metrics = {f"mtp/loss_{k}": global_losses[k - 1] for k in range(1, depth + 1)}
    metrics["mtp/loss"] = sum(global_losses[:depth]) / depth
    if not losses:
        return None, metrics
    shares = [max(count, 1.0) * world / float(totals[k]) for k, count in enumerate(counts)]
    local = torch.stack([loss * share for loss, share in zip(losses, shares, strict=True)]).sum() / depth
    return weight * local, metrics


def mtp_target_mask(batch: RlBatch) -> torch.Tensor:
    """bool [B, L]: the tokens that are trained targets (the MTP loss's mask; batch.mask is per target,
    shifted by one)."""
    target_mask = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    target_mask[:, 1:] = batch.mask
    return target_mask


def fill_routes(model: PolicyModel, batch: RlBatch) -> torch.Tensor | None:
    """Routing to replay [B, L, nL, K]: the rollout's expert ids where it recorded them (the last prompt
    token and the generated tokens but the last); a position a row shares with another row's recorded
    one (the same prefix: a later turn's prompt holds an earlier turn's generation, which the engine's
    prefix cache reused) takes that record; for the rest, the routing a no-grad forward of this batch
    chooses. So a shared prefix node has one routing in every row, as prefix merging needs.

    Collective under torch.distributed: the forward runs on every rank when any rank has a position
    without a record, since under FSDP2 or EP it all-gathers and all-to-alls with the other ranks, and a
    rank that skipped it would leave them waiting forever."""
    routed = batch.routed_experts
    missing = None
    if routed is not None:
        routed = share_recorded_routes(routed, batch.input_ids, batch.lengths)
        missing = routed[..., 0, 0] < 0
    if not _any_rank(missing is not None and bool(missing.any()), batch.input_ids.device):
        return routed
    was_training = model.training
    model.eval()
    with torch.no_grad():
        fresh = model(batch.input_ids).routed_experts  # [B, L, nL, K]
    model.train(was_training)
    if routed is None or missing is None:
        return routed
    return torch.where(missing[..., None, None], fresh, routed)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """`flag` or'ed over every rank (one all-reduce on `device` when torch.distributed is initialised)."""
    if _data_parallel_world() == 1:
        return flag
    either = torch.tensor([float(flag)], device=device)
    dist.all_reduce(either, op=dist.ReduceOp.MAX)
    return bool(either.item() > 0)


def share_recorded_routes(routed: torch.Tensor, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """`routed` [B, L, nL, K] with every position that has no record (-1) but shares its prefix with a
    recorded position of another row given that record."""
    out = routed.clone()
    for pack in PrefixForest.build(input_ids, lengths).packs:
        steps = torch.arange(pack.node_index.shape[1])
        valid_SL = steps[None, :] < pack.lengths[:, None]
        # Every (row, position) of the pack's sequences [V], and the node it is.
        rows = pack.sequence_rows[:, None].expand_as(valid_SL)[valid_SL]
        cols = steps[None, :].expand_as(valid_SL)[valid_SL]
        nodes = pack.node_index[valid_SL]
        values = routed[rows, cols]  # [V, nL, K]
        recorded = values[:, 0, 0] >= 0
        node_routes = routed.new_full((pack.num_tokens, *routed.shape[2:]), -1)
        node_routes[nodes[recorded]] = values[recorded]
        fill = ~recorded
        out[rows[fill], cols[fill]] = node_routes[nodes[fill]]
    return out


def rl_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: RlBatch,
    cfg: RlStepConfig,
    *,
    core: PolicyModel | None = None,
) -> dict[str, float]:
    """Forward (merged or not), policy loss (+ MTP), backward, clip, optimizer step, expert-bias update.

    `model` may be a DDP wrapper; `core` is the bare model, M2 or M3 (`PolicyModel`; default: `model`).
    Under DDP each rank passes its own shard of rows; the policy and MTP losses are scaled so that the
    averaged gradient equals the gradient of the losses normalised over every rank's tokens
    (global_mtp_loss). A model whose prefix-tree packs are not exact (M3 with sparse attention) needs
    `prefix_merge` off."""
    started = time.perf_counter()
    core = core or model  # type: ignore[assignment]
    if not isinstance(core, nn.Module) or not isinstance(core, PolicyModel):
        raise TypeError(f"rl_step: {type(core).__name__} is not a policy model (forgerl.model.policy.PolicyModel)")
    if cfg.prefix_merge and not core.prefix_merge_exact:
        raise ValueError(
            f"prefix_merge is on, but {type(core).__name__}'s prefix-tree packs would not give each row its own "
            "logits (sparse attention picks key blocks by pack slot): set rl.prefix_merge false"
        )
    model.train()
    loss_fn = get_policy_loss(cfg.loss)
    metrics: dict[str, float] = dict(batch.stats)
    routed = fill_routes(core, batch) if cfg.routing_replay else None
    outs, mtp_loss, forward_metrics = _forward(model, core, batch, routed, cfg)
    metrics.update(forward_metrics)
    mask = batch.mask
    loss, loss_metrics = loss_fn(
        outs.logprobs,
        batch.old_logprobs,
        batch.advantages,
        mask,
        eps_high=cfg.eps_high,
        eps_low=cfg.eps_low,
        entropy=outs.entropy,
    )
    loss = global_token_mean(loss, mask.sum())
    total = loss if mtp_loss is None else loss + mtp_loss
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    grad_norm, mtp_grad_norm = _clip_gradients(model, core, cfg, mtp_loss is not None)
    optimizer.step()
    metrics.update(expert_bias_step(core, cfg.bias_update_rate))
    for key, value in loss_metrics.items():
        metrics[key] = float(value)
    metrics["loss"] = float(total.detach())
    metrics["policy/loss"] = float(loss.detach())
    gn = float(grad_norm)
    metrics["grad_norm"] = gn if math.isfinite(gn) else -1.0
    if mtp_grad_norm is not None:
        metrics["mtp/grad_norm"] = mtp_grad_norm
    prefix = cfg.loss
    if f"{prefix}/entropy" in metrics:
        metrics["entropy"] = metrics[f"{prefix}/entropy"]
    if f"{prefix}/clip_frac" in metrics:
        metrics["clip_frac"] = metrics[f"{prefix}/clip_frac"]
    metrics["step_time_s"] = time.perf_counter() - started
    return metrics


def _clip_gradients(
    model: nn.Module, core: PolicyModel, cfg: RlStepConfig, with_mtp: bool
) -> tuple[torch.Tensor, float | None]:
    """Clip to cfg.max_grad_norm (any layout: DDP, FSDP2, EP) and return the norm before clipping. An MTP
    loss that does not train the trunk has its modules clipped on their own (second value: their norm),
    so that it cannot scale the policy's step through a shared norm."""
    if not with_mtp or cfg.mtp_trains_trunk:
        return clip_grad_norm_(model.parameters(), cfg.max_grad_norm), None
    mtp_ids = {id(p) for p in core.mtp.parameters()}
    policy = [p for p in model.parameters() if id(p) not in mtp_ids]
    mtp_norm = float(clip_grad_norm_(core.mtp.parameters(), cfg.max_grad_norm))
    return clip_grad_norm_(policy, cfg.max_grad_norm), mtp_norm


def expert_bias_step(model: nn.Module, rate: float) -> dict[str, float]:
    """update_expert_bias, with the load metrics of MoE layers that routed no token in this step left out
    (the MTP block when the loss skips MTP): their max violation reads -1 and would drag the mean down."""
    metrics = update_expert_bias(model, rate)
    layers = {k: v for k, v in metrics.items() if k.startswith("moe/layer_")}
    used = {k: v for k, v in layers.items() if v > -1.0}
    out = dict(used)
    if used:
        out["moe/max_violation"] = sum(used.values()) / len(used)
    return out


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(values.dtype)
    return float((values * m).sum() / m.sum().clamp(min=1))


__all__ = [
    "RlBatch",
    "RlStepConfig",
    "build_batch",
    "expert_bias_step",
    "rl_step",
    "shard_rows",
    "trajectory_step_rewards",
]
