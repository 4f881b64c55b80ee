"""The RL step: rows and advantages from trajectories; prefix merging changes nothing but the cost."""

from __future__ import annotations

import copy

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.trainer.step import RlStepConfig, build_batch, rl_step
from forgerl.v1 import trajectory_pb2

pytestmark = pytest.mark.unit


def _traj(
    group: str, prompt: list[int], gens: list[list[int]], reward: float, version: int = 0
) -> trajectory_pb2.Trajectory:
    traj = trajectory_pb2.Trajectory(
        trajectory_id=f"{group}-{reward}-{len(gens)}-{gens[0][0]}", group_id=group, task_id=group
    )
    ids = list(prompt)
    for gen in gens:
        traj.turns.add(
            prompt_token_ids=ids,
            generated_token_ids=gen,
            behaviour_logprobs=[-1.0] * len(gen),
            loss_mask=[1] * len(gen),
            policy_version=version,
        )
        ids = ids + gen + [7, 7]
    traj.reward.total = reward
    traj.reward.performance = reward
    traj.success = reward > 0
    return traj


def _batch() -> list[trajectory_pb2.Trajectory]:
    prompt = [1, 2, 3, 4, 5, 6]
    return [
        _traj("a", prompt, [[10, 11, 12], [13, 14]], 1.0, version=1),
        _traj("a", prompt, [[10, 11, 20], [21]], 0.0),
        _traj("b", [1, 2, 3, 9], [[30, 31]], 1.0),
        _traj("b", [1, 2, 3, 9], [[30, 32, 33]], 0.0),
    ]


def test_build_batch_rows_and_advantages() -> None:
    batch = build_batch(_batch(), gamma=1.0, policy_version=2, normalize_std=False)
    assert batch.input_ids.shape[0] == 6  # one row per turn
    assert int(batch.mask.sum()) == 3 + 2 + 3 + 1 + 2 + 3
    # Row 0: prompt of 6, generated 3 -> targets at positions 5..7 of the [B, L-1] layout.
    assert batch.mask[0, 5:8].all() and not batch.mask[0, :5].any()
    assert torch.allclose(batch.old_logprobs[0, 5:8], torch.tensor([-1.0] * 3))
    # Group baseline 0.5: the winner's tokens +0.5, the loser's -0.5, in every turn.
    assert torch.allclose(batch.advantages[0, 5:8], torch.tensor([0.5] * 3))
    assert batch.advantages[2][batch.mask[2]].tolist() == [-0.5] * 3
    assert batch.stats["staleness/max"] == 2.0 and batch.stats["staleness/mean"] == pytest.approx(10 / 6)
    assert batch.stats["success_rate"] == 0.5


@pytest.mark.parametrize("loss", ["cispo", "ppo", "reinforce"])
def test_merged_step_equals_unmerged(loss: str) -> None:
    torch.manual_seed(0)
    base = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=64)).double()
    batch = build_batch(_batch(), gamma=1.0, policy_version=1)
    grads = {}
    results = {}
    for merge in (True, False):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = RlStepConfig(loss=loss, prefix_merge=merge, max_grad_norm=1e9, bias_update_rate=0.0)
        results[merge] = rl_step(model, opt, batch, cfg)
        grads[merge] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert results[True]["policy/loss"] == pytest.approx(results[False]["policy/loss"], rel=1e-9, abs=1e-12)
    assert results[True]["tokens/merged"] > 0
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-7, atol=1e-10)


def test_step_updates_weights_and_expert_bias() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=64))
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    metrics = rl_step(
        model, opt, build_batch(_batch(), gamma=1.0, policy_version=1), RlStepConfig(bias_update_rate=1e-3)
    )
    after = model.state_dict()
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    bias = "model.layers.0.block_sparse_moe.e_score_correction_bias"
    assert not torch.equal(before[bias], after[bias])
    for key in ("loss", "entropy", "clip_frac", "moe/max_violation", "tokens/merged", "step_time_s", "reward/mean"):
        assert key in metrics


@pytest.mark.parametrize("trains_trunk", [True, False])
def test_merged_step_with_mtp_equals_unmerged(trains_trunk: bool) -> None:
    """MTP on prefix trees (branching turns and group members) equals MTP on the rows, loss and every
    gradient, with two modules."""
    torch.manual_seed(0)
    base = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=64, num_mtp_modules=2)).double()
    batch = build_batch(_batch(), gamma=1.0, policy_version=1)
    grads, results = {}, {}
    for merge in (True, False):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        cfg = RlStepConfig(
            prefix_merge=merge,
            mtp_loss_weight=0.3,
            mtp_trains_trunk=trains_trunk,
            max_grad_norm=1e9,
            bias_update_rate=0.0,
        )
        results[merge] = rl_step(model, opt, batch, cfg)
        grads[merge] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for key in ("mtp/loss_1", "mtp/loss_2", "mtp/loss", "loss"):
        assert abs(results[True][key] - results[False][key]) < 1e-10, key
    assert results[True]["loss"] - results[True]["policy/loss"] == pytest.approx(0.3 * results[True]["mtp/loss"])
    for name in grads[True]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=0, atol=1e-10)
    assert not torch.equal(grads[True]["mtp.1.eh_proj.weight"], base.state_dict()["mtp.1.eh_proj.weight"])


