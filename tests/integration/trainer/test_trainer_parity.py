"""A checkpoint the trainer writes (tiny preset) gives the same greedy answers in our model, in
transformers and in vLLM (CPU) on held-out tool-use prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig, save_checkpoint
from forgerl.model.tokenizer import load_tokenizer
from forgerl.trainer.parity import main as parity

pytestmark = pytest.mark.integration


def test_same_greedy_answers_in_three_engines(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("tiny", vocab_size=len(tok), initializer_range=0.1))
    path = save_checkpoint(model, tok, tmp_path / "ckpt")
    result = parity([str(path), "--tasks", "3", "--max-tokens", "12"])
    assert result["transformers"] == {"same_greedy_tokens": 3, "of": 3}
    assert result["vllm"] == {"same_greedy_tokens": 3, "of": 3}
