"""The lightning indexer's own objective (m3_indexer_training): the KL against an attention mass computed
here by explicit loops, torch's kl_div as the reference for its value, and where its gradient goes."""

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from forgerl.model.m3 import MiniMaxM3ForCausalLM
from forgerl.model.m3_attention import causal_mask
from forgerl.model.m3_config import FULL_ATTENTION, M3Config
from forgerl.model.m3_indexer_training import block_recall, indexer_objective

pytestmark = pytest.mark.unit

B, G, HEADS_PER_GROUP, T, DIM, BLOCK = 1, 2, 2, 8, 4, 2
NUM_BLOCKS = T // BLOCK
SCALE = DIM**-0.5


def causal_keys(g: int, t: int) -> list[int]:
    return list(range(t + 1))


def looped_block_mass(
    q: torch.Tensor, k: torch.Tensor, keys_of: Callable[[int, int], list[int]] = causal_keys
) -> torch.Tensor:
    """[B, G, T, NB] by hand: each head's softmax over the keys `keys_of(g, t)` (default: causal), key by
    key, summed into blocks and over the group's heads, divided by the heads per group."""
    mass = torch.zeros(B, G, T, NUM_BLOCKS, dtype=torch.float64)
    for g in range(G):
        for head in range(g * HEADS_PER_GROUP, (g + 1) * HEADS_PER_GROUP):
            for t in range(T):
                keys = list(keys_of(g, t))
                logits = [float(q[0, head, t] @ k[0, g, s]) * SCALE for s in keys]
                top = max(logits)
                weights = [math.exp(x - top) for x in logits]
                for s, w in zip(keys, weights, strict=True):
                    mass[0, g, t, s // BLOCK] += w / sum(weights) / HEADS_PER_GROUP
    return mass


@pytest.fixture
def qk() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, G * HEADS_PER_GROUP, T, DIM, generator=generator, dtype=torch.float64)
    k = torch.randn(B, G, T, DIM, generator=generator, dtype=torch.float64)
    return q, k


def visible_block_scores(scores: torch.Tensor) -> torch.Tensor:
    """Blocks after the query's own are invisible: -inf there, as the indexer scores them."""
    own = torch.arange(T)[:, None] // BLOCK
    return scores.masked_fill(torch.arange(NUM_BLOCKS)[None, :] > own, -torch.inf)