@pytest.mark.parametrize("merge", [True, False])
def test_mtp_that_does_not_train_the_trunk_leaves_the_policy_step_unchanged(merge: bool) -> None:
    """With rl.mtp_trains_trunk off, a step with an MTP loss moves every parameter outside the MTP modules
    exactly as a step without MTP does (AdamW, clipping on, expert biases updated), and trains the modules;
    with it on, the MTP loss reaches the trunk."""
    torch.manual_seed(0)
    base = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=64, num_mtp_modules=2)).double()
    batch = build_batch(_batch(), gamma=1.0, policy_version=1)
    after = {}
    for name, weight, trains_trunk in (("none", 0.0, False), ("isolated", 0.5, False), ("joint", 0.5, True)):
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = RlStepConfig(prefix_merge=merge, mtp_loss_weight=weight, mtp_trains_trunk=trains_trunk, max_grad_norm=0.5)
        for _ in range(2):
            metrics = rl_step(model, opt, batch, cfg)
        after[name] = model.state_dict()
        if weight:
            assert metrics["mtp/loss"] > 0 and metrics["mtp/grad_norm" if not trains_trunk else "mtp/loss"] > 0
    for key, value in after["none"].items():
        if key.startswith("mtp."):
            assert torch.equal(value, base.state_dict()[key]), key
            assert not torch.equal(after["isolated"][key], value) or "bias" in key, key
        else:
            assert torch.equal(after["isolated"][key], value), key
    assert not torch.equal(after["joint"]["lm_head.weight"], after["none"]["lm_head.weight"])


def test_mtp_loss_falls_over_merged_steps() -> None:
    """A few merged RL steps on one batch train the MTP module: mtp/loss falls."""
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("tiny", vocab_size=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = build_batch(_batch(), gamma=1.0, policy_version=1)
    cfg = RlStepConfig(prefix_merge=True, mtp_loss_weight=0.1)
    losses = [rl_step(model, opt, batch, cfg)["mtp/loss"] for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_build_batch_places_recorded_routes_at_the_positions_that_produced_the_tokens() -> None:
    """Route j of a turn is the forward of input position p - 1 + j (p: the first generated token)."""
    traj = _traj("a", [1, 2, 3, 4], [[10, 11, 12]], 1.0)
    layers, top_k, g = 2, 2, 3
    rows = torch.arange(g * layers * top_k).view(g, layers, top_k)
    traj.turns[0].routed_experts.num_layers = layers
    traj.turns[0].routed_experts.top_k = top_k
    traj.turns[0].routed_experts.expert_ids.extend(rows.flatten().tolist())
    batch = build_batch([traj], gamma=1.0, policy_version=0, num_layers=layers, top_k=top_k)
    assert batch.routed_experts is not None
    assert torch.equal(batch.routed_experts[0, 3:6], rows)  # prompt of 4: positions 3, 4, 5
    assert (batch.routed_experts[0, :3] == -1).all() and (batch.routed_experts[0, 6] == -1).all()


def test_shared_prefixes_take_the_recorded_routes() -> None:
    """The second turn's prompt holds the first turn's generation: its positions take the first turn's
    records, so a merged prefix node has one routing; positions nobody recorded stay -1."""
    from forgerl.trainer.step import share_recorded_routes

    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 7, 8], [1, 5, 6, 0, 0, 0]])
    lengths = torch.tensor([4, 6, 3])
    routed = torch.full((3, 6, 1, 2), -1)
    routed[0, 1:3] = torch.tensor([[[0, 1]], [[2, 3]]])  # turn 1 recorded positions 1 and 2
    routed[1, 4] = torch.tensor([[4, 5]])  # turn 2 recorded its own position 4
    out = share_recorded_routes(routed, ids, lengths)
    assert torch.equal(out[1, 1:3], routed[0, 1:3]) and torch.equal(out[1, 4], routed[1, 4])
    assert (out[1, [0, 3, 5]] == -1).all()
    assert (out[2] == -1).all()  # branches at position 1: shares only token 0, which nobody recorded
    assert torch.equal(out[0], routed[0])
