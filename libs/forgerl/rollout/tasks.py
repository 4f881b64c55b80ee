"""The common task format of every suite, the grading of test output, and the suite registry.

A task is SWE-bench-like where that applies: a work directory (`files`) the agent starts from, the
instructions it reads, the test ids that must go from failing to passing (`fail_to_pass`) or keep passing
(`pass_to_pass`), and how the tests run: a built-in `harness` ("unittest" or "pytest", ids in that
runner's form) or the task's own `test_command`. `test_files` are added to the grading tree, over the
agent's, so the agent can neither edit the tests into passing nor read a hidden answer while it works.
`environment` declares the Python and packages the task's commands run with (forgerl.rollout.sandbox).

Grading (forgerl.rollout.grading) runs on a clean copy of the task: the test command prints one line
`FORGERL_RESULTS <nonce> {"<test id>": "pass" | "fail" | "error"}`; the nonce is sent on its standard
input, so output the agent's code prints cannot pose as the result line.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgerl.rollout.sandbox.base import TaskEnvironment

RESULTS_MARKER = "FORGERL_RESULTS"


@dataclass(frozen=True)
class Task:
    id: str
    suite: str
    split: str
    instructions: str
    test_command: str
    time_budget_s: float  # wall clock the whole episode may take
    baseline_s: float  # reference completion time for the speed reward
    files: Mapping[str, str] = field(default_factory=dict)  # the work directory at the start
    test_files: Mapping[str, str] = field(default_factory=dict)  # written over it before the tests run
    fail_to_pass: tuple[str, ...] = ()
    pass_to_pass: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()  # tool names the task offers the agent
    answer_file: str | None = None  # the agent's final message is written here before the tests
    difficulty: int = 1
    metadata: Mapping[str, str] = field(default_factory=dict)
    harness: str | None = None  # "unittest" | "pytest": the built-in harness runs the tests, not test_command
    environment: TaskEnvironment | None = None  # None: the machine's python3 / the Kubernetes default image

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "suite": self.suite,
            "split": self.split,
            "instructions": self.instructions,
            "test_command": self.test_command,
            "time_budget_s": self.time_budget_s,
            "baseline_s": self.baseline_s,
            "files": dict(self.files),
            "test_files": dict(self.test_files),
            "FAIL_TO_PASS": list(self.fail_to_pass),
            "PASS_TO_PASS": list(self.pass_to_pass),
            "tools": list(self.tools),
            "answer_file": self.answer_file,
            "difficulty": self.difficulty,
            "metadata": dict(self.metadata),
            "harness": self.harness,
            "environment": None
            if self.environment is None
            else {
                "python": self.environment.python,
                "requirements": list(self.environment.requirements),
                "image": self.environment.image,
            },
        }


@dataclass(frozen=True)
class ToolCallSpec:
    """A tool call of a gold solution: what a knows-the-answers agent does."""

    name: str
    arguments: Mapping[str, Any]
    reasoning: str = ""


@dataclass(frozen=True)
class GoldSolution:
    """The reference way to solve a task: tool calls in turns (calls in one turn are independent),
    then a final answer. Replayed by the scripted agent, rendered as a gold trajectory for SFT."""

    turns: tuple[tuple[ToolCallSpec, ...], ...]
    final_answer: str
    final_reasoning: str = ""


@dataclass(frozen=True)
class Grading:
    """What the tests said about an episode's work directory."""

    results: Mapping[str, str]  # test id -> pass | fail | error | missing
    performance: float  # fraction of FAIL_TO_PASS passing, 0 unless every PASS_TO_PASS passes
    success: bool  # resolved: every FAIL_TO_PASS and PASS_TO_PASS test passes
    detail: str = ""
    dropped: Mapping[str, str] = field(default_factory=dict)  # agent changes left out of the grading tree: why
    runner: Mapping[str, Any] = field(default_factory=dict)  # how the test runner ended, which python / pytest


def tagged_json(output: str, nonce: str, marker: str) -> dict[str, Any] | None:
    """The JSON object of the last `<marker> <nonce> {...}` line, or None when there is none."""
    pattern = re.compile(rf"^{re.escape(marker)} {re.escape(nonce)} (\{{.*\}})\s*$", re.MULTILINE)
    found = pattern.findall(output)
    if not found:
        return None
    try:
        data = json.loads(found[-1])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def parse_results(output: str, nonce: str) -> dict[str, str] | None:
    """The result line with this nonce, or None when the test command printed none."""
    data = tagged_json(output, nonce, RESULTS_MARKER)
    return None if data is None else {str(k): str(v) for k, v in data.items()}


def grade(task: Task, results: Mapping[str, str] | None, detail: str = "") -> Grading:
    """Performance from FAIL_TO_PASS / PASS_TO_PASS. No results at all (the harness crashed) grades 0."""
    if results is None:
        ids = [*task.fail_to_pass, *task.pass_to_pass]
        return Grading({t: "missing" for t in ids}, 0.0, False, detail or "the tests printed no results")
    merged = {t: results.get(t, "missing") for t in (*task.fail_to_pass, *task.pass_to_pass)}
    p2p_ok = all(merged[t] == "pass" for t in task.pass_to_pass)
    f2p_passed = sum(merged[t] == "pass" for t in task.fail_to_pass)
    fraction = f2p_passed / len(task.fail_to_pass) if task.fail_to_pass else 1.0
    performance = fraction if p2p_ok else 0.0
    return Grading(merged, performance, p2p_ok and f2p_passed == len(task.fail_to_pass), detail)


class Suite(abc.ABC):
    """A named set of tasks in splits, with gold solutions."""

    name: str
    splits: tuple[str, ...]

    @abc.abstractmethod
    def tasks(self, split: str) -> Sequence[Task]: ...

    @abc.abstractmethod
    def gold(self, task: Task) -> GoldSolution: ...

    def get(self, task_id: str) -> Task:
        split = task_id.split("/")[1] if task_id.count("/") >= 2 else None
        for s in [split] if split in self.splits else self.splits:
            for task in self.tasks(s):
                if task.id == task_id:
                    return task
        raise KeyError(f"{self.name}: no task {task_id!r}")

    def select(self, split: str, task_ids: Sequence[str] = ()) -> list[Task]:
        """The split's tasks, or the named ones (which must belong to the split)."""
        if split not in self.splits:
            raise KeyError(f"{self.name}: no split {split!r}; splits: {', '.join(self.splits)}")
        tasks = self.tasks(split)
        if not task_ids:
            return list(tasks)
        by_id = {t.id: t for t in tasks}
        missing = [t for t in task_ids if t not in by_id]
        if missing:
            raise KeyError(f"{self.name}/{split}: unknown task ids {missing[:5]}")
        return [by_id[t] for t in task_ids]

    def __iter__(self) -> Iterator[Task]:
        for split in self.splits:
            yield from self.tasks(split)


_SUITES: dict[str, Suite] = {}


def register_suite(suite: Suite) -> Suite:
    _SUITES[suite.name] = suite
    return suite


def get_suite(name: str) -> Suite:
    if not _SUITES:
        load_builtin_suites()
    try:
        return _SUITES[name]
    except KeyError:
        raise KeyError(f"unknown suite {name!r}: choose one of {', '.join(sorted(_SUITES))}") from None


def suite_names() -> list[str]:
    if not _SUITES:
        load_builtin_suites()
    return sorted(_SUITES)


def load_builtin_suites() -> None:
    from forgerl.rollout.suites import swe, tooluse

    register_suite(tooluse.ToolUseSuite())
    register_suite(swe.SweSuite())
