"""The trainer's SFT loss and CISPO step on MiniMax-M3 (minimax-m3-tiny, the lightning indexer dropping key
blocks), checked against an independent float64 CISPO computation, and the trained model's export loaded by
transformers' MiniMaxM3VLForCausalLM with equal logits."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_m3

from forgerl.model import M3Config, MiniMaxM3ForCausalLM, load_m3_checkpoint, save_m3_checkpoint
from forgerl.model.m3 import SharedExpertMoeBlock
from forgerl.trainer.sft import SftExample, collate, sft_loss, sft_loss_merged
from forgerl.trainer.step import RlBatch, RlStepConfig, build_batch, rl_step
from forgerl.v1 import trajectory_pb2

pytestmark = pytest.mark.unit

VOCAB = 64
# minimax-m3-tiny: blocks of 4 keys, 3 kept per query, so a query past position 11 sees more blocks than it
# keeps. The rows below are 23-31 tokens long (RL) and 32-35 (SFT).
PROMPT_LEN = 18


def tiny_m3(dtype: torch.dtype = torch.float32) -> MiniMaxM3ForCausalLM:
    torch.manual_seed(0)
    return MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny", vocab_size=VOCAB)).to(dtype)


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _trajectory(
    model: MiniMaxM3ForCausalLM, group: str, prompt: list[int], gens: list[list[int]], reward: float
) -> trajectory_pb2.Trajectory:
    """Two-turn trajectory whose behaviour log-probabilities are the model's own (on-policy), as a rollout
    on the same weights records them."""
    traj = trajectory_pb2.Trajectory(trajectory_id=f"{group}-{reward}", group_id=group, task_id=group)
    ids = list(prompt)
    for turn, gen in enumerate(gens):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0].double(), -1)
        behaviour = [float(logp[len(ids) - 1 + j, tok]) for j, tok in enumerate(gen)]
        traj.turns.add(
            prompt_token_ids=ids,
            generated_token_ids=gen,
            behaviour_logprobs=behaviour,
            loss_mask=[1] * len(gen),
            policy_version=0,
        )
        ids = ids + gen + _tokens(100 + turn, 3)  # the tool's answer
    traj.reward.total = reward
    return traj


def rl_batch(model: MiniMaxM3ForCausalLM) -> RlBatch:
    """Two groups of two: in each, a rewarded and an unrewarded episode (advantages +0.5 / -0.5)."""
    trajectories = []
    for g, group in enumerate("ab"):
        prompt = _tokens(g, PROMPT_LEN)
        for reward in (1.0, 0.0):
            seed = 10 * g + int(reward)
            gens = [_tokens(seed, 5), _tokens(seed + 5, 4 + g)]
            trajectories.append(_trajectory(model, group, prompt, gens, reward))
    return build_batch(trajectories, gamma=1.0, policy_version=0)


def blocks_dropped(model: MiniMaxM3ForCausalLM, ids: torch.Tensor) -> bool:
    """Whether the indexer keeps fewer blocks than some query can see, in every sparse layer."""
    with torch.no_grad():
        out = model(ids)
    visible_T = torch.arange(ids.shape[1]) // model.config.index_block_size + 1
    return len(out.block_indices) == 2 and all(
        ((blocks >= 0).sum(-1) < visible_T).any().item() for blocks in out.block_indices.values()
    )


def sequence_logprobs(model: MiniMaxM3ForCausalLM, batch: RlBatch) -> torch.Tensor:
    """Per row, the summed float64 log-probability of its trained targets, each row alone (no padding)."""
    sums = []
    with torch.no_grad():
        for row in range(batch.input_ids.shape[0]):
            n = int(batch.lengths[row])
            logits = model(batch.input_ids[row : row + 1, :n]).logits[0].double()
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, batch.input_ids[row, 1:n, None])[:, 0]
            sums.append((logp * batch.mask[row, : n - 1]).sum())
    return torch.stack(sums)


def reference_cispo_loss(model: MiniMaxM3ForCausalLM, batch: RlBatch, eps_high: float) -> torch.Tensor:
    """CISPO (MiniMax-M1 eq. 4-5) written out token by token in float64, each row through the model alone:
    -sum_t min(r_t, 1 + eps_high) [no gradient] * A_t * log pi(t) / (number of trained tokens)."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for row in range(batch.input_ids.shape[0]):
        n = int(batch.lengths[row])
        ids = batch.input_ids[row, :n]
        logits = model(ids[None]).logits[0].to(torch.float64)
        for t in range(n - 1):
            if not batch.mask[row, t]:
                continue
            logp = logits[t, ids[t + 1]] - torch.logsumexp(logits[t], dim=0)
            ratio = math.exp(float(logp.detach()) - float(batch.old_logprobs[row, t]))
            total = total - min(ratio, 1.0 + eps_high) * float(batch.advantages[row, t]) * logp
            count += 1
    return total / count


