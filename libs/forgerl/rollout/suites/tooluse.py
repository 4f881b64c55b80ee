"""The learnable tool-use suite: short questions that need a calculator or Python call, then the answer.

Made for a small model trained from scratch on CPU: prompts of a dozen tokens, one tool call with short
arguments copied from the question, and an answer copied from the tool's result. Four levels:

    1  "What is 47 + 38?"                          calculator {"expression": "47 + 38"}
    2  "What is 473 * 28?"                         calculator {"expression": "473 * 28"}
    3  "Add 12 and 7, then multiply by 9."         calculator {"expression": "(12 + 7) * 9"}   (words -> ops)
    4  "Reverse the word 'lemon'."                  python {"code": "print('lemon'[::-1])"}       (pick the tool)

Splits are generated deterministically from a seed: `train` and a held-out `test` with the same level
mix and no question in both. The answer is graded by a check script in the sandbox (answer.txt against
the expected answer, written only after the agent has finished).
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from forgerl.rollout.scaffold_config import DEFAULT, ScaffoldConfig
from forgerl.rollout.suites.tooluse_tools import run_tool
from forgerl.rollout.tasks import RESULTS_MARKER, GoldSolution, Suite, Task, ToolCallSpec

NAME = "tooluse"
SEED = 20260801
SPLIT_SIZES = {"train": 4000, "test": 400}
LEVELS = (1, 2, 3, 4)
TOOLS = ("calculator", "python")
ANSWER_FILE = "answer.txt"
TIME_BUDGET_S = 120.0
BASELINE_S = 10.0

_WORDS_TEXT = """
apple banana cherry lemon mango melon peach grape olive onion carrot pepper tomato potato garden
window bottle candle pencil rocket planet forest river silver golden yellow purple orange summer
winter autumn spring monday friday castle bridge butter coffee cookie dragon pirate wizard violin
guitar piano turtle rabbit monkey donkey kitten puppy parrot falcon salmon lizard beetle spider
marble copper cotton paper button ribbon pillow blanket basket wallet ticket camera laptop rubber
hammer ladder needle kettle saddle barrel engine wagon anchor harbor island valley canyon desert
bread cheese honey sugar pasta pizza salad soup juice water stone cloud storm thunder shadow light
music dance story poem letter number circle square corner center market school office doctor nurse
farmer sailor driver singer painter baker hunter queen king prince knight shield sword arrow tower
city village road street train plane truck bicycle boat ship horse tiger zebra camel eagle whale
shark otter panda koala bread flower tree leaf branch root seed grass moss sand shell pearl crystal
metal glass plastic wood iron steel gold coal fire ice snow rain wind sun moon star comet
"""
WORDS = tuple(dict.fromkeys(_WORDS_TEXT.split()))
LETTERS = "aeiounrstl"

CHECK_SCRIPT = """import json, sys
nonce = sys.stdin.readline().strip()
expected = {expected}
try:
    with open({answer_file!r}) as f:
        got = f.read()
except OSError:
    got = ""
def norm(s):
    return " ".join(s.strip().split()).lower().rstrip(".")