def dense_objective(q: torch.Tensor, k: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    all_blocks = torch.arange(NUM_BLOCKS).expand(B, G, T, NUM_BLOCKS)
    return indexer_objective("dense", q, k, causal_mask(B, T, q.device), scores, all_blocks, BLOCK, SCALE).loss


def test_kl_is_zero_when_the_indexer_matches_the_attention_mass(qk: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k = qk
    mass = looped_block_mass(q, k)
    # Any per-query shift of log(mass) gives the same softmax.
    scores = visible_block_scores(mass.log() + torch.randn(B, G, T, 1, dtype=torch.float64))
    assert dense_objective(q, k, scores).item() == pytest.approx(0.0, abs=1e-12)


def test_kl_is_positive_otherwise_and_equals_torch_kl_div(qk: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k = qk
    mass = looped_block_mass(q, k)
    scores = visible_block_scores(torch.randn(B, G, T, NUM_BLOCKS, dtype=torch.float64))
    loss = dense_objective(q, k, scores)
    log_q = torch.log_softmax(scores, dim=-1)
    expected = F.kl_div(log_q.clamp(min=-1e30), mass, reduction="none").sum(-1).mean()
    assert loss.item() > 0.01
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


def test_sparse_stage_is_restricted_to_the_kept_blocks(qk: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Each query keeps its own block and block 0: the target is the attention computed on those keys
    alone (by hand), the indexer's softmax is over those blocks only."""
    q, k = qk
    own = torch.arange(T) // BLOCK
    kept = torch.stack([own, torch.where(own > 0, 0, -1)], dim=-1).expand(B, G, T, 2)

    def kept_keys(g: int, t: int) -> list[int]:
        return [s for s in range(t + 1) if s // BLOCK in (0, t // BLOCK)]

    mass = looped_block_mass(q, k, kept_keys)
    scores = visible_block_scores(torch.randn(B, G, T, NUM_BLOCKS, dtype=torch.float64))
    objective = indexer_objective("sparse", q, k, causal_mask(B, T, q.device), scores, kept, BLOCK, SCALE)
    allowed = torch.zeros(T, NUM_BLOCKS, dtype=torch.bool)
    allowed[:, 0] = True
    allowed[torch.arange(T), own] = True
    log_q = torch.log_softmax(scores.masked_fill(~allowed, -torch.inf), dim=-1).clamp(min=-1e30)
    expected = F.kl_div(log_q, mass, reduction="none").sum(-1).mean()
    assert objective.loss.item() > 0.01
    assert objective.loss.item() == pytest.approx(expected.item(), rel=1e-9)
    # Matching the sparse mass on the kept blocks zeroes it, whatever the scores of the dropped blocks.
    matched = torch.where(allowed, mass.clamp(min=1e-300).log(), torch.randn(B, G, T, NUM_BLOCKS).double())
    zero = indexer_objective(
        "sparse", q, k, causal_mask(B, T, q.device), visible_block_scores(matched), kept, BLOCK, SCALE
    )
    assert zero.loss.item() == pytest.approx(0.0, abs=1e-12)


def test_recall_counts_the_heaviest_blocks_the_indexer_kept() -> None:
    # One query, 4 visible blocks, 2 kept: the heaviest are 3 and 1; the indexer kept 3 and 0.
    mass = torch.tensor([0.1, 0.3, 0.05, 0.55]).view(1, 1, 1, 4)
    visible = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    assert block_recall(mass, torch.tensor([3, 0]).view(1, 1, 1, 2), visible).item() == 0.5
    assert block_recall(mass, torch.tensor([1, 3]).view(1, 1, 1, 2), visible).item() == 1.0
    # No query drops a block: nothing to measure.
    assert block_recall(mass, torch.tensor([1, 3, 0, 2]).view(1, 1, 1, 4), visible).isnan()


@pytest.mark.parametrize("stage", ["dense", "sparse"])
def test_indexer_loss_reaches_only_the_indexer_parameters(stage: str) -> None:
    torch.manual_seed(0)
    model = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    out = model(ids, indexer_stage=stage)
    assert out.indexer_loss is not None and out.indexer_loss.item() > 0
    out.indexer_loss.backward()
    moved = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    indexer_params = {name for name, _ in model.named_parameters() if ".indexer." in name}
    assert moved == indexer_params


def test_sparse_stage_attends_as_inference_and_dense_stage_as_full_attention() -> None:
    torch.manual_seed(0)
    cfg = M3Config.from_preset("minimax-m3-tiny")
    model = MiniMaxM3ForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        plain = model(ids)
        sparse = model(ids, indexer_stage="sparse")
        dense = model(ids, indexer_stage="dense")
        full = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny", layer_types=(FULL_ATTENTION,) * 3))
        missing = full.load_state_dict(model.state_dict(), strict=False)
        assert missing.missing_keys == [] and all(".indexer." in key for key in missing.unexpected_keys)
        full_logits = full.eval()(ids).logits
    torch.testing.assert_close(sparse.logits, plain.logits, rtol=0, atol=0)
    for layer, blocks in plain.block_indices.items():
        torch.testing.assert_close(sparse.block_indices[layer], blocks, rtol=0, atol=0)
    torch.testing.assert_close(dense.logits, full_logits, rtol=1e-6, atol=1e-6)
    assert (dense.logits - plain.logits).abs().max() > 1e-4  # the tiny preset drops blocks at 24 tokens


def test_unknown_stage_is_refused() -> None:
    model = MiniMaxM3ForCausalLM(M3Config.from_preset("minimax-m3-tiny"))
    with pytest.raises(ValueError, match="indexer_stage 'warmup'"):
        model(torch.zeros(1, 4, dtype=torch.long), indexer_stage="warmup")
