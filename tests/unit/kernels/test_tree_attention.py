"""Tree attention against the float32 dense-mask reference, with trees drawn at random in preorder."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import DEVICES, rel_err

from forgerl.kernels.tree_attention import adapter, tree_attention, tree_attention_backend
from forgerl.kernels.tree_attention.naive import ancestor_mask, naive_tree_attention
from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.attention import ATTENTION_BACKENDS, TreeMask, eager_attention
from forgerl.rl.prefix_merge import dense_ancestor_mask, forward_merged, forward_unmerged
from forgerl.rl.prefix_tree import PrefixForest, TreePack

# Norm-wise relative error bounds: the kernel rounds P to the input dtype before P @ V (as flash attention
# does); bf16 keeps 8 mantissa bits (2^-8 = 4e-3 per element), fp16 11 bits.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def random_preorder_forest(t: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """parent [T] (-1 for roots) of a random forest numbered in preorder, and its subtree ends [T].

    Node i's parent is drawn from the path root -> node i-1 (or none: a new root), which is exactly the
    set of nodes a preorder walk may attach the next node to."""
    parent: list[int] = []
    path: list[int] = []
    for node in range(t):
        depth = int(torch.randint(0, len(path) + 1, (), generator=generator)) if path else 0
        path = path[:depth]
        parent.append(path[-1] if path else -1)
        path.append(node)
    end = list(range(1, t + 1))
    for node in reversed(range(t)):
        if parent[node] >= 0:
            end[parent[node]] = max(end[parent[node]], end[node])
    return torch.tensor(parent), torch.tensor(end, dtype=torch.int32)


def mask_from_parents(parent: torch.Tensor) -> torch.Tensor:
    """bool [T, T] by walking parent pointers: independent of the subtree_end encoding."""
    t = parent.shape[0]
    mask = torch.zeros(t, t, dtype=torch.bool)
    for node in range(t):
        walk = node
        while walk >= 0:
            mask[node, walk] = True
            walk = int(parent[walk])
    return mask


@pytest.mark.unit
def test_subtree_end_encodes_the_ancestor_mask() -> None:
    generator = torch.Generator().manual_seed(1)
    for t in (1, 7, 40):
        parent, end = random_preorder_forest(t, generator)
        assert torch.equal(ancestor_mask(end[None])[0], mask_from_parents(parent))


def _inputs(b: int, t: int, h: int, g: int, d: int, dtype: torch.dtype, device: str, seed: int):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, n, d, generator=generator).to(dtype) for n in (h, g, g))
    end = torch.stack([random_preorder_forest(t, generator)[1] for _ in range(b)])
    # Right padding of the last row: real subtrees stop at t // 2, padding keys are hidden, padding rows zero.
    end[-1] = torch.where(torch.arange(t) < t // 2, end[-1].clamp(max=t // 2), torch.arange(t, dtype=torch.int32))
    grad = torch.randn(b, t, h, d, generator=generator).to(dtype)
    return [x.to(device) for x in (q, k, v, end, grad)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.float32, (2, 37, 4, 2, 24)),
        (torch.bfloat16, (1, 45, 3, 1, 40)),
        (torch.float16, (2, 29, 2, 2, 16)),
    ],
)
def test_forward_and_gradients_match_reference(device: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    b, t, h, g, d = shape
    q, k, v, end, grad = _inputs(b, t, h, g, d, dtype, device, seed=t)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = tree_attention(leaves[0], leaves[1], leaves[2], end)
    out.backward(grad)
    ref_leaves = [x.float().clone().requires_grad_() for x in (q, k, v)]
    ref = naive_tree_attention(ref_leaves[0], ref_leaves[1], ref_leaves[2], end)
    ref.backward(grad.float())
    assert out.dtype == dtype
    assert rel_err(out, ref) < TOLERANCE[dtype]
    for leaf, ref_leaf in zip(leaves, ref_leaves, strict=True):
        assert leaf.grad is not None and ref_leaf.grad is not None
        assert leaf.grad.dtype == dtype
        assert rel_err(leaf.grad, ref_leaf.grad) < TOLERANCE[dtype]
    padded_rows = out[-1, t // 2 :]
    assert torch.equal(padded_rows, torch.zeros_like(padded_rows))


@pytest.mark.parametrize("device", DEVICES)
def test_causal_encoding_is_causal_attention(device: str) -> None:
    b, t, h, g, d = 1, 21, 2, 1, 16
    q, k, v, _, _ = _inputs(b, t, h, g, d, torch.float32, device, seed=3)
    causal = torch.full((b, t), t, dtype=torch.int32, device=device)
    out = tree_attention(q, k, v, causal)
    q_BHTD, k_BGTD, v_BGTD = (x.double().transpose(1, 2) for x in (q, k, v))
    expected = F.scaled_dot_product_attention(q_BHTD, k_BGTD, v_BGTD, is_causal=True, enable_gqa=True).transpose(1, 2)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_backend_matches_eager_attention_on_a_prefix_forest(device: str) -> None:
    """The model-side adapter on a real TreePack's mask, against the model's own eager backend."""
    rows = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 3, 4, 0], [5, 2, 2, 2, 0, 0], [9, 9, 9, 9, 9, 9]])
    pack = PrefixForest.build(rows, torch.tensor([6, 5, 4, 6])).packs[0]
    mask_BTS = pack.ancestor_mask()[None].to(device)
    t = pack.num_tokens
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, t, 16, generator=generator, dtype=torch.float64).to(device) for n in (4, 2, 2))
    expected = eager_attention(q, k, v, mask_BTS, 0.25)
    out = tree_attention_backend(q.float(), k.float(), v.float(), mask_BTS, 0.25)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]
    tree_mask = TreeMask(pack.subtree_end()[None].to(device))  # the pack's own encoding, no dense mask
    out = tree_attention_backend(q.float(), k.float(), v.float(), tree_mask, 0.25)
    assert rel_err(out, expected) < TOLERANCE[torch.float32]


@pytest.mark.unit
def test_backend_rejects_a_mask_that_is_not_an_ancestor_mask() -> None:
    mask = torch.ones(1, 4, 4, dtype=torch.bool)  # keys after the query: no preorder tree does that
    with pytest.raises(ValueError, match="not a preorder ancestor mask"):
        tree_attention_backend(torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 4, 16), mask, 1.0)


def _no_dense_mask(*args: object) -> torch.Tensor:
    raise AssertionError("a dense [T, T] mask was built on the subtree-end path")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hook", ["picked", "dense"])
def test_model_with_the_tree_backend_matches_unmerged_sequences(
    device: str, hook: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The debug model on a merged forest, attention by the kernel, against the unmerged SDPA model: with
    the hook forward_merged picks for attn_backend "tree" (each pack's subtree ends, and no [T, T] mask
    anywhere: building one fails the test) and with the dense mask the adapter converts back."""
    monkeypatch.setitem(ATTENTION_BACKENDS, "tree", tree_attention_backend)
    tree_attention = dense_ancestor_mask if hook == "dense" else None
    if hook == "picked":
        for owner, name in ((TreePack, "ancestor_mask"), (TreeMask, "dense"), (adapter, "subtree_end_from_mask")):
            monkeypatch.setattr(owner, name, _no_dense_mask)
    torch.manual_seed(0)
    reference = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).to(device)
    merged = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", attn_backend="tree")).to(device)
    merged.load_state_dict(reference.state_dict())
    ids = torch.tensor([[7, 8, 9, 10, 11, 12, 13], [7, 8, 9, 10, 20, 21, 0], [7, 8, 30, 31, 32, 33, 34]], device=device)
    lengths = torch.tensor([7, 6, 7])
    routes = reference(ids).routed_experts  # replayed in both runs: near-ties must not pick other experts
    weights = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).to(device)
    expected = forward_unmerged(reference, ids, lengths, routed_experts=routes)
    (expected.logprobs * weights).sum().backward()
    forest = PrefixForest.build(ids.cpu(), lengths)
    forest = dataclasses.replace(forest, packs=tuple(pack.to(device) for pack in forest.packs))
    got = forward_merged(merged, forest, routed_experts=routes, tree_attention=tree_attention)
    (got.logprobs * weights).sum().backward()
    assert rel_err(got.logprobs, expected.logprobs) < 1e-5
    ref_params = dict(reference.named_parameters())
    assert sum(param.grad is not None for param in merged.parameters()) > 10
    for name, param in merged.named_parameters():
        if param.grad is not None:
            assert rel_err(param.grad, ref_params[name].grad) < 1e-4, name