def test_cispo_step_equals_an_independent_float64_cispo() -> None:
    """rl_step's policy loss and every gradient equal autograd through the hand-written CISPO above, on a
    float64 M3 whose indexer drops blocks; ratios pushed off 1 so that some tokens clip."""
    model = tiny_m3(torch.float64)
    batch = rl_batch(model)
    assert blocks_dropped(model, batch.input_ids)
    shift = torch.linspace(-0.5, 0.5, batch.old_logprobs.numel(), dtype=torch.float64).view_as(batch.old_logprobs)
    batch.old_logprobs = batch.old_logprobs.double() + shift
    reference = copy.deepcopy(model)
    expected = reference_cispo_loss(reference, batch, eps_high=0.28)
    expected.backward()
    cfg = RlStepConfig(prefix_merge=False, max_grad_norm=1e9, bias_update_rate=0.0)
    metrics = rl_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
    assert metrics["policy/loss"] == pytest.approx(float(expected), rel=1e-10, abs=1e-12)
    assert 0.0 < metrics["cispo/clip_frac"] < 1.0
    theirs = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        if theirs[name].grad is None:
            assert param.grad is None, name
        else:
            torch.testing.assert_close(param.grad, theirs[name].grad, rtol=1e-8, atol=1e-12, msg=name)


def _assert_gradient_reaches_all_but_the_indexers(model: MiniMaxM3ForCausalLM) -> None:
    """The top-k selection has no gradient and the indexer runs under no_grad: its parameters get none
    (its own objective trains it, m3_indexer_training); every other parameter gets a nonzero one."""
    for name, param in model.named_parameters():
        if ".indexer." in name:
            assert param.grad is None, name
        else:
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_sft_steps_on_m3_lower_the_loss() -> None:
    model = tiny_m3()
    examples = [
        SftExample(tuple(ids), tuple([0] * PROMPT_LEN + [1] * (len(ids) - PROMPT_LEN)))
        for ids in (_tokens(s, PROMPT_LEN + 14 + s) for s in range(4))
    ]
    ids, mask = collate(examples)
    assert blocks_dropped(model, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        loss, metrics = sft_loss(model, ids, mask)
        loss.backward()
        if step == 0:
            _assert_gradient_reaches_all_but_the_indexers(model)
        opt.step()
        losses.append(metrics["sft/loss"])
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    with pytest.raises(ValueError, match="sparse attention"):
        sft_loss_merged(model, examples)


def test_cispo_steps_on_m3_move_probability_to_rewarded_episodes() -> None:
    """Three CISPO steps (AdamW, clipping, expert-bias updates): the rewarded rows' log-probability rises,
    the others' falls; the routing bias moves; prefix merging is refused (sparse blocks are pack slots)."""
    model = tiny_m3()
    batch = rl_batch(model)
    advantage_B = batch.advantages.sum(-1)
    before = sequence_logprobs(model, batch)
    bias_before = [m.e_score_correction_bias.clone() for m in model.modules() if isinstance(m, SharedExpertMoeBlock)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    cfg = RlStepConfig(prefix_merge=False)
    for step in range(3):
        metrics = rl_step(model, opt, batch, cfg)
        assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
        if step == 0:
            _assert_gradient_reaches_all_but_the_indexers(model)
    change = sequence_logprobs(model, batch) - before
    assert (change[advantage_B > 0] > 0).all() and (change[advantage_B < 0] < 0).all(), change
    bias_after = [m.e_score_correction_bias for m in model.modules() if isinstance(m, SharedExpertMoeBlock)]
    assert all(not torch.equal(a, b) for a, b in zip(bias_before, bias_after, strict=True))
    with pytest.raises(ValueError, match="prefix_merge"):
        rl_step(model, opt, batch, RlStepConfig())


def test_trained_m3_export_loads_in_transformers_with_equal_logits(tmp_path: Path) -> None:
    """SFT then CISPO steps, the export written from those weights (moved routing bias included), and
    transformers' M3 on it: logits within 1e-5 at 40 tokens, where the indexer drops blocks."""
    model = tiny_m3()
    initial = copy.deepcopy(model.state_dict())
    ids = torch.tensor([_tokens(s, 30) for s in range(3)])
    mask = torch.ones_like(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        sft_loss(model, ids, mask)[0].backward()
        opt.step()
    batch = rl_batch(model)
    for _ in range(2):
        rl_step(model, opt, batch, RlStepConfig(prefix_merge=False))
    trained = model.state_dict()
    assert not torch.equal(trained["lm_head.weight"], initial["lm_head.weight"])
    assert trained["model.layers.1.mlp.e_score_correction_bias"].abs().sum() > 0

    path = save_m3_checkpoint(model.eval(), tmp_path / "m3")
    reference = hf_m3.MiniMaxM3VLForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    probe = torch.tensor([_tokens(50 + s, 40) for s in range(2)])
    assert blocks_dropped(model, probe)
    with torch.no_grad():
        ours, theirs = model(probe).logits, reference.eval()(probe).logits
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - theirs).abs().max().item() < 1e-3 * ours.abs().max().item()
    reloaded = load_m3_checkpoint(path).state_dict()
    for name, tensor in trained.items():
        assert torch.equal(reloaded[name], tensor), name
