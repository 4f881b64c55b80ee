"""The BPE tokenizer and chat template, as transformers loads them back from disk."""

from pathlib import Path

import pytest
import torch
import transformers

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, load_checkpoint, save_checkpoint
from forgerl.model.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, load_tokenizer, save_tokenizer, train_tokenizer

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "You are a careful agent."},
    {"role": "user", "content": "What is 12 + 7?"},
    {
        "role": "assistant",
        "reasoning_content": "I will use the calculator.",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 + 7"}}}],
    },
    {"role": "tool", "content": '{"result": 19}'},
    {"role": "assistant", "reasoning_content": "The tool says 19.", "content": "The answer is 19."},
    {"role": "user", "content": "And 19 * 2?"},
]
RENDERED = (
    "<|im_start|>system\nYou are a careful agent.<|im_end|>\n"
    "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nI will use the calculator.\n</think>\n\n"
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 + 7"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>tool\n<tool_response>\n{"result": 19}\n</tool_response><|im_end|>\n'
    "<|im_start|>assistant\n<think>\nThe tool says 19.\n</think>\n\nThe answer is 19.<|im_end|>\n"
    "<|im_start|>user\nAnd 19 * 2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(vocab_size=4096), path)
    return path


def test_auto_tokenizer_loads_it_with_the_trained_vocab(saved: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(saved)
    assert len(tokenizer) == 4096
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # Markers take the lowest ids, in a fixed order, so every tokenizer trained here agrees on them.
    assert tokenizer.convert_tokens_to_ids([*SPECIAL_TOKENS, *TAG_TOKENS]) == list(range(9))


def test_chat_template_renders_interleaved_thinking_and_tools(saved: Path) -> None:
    tokenizer = load_tokenizer(saved)
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == RENDERED
    without_prompt = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert without_prompt == RENDERED.removesuffix("<|im_start|>assistant\n")


def test_openai_style_string_arguments_and_content_parts(saved: Path) -> None:
    tokenizer = load_tokenizer(saved)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "List "}, {"type": "text", "text": "files"}]},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}},
                {"id": "2", "type": "function", "function": {"name": "bash", "arguments": '{"command": "pwd"}'}},
            ],
        },
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nList files<|im_end|>\n"
        "<|im_start|>assistant\nLet me look.\n"
        '<tool_call>\n{"name": "bash", "arguments": {"command": "ls"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "bash", "arguments": {"command": "pwd"}}\n</tool_call><|im_end|>\n'
    )


def test_tools_are_listed_in_the_system_turn(saved: Path) -> None:
    tokenizer = load_tokenizer(saved)
    tool = {"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tool], tokenize=False)
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert '\n<tools>\n{"type": "function", "function": {"name": "calculator"' in text
    assert text.endswith("</tool_call><|im_end|>\n<|im_start|>user\nhi<|im_end|>\n")


def test_markers_are_single_tokens_and_tags_survive_decoding(saved: Path) -> None:
    tokenizer = load_tokenizer(saved)
    ids = tokenizer.encode(RENDERED, add_special_tokens=False)
    for marker in ("<|im_start|>", "<|im_end|>", *TAG_TOKENS):  # each occurrence is exactly one id
        assert ids.count(tokenizer.convert_tokens_to_ids(marker)) == RENDERED.count(marker) > 0
    assert tokenizer.decode(ids) == RENDERED  # byte-level: lossless
    dropped = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in dropped and "<think>" in dropped and "<tool_call>" in dropped


def test_digits_are_split_and_code_is_compressed(saved: Path) -> None:
    tokenizer = load_tokenizer(saved)
    assert tokenizer.tokenize("12345") == ["1", "2", "3", "4", "5"]
    code = "def compute_total(values):\n    return sum(values)\n"
    assert len(tokenizer.encode(code)) < len(code) / 2.5


def test_checkpoint_carries_the_tokenizer(saved: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
    save_checkpoint(model, load_tokenizer(saved), tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in tmp_path.iterdir()
    }
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]])
    assert ids.max() < model.config.vocab_size
    loaded = load_checkpoint(tmp_path)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert (loaded.config.eos_token_id, loaded.config.pad_token_id) == (2, 0)  # <|im_end|>, <|endoftext|>
