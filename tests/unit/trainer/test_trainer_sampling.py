"""The KV-cached sampler decodes what the training model's full forward would, row by row."""

from __future__ import annotations

import pytest
import torch

from forgerl.model import MiniMaxM2ForCausalLM, ModelConfig
from forgerl.trainer.sampling import generate

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "prompts",
    [
        [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 20], [5, 6, 7, 30, 31, 32, 33, 34, 35]],  # a shared prefix
        [[1, 2, 3], [9, 8, 7, 6, 5, 4]],  # none
        [[4, 4, 4, 4], [4, 4, 4, 4]],  # identical prompts
    ],
)
def test_greedy_matches_full_forward(prompts: list[list[int]]) -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", initializer_range=0.2)).double()
    gen = generate(model, prompts, max_new_tokens=6, stop_token_ids=(), temperature=0)
    model.eval()
    with torch.no_grad():
        for prompt, ids, logprobs in zip(prompts, gen.token_ids, gen.logprobs, strict=True):
            seq = list(prompt)
            for token, logprob in zip(ids, logprobs, strict=True):
                logits = model(torch.tensor([seq])).logits[0, -1]
                assert token == int(logits.argmax())
                assert logprob == pytest.approx(float(torch.log_softmax(logits, -1)[token]), abs=1e-5)
                seq.append(token)


def test_stops_at_stop_token_and_reports_finish() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug"))
    greedy = generate(model, [[1, 2, 3]], max_new_tokens=5, stop_token_ids=(), temperature=0)
    first = greedy.token_ids[0][0]
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=5, stop_token_ids=(first,), temperature=0)
    assert stopped.token_ids == [[first]] and stopped.finish_reasons == ["stop"]
    assert greedy.finish_reasons == ["length"] and len(greedy.token_ids[0]) == 5


def test_sampling_is_seeded() -> None:
    torch.manual_seed(0)
    model = MiniMaxM2ForCausalLM(ModelConfig.from_preset("debug", initializer_range=0.5))
    runs = [
        generate(model, [[1, 2], [3]], max_new_tokens=8, stop_token_ids=(), generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0].token_ids == runs[1].token_ids
