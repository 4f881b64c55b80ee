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
