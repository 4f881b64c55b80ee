"""In-process tools, generation parsing and episodes on the tool-use suite."""

from __future__ import annotations

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.trainer.local_env import (
    LocalEpisodeRunner,
    normalize_answer,
    parse_generation,
    run_tool,
    suite_episode_specs,
)

pytestmark = pytest.mark.unit


def test_tools() -> None:
    assert run_tool("calculator", {"expression": "(12 + 7) * 9"}) == ("171", False)
    assert run_tool("python", {"code": "print('lemon'[::-1])"}) == ("nomel", False)
    assert run_tool("python", {"code": "print('banana'.count('a'))"}) == ("3", False)
    assert run_tool("python", {"code": "print('rabbit'.upper())"}) == ("RABBIT", False)
    for name, args in (
        ("python", {"code": "import os"}),
        ("calculator", {"expression": "__import__('os')"}),
        ("calculator", {"expression": "9 ** 9 ** 9"}),
        ("shell", {"command": "ls"}),
        ("calculator", {}),
    ):
        output, is_error = run_tool(name, args)
        assert is_error and output.startswith("error")


def test_parse_generation() -> None:
    call = '{"name": "calculator", "arguments": {"expression": "1 + 2"}}'
    text = f"<think>\nI will use the calculator.\n</think>\n\n<tool_call>\n{call}\n</tool_call><|im_end|>"
    parsed = parse_generation(text)
    assert parsed.reasoning == "I will use the calculator."
    assert parsed.calls == [("calculator", {"expression": "1 + 2"})] and parsed.content == ""
    answer = parse_generation("<think>\nThe result is 3.\n</think>\n\n3<|im_end|>")
    assert answer.content == "3" and not answer.calls
    bad = parse_generation("<tool_call>\n{not json}\n</tool_call>")
    assert bad.malformed and not bad.calls
    assert normalize_answer("  Nomel. ") == "nomel"


def test_episodes_are_token_exact(tokenizer) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", vocab_size=len(tokenizer)))
    runner = LocalEpisodeRunner(tokenizer, max_new_tokens=8)
    specs = suite_episode_specs("tooluse", "train", ["tooluse/train/00000", "tooluse/train/00001"], group_size=2)
    trajs = runner.run(model, specs, generator=torch.Generator().manual_seed(0))
    assert len(trajs) == 4
    for traj in trajs:
        assert traj.turns and traj.group_id == traj.task_id
        for turn in traj.turns:
            assert len(turn.behaviour_logprobs) == len(turn.generated_token_ids) == len(turn.loss_mask)
        for prev, nxt in zip(traj.turns, traj.turns[1:], strict=False):
            head = list(prev.prompt_token_ids) + list(prev.generated_token_ids)
            assert list(nxt.prompt_token_ids[: len(head)]) == head
