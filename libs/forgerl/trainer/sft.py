"""Supervised warm start on a suite's gold trajectories: the chat template, loss on assistant tokens only.

A gold trajectory is OpenAI-style messages (+ tools). It is rendered with the model's chat template, and
a token is trained when it lies inside an assistant message: from just after `<|im_start|>assistant\\n` up
to and including that message's `<|im_end|>` (the model must learn to stop). System, user and tool
tokens are context only. This is exactly the text the gateway renders at RL time, so what SFT teaches is
what RL samples from.

Shape legend: B examples, T their padded length.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from forgerl.model.layers import compute_dtype
from forgerl.model.policy import PolicyModel


@dataclass(frozen=True)
class SftExample:
    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]  # 1 where the token is a trained (assistant) target


def assistant_spans(
    tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Any = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant outputs (header excluded,
    `<|im_end|>` included). Found by rendering growing prefixes: the template is incremental."""
    full = tokenizer.apply_chat_template(list(messages), tools=tools, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = tokenizer.apply_chat_template(
            list(messages[:i]), tools=tools, add_generation_prompt=True, tokenize=False
        )
        end_text = tokenizer.apply_chat_template(list(messages[: i + 1]), tools=tools, tokenize=False)
        if not full.startswith(start_text) or not full.startswith(end_text):
            raise ValueError("the chat template is not incremental: a prefix of the messages renders differently")
        end = end_text.rstrip("\n")
        spans.append((len(start_text), len(end)))
    return full, spans


def make_example(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: Any = None) -> SftExample:
    text, spans = assistant_spans(tokenizer, messages, tools)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = []
    for start, end in enc["offset_mapping"]:
        inside = any(s <= start and end <= e for s, e in spans) and end > start
        mask.append(1 if inside else 0)
    return SftExample(tuple(enc["input_ids"]), tuple(mask))


def make_examples(tokenizer: Any, items: Iterable[dict[str, Any]]) -> list[SftExample]:
    """Items as the suites' `gold_trajectories` yield them: {"messages": [...], "tools": [...]}."""
    return [make_example(tokenizer, item["messages"], item.get("tools")) for item in items]


def collate(examples: Sequence[SftExample], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids [B, T] and loss mask [B, T] (0 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.loss_mask)] = torch.tensor(e.loss_mask)
    return ids, mask


def sft_loss(
    model: PolicyModel, input_ids: torch.Tensor, loss_mask: torch.Tensor, *, mtp: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over masked targets (+ the weighted MTP loss when the model has MTP
    modules and `mtp`). Returns the loss and metrics: sft/loss, sft/token_acc, sft/tokens, mtp/*."""
    out = model(input_ids)
    logits = out.logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(compute_dtype(logits.dtype))
    # At least float32 (bf16 logits), float64 kept: the merged loss is computed in the logits' own precision.
    flat = logits.reshape(-1, logits.shape[-1]).to(compute_dtype(logits.dtype))
    ce = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
    n = mask.sum().clamp(min=1)
    loss = (ce.view_as(mask) * mask).sum() / n
    with torch.no_grad():
        acc = ((logits.argmax(-1) == targets).to(mask.dtype) * mask).sum() / n
    metrics = {"sft/loss": loss.item(), "sft/token_acc": acc.item(), "sft/tokens": float(mask.sum())}
    total = loss + out.aux_loss
    if mtp and len(model.mtp) > 0:
        mtp_loss, mtp_metrics = model.mtp_loss(out.hidden_states, input_ids, loss_mask.bool())
        total = total + mtp_loss
        metrics.update(mtp_metrics)
    metrics["loss"] = total.item()
    return total, metrics


class SftBatches:
    """Deterministic shuffled batches over the examples, resumable: the position is (epoch, index)."""

    def __init__(self, examples: Sequence[SftExample], batch_size: int, seed: int) -> None:
        if not examples:
            raise ValueError("SFT needs at least one gold trajectory")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed

    def batch(self, step: int) -> list[SftExample]:
        """The examples of optimizer step `step` (0-based): a pure function of the step, so a resumed run
        sees exactly the batches an uninterrupted one would."""
        per_epoch = max(1, len(self.examples) // self.batch_size)
        epoch, index = divmod(step, per_epoch)
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        return [self.examples[i] for i in rows]


def sft_loss_merged(
    model: torch.nn.Module, examples: Sequence[SftExample], *, max_tokens_per_pack: int | None = 4096
) -> tuple[torch.Tensor, dict[str, float]]:
    """The same masked cross-entropy computed on prefix trees: gold trajectories of a suite share their
    system prompt (and tool signatures), which is then computed once per pack instead of once per
    example. No MTP loss: RL trains MTP (`rl.mtp_loss_weight`; forgerl.rl.prefix_mtp computes it on the
    same trees, so SFT could too)."""
    from forgerl.rl.prefix_merge import forward_merged
    from forgerl.rl.prefix_tree import PrefixForest

    core = getattr(model, "module", model)  # through a DDP wrapper
    if not getattr(core, "prefix_merge_exact", True):
        raise ValueError(
            f"sft_loss_merged: {type(core).__name__}'s prefix-tree packs would not give each example its own "
            "logits (sparse attention picks key blocks by pack slot): use sft_loss"
        )
    ids, mask = collate(examples)
    lengths = torch.tensor([len(e.input_ids) for e in examples])
    forest = PrefixForest.build(ids, lengths, max_tokens_per_pack=max_tokens_per_pack)
    out = forward_merged(model, forest)
    target_mask = mask[:, 1:].to(out.logprobs.dtype)
    n = target_mask.sum().clamp(min=1)
    loss = -(out.logprobs * target_mask).sum() / n
    metrics = {
        "sft/loss": loss.item(),
        "sft/tokens": float(target_mask.sum()),
        "tokens/input": float(forest.num_input_tokens),
        "tokens/packed": float(forest.num_packed_tokens),
        "tokens/merged": float(forest.num_input_tokens - forest.num_packed_tokens),
        "loss": loss.item(),
    }
    return loss, metrics
