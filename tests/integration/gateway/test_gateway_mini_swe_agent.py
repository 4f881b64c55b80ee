"""mini-swe-agent (from PyPI, in its own environment) runs an episode against the gateway.

Scripted replicas make the model act: a bash tool call that writes a file, then the submit command, so
the whole loop runs (tool call parsed, executed by mini-swe-agent, result sent back, history verified).
The same scaffold on the real vLLM engine is in test_gateway_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gateway_services import run_mini_swe_agent, running_gateway

from forgerl.model.tokenizer import load_tokenizer
from forgerl.v1 import gateway_pb2

pytestmark = pytest.mark.integration


def bash_call(tok, reasoning: str, command: str) -> list[int]:
    text = (
        f"<think>\n{reasoning}\n</think>\n\n"
        f'<tool_call>\n{{"name": "bash", "arguments": {json.dumps({"command": command})}}}\n</tool_call>'
    )
    return [*tok.encode(text, add_special_tokens=False), tok.eos_token_id]


async def test_mini_swe_agent_completes_a_scripted_episode(tokenizer_dir: Path, replicas, tmp_path: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    generations = [
        bash_call(tok, "Create the file first.", "echo hello > hello.txt && cat hello.txt"),
        bash_call(tok, "The file exists; submit.", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"),
    ]
    for r in replicas:
        r.inference.add(*generations)
    async with running_gateway([r.address for r in replicas]) as gw:
        opened = await gw.stub.OpenEpisode(
            gateway_pb2.OpenEpisodeRequest(run_id="run-1", scaffold_version="mini-swe-agent-2.4.6")
        )
        summary, saved = await run_mini_swe_agent(
            opened.base_url, opened.episode_key, tmp_path, step_limit=4, task="Write hello into hello.txt."
        )
        closed = await gw.stub.CloseEpisode(gateway_pb2.CloseEpisodeRequest(episode_key=opened.episode_key))
    assert summary["exit_status"] == "Submitted" and summary["n_calls"] == 2
    assert (tmp_path / "hello.txt").read_text() == "hello\n"
    turns = closed.trajectory.turns
    assert [list(t.generated_token_ids) for t in turns] == generations
    assert [c.name for t in turns for c in t.tool_calls] == ["bash", "bash"]
    assert '"returncode": 0' in turns[0].tool_results[0].content and "hello" in turns[0].tool_results[0].content
    head = [*turns[0].prompt_token_ids, *turns[0].generated_token_ids]
    assert list(turns[1].prompt_token_ids[: len(head)]) == head
    assert "Create the file first." in tok.decode(list(turns[1].prompt_token_ids))
    assert saved["info"]["exit_status"] == "Submitted"
