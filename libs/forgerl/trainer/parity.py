"""Does a run's checkpoint give the same greedy answers in our PyTorch model, in transformers and in vLLM?

For the first turn of `--tasks` held-out tool-use tasks (system prompt, tool signatures, question, then
the assistant header), each engine decodes greedily up to the end of the turn; the token ids must agree.
Prints one JSON object: per engine the number of prompts whose greedy tokens equal our model's.

    python -m forgerl.trainer.parity runs/<run-id>/checkpoints/rl-00030 --tasks 16 [--no-vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import torch

from forgerl.model import load_checkpoint
from forgerl.model.tokenizer import load_tokenizer
from forgerl.trainer.local_env import suite_episode_specs
from forgerl.trainer.sampling import generate


def first_turn_prompts(tokenizer: Any, tasks: int) -> list[list[int]]:
    from forgerl.rollout.tasks import get_suite

    ids = [t.id for t in get_suite("tooluse").tasks("test")[:tasks]]
    prompts = []
    for spec in suite_episode_specs("tooluse", "test", ids):
        text = tokenizer.apply_chat_template(
            spec.messages, tools=spec.tools, add_generation_prompt=True, tokenize=False
        )
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return prompts


def _cut(tokens: list[int], stop: int) -> list[int]:
    return tokens[: tokens.index(stop) + 1] if stop in tokens else tokens


def ours(path: Path, prompts: list[list[int]], max_tokens: int, stop: int) -> list[list[int]]:
    model = load_checkpoint(path, dtype=torch.float32)
    gen = generate(model, prompts, max_new_tokens=max_tokens, stop_token_ids=(stop,), temperature=0.0)
    return [_cut(t, stop) for t in gen.token_ids]


def transformers_greedy(path: Path, prompts: list[list[int]], max_tokens: int, stop: int) -> list[list[int]]:
    import transformers

    model = transformers.MiniMaxM2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            result = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=stop, pad_token_id=0, use_mtp=False
            )
            out.append(_cut(result[0, len(prompt) :].tolist(), stop))
    return out


def vllm_greedy(path: Path, prompts: list[list[int]], max_tokens: int, stop: int) -> list[list[int]]:
    from forgerl.inference.engine import EngineSettings, InferenceEngine
    from forgerl.inference.requests import GenerationRequest, Sampling

    async def run() -> list[list[int]]:
        engine = InferenceEngine(
            EngineSettings(model_path=str(path), max_model_len=1024, kv_cache_bytes=64 * 2**20, executor="uni")
        )
        await engine.start()
        try:
            out = []
            for i, prompt in enumerate(prompts):
                sampling = Sampling(temperature=0.0, max_tokens=max_tokens, stop_token_ids=(stop,))
                tokens: list[int] = []
                async for chunk in engine.generate(GenerationRequest(f"parity-{i}", tuple(prompt), sampling)):
                    tokens += list(chunk.token_ids)
                out.append(_cut(tokens, stop))
            return out
        finally:
            await engine.stop()

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m forgerl.trainer.parity")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--no-vllm", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.checkpoint)
    stop_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(stop_id, int), "the tokenizer has no <|im_end|> token"
    stop = stop_id
    prompts = first_turn_prompts(tokenizer, args.tasks)
    reference = ours(args.checkpoint, prompts, args.max_tokens, stop)
    engines = {"transformers": transformers_greedy}
    if not args.no_vllm:
        engines["vllm"] = vllm_greedy
    result: dict[str, Any] = {"checkpoint": str(args.checkpoint), "prompts": len(prompts)}
    for name, fn in engines.items():
        answers = fn(args.checkpoint, prompts, args.max_tokens, stop)
        same = sum(a == b for a, b in zip(answers, reference, strict=True))
        result[name] = {"same_greedy_tokens": same, "of": len(prompts)}
    result["example"] = tokenizer.decode(reference[0])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
