"""SFT data: the chat template, loss on assistant tokens only, and merged == unmerged loss."""

from __future__ import annotations

import itertools

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.rollout.suites.tooluse import gold_trajectories
from forgerl.trainer.sft import SftBatches, collate, make_example, make_examples, sft_loss, sft_loss_merged

pytestmark = pytest.mark.unit


def test_mask_covers_exactly_the_assistant_turns(tokenizer) -> None:  # type: ignore[no-untyped-def]
    item = next(gold_trajectories("train"))
    example = make_example(tokenizer, item["messages"], item["tools"])
    assert len(example.input_ids) == len(example.loss_mask)
    trained = tokenizer.decode([t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m])
    # Two assistant turns: the tool call and the answer, each ending with the end-of-turn marker.
    assert trained.count("<|im_end|>") == 2
    assert "<tool_call>" in trained and item["messages"][-1]["content"] in trained
    assert "<|im_start|>" not in trained and "system" not in trained
    assert item["messages"][1]["content"] not in trained  # the user's question is context only
    full = tokenizer.decode(list(example.input_ids))
    assert full == tokenizer.apply_chat_template(item["messages"], tools=item["tools"], tokenize=False)


def test_merged_loss_equals_unmerged(tokenizer) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=len(tokenizer), num_mtp_modules=0))
    model = model.double()
    examples = make_examples(tokenizer, itertools.islice(gold_trajectories("train"), 6))
    ids, mask = collate(examples)
    plain, _ = sft_loss(model, ids, mask, mtp=False)
    merged, metrics = sft_loss_merged(model, examples)
    assert merged.item() == pytest.approx(plain.item(), rel=1e-9)
    assert metrics["tokens/merged"] > 0.5 * metrics["tokens/input"]  # the system prompt is shared


def test_batches_are_a_function_of_the_step() -> None:
    examples = list(range(10))
    a, b = SftBatches(examples, 3, seed=1), SftBatches(examples, 3, seed=1)  # type: ignore[arg-type]
    assert [a.batch(s) for s in range(7)] == [b.batch(s) for s in range(7)]
    epoch = [x for s in range(3) for x in a.batch(s)]
    assert len(set(epoch)) == 9
