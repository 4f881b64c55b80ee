"""benchmarks/msa.py's torch MSA paths (key-to-query prefill, per-query gather decode, decode selection,
analytic kept-key count) against the model's float64 torch reference, so its CPU figures time the same
computation the model does."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from forgerl.model.m3_attention import torch_block_sparse_attention, torch_index_scores


def load_benchmark() -> ModuleType:
    path = Path(__file__).resolve().parents[3] / "benchmarks" / "msa.py"
    spec = importlib.util.spec_from_file_location("msa_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()
# Odd length, groups of 3, blocks of 8 with 3 kept (2 of them forced local): 10 blocks, so most queries drop.
SHAPE = bench.Shape(heads=6, kv_heads=2, head_dim=24, index_head_dim=16, block=8, top_k=3, local_blocks=2)
TOKENS = 77


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.unit
def test_prefill_k2q_equals_the_model_reference() -> None:
    x = bench.prefill_inputs(TOKENS, SHAPE, "cpu", torch.float32)
    blocks = bench.make_indexer(SHAPE).select(torch_index_scores(x["q_idx"], x["k_idx"], None, SHAPE.block))
    assert (blocks >= 0).sum(-1).max() == SHAPE.top_k and blocks.max() == -(-TOKENS // SHAPE.block) - 1
    ref = torch_block_sparse_attention(
        x["q"].double(), x["k"].double(), x["v"].double(), None, blocks, SHAPE.block, 0.2
    )  # fmt: skip
    ours = bench.k2q_block_attention(x["q"], x["k"], x["v"], blocks, SHAPE.block, 0.2)
    gathered = bench.gather_block_attention(x["q"], x["k"], x["v"], blocks, torch.arange(TOKENS), SHAPE.block, 0.2, 10)
    assert rel_err(ours, ref) < 1e-5 and rel_err(gathered, ref) < 1e-5


@pytest.mark.unit
def test_decode_path_equals_the_model_reference() -> None:
    x = bench.decode_inputs(TOKENS, 3, SHAPE, "cpu", torch.float32)
    providers = bench.decode_providers(x, SHAPE, bench.make_indexer(SHAPE))
    with torch.no_grad():
        gathered, reference, dense, dense_mm = (
            providers[name]() for name in ("msa_torch_gather", "msa_torch_reference", "dense_sdpa", "dense_gqa_matmul")
        )
    assert rel_err(gathered, reference.double()) < 1e-5
    assert rel_err(dense_mm, dense.double()) < 1e-5  # the decode baseline is dense attention
    assert rel_err(gathered, dense.double()) > 1e-2  # blocks were dropped: sparse differs from dense


@pytest.mark.unit
def test_decode_selection_and_analytic_count_match_the_model_selection() -> None:
    assert bench.selection_checks(SHAPE, TOKENS) == {
        "decode_selection_equals_prefill_last_row": True,
        "analytic_kept_keys_equal_selection": True,
    }
