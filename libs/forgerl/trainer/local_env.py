"""In-process episodes on a tool-use suite: the model samples (forgerl.trainer.sampling), tools run in this
process, the answer is graded, and the result is a `forgerl.v1.Trajectory` as the gateway would record it.

This is what the trainer uses without services: held-out evaluation during a run (`evaluate`), the
learnability experiment, and tests of the RL loop. The real run's episodes go rollout -> gateway ->
inference (vLLM) -> Kafka; both produce the same Trajectory message, token-exact:

    turn k prompt  = turn k-1 prompt + turn k-1 generated ids + tokens of the new messages
                     ("\\n<|im_start|>tool ... <|im_end|>\\n<|im_start|>assistant\\n")

Tools are the `tooluse` suite's, evaluated in-process without exec (forgerl.rollout.suites.tooluse_tools).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from forgerl.rollout.rewards import RewardSettings, StepProcess, episode_rewards
from forgerl.rollout.suites.tooluse_tools import run_tool
from forgerl.trainer.sampling import SamplingModel, generate
from forgerl.v1 import trajectory_pb2

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_THINK = re.compile(r"^\s*<think>\s*(.*?)\s*</think>\s*", re.DOTALL)


# ---- parsing a generation ---------------------------------------------------------------------------


@dataclass
class ParsedTurn:
    reasoning: str
    content: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)


def parse_generation(text: str) -> ParsedTurn:
    """Split generated text (special tokens kept, the end-of-turn marker stripped) like the chat template."""
    text = text.replace("<|im_end|>", "")
    reasoning = ""
    think = _THINK.match(text)
    if think:
        reasoning, text = think.group(1), text[think.end() :]
    calls: list[tuple[str, dict[str, Any]]] = []
    malformed: list[str] = []
    for raw in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(raw)
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise ValueError("not a call")
            args = obj.get("arguments", {})
            if isinstance(args, str):
                args = json.loads(args)
            if not isinstance(args, dict):
                raise ValueError("arguments must be an object")
            calls.append((obj["name"], args))
        except (ValueError, json.JSONDecodeError):
            malformed.append(raw)
    content = _TOOL_CALL.sub("", text)
    if "<tool_call>" in content:  # never closed
        malformed.append(content[content.index("<tool_call>") :])
        content = content[: content.index("<tool_call>")]
    return ParsedTurn(reasoning, content.strip(), calls, malformed)


def normalize_answer(text: str) -> str:
    """The suite's check: whitespace collapsed, lower case, a trailing period dropped."""
    return " ".join(text.strip().split()).lower().rstrip(".")


# ---- episodes -----------------------------------------------------------------------------------------


@dataclass
class EpisodeSpec:
    task_id: str
    group_id: str
    messages: list[dict[str, Any]]  # system + user
    tools: list[dict[str, Any]]
    answer: str
    split: str = "train"
    suite: str = "tooluse"


@dataclass
class _Live:
    spec: EpisodeSpec
    prompt: list[int]
    turns: list[trajectory_pb2.Turn] = field(default_factory=list)
    answer: str | None = None
    done: bool = False


