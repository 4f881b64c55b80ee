"""Prefix-tree merging: the trie and its packs, and parity with the unmerged computation on the project's
model (per-token log-probabilities, entropies and every parameter gradient)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.attention import ATTENTION_BACKENDS, TreeMask, eager_attention
from forgerl.rl.losses import cispo_loss
from forgerl.rl.prefix_merge import (
    dense_ancestor_mask,
    forward_merged,
    forward_pack,
    forward_unmerged,
    subtree_end_mask,
    tree_attention_for,
)
from forgerl.rl.prefix_tree import PrefixForest, TreePack

pytestmark = pytest.mark.unit


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
    return ids, lengths


# -- the trie and its packs ---------------------------------------------------------------------------


def test_hand_made_forest() -> None:
    ids, lengths = _pad([[1, 2, 3, 4], [1, 2, 5], [1, 2], [7, 8, 9], [1, 2, 3, 4]])
    forest = PrefixForest.build(ids, lengths)
    (pack,) = forest.packs
    # Preorder of the trie 1-2-{3-4, 5} and 7-8-9; the duplicate and the prefix add no node.
    assert pack.input_ids.tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    assert pack.position_ids.tolist() == [0, 1, 2, 3, 2, 0, 1, 2]
    assert pack.parent.tolist() == [-1, 0, 1, 2, 1, -1, 5, 6]
    assert forest.num_input_tokens == 16 and forest.num_packed_tokens == 8
    mask = pack.ancestor_mask()
    assert mask[4].nonzero().flatten().tolist() == [0, 1, 4]  # the branch 5 sees 1, 2 and itself
    assert mask[7].nonzero().flatten().tolist() == [5, 6, 7]  # trees do not see each other


def test_ancestor_mask_is_the_parent_chain() -> None:
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 3, (int(n),), generator=gen).tolist() for n in torch.randint(1, 12, (30,), generator=gen)]
    forest = PrefixForest.build(*_pad(seqs))
    (pack,) = forest.packs
    expected = torch.zeros(pack.num_tokens, pack.num_tokens, dtype=torch.bool)
    for node in range(pack.num_tokens):
        ancestor = node
        while ancestor >= 0:
            expected[node, ancestor] = True
            ancestor = int(pack.parent[ancestor])
        assert int(pack.position_ids[node]) == int(expected[node].sum()) - 1  # depth = number of ancestors
    assert torch.equal(pack.ancestor_mask(), expected)
    assert torch.equal(TreeMask(pack.subtree_end()[None]).dense(), expected[None])
    # Every sequence reads back its own tokens through its node path.
    for row, nodes, length in zip(pack.sequence_rows, pack.node_index, pack.lengths, strict=True):
        assert pack.input_ids[nodes[:length]].tolist() == seqs[row]


def test_max_tokens_per_pack_splits_the_forest() -> None:
    prompt = list(range(10, 20))
    seqs = [[*prompt, i, i + 1, i + 2] for i in range(6)]
    ids, lengths = _pad(seqs)
    assert PrefixForest.build(ids, lengths).num_packed_tokens == 10 + 6 * 3
    forest = PrefixForest.build(ids, lengths, max_tokens_per_pack=20)
    # 10 + 3 + 3 + 3 = 19 fits, a 4th answer would not: the prompt is recomputed in each pack.
    assert [pack.num_tokens for pack in forest.packs] == [19, 19]
    assert sorted(torch.cat([p.sequence_rows for p in forest.packs]).tolist()) == list(range(6))
    with pytest.raises(ValueError, match="more than max_tokens_per_pack=12"):
        PrefixForest.build(ids, lengths, max_tokens_per_pack=12)


def test_pack_per_token_follows_the_nodes() -> None:
    ids, lengths = _pad([[1, 2, 3], [1, 2, 4, 5]])
    values = ids * 10 + torch.arange(ids.shape[1])  # unique per (token, position)
    forest = PrefixForest.build(ids, lengths)
    (packed,) = forest.pack_per_token(values[..., None, None])
    assert packed.shape == (5, 1, 1)
    assert packed.flatten().tolist() == [10, 21, 32, 42, 53]


# -- parity on the project's model --------------------------------------------------------------------

VOCAB = ModelConfig.from_preset("debug").vocab_size


def _group_batch(gen: torch.Generator) -> list[list[int]]:
    """Group members answering one prompt; some answers share their first tokens, one is repeated."""
    prompt = torch.randint(0, VOCAB, (int(torch.randint(8, 40, (1,), generator=gen)),), generator=gen).tolist()
    answers = [
        torch.randint(0, VOCAB, (int(n),), generator=gen).tolist() for n in torch.randint(1, 20, (6,), generator=gen)
    ]
    answers.append([*answers[0][:2], 5, 6, 7])
    answers.append(list(answers[1]))
    return [prompt + answer for answer in answers]


def _multiturn_batch(gen: torch.Generator) -> list[list[int]]:
    """Agent trajectories: one sample per turn, history + reasoning/action; histories grow by tool output."""
    task = torch.randint(0, VOCAB, (12,), generator=gen).tolist()
    samples = []
    for _ in range(3):
        history = list(task)
        for _ in range(int(torch.randint(2, 5, (1,), generator=gen))):
            action = torch.randint(0, VOCAB, (int(torch.randint(3, 10, (1,), generator=gen)),), generator=gen)
            observation = torch.randint(0, VOCAB, (int(torch.randint(2, 8, (1,), generator=gen)),), generator=gen)
            samples.append(history + action.tolist())
            history = samples[-1] + observation.tolist()
    return samples


def _mixed_batch(gen: torch.Generator) -> list[list[int]]:
    return _group_batch(gen) + _multiturn_batch(gen) + [[3], [3, 4]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp(min=torch.finfo(b.dtype).tiny))


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _parity(
    model: MiniMaxM2ForCausalLM,
    seqs: list[list[int]],
    *,
    max_tokens: int | None,
    replay: bool,
    seed: int,
    reference: MiniMaxM2ForCausalLM | None = None,
) -> tuple[float, float, float]:
    """Worst relative differences (logprobs, entropy, parameter gradients) merged vs unmerged; the
    unmerged run uses `reference` (the same weights) when given, else `model` itself."""
    reference = reference or model
    dtype = next(model.parameters()).dtype
    ids, lengths = _pad(seqs)
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    routes = reference(ids).routed_experts if replay else None  # the rollout's routing, replayed in both runs
    ref = forward_unmerged(reference, ids, lengths, routed_experts=routes, with_entropy=True)
    ((ref.logprobs + 0.1 * ref.entropy) * weights).sum().backward()
    ref_grads = _grads(reference)
    forest = PrefixForest.build(ids, lengths, max_tokens_per_pack=max_tokens)
    assert forest.num_packed_tokens < forest.num_input_tokens
    out = forward_merged(model, forest, routed_experts=routes, with_entropy=True)
    ((out.logprobs + 0.1 * out.entropy) * weights).sum().backward()
    grads = _grads(model)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    grad_err = max(_rel(grads[name], ref_grads[name]) for name in grads)
    return _rel(out.logprobs, ref.logprobs), _rel(out.entropy, ref.entropy), grad_err


BATCHES = {"group": _group_batch, "multiturn": _multiturn_batch, "mixed": _mixed_batch}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_merged_equals_unmerged_in_float64(kind: str, seed: int) -> None:
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).double()
    seqs = BATCHES[kind](torch.Generator().manual_seed(seed))
    max_tokens = 64 if kind == "mixed" else None  # the mixed batch is split over several packs
    errors = _parity(model, seqs, max_tokens=max_tokens, replay=False, seed=seed)
    assert max(errors) <= 1e-10, errors


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", sorted(BATCHES))
def test_merged_equals_unmerged_in_float32(kind: str, seed: int) -> None:
    # Routing replay, as in training: a router score within rounding of the k-th largest could otherwise
    # pick another expert in one of the two runs, which is a tie-break, not a merging error.
    torch.manual_seed(seed)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
    seqs = BATCHES[kind](torch.Generator().manual_seed(100 + seed))
    max_tokens = 64 if kind == "mixed" else None
    errors = _parity(model, seqs, max_tokens=max_tokens, replay=True, seed=seed)
    assert max(errors) <= 1e-5, errors


def test_a_tree_backend_gets_subtree_ends_and_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """attn_backend "tree" makes the merged forward hand each pack's O(T) TreeMask to the backend, and no
    [T, T] mask is built on the way; a stand-in backend (eager attention on the expanded mask) then
    matches the unmerged SDPA model. The kernel itself is tested against this in tests/unit/kernels."""
    masks: list[torch.Tensor | TreeMask | None] = []

    def stand_in(
        q_BHTK: torch.Tensor,
        k_BGSK: torch.Tensor,
        v_BGSK: torch.Tensor,
        mask_BTS: torch.Tensor | TreeMask | None,
        scale: float,
    ) -> torch.Tensor:
        masks.append(mask_BTS)
        return eager_attention(q_BHTK, k_BGSK, v_BGSK, mask_BTS, scale)

    def no_dense_mask(pack: TreePack) -> torch.Tensor:
        raise AssertionError("the merged forward built a pack's dense ancestor mask")

    monkeypatch.setitem(ATTENTION_BACKENDS, "tree", stand_in)
    torch.manual_seed(0)
    reference = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).double()
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", attn_backend="tree")).double()
    model.load_state_dict(reference.state_dict())
    assert tree_attention_for(reference) is dense_ancestor_mask
    assert tree_attention_for(model) is subtree_end_mask
    assert tree_attention_for(SimpleNamespace(module=model)) is subtree_end_mask  # DDP keeps it in .module
    monkeypatch.setattr(TreePack, "ancestor_mask", no_dense_mask)
    seqs = _mixed_batch(torch.Generator().manual_seed(3))
    errors = _parity(model, seqs, max_tokens=64, replay=False, seed=3, reference=reference)
    assert max(errors) <= 1e-10, errors
    packs = len(PrefixForest.build(*_pad(seqs), max_tokens_per_pack=64).packs)
    assert packs > 1 and len(masks) == packs * model.config.num_hidden_layers
    assert all(isinstance(mask, TreeMask) for mask in masks)


def test_cispo_loss_and_gradients_match() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).double()
    gen = torch.Generator().manual_seed(7)
    ids, lengths = _pad(_group_batch(gen) + _multiturn_batch(gen))
    mask = torch.arange(ids.shape[1] - 1)[None, :] < (lengths[:, None] - 1)
    advantages = torch.randn(ids.shape[0], 1, dtype=torch.float64, generator=gen)

    def loss_of(logprobs: torch.Tensor) -> torch.Tensor:
        old = logprobs.detach() + 0.3 * torch.randn(logprobs.shape, dtype=logprobs.dtype, generator=gen)
        return cispo_loss(logprobs, old, advantages, mask, eps_high=0.2)[0]

    gen.manual_seed(11)
    loss_ref = loss_of(forward_unmerged(model, ids, lengths).logprobs)
    loss_ref.backward()
    ref_grads = _grads(model)
    gen.manual_seed(11)
    loss = loss_of(forward_merged(model, PrefixForest.build(ids, lengths)).logprobs)
    loss.backward()
    grads = _grads(model)
    assert abs(loss.item() - loss_ref.item()) <= 1e-10 * abs(loss_ref.item())
    assert max(_rel(grads[name], ref_grads[name]) for name in grads) <= 1e-10


def test_packed_routing_is_the_routing_each_node_gets() -> None:
    # The experts the merged forward picks for a node are those the unmerged forward picked for that token:
    # pack_per_token puts routing replay ids where the packed model expects them.
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).double()
    ids, lengths = _pad(_multiturn_batch(torch.Generator().manual_seed(5)))
    routes = model(ids).routed_experts  # [B, L, n_layers, top_k]
    forest = PrefixForest.build(ids, lengths, max_tokens_per_pack=80)
    for pack, packed_routes in zip(forest.packs, forest.pack_per_token(routes), strict=True):
        out = model(
            pack.input_ids[None], position_ids=pack.position_ids[None], attention_mask=pack.ancestor_mask()[None]
        )
        assert torch.equal(out.routed_experts[0].sort(dim=-1).values, packed_routes.sort(dim=-1).values)


def test_forward_pack_gives_each_packs_sequences() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug")).double()
    ids, lengths = _pad(_group_batch(torch.Generator().manual_seed(3)))
    ref = forward_unmerged(model, ids, lengths).logprobs
    forest = PrefixForest.build(ids, lengths, max_tokens_per_pack=60)
    assert len(forest.packs) > 1
    for pack in forest.packs:  # pack by pack, as gradient accumulation would run them
        out = forward_pack(model, pack).logprobs
        rows = pack.sequence_rows
        assert _rel(out, ref[rows, : out.shape[1]]) <= 1e-10
        assert torch.all(ref[rows, out.shape[1] :] == 0)


def test_importing_rl_pulls_in_neither_vllm_nor_triton() -> None:
    code = (
        "import sys, forgerl.rl, forgerl.rl.losses, forgerl.rl.rewards, forgerl.rl.windowed_fifo, "
        "forgerl.rl.prefix_tree, forgerl.rl.prefix_merge; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'triton')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
