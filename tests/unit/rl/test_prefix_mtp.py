"""Multi-token prediction on prefix-tree packs: the tree each module runs on, and equality of the merged MTP
loss (value and every gradient) with the unmerged one, the model's linear `mtp_module_losses`."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.mtp import mtp_module_losses
from forgerl.rl.prefix_merge import dense_ancestor_mask, forward_merged, subtree_end_mask
from forgerl.rl.prefix_mtp import mtp_loss_merged
from forgerl.rl.prefix_tree import PrefixForest

pytestmark = pytest.mark.unit


def _pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows right-padded with 0, and their lengths."""
    ids = pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True)
    return ids, torch.tensor([len(s) for s in seqs])


def test_cut_tree_of_a_hand_made_forest() -> None:
    ids, lengths = _pad([[1, 2, 3, 4], [1, 2, 5], [1, 2], [7, 8, 9], [1, 2, 3, 4]])
    (pack,) = PrefixForest.build(ids, lengths).packs  # preorder 1-2-{3-4, 5}, 7-8-9
    cut = pack.without_top_levels(2)
    assert cut is not None
    sub, kept = cut
    # Depth >= 2: the nodes of 3, 4, 5 and 9; 3, 5 and 9 become roots.
    assert kept.tolist() == [2, 3, 4, 7]
    assert sub.input_ids.tolist() == [3, 4, 5, 9]
    assert sub.position_ids.tolist() == [0, 1, 0, 0]
    assert sub.parent.tolist() == [-1, 0, -1, -1]
    # The sequence [1, 2] has nothing at depth 2; the others keep their tails.
    assert sub.sequence_rows.tolist() == [0, 4, 1, 3]
    assert sub.lengths.tolist() == [2, 2, 1, 1]
    assert sub.node_index.tolist() == [[0, 1], [0, 1], [2, 0], [3, 0]]
    assert sub.ancestor_mask()[1].nonzero().flatten().tolist() == [0, 1]
    assert pack.without_top_levels(4) is None


def _random_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows over a 3-token alphabet: long shared prefixes that branch everywhere, within k steps too."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 3, (int(n),), generator=gen).tolist() for n in torch.randint(1, 13, (24,), generator=gen)]
    seqs += [seqs[0], seqs[1][:-1]]  # a duplicate row and a row that is another's prefix
    ids, lengths = _pad(seqs)
    steps = torch.arange(ids.shape[1])
    mask = (torch.rand(ids.shape, generator=gen) < 0.7) & (steps[None, :] < lengths[:, None])
    return ids, lengths, mask


@pytest.mark.parametrize("max_tokens_per_pack", [None, 14])
@pytest.mark.parametrize("hook", [dense_ancestor_mask, subtree_end_mask])
def test_merged_mtp_loss_and_gradients_equal_unmerged(max_tokens_per_pack: int | None, hook: object) -> None:
    torch.manual_seed(0)
    base = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=16, num_mtp_modules=3)).double()
    ids, lengths, mask = _random_batch(1)

    reference = copy.deepcopy(base)
    ref_losses = mtp_module_losses(reference, reference(ids).hidden_states, ids, mask)
    assert len(ref_losses) == 3
    torch.stack(ref_losses).mean().backward()

    merged = copy.deepcopy(base)
    forest = PrefixForest.build(ids, lengths, max_tokens_per_pack=max_tokens_per_pack)
    assert forest.num_packed_tokens < forest.num_input_tokens
    outs = forward_merged(merged, forest, tree_attention=hook, with_hidden=True)  # type: ignore[arg-type]
    assert outs.pack_hidden is not None
    loss, metrics = mtp_loss_merged(merged, forest, outs.pack_hidden, mask, tree_attention=hook)  # type: ignore[arg-type]
    loss.backward()

    for k, ref in enumerate(ref_losses, start=1):
        assert abs(metrics[f"mtp/loss_{k}"] - float(ref.detach())) < 1e-10
    assert abs(float(loss.detach()) - float(torch.stack(ref_losses).mean().detach())) < 1e-10
    ref_grads = dict(reference.named_parameters())
    for name, param in merged.named_parameters():
        expected = ref_grads[name].grad
        if expected is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=1e-10, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in merged.mtp[2].parameters())


def test_one_state_per_main_node_would_be_wrong() -> None:
    """Why module k needs its own tree (and that the test above can fail): module 1 run on the main
    tree, one state per node with the next token of the node's first row, gives another loss."""
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=16, num_mtp_modules=1)).double()
    ids, lengths, mask = _random_batch(1)
    exact = mtp_module_losses(model, model(ids).hidden_states, ids, mask)[0]
    forest = PrefixForest.build(ids, lengths)
    (pack,) = forest.packs
    (hidden_TD,) = forward_merged(model, forest, with_hidden=True).pack_hidden or ()
    ahead_T = ids[pack.origin_row, (pack.position_ids + 1).clamp(max=ids.shape[1] - 1)]
    module = model.mtp[0]
    _, normed = module(
        hidden_TD[None],
        model.model.embed_tokens(ahead_T)[None],
        model.rope(pack.position_ids[None], torch.float64),
        pack.ancestor_mask()[None],
    )
    logp_TV = torch.log_softmax(model.lm_head(normed[0]), dim=-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for s, row in enumerate(pack.sequence_rows.tolist()):
        for pos in range(int(pack.lengths[s]) - 2):
            if mask[row, pos + 2]:
                total = total - logp_TV[pack.node_index[s, pos], ids[row, pos + 2]]
                count += 1
    assert abs(float((total / count).detach()) - float(exact.detach())) > 1e-3