class LocalEpisodeRunner:
    """Runs many episodes at once: every live episode's next turn is one batched `generate` call."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_turns: int = 4,
        max_new_tokens: int = 64,
        alpha_process: float = 0.1,
        policy_version: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_turns = max_turns
        self.max_new_tokens = max_new_tokens
        self.alpha_process = alpha_process
        self.policy_version = policy_version
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = tokenizer.pad_token_id or 0

    def _tool_suffix(self, results: Sequence[str]) -> list[int]:
        text = "\n" + "".join(f"<|im_start|>tool\n<tool_response>\n{r}\n</tool_response><|im_end|>\n" for r in results)
        return list(self.tokenizer(text + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])

    def run(
        self,
        model: SamplingModel,
        specs: Sequence[EpisodeSpec],
        *,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        run_id: str = "",
        max_batch: int = 64,
    ) -> list[trajectory_pb2.Trajectory]:
        out: list[trajectory_pb2.Trajectory] = []
        for start in range(0, len(specs), max_batch):
            out.extend(self._run_batch(model, specs[start : start + max_batch], temperature, generator, run_id))
        return out

    def _run_batch(
        self,
        model: SamplingModel,
        specs: Sequence[EpisodeSpec],
        temperature: float,
        generator: torch.Generator | None,
        run_id: str,
    ) -> list[trajectory_pb2.Trajectory]:
        live = []
        for spec in specs:
            prompt = self.tokenizer.apply_chat_template(
                spec.messages, tools=spec.tools, add_generation_prompt=True, tokenize=False
            )
            live.append(_Live(spec, list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])))
        for _ in range(self.max_turns):
            active = [ep for ep in live if not ep.done]
            if not active:
                break
            gen = generate(
                model,
                [ep.prompt for ep in active],
                max_new_tokens=self.max_new_tokens,
                stop_token_ids=(self.im_end,),
                temperature=temperature,
                generator=generator,
                pad_token_id=self.pad,
            )
            for ep, ids, lps, reason in zip(active, gen.token_ids, gen.logprobs, gen.finish_reasons, strict=True):
                self._advance(ep, ids, lps, reason)
        return [self._trajectory(ep, run_id) for ep in live]

    def _advance(self, ep: _Live, ids: list[int], lps: list[float], reason: str) -> None:
        parsed = parse_generation(self.tokenizer.decode(ids, skip_special_tokens=False))
        turn = trajectory_pb2.Turn(
            prompt_token_ids=ep.prompt,
            generated_token_ids=ids,
            behaviour_logprobs=lps,
            loss_mask=[1] * len(ids),
            policy_version=self.policy_version,
            reasoning=parsed.reasoning,
            content=parsed.content,
            finish_reason=reason,
        )
        for raw in parsed.malformed:
            turn.tool_calls.add(name="", arguments_json=raw, malformed=True)
        if reason != "stop":
            ep.turns.append(turn)
            ep.done = True
            return
        if not parsed.calls:
            ep.turns.append(turn)
            ep.answer = parsed.content
            ep.done = True
            return
        results = []
        for i, (name, args) in enumerate(parsed.calls):
            output, is_error = run_tool(name, args)
            call_id = f"call_{len(ep.turns)}_{i}"
            turn.tool_calls.add(id=call_id, name=name, arguments_json=json.dumps(args))
            turn.tool_results.add(tool_call_id=call_id, content=output, is_error=is_error)
            results.append(output)
        ep.turns.append(turn)
        ep.prompt = ep.prompt + ids + self._tool_suffix(results)

    def _trajectory(self, ep: _Live, run_id: str) -> trajectory_pb2.Trajectory:
        success = ep.answer is not None and normalize_answer(ep.answer) == normalize_answer(ep.spec.answer)
        performance = 1.0 if success else 0.0
        # The process reward is rollout's (forgerl.rollout.rewards): per step, penalties for malformed calls
        # and tool errors, and for ending without an answer; no speed term (the main job's beta_speed is 0).
        steps = [
            StepProcess(
                malformed_calls=sum(c.malformed for c in turn.tool_calls),
                tool_errors=sum(r.is_error for r in turn.tool_results),
                over_budget=ep.answer is None and i == len(ep.turns) - 1,
            )
            for i, turn in enumerate(ep.turns)
        ]
        settings = RewardSettings(alpha=self.alpha_process, beta=0.0)
        rewards = episode_rewards(
            steps, performance=performance, success=success, wall_clock_s=1.0, baseline_s=1.0, settings=settings
        )
        traj = trajectory_pb2.Trajectory(
            schema_version=1,
            trajectory_id=uuid.uuid4().hex,
            run_id=run_id,
            task_id=ep.spec.task_id,
            group_id=ep.spec.group_id,
            episode_id=uuid.uuid4().hex,
            turns=ep.turns,
            success=success,
            suite=ep.spec.suite,
            split=ep.spec.split,
        )
        traj.reward.CopyFrom(rewards.total)
        traj.step_rewards.extend(rewards.steps)
        return traj


def suite_episode_specs(
    suite_name: str, split: str, task_ids: Sequence[str] | None = None, *, group_size: int = 1, group_prefix: str = ""
) -> list[EpisodeSpec]:
    """EpisodeSpecs for tasks of a forgerl.rollout suite, `group_size` episodes per task (one group each)."""
    from forgerl.rollout.scaffold_config import DEFAULT
    from forgerl.rollout.tasks import get_suite

    suite = get_suite(suite_name)
    tasks = suite.select(split, list(task_ids or ()))
    specs = []
    for task in tasks:
        messages = [
            {"role": "system", "content": DEFAULT.system_prompt(task.suite)},
            {"role": "user", "content": task.instructions},
        ]
        tools = DEFAULT.tool_specs(task.tools)
        answer = task.metadata.get("answer", "")
        for _ in range(group_size):
            specs.append(EpisodeSpec(task.id, group_prefix + task.id, messages, tools, answer, split, task.suite))
    return specs
