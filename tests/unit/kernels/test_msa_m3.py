"""The Triton MSA kernel on M3's contract (per-token, per-KV-group left-packed block indices) against
transformers' MiniMax-M3 reference: its indexer's block mask and its eager attention."""

import pytest
import torch
from kernel_cases import DEVICES, rel_err
from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as hf_m3
from transformers.models.minimax_m3_vl.configuration_minimax_m3_vl import MiniMaxM3VLTextConfig

from forgerl.kernels.msa import index_block_scores, msa_m3_attention, msa_m3_attention_varlen, register_m3_msa
from forgerl.model.m3 import MiniMaxM3ForCausalLM
from forgerl.model.m3_attention import torch_index_scores
from forgerl.model.m3_config import M3Config

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def random_selection(b: int, g: int, t: int, n: int, block: int, generator: torch.Generator) -> torch.Tensor:
    """long [B, G, T, N] in the indexer's format: the query's own block, then up to N - 1 random earlier
    blocks (fewer for some queries, to exercise -1 slots mid-row counts), -1 after."""
    blocks = torch.full((b, g, t, n), -1, dtype=torch.long)
    for index in torch.cartesian_prod(torch.arange(b), torch.arange(g), torch.arange(t)).tolist():
        own = index[2] // block
        earlier = torch.randperm(own, generator=generator)[: int(torch.randint(0, n, (), generator=generator))]
        kept = [own, *earlier.tolist()]
        blocks[tuple(index)][: len(kept)] = torch.tensor(kept)
    return blocks


def transformers_reference(q, k, v, blocks, block, scale):  # type: ignore[no-untyped-def]
    """transformers' path: MiniMaxM3VLIndexer.build_block_mask (additive [B, H, T, S]) + eager attention."""
    b, h, t, d = q.shape
    config = MiniMaxM3VLTextConfig(
        num_attention_heads=h, num_key_value_heads=k.shape[1], index_n_heads=k.shape[1], index_block_size=block,
        hidden_size=16, head_dim=d, num_hidden_layers=1,
    )  # fmt: skip
    indexer = hf_m3.MiniMaxM3VLIndexer(config, 0)
    positions = torch.arange(t).expand(b, t)
    mask = indexer.build_block_mask(blocks, None, t, torch.float32, q.device, positions)
    module = torch.nn.Module()
    module.num_key_value_groups = h // k.shape[1]  # type: ignore[assignment]
    module.training = False
    out, _ = hf_m3.eager_attention_forward(module, q.float(), k.float(), v.float(), mask, scaling=scale)
    return out.transpose(1, 2)  # eager returns [B, T, H, K]


