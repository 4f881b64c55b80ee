"""Forward semantics: shapes, dtypes, masks (packing, prefix trees), routing and its replay."""

import pytest
import torch
import torch.nn.functional as F

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.model.attention import TreeMask, eager_attention, sdpa_attention
from forgerl.model.moe import route

pytestmark = pytest.mark.unit


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object) -> MiniMaxM2ForCausalLM:
    torch.manual_seed(seed)
    return MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", **overrides)).to(dtype).eval()


def test_output_shapes_and_dtypes() -> None:
    model = make_model()
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (3, 11))
    out = model(ids)
    assert out.logits.shape == (3, 11, cfg.vocab_size) and out.logits.dtype == torch.float32
    assert out.hidden_states.shape == (3, 11, cfg.hidden_size)
    assert out.expert_load.shape == (cfg.num_hidden_layers, cfg.num_local_experts)
    assert out.routed_experts.shape == (3, 11, cfg.num_hidden_layers, cfg.num_experts_per_tok)
    assert out.routed_experts.dtype == torch.long
    # Every token goes to exactly top_k experts in every layer.
    assert torch.all(out.expert_load.sum(-1) == 3 * 11 * cfg.num_experts_per_tok)
    assert torch.equal(out.expert_load[0], torch.bincount(out.routed_experts[:, :, 0].flatten(), minlength=8).float())
    assert out.aux_loss.item() == 0.0


def test_float64_model_computes_in_float64() -> None:
    model = make_model(torch.float64)
    out = model(torch.randint(0, 4096, (2, 9)))
    assert out.logits.dtype == out.hidden_states.dtype == torch.float64
    # The router too: float64 scores, so float64 weights.
    x_ND = torch.randn(5, 64, dtype=torch.float64)
    gate = model.model.layers[0].block_sparse_moe
    routing = route(x_ND, gate.gate.weight, gate.e_score_correction_bias, 2)
    assert routing.weights_NK.dtype == torch.float64


def test_causal_default_equals_explicit_causal_mask_and_arange_positions() -> None:
    model = make_model(torch.float64)
    ids = torch.randint(0, 4096, (2, 13))
    causal = torch.ones(13, 13, dtype=torch.bool).tril().expand(2, 13, 13)
    a = model(ids).logits
    b = model(ids, position_ids=torch.arange(13).expand(2, 13), attention_mask=causal).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_packed_sequences_with_block_mask_equal_separate_forwards() -> None:
    model = make_model(torch.float64)
    first, second = torch.randint(0, 4096, (1, 7)), torch.randint(0, 4096, (1, 5))
    packed = torch.cat([first, second], dim=1)
    mask = torch.zeros(1, 12, 12, dtype=torch.bool)
    mask[0, :7, :7] = torch.ones(7, 7, dtype=torch.bool).tril()
    mask[0, 7:, 7:] = torch.ones(5, 5, dtype=torch.bool).tril()
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None]
    out = model(packed, position_ids=positions, attention_mask=mask)
    torch.testing.assert_close(out.logits[:, :7], model(first).logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.logits[:, 7:], model(second).logits, rtol=0, atol=1e-10)


def test_prefix_tree_mask_with_depth_positions_equals_both_branches() -> None:
    """prefix P (4 tokens) shared by branches A (3) and B (2): packed as P A B, each token attending to
    its ancestors only, positions = depth in the tree."""
    model = make_model(torch.float64)
    prefix, branch_a, branch_b = (torch.randint(0, 4096, (1, n)) for n in (4, 3, 2))
    tree = torch.cat([prefix, branch_a, branch_b], dim=1)
    parents = [-1, 0, 1, 2, 3, 4, 5, 3, 7]  # B's first token hangs off P's last
    mask = torch.zeros(1, 9, 9, dtype=torch.bool)
    depth = torch.zeros(1, 9, dtype=torch.long)
    for node, parent in enumerate(parents):
        mask[0, node, node] = True
        if parent >= 0:
            mask[0, node] |= mask[0, parent]
            depth[0, node] = depth[0, parent] + 1
    out = model(tree, position_ids=depth, attention_mask=mask)
    full_a = model(torch.cat([prefix, branch_a], dim=1)).logits
    full_b = model(torch.cat([prefix, branch_b], dim=1)).logits
    torch.testing.assert_close(out.logits[:, :7], full_a, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.logits[:, 7:], full_b[:, 4:], rtol=0, atol=1e-10)
    # The same tree as subtree ends (P's subtree runs to the end, A's stops where B starts): the backend
    # expands it to the very same mask, so the output is bit for bit the dense mask's.
    tree_mask = TreeMask(torch.tensor([[9, 9, 9, 9, 7, 7, 7, 9, 9]]))
    assert torch.equal(tree_mask.dense(), mask)
    assert torch.equal(model(tree, position_ids=depth, attention_mask=tree_mask).logits, out.logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_backends_agree_and_rows_without_keys_give_zeros(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 6, 16, dtype=dtype),
        torch.randn(2, 2, 6, 16, dtype=dtype),
        torch.randn(2, 2, 6, 16, dtype=dtype),
    )
    mask = torch.rand(2, 6, 6) > 0.4
    mask[1, 3] = False  # a padding query that may see nothing
    for m in (None, mask):
        a, b = sdpa_attention(q, k, v, m, 0.25), eager_attention(q, k, v, m, 0.25)
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(a, b, rtol=0, atol=tol)
    assert torch.equal(sdpa_attention(q, k, v, mask, 0.25)[1, :, 3], torch.zeros(4, 16, dtype=dtype))


