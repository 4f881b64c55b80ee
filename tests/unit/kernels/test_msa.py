"""MSA against the per-sequence float32 reference (index branch and attention written out with loops)."""

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICES, rel_err

from forgerl.kernels.msa import make_msa_backend, msa_attention
from forgerl.kernels.msa.index import select_blocks
from forgerl.kernels.msa.naive import naive_msa, naive_select_blocks
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.attention import ATTENTION_BACKENDS

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}
BLOCK = 16


def _packed(lens_q: list[int], lens_k: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, *lens_q]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lens_k]).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), heads, dim, generator=generator).to(dtype)
    k, v = (torch.randn(sum(lens_k), kv_heads, dim, generator=generator).to(dtype) for _ in range(2))
    return q, k, v, cu_q, cu_k


@pytest.mark.unit
def test_index_branch_matches_the_per_sequence_loops() -> None:
    lens_q, lens_k = [77, 16, 1, 5], [77, 16, 50, 40]  # prefill, one block, decode, a chunk at the end
    q, k, _, cu_q, cu_k = _packed(lens_q, lens_k, 4, 2, 8, torch.float32, seed=0)
    selected = select_blocks(q, k, cu_q, cu_k, BLOCK, top_k=2)
    for i in range(len(lens_q)):
        expected = naive_select_blocks(q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], BLOCK, top_k=2)
        assert torch.equal(selected[i, :, : expected.shape[1]].long(), expected)
        assert bool((selected[i, :, expected.shape[1] :] == -1).all())
    assert bool((selected[0, :, -1, 2:] >= 1).all())  # the last block of the 77-token prefill drops one of 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "lens_q", "lens_k", "heads", "kv_heads", "dim"),
    [
        (torch.float32, [77, 16, 1], [77, 16, 50], 4, 2, 24),  # varlen prefill and a decode row
        (torch.bfloat16, [70, 1, 1], [70, 33, 64], 3, 1, 40),  # MQA; decode at a block boundary
        (torch.float16, [50, 9], [50, 41], 2, 2, 16),  # MHA; a 9-token chunk appended to a 32-token prefix
    ],
)
def test_forward_and_gradients_match_reference(
    device: str, dtype: torch.dtype, lens_q: list[int], lens_k: list[int], heads: int, kv_heads: int, dim: int
) -> None:
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, heads, kv_heads, dim, dtype, seed=len(lens_q) + dim)
    leaves = [t.to(device).clone().requires_grad_() for t in (q, k, v)]
    out = msa_attention(leaves[0], leaves[1], leaves[2], cu_q.to(device), cu_k.to(device), block=BLOCK, top_k=2)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dtype)
    out.backward(grad.to(device))
    ref_leaves = [t.float().clone().requires_grad_() for t in (q, k, v)]
    pieces = []
    for i in range(len(lens_q)):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        kept = naive_select_blocks(q[qs], k[ks], BLOCK, top_k=2)
        pieces.append(naive_msa(ref_leaves[0][qs], ref_leaves[1][ks], ref_leaves[2][ks], kept, BLOCK, dim**-0.5))
    ref = torch.cat(pieces)
    ref.backward(grad.float())
    assert out.dtype == dtype
    assert rel_err(out.cpu(), ref) < TOLERANCE[dtype]
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad is not None and ref_leaf.grad is not None
        assert rel_err(leaf.grad.cpu(), ref_leaf.grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
def test_keeping_every_block_is_causal_attention(device: str) -> None:
    """top_k at least the block count: MSA must equal dense causal GQA attention (float64 SDPA)."""
    q, k, v, cu_q, cu_k = _packed([45], [45], 4, 2, 16, torch.float32, seed=2)
    q_d, k_d, v_d, cu_q_d, cu_k_d = (t.to(device) for t in (q, k, v, cu_q, cu_k))
    out = msa_attention(q_d, k_d, v_d, cu_q_d, cu_k_d, block=BLOCK, top_k=8)
    q_HTD, k_GTD, v_GTD = (t.double().transpose(0, 1) for t in (q, k, v))
    expected = F.scaled_dot_product_attention(q_HTD, k_GTD, v_GTD, is_causal=True, enable_gqa=True).transpose(0, 1)
    assert rel_err(out.cpu(), expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_model_backend_keeping_every_block_matches_sdpa(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The debug model with the msa backend (2 rows of 40 tokens, every block kept) against SDPA: logits and
    every parameter gradient, so the layouts through the backend and the backward are right."""
    monkeypatch.setitem(ATTENTION_BACKENDS, "msa", make_msa_backend(block=BLOCK, top_k=4))
    torch.manual_seed(0)
    reference = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).to(device)
    sparse = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", attn_backend="msa")).to(device)
    sparse.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(3)).to(device)
    routes = reference(ids).routed_experts
    expected = reference(ids, routed_experts=routes).logits
    got = sparse(ids, routed_experts=routes).logits
    assert rel_err(got, expected) < TOLERANCE[torch.float32]
    expected.float().logsumexp(-1).sum().backward()
    got.float().logsumexp(-1).sum().backward()
    ref_params = dict(reference.named_parameters())
    for name, param in sparse.named_parameters():
        if param.grad is not None:
            assert rel_err(param.grad, ref_params[name].grad) < 1e-4, name