status = "pass" if norm(got) == norm(expected) else "fail"
print({marker!r}, nonce, json.dumps({{"answer": status}}))
"""


def _level1(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    expr = f"{a} {op} {b}"
    return f"What is {expr}?", "calculator", expr, str(a + b if op == "+" else a - b)


def _level2(rng: random.Random) -> tuple[str, str, str, str]:
    a, b = rng.randint(100, 999), rng.randint(10, 99)
    expr = f"{a} * {b}"
    return f"What is {expr}?", "calculator", expr, str(a * b)


def _level3(rng: random.Random) -> tuple[str, str, str, str]:
    a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 40)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Add {a} and {b}, then multiply by {c}.", "calculator", f"({a} + {b}) * {c}", str((a + b) * c)
    if kind == 1:
        return f"Multiply {a} by {b}, then add {c}.", "calculator", f"{a} * {b} + {c}", str(a * b + c)
    if kind == 2:
        return f"Multiply {a} by {b}, then subtract {c}.", "calculator", f"{a} * {b} - {c}", str(a * b - c)
    return f"Subtract {b} from {a}, then multiply by {c}.", "calculator", f"({a} - {b}) * {c}", str((a - b) * c)


def _level4(rng: random.Random) -> tuple[str, str, str, str]:
    word = rng.choice(WORDS)
    kind = rng.randrange(4)
    if kind == 3:
        return f"How many letters are in '{word}'?", "python", f"print(len('{word}'))", str(len(word))
    if kind == 0:
        return f"Reverse the word '{word}'.", "python", f"print('{word}'[::-1])", word[::-1]
    if kind == 1:
        letter = rng.choice(LETTERS)
        question = f"How many times does '{letter}' occur in '{word}'?"
        return question, "python", f"print('{word}'.count('{letter}'))", str(word.count(letter))
    return f"Write '{word}' in capital letters.", "python", f"print('{word}'.upper())", word.upper()


_GENERATORS = {1: _level1, 2: _level2, 3: _level3, 4: _level4}
_ARG = {"calculator": "expression", "python": "code"}
_REASONING = {"calculator": "I will use the calculator.", "python": "I will run Python."}


def _make_task(split: str, index: int, level: int, question: str, tool: str, arg: str, answer: str) -> Task:
    check = CHECK_SCRIPT.format(expected=json.dumps(answer), answer_file=ANSWER_FILE, marker=RESULTS_MARKER)
    return Task(
        id=f"{NAME}/{split}/{index:05d}",
        suite=NAME,
        split=split,
        instructions=question,
        test_command="python3 -I .forgerl/check.py",
        time_budget_s=TIME_BUDGET_S,
        baseline_s=BASELINE_S,
        files={},
        test_files={".forgerl/check.py": check},
        fail_to_pass=("answer",),
        tools=TOOLS,
        answer_file=ANSWER_FILE,
        difficulty=level,
        metadata={"tool": tool, _ARG[tool]: arg, "answer": answer},
    )


@functools.cache
def generate(seed: int = SEED) -> dict[str, tuple[Task, ...]]:
    """Every split, deterministic in `seed`: levels round-robin, no question twice across splits."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, tuple[Task, ...]] = {}
    for split, size in SPLIT_SIZES.items():
        tasks: list[Task] = []
        while len(tasks) < size:
            level = LEVELS[len(tasks) % len(LEVELS)]
            question, tool, arg, answer = _GENERATORS[level](rng)
            if question in seen:
                continue
            seen.add(question)
            tasks.append(_make_task(split, len(tasks), level, question, tool, arg, answer))
        splits[split] = tuple(tasks)
    return splits


class ToolUseSuite(Suite):
    name = NAME
    splits = tuple(SPLIT_SIZES)

    def __init__(self, seed: int = SEED) -> None:
        self.seed = seed

    def tasks(self, split: str) -> Sequence[Task]:
        if split not in self.splits:
            raise KeyError(f"{NAME}: no split {split!r}")
        return generate(self.seed)[split]

    def gold(self, task: Task) -> GoldSolution:
        tool = task.metadata["tool"]
        call = ToolCallSpec(tool, {_ARG[tool]: task.metadata[_ARG[tool]]}, reasoning=_REASONING[tool])
        answer = task.metadata["answer"]
        return GoldSolution(turns=((call,),), final_answer=answer, final_reasoning=f"The result is {answer}.")