def test_eager_backend_gives_the_same_model_output() -> None:
    ids = torch.randint(0, 4096, (2, 10))
    a = make_model(torch.float64)(ids).logits
    b = make_model(torch.float64, attn_backend="eager")(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_replaying_the_chosen_experts_reproduces_the_forward() -> None:
    model = make_model(torch.float64)
    ids = torch.randint(0, 4096, (2, 10))
    out = model(ids)
    replayed = model(ids, routed_experts=out.routed_experts)
    torch.testing.assert_close(replayed.logits, out.logits, rtol=0, atol=1e-12)
    assert torch.equal(replayed.routed_experts, out.routed_experts)


def test_replay_overrides_routing_even_against_the_router() -> None:
    model = make_model(torch.float64)
    ids = torch.randint(0, 4096, (1, 6))
    out = model(ids)
    other = (out.routed_experts + 1) % model.config.num_local_experts  # never what the router picked
    replayed = model(ids, routed_experts=other)
    assert torch.equal(replayed.routed_experts, other)
    assert not torch.allclose(replayed.logits, out.logits)
    assert torch.equal(replayed.expert_load[0], torch.bincount(other[:, :, 0].flatten(), minlength=8).double())


def test_correction_bias_changes_the_choice_not_the_weights() -> None:
    torch.manual_seed(0)
    x_ND, gate_ED = torch.randn(32, 64), torch.randn(8, 64) * 0.1
    plain = route(x_ND, gate_ED, torch.zeros(8), 2)
    biased = route(x_ND, gate_ED, torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]), 2)
    assert torch.equal(biased.expert_ids_NK.sort(-1).values, torch.tensor([[0, 1]]).expand(32, 2))
    # The weights are the unbiased sigmoid scores of the chosen experts, renormalised.
    scores = torch.sigmoid(x_ND @ gate_ED.T)
    expected = scores[:, :2] / scores[:, :2].sum(-1, keepdim=True)
    torch.testing.assert_close(biased.weights_NK.gather(1, biased.expert_ids_NK.argsort(-1)), expected)
    torch.testing.assert_close(plain.weights_NK.sum(-1), torch.ones(32))


def test_grouped_and_looped_expert_paths_agree() -> None:
    """float32 takes torch's grouped_mm, float64 the per-expert loop: same function."""
    model32 = make_model(torch.float32)
    model64 = make_model(torch.float64)
    ids = torch.randint(0, 4096, (2, 16))
    torch.testing.assert_close(model32(ids).logits.double(), model64(ids).logits, rtol=0, atol=2e-5)


def test_sequence_balance_loss_is_reported_when_enabled() -> None:
    model = make_model(seq_aux_loss_coef=1e-2).train()
    out = model(torch.randint(0, 4096, (2, 16)))
    # f.P sums to ~1 per layer at random init (balanced-ish routing); 2 layers, coefficient 1e-2.
    assert 0.5e-2 < out.aux_loss.item() < 4e-2
    out.aux_loss.backward()
    assert model.model.layers[0].block_sparse_moe.gate.weight.grad is not None


def test_rejects_inputs_of_the_wrong_shape() -> None:
    model = make_model()
    ids = torch.randint(0, 4096, (2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 5, 5))  # float, not bool
    with pytest.raises(ValueError, match="TreeMask"):
        model(ids, attention_mask=TreeMask(torch.full((1, 5), 5)))  # one row for a batch of two
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(5))
    with pytest.raises(ValueError, match="routed_experts"):
        model(ids, routed_experts=torch.zeros(2, 5, 2, 3, dtype=torch.long))


def test_debug_training_steps_fit_a_fixed_batch() -> None:
    """Forward, next-token + MTP loss, backward, AdamW: repeated on one batch, both losses fall. (Its speed
    is measured in benchmarks/model_step.py, not asserted here: other processes may share the CPU.)"""
    torch.manual_seed(0)
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 4096, (4, 128))

    def step() -> tuple[float, float]:
        out = model(ids)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        mtp_loss = model.mtp_loss(out.hidden_states, ids)[0]
        (loss + mtp_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.item(), mtp_loss.item()

    first = step()
    for _ in range(8):
        last = step()
    assert last[0] < first[0] - 0.5 and last[1] < first[1]
