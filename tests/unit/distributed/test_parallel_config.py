"""trainer.parallel: degrees resolved against the world size, errors that say what to change; the
layout-independent grad-norm clip equals torch's on plain parameters; activation checkpointing changes
no gradient."""

import pytest
import torch

from forgerl.distributed import ParallelConfig, clip_grad_norm_
from forgerl.distributed.parallelize import apply_activation_checkpointing
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("values", "world", "expected"),
    [
        ({}, 4, (4, 1, 1, 1)),  # the default: every rank a DDP replica, as the trainer always was
        ({"dp_shard": 4}, 4, (1, 4, 1, 4)),
        ({"dp_shard": 4, "ep": 2}, 4, (1, 4, 2, 2)),
        ({"dp_shard": 4, "ep": 4}, 4, (1, 4, 4, 1)),
        ({"dp_replicate": 2, "dp_shard": -1, "ep": 2}, 8, (2, 4, 2, 2)),
        ({"dp_shard": 2, "ep": 2}, 6, (3, 2, 2, 1)),
    ],
)
def test_resolve(values: dict, world: int, expected: tuple[int, int, int, int]) -> None:
    layout = ParallelConfig.from_dict(values).resolve(world, num_experts=8)
    assert (layout.dp_replicate, layout.dp_shard, layout.ep, layout.efsdp) == expected
    assert layout.world_size == world
    assert layout.uses_fsdp == (layout.dp_shard > 1)


@pytest.mark.parametrize(
    ("values", "world", "message"),
    [
        ({"dp_replicate": 2, "dp_shard": 3}, 4, "2 x dp_shard 3 = 6 ranks, but the job has 4"),
        ({"dp_shard": 3}, 4, "world size 4 is not a multiple of trainer.parallel.dp_shard 3"),
        ({"dp_replicate": 3, "dp_shard": -1}, 4, "world size 4 is not a multiple of trainer.parallel.dp_replicate 3"),
        ({"dp_replicate": -1, "dp_shard": -1}, 4, "both -1"),
        ({"dp_shard": 0}, 4, "dp_shard 0: must be >= 1"),
        ({"dp_shard": 4, "ep": 3}, 4, "ep 3 must divide dp_shard 4"),
        ({"dp_shard": 2, "ep": 2}, 2, "ep 2 must divide the model's 7 experts"),
        ({"ep": 0}, 1, "ep 0: must be >= 1"),
        ({"activation_checkpoint_every": -1}, 1, "activation_checkpoint_every -1"),
    ],
)
def test_resolve_errors(values: dict, world: int, message: str) -> None:
    experts = 7 if "7 experts" in message else 8
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ParallelConfig.from_dict(values).resolve(world, num_experts=experts)


def test_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['expert_parallel'\]"):
        ParallelConfig.from_dict({"expert_parallel": 2})


def _model_with_grads(checkpoint_every: int) -> MiniMaxM2ForCausalLM:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", num_mtp_modules=0)).train()
    apply_activation_checkpointing(model, checkpoint_every)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    return model


def test_clip_on_plain_parameters() -> None:
    """The norm in float64 (torch's float32 norm of a million squares is off by ~1e-5 relative here) and
    torch's rule: grads times min(1, max_norm / (norm + 1e-6))."""
    model = _model_with_grads(0)
    grads = [p.grad.clone() for p in model.parameters()]
    expected = sum(float(g.double().pow(2).sum()) for g in grads) ** 0.5
    norm = clip_grad_norm_(model.parameters(), 0.01)
    assert float(norm) == pytest.approx(expected, rel=1e-12)
    assert expected > 0.01  # the clip did scale
    coef = 0.01 / (expected + 1e-6)
    for (name, param), grad in zip(model.named_parameters(), grads, strict=True):
        torch.testing.assert_close(param.grad, grad * coef, rtol=1e-6, atol=0, msg=name)


def test_activation_checkpointing_keeps_gradients() -> None:
    plain, recomputed = _model_with_grads(0), _model_with_grads(1)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