def gold_messages(task: Task, gold: GoldSolution, scaffold: ScaffoldConfig = DEFAULT) -> list[dict[str, Any]]:
    """A gold trajectory as OpenAI-style messages, with the scaffold's system prompt: what the model should
    produce at RL time, turn for turn (assistant turns carry `reasoning_content` and `tool_calls`)."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": scaffold.system_prompt(task.suite)},
        {"role": "user", "content": task.instructions},
    ]
    for t, turn in enumerate(gold.turns):
        calls = [
            {
                "id": f"call_{t}_{i}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))},
            }
            for i, c in enumerate(turn)
        ]
        reasoning = " ".join(c.reasoning for c in turn if c.reasoning)
        messages.append({"role": "assistant", "content": "", "reasoning_content": reasoning, "tool_calls": calls})
        for i, c in enumerate(turn):
            messages.append({"role": "tool", "tool_call_id": f"call_{t}_{i}", "content": expected_output(task, c)})
    messages.append({"role": "assistant", "content": gold.final_answer, "reasoning_content": gold.final_reasoning})
    return messages


def expected_output(task: Task, call: ToolCallSpec) -> str:
    """What the tool returns for the gold call (the answer, as the calculator / Python prints it)."""
    return task.metadata["answer"]


def gold_trajectories(
    split: str = "train", scaffold: ScaffoldConfig = DEFAULT, seed: int = SEED, teacher_error_rate: float = 0.0
) -> Iterator[dict[str, Any]]:
    """SFT warm-start data: {"task_id", "difficulty", "messages", "tools"} per task of the split. Render
    with the model's chat template as `apply_chat_template(messages, tools=tools)`. With
    `teacher_error_rate`, the demonstrations of an imperfect teacher (`teacher_solution`)."""
    suite = ToolUseSuite(seed)
    for task in suite.tasks(split):
        yield {
            "task_id": task.id,
            "difficulty": task.difficulty,
            "messages": gold_messages(task, teacher_solution(task, teacher_error_rate), scaffold),
            "tools": scaffold.tool_specs(task.tools),
        }


# The teacher's typical mistakes: (pattern of the question, the wrong call it writes instead). A distilled
# teacher is right most of the time and wrong in ways that repeat: this one misreads the order of operations
# of two-step word problems (level 3) and reaches for `str.find` where `str.count` is asked for (level 4;
# wrong unless the first index happens to equal the count, 9% of the questions. Swapping count's arguments,
# the mistake before, printed 0, the right answer for the 65% of questions whose letter is absent).
_TEACHER_MISTAKES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"^Add (\d+) and (\d+), then multiply by (\d+)\.$"), lambda m: f"{m[1]} + {m[2]} * {m[3]}"),
    (re.compile(r"^Subtract (\d+) from (\d+), then multiply by (\d+)\.$"), lambda m: f"({m[1]} - {m[2]}) * {m[3]}"),
    (re.compile(r"^Multiply (\d+) by (\d+), then subtract (\d+)\.$"), lambda m: f"{m[1]} * ({m[2]} - {m[3]})"),
    (re.compile(r"^Multiply (\d+) by (\d+), then add (\d+)\.$"), lambda m: f"{m[1]} * ({m[2]} + {m[3]})"),
    (re.compile(r"^How many times does '(\w)' occur in '(\w+)'\?$"), lambda m: f"print('{m[2]}'.find('{m[1]}'))"),
)
# And the agentic mistake LLM teachers are known for: skipping the tool and answering from "mental arithmetic",
# an estimate with the operands rounded to their tens. On level 1 both operands (47 + 38 -> 50 + 40 = 90), on
# level 2's three-digit products the second factor (473 * 28 -> 473 * 30 = 14190); wrong unless the rounding
# happens to cancel (level 1, ~10% of the questions) or changes nothing (level 2: 9 of 90 second factors).
# Whether to call the tool is one decision with a clean reward, and the right branch needs only what this
# model copies most reliably (two numbers of two or three digits), so RL can correct it whatever SFT's
# rounding did to the harder copying of level 3 (benchmarks/README.md, "Learnability").
_TEACHER_GUESSES: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], int]], ...] = (
    (
        re.compile(r"^What is (\d{2}) ([+-]) (\d{2})\?$"),
        lambda m: round(int(m[1]), -1) + (1 if m[2] == "+" else -1) * round(int(m[3]), -1),
    ),
    (re.compile(r"^What is (\d{3}) \* (\d{2})\?$"), lambda m: int(m[1]) * round(int(m[2]), -1)),
)
GUESS_REASONING = "I can work this out in my head."


def _teacher_guess(question: str) -> GoldSolution | None:
    """The teacher's estimate for a question it answers without the tool, or None for the others."""
    for pattern, estimate in _TEACHER_GUESSES:
        match = pattern.match(question)
        if match is not None:
            answer = str(estimate(match))
            return GoldSolution(turns=(), final_answer=answer, final_reasoning=GUESS_REASONING)
    return None


