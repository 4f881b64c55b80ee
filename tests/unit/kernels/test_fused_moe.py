"""Fused MoE against the float32 per-expert reference and against forgerl.model.moe itself."""

import pytest
import torch
from kernel_cases import DEVICES, rel_err

from forgerl.kernels.fused_moe import fused_moe
from forgerl.kernels.fused_moe.naive import naive_fused_moe
from forgerl.kernels.fused_moe.routing import route
from forgerl.model.config import ModelConfig
from forgerl.model.moe import Experts, SparseMoeBlock
from forgerl.model.moe import route as model_route

# Norm-wise relative error bounds: bf16 rounds x, the weights, h = silu(a1) * a3 and every GEMM output to
# 8 mantissa bits (2^-8 = 4e-3 per element, measured ~1e-2 after three chained GEMMs).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def _layer(n: int, d: int, e: int, f: int, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    x = randn(n, d).to(dtype)
    gate, bias = randn(e, d, scale=0.3), randn(e, scale=0.1)
    w1, w3 = (randn(e, f, d, scale=d**-0.5).to(dtype) for _ in range(2))
    w2 = randn(e, d, f, scale=f**-0.5).to(dtype)
    return [t.to(device) for t in (x, gate, bias, w1, w2, w3, randn(n, d).to(dtype))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "shape"),  # (N, D, E, F, K): odd token counts, an expert left with no tokens is likely at E 7, K 3
    [(torch.float32, (37, 24, 7, 20, 3)), (torch.bfloat16, (29, 40, 5, 24, 2))],
)
def test_forward_and_gradients_match_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    n, d, e, f, k = shape
    x, gate, bias, w1, w2, w3, grad = _layer(n, d, e, f, dtype, device, seed=n)
    leaves = [t.clone().requires_grad_() for t in (x, gate, w1, w2, w3)]
    y, ids, weights = fused_moe(leaves[0], leaves[1], bias, leaves[2], leaves[3], leaves[4], k)
    y.backward(grad)
    ref_leaves = [t.float().clone().requires_grad_() for t in (x, gate, w1, w2, w3)]
    ref_y, ref_ids, ref_weights = naive_fused_moe(
        ref_leaves[0], ref_leaves[1], bias, ref_leaves[2], ref_leaves[3], ref_leaves[4], k
    )
    ref_y.backward(grad.float())
    assert torch.equal(ids, ref_ids)
    assert rel_err(weights, ref_weights) < 1e-6
    assert y.dtype == dtype
    assert rel_err(y, ref_y) < TOLERANCE[dtype]
    for name, leaf, ref_leaf in zip(("x", "gate", "w1", "w2", "w3"), leaves, ref_leaves, strict=True):
        assert leaf.grad is not None and ref_leaf.grad is not None
        assert rel_err(leaf.grad, ref_leaf.grad) < TOLERANCE[dtype], name


@pytest.mark.parametrize("device", DEVICES)
def test_bias_selects_experts_but_does_not_weight_them(device: str) -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]], device=device)
    bias = torch.tensor([10.0, 0.0, 0.0, 0.0], device=device)  # forces expert 0 in, at its own score
    ids, weights = route(logits, bias, 2)
    assert ids.tolist() == [[0, 3]]
    scores = torch.sigmoid(logits[0, [0, 3]])
    assert torch.allclose(weights[0], scores / scores.sum())


@pytest.mark.parametrize("device", DEVICES)
def test_matches_the_model_moe_block_with_replayed_routing(device: str) -> None:
    """Same layer as forgerl.model.moe.SparseMoeBlock in float64, with the routes it chose replayed."""
    cfg = ModelConfig()  # the tiny defaults: D 64, E 8, F 64, top-2
    block = SparseMoeBlock(cfg).double()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * p.shape[-1] ** -0.5)
        block.e_score_correction_bias.copy_(torch.randn(cfg.num_local_experts, generator=generator) * 0.1)
    x = torch.randn(1, 19, cfg.hidden_size, generator=generator, dtype=torch.float64)
    expected, routing, _ = block(x)
    ex = block.experts
    w1, w2, w3 = (w.detach().float().to(device) for w in (ex.w1, ex.w2, ex.w3))
    gate, bias = block.gate.weight.float().to(device), block.e_score_correction_bias.float().to(device)
    replay = routing.expert_ids_NK.to(device)
    y, ids, _ = fused_moe(x[0].float().to(device), gate, bias, w1, w2, w3, cfg.num_experts_per_tok, replay)
    assert torch.equal(ids.cpu(), routing.expert_ids_NK)
    assert rel_err(y.cpu(), expected[0]) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_routes_with_idle_experts_match_the_model_experts_and_gradients(device: str) -> None:
    """Replayed routes that leave experts 2..5 idle, against forgerl.model.moe's route + Experts in float64."""
    n, d, e, f, k = 23, 24, 6, 20, 2
    x, gate, bias, w1, w2, w3, grad = _layer(n, d, e, f, torch.float32, device, seed=11)
    replay = torch.stack([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)], dim=1)
    replay[::3] = replay[::3].flip(1)  # the order within a token's K slots must not matter
    leaves = [t.clone().requires_grad_() for t in (x, gate, w1, w2, w3)]
    y, _, _ = fused_moe(leaves[0], leaves[1], bias, leaves[2], leaves[3], leaves[4], k, replay.to(device))
    y.backward(grad)
    experts = Experts(ModelConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k))
    experts = experts.double()
    ref_x, ref_gate = x.cpu().double().requires_grad_(), gate.cpu().double().requires_grad_()
    with torch.no_grad():
        for param, value in zip((experts.w1, experts.w2, experts.w3), (w1, w2, w3), strict=True):
            param.copy_(value.cpu().double())
    routing = model_route(ref_x, ref_gate, bias.cpu().double(), k, replay)
    counts = torch.bincount(replay.reshape(-1), minlength=e)
    ref_y = experts(ref_x, routing.expert_ids_NK, routing.weights_NK, counts)
    ref_y.backward(grad.cpu().double())
    assert rel_err(y.cpu(), ref_y) < TOLERANCE[torch.float32]
    ref_grads = [ref_x.grad, ref_gate.grad, experts.w1.grad, experts.w2.grad, experts.w3.grad]
    for name, leaf, ref_grad in zip(("x", "gate", "w1", "w2", "w3"), leaves, ref_grads, strict=True):
        assert leaf.grad is not None and ref_grad is not None
        assert rel_err(leaf.grad.cpu(), ref_grad) < TOLERANCE[torch.float32], name
    dw1 = leaves[2].grad
    assert dw1 is not None and float(dw1[2:].abs().max()) == 0.0  # idle experts get exactly zero gradient