# (batch, heads, kv heads, length, head_dim, block, slots): odd lengths and head_dims, groups of 3 and 4,
# blocks smaller than and equal to the 16-wide tile.
CASES = [(2, 6, 2, 37, 24, 4, 3), (1, 4, 1, 50, 16, 16, 2), (1, 8, 2, 29, 32, 8, 5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_transformers(device: str, dtype: torch.dtype, case: tuple[int, ...]) -> None:
    b, h, g, t, d, block, n = case
    generator = torch.Generator().manual_seed(sum(case))
    q = torch.randn(b, h, t, d, generator=generator)
    k, v = (torch.randn(b, g, t, d, generator=generator) for _ in range(2))
    blocks = random_selection(b, g, t, n, block, generator)
    assert (blocks < 0).any() and (blocks >= 0).sum(-1).min() >= 1
    scale = d**-0.5
    # The reference in float32 from the same (rounded) inputs the kernel sees.
    leaves = [x.to(dtype).float().requires_grad_() for x in (q, k, v)]
    expected = transformers_reference(*leaves, blocks, block, scale)
    grad_out = torch.randn(expected.shape, generator=generator)
    expected.backward(grad_out)
    ours_in = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
    out = msa_m3_attention(*ours_in, blocks.to(device), block, scale)
    out.backward(grad_out.to(device=device, dtype=dtype))
    assert out.dtype == dtype
    assert rel_err(out.cpu(), expected) <= TOLERANCE[dtype]
    for ours, reference in zip(ours_in, leaves, strict=True):
        assert ours.grad is not None and reference.grad is not None
        assert rel_err(ours.grad.cpu(), reference.grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_sequences_match_transformers_per_sequence(device: str, dtype: torch.dtype) -> None:
    """Three sequences of 13, 22 and 7 tokens (block 4 divides none) packed end to end, block ids relative
    to each sequence: output and dq/dk/dv equal transformers' reference run on each sequence alone."""
    h, g, d, block, n, lengths = 6, 2, 24, 4, 3, [13, 22, 7]
    generator = torch.Generator().manual_seed(3)
    total = sum(lengths)
    q = torch.randn(total, h, d, generator=generator)
    k, v = (torch.randn(total, g, d, generator=generator) for _ in range(2))
    blocks = torch.cat([random_selection(1, g, t, n, block, generator)[0] for t in lengths], dim=1)  # [G, Tq, N]
    grad_out = torch.randn(total, h, d, generator=generator)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    scale = d**-0.5
    ours_in = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v)]
    out = msa_m3_attention_varlen(*ours_in, cu_seqlens.to(device), blocks.to(device), block, scale)
    out.backward(grad_out.to(device=device, dtype=dtype))
    assert out.shape == (total, h, d) and out.dtype == dtype
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        # The reference is batch-major [1, H, T, K]; the float32 inputs are the kernel's rounded ones.
        leaves = [
            x[start:end].detach().to(dtype).float().transpose(0, 1)[None].contiguous().requires_grad_()
            for x in (q, k, v)
        ]
        expected = transformers_reference(*leaves, blocks[None, :, start:end], block, scale)[0].transpose(0, 1)
        expected.backward(grad_out[start:end].to(dtype).float())
        assert rel_err(out[start:end].cpu(), expected) <= TOLERANCE[dtype]
        for ours, reference in zip(ours_in, leaves, strict=True):
            assert ours.grad is not None and reference.grad is not None
            assert rel_err(ours.grad[start:end].cpu(), reference.grad[0].transpose(0, 1)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("b", "g", "t", "dim", "block"), [(2, 2, 37, 24, 4), (1, 4, 50, 16, 16), (1, 3, 29, 40, 8)])
def test_index_block_scores_match_the_reference(
    device: str, dtype: torch.dtype, b: int, g: int, t: int, dim: int, block: int
) -> None:
    """Block maxima equal the full-matrix reference (transformers' maths); -inf exactly where no key of
    the block is visible (future blocks, and the reference's padding)."""
    generator = torch.Generator().manual_seed(t)
    q = torch.randn(b, g, t, dim, generator=generator).to(dtype)
    k = torch.randn(b, 1, t, dim, generator=generator).to(dtype)
    expected = torch_index_scores(q, k, None, block)
    ours = index_block_scores(q.to(device), k.to(device), None, block).cpu()
    assert ours.shape == expected.shape == (b, g, t, -(-t // block))
    finite = expected.isfinite()
    assert torch.equal(ours.isfinite(), finite) and (~finite).any()
    assert rel_err(ours[finite], expected[finite]) <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_the_m3_model_runs_its_sparse_layers_on_the_kernel(device: str) -> None:
    """The tiny M3 model with the Triton attention and index scorer picks the same blocks and gives the
    logits and gradients of the torch reference backends (at parity with transformers,
    tests/unit/model/test_model_m3.py), 40 tokens: blocks are dropped."""
    register_m3_msa("triton")
    torch.manual_seed(0)
    reference = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny")).to(device)
    model = MiniMaxM3ForCausalLM(reference.config.replace(msa_backend="triton", index_backend="triton")).to(device)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(0, reference.config.vocab_size, (1, 40), device=device)
    out, expected = model(ids), reference(ids)
    assert all(torch.equal(out.block_indices[i], expected.block_indices[i]) for i in expected.block_indices)
    assert (expected.block_indices[2] >= 0).sum(-1).max() < 40 // reference.config.index_block_size
    assert rel_err(out.logits, expected.logits) <= 1e-5
    out.logits.square().mean().backward()
    expected.logits.square().mean().backward()
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    for name in ("model.layers.2.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"):
        assert rel_err(ours[name].grad, theirs[name].grad) <= 1e-4, name  # type: ignore[arg-type]


@pytest.mark.parametrize("device", DEVICES)
def test_a_mask_is_refused_with_a_way_out(device: str) -> None:
    register_m3_msa("triton")
    model = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny", msa_backend="triton")).to(device)
    mask = torch.ones(1, 8, 8, dtype=torch.bool, device=device).tril()
    with pytest.raises(ValueError, match="msa_backend 'torch'"):
        model(torch.zeros(1, 8, dtype=torch.long, device=device), attention_mask=mask)