def teacher_solution(task: Task, error_rate: float, seed: int = 0) -> GoldSolution:
    """What an imperfect teacher demonstrates: the gold solution, except that on the question kinds of
    `_TEACHER_MISTAKES` (a wrong call) and `_TEACHER_GUESSES` (no call, an estimate) it makes that kind's
    mistake with probability `error_rate` (decided per task, from `seed`); the demonstration stays consistent
    (the tool's output of the wrong call, then that output as the answer), as distilled data would be."""
    gold = ToolUseSuite().gold(task)
    if error_rate <= 0 or random.Random(f"{seed}/{task.id}").random() >= error_rate:
        return gold
    guess = _teacher_guess(task.instructions)
    if guess is not None:
        return guess
    for pattern, mistake in _TEACHER_MISTAKES:
        match = pattern.match(task.instructions)
        if match is None:
            continue
        tool = task.metadata["tool"]
        wrong = mistake(match)
        output, _ = run_tool(tool, {_ARG[tool]: wrong})
        call = ToolCallSpec(tool, {_ARG[tool]: wrong}, reasoning=_REASONING[tool])
        return GoldSolution(turns=((call,),), final_answer=output, final_reasoning=f"The result is {output}.")
    return gold


def render_chatml(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as the model's chat template (forgerl.model.tokenizer.CHAT_TEMPLATE) renders it,
    without needing a tokenizer: for training the tokenizer itself on the suite's text."""
    parts: list[str] = []
    rest = messages
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    if system is not None:
        rest = messages[1:]
    if system is not None or tools:
        head = system or ""
        if tools:
            head += "\n\n" if system is not None else ""
            head += (
                "# Tools\n\nYou may call one or more functions. Their signatures are inside <tools></tools>:\n<tools>"
            )
            head += "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
            head += (
                "\n</tools>\n\nTo call a function, put a JSON object with its name and arguments inside "
                '<tool_call></tool_call>:\n<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n'
                "</tool_call>"
            )
        parts.append(f"<|im_start|>system\n{head}<|im_end|>\n")
    for m in rest:
        role = m["role"]
        if role in ("user", "system"):
            parts.append(f"<|im_start|>{role}\n{m['content']}<|im_end|>\n")
        elif role == "tool":
            parts.append(f"<|im_start|>tool\n<tool_response>\n{m['content']}\n</tool_response><|im_end|>\n")
        else:
            text = "<|im_start|>assistant\n"
            reasoning = m.get("reasoning_content") or ""
            if reasoning:
                text += f"<think>\n{reasoning}\n</think>\n\n"
            content = m.get("content") or ""
            text += content
            for i, call in enumerate(m.get("tool_calls") or []):
                fn = call["function"]
                args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"])
                if content or i:
                    text += "\n"
                text += f'<tool_call>\n{{"name": {json.dumps(fn["name"])}, "arguments": {args}}}\n</tool_call>'
            parts.append(text + "<|im_end|>\n")
    return "".join(parts)


def tokenizer_corpus(
    splits: Sequence[str] = ("train",), scaffold: ScaffoldConfig = DEFAULT, seed: int = SEED
) -> Iterator[str]:
    """Text for `forgerl.model.tokenizer.train_tokenizer(texts)`: every gold conversation of the splits,
    rendered as the chat template renders it (system prompt and tool signatures included)."""
    for split in splits:
        for item in gold_trajectories(split, scaffold, seed):
            yield render_chatml(item["messages"], item["tools"])
