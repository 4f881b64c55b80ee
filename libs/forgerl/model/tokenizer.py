"""Byte-level BPE tokenizer trained offline with `tokenizers`, and the chat template.

Saved with `save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(dir)` and vLLM load it.

Single-token markers (the gateway parses generated ids with them):
- special (dropped by `decode(skip_special_tokens=True)`): `<|endoftext|>` (pad), `<|im_start|>`,
  `<|im_end|>` (end of turn = eos);
- plain added tokens (kept in decoded text): `<think>`, `</think>`, `<tool_call>`, `</tool_call>`,
  `<tool_response>`, `</tool_response>`.

A rendered conversation (interleaved thinking: every earlier assistant turn keeps its reasoning):
    <|im_start|>system\n{system}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n\n{content}
        \n<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>\n   <- one line in fact
    <|im_start|>tool\n<tool_response>\n{result}\n</tool_response><|im_end|>\n
    <|im_start|>assistant\n                      <- add_generation_prompt
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from forgerl.model.chat_formats import END, M2_CHAT_TEMPLATE, M2_SPECIAL_TOKENS, M2_TAG_TOKENS, TEXT_MACRO
from forgerl.model.corpus import default_corpus

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, END_TOOL_RESPONSE = "<tool_response>", "</tool_response>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
TAG_TOKENS = (THINK, END_THINK, TOOL_CALL, END_TOOL_CALL, TOOL_RESPONSE, END_TOOL_RESPONSE)

# Jinja (transformers renders with trim_blocks/lstrip_blocks; every tag here strips whitespace itself).
CHAT_TEMPLATE = (
    TEXT_MACRO
    + r"""
{%- set has_system = messages and messages[0].role == 'system' -%}
{%- if has_system or tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- text(messages[0].content) -}}{%- endif -%}
{%- if tools -%}
{%- if has_system -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call one or more functions. Their signatures are inside <tools></tools>:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nTo call a function, put a JSON object with its name and arguments inside '
    + '<tool_call></tool_call>:\n<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n'
    + '</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{%- if not loop.first -%}{{- '<|im_start|>system\n' + text(message.content) + '<|im_end|>\n' -}}{%- endif -%}
{%- elif message.role == 'user' -%}
{{- '<|im_start|>user\n' + text(message.content) + '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' -}}
{%- set reasoning = message.reasoning_content if message.reasoning_content is defined
    and message.reasoning_content is not none else (message.reasoning if message.reasoning is defined
    and message.reasoning is not none else '') -%}
{%- if reasoning -%}{{- '<think>\n' + reasoning + '\n</think>\n\n' -}}{%- endif -%}
{%- set content = text(message.content) -%}
{{- content -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- if content or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": ' + (fn.name | tojson) + ', "arguments": ' -}}
{%- if fn.arguments is string -%}{{- fn.arguments -}}{%- else -%}{{- fn.arguments | tojson -}}{%- endif -%}
{{- '}\n</tool_call>' -}}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{{- '<|im_start|>tool\n<tool_response>\n' + text(message.content) + '\n</tool_response><|im_end|>\n' -}}
{%- else -%}
{{- raise_exception('unknown role ' + message.role + ': use system, user, assistant or tool') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""
).strip()


@dataclass(frozen=True)
class TokenizerFormat:
    """A chat format a tokenizer is built for: its markers (special ones are dropped when decoding with
    skip_special_tokens, tags are kept), the end-of-turn token and the chat template."""

    special: tuple[str, ...]
    tags: tuple[str, ...]
    eos: str
    template: str


# The chat format is a property of the tokenizer (saved with it); "chatml" is what the tiny presets, the
# SFT data and the rollout suites are built for, "minimax_m2" is MiniMax-M2's own (chat_formats.py).
TOKENIZER_FORMATS = {
    "chatml": TokenizerFormat(SPECIAL_TOKENS, TAG_TOKENS, IM_END, CHAT_TEMPLATE),
    "minimax_m2": TokenizerFormat((PAD, *M2_SPECIAL_TOKENS), M2_TAG_TOKENS, END, M2_CHAT_TEMPLATE),
}


def train_tokenizer(
    texts: Iterable[str] | None = None, vocab_size: int = 4096, chat_format: str = "chatml"
) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts` (default: the built-in corpus), digits split one by one (arithmetic
    stays consistent across numbers), the markers of `chat_format` as single tokens with the lowest ids."""
    fmt = TOKENIZER_FORMATS.get(chat_format)
    if fmt is None:
        raise ValueError(f"chat_format {chat_format!r}: use one of {', '.join(TOKENIZER_FORMATS)}")
    if vocab_size < 256 + len(fmt.special) + len(fmt.tags):
        raise ValueError(f"vocab_size {vocab_size}: must cover the 256 bytes and the markers")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[*fmt.special, *fmt.tags],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(default_corpus() if texts is None else texts, trainer=trainer)
    # The trainer registers every marker as special; the tags must survive decode(skip_special_tokens=True).
    state = json.loads(bpe.to_str())
    for added in state["added_tokens"]:
        added["special"] = added["content"] in fmt.special
    bpe = Tokenizer.from_str(json.dumps(state))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=fmt.eos,
        pad_token=PAD,
        chat_template=fmt.template,
        model_max_length=196_608,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> None:
    """`save_pretrained` (tokenizer.json, tokenizer_config.json, chat_template.jinja), naming the class
    `PreTrainedTokenizerFast`, which transformers 4.x resolves too (5.x writes its new `TokenizersBackend`)."""
    tokenizer.save_pretrained(str(path))
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(path))
