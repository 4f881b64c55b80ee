"""The tool-use suite's imperfect teacher: which demonstrations it gets wrong, how, and how often."""

from __future__ import annotations

import dataclasses

import pytest

from forgerl.rollout.suites.tooluse import ToolUseSuite, gold_trajectories, teacher_solution
from forgerl.rollout.tasks import Task

pytestmark = pytest.mark.unit


def _task(question: str, tool: str, arg: str, answer: str) -> Task:
    template = ToolUseSuite().tasks("train")[0]
    key = "expression" if tool == "calculator" else "code"
    return dataclasses.replace(
        template, instructions=question, metadata={"tool": tool, key: arg, "answer": answer}, difficulty=3
    )


@pytest.mark.parametrize(
    ("question", "tool", "arg", "answer", "wrong_arg", "wrong_answer"),
    [  # the wrong answers worked out by hand
        ("Add 12 and 7, then multiply by 9.", "calculator", "(12 + 7) * 9", "171", "12 + 7 * 9", "75"),
        ("Subtract 5 from 20, then multiply by 3.", "calculator", "(20 - 5) * 3", "45", "(5 - 20) * 3", "-45"),
        ("Multiply 4 by 6, then subtract 2.", "calculator", "4 * 6 - 2", "22", "4 * (6 - 2)", "16"),
        ("Multiply 4 by 6, then add 2.", "calculator", "4 * 6 + 2", "26", "4 * (6 + 2)", "32"),
        (
            "How many times does 'o' occur in 'lemon'?",
            "python",
            "print('lemon'.count('o'))",
            "1",
            "print('lemon'.find('o'))",
            "3",
        ),
    ],
)
def test_mistakes_are_consistent_demonstrations(
    question: str, tool: str, arg: str, answer: str, wrong_arg: str, wrong_answer: str
) -> None:
    task = _task(question, tool, arg, answer)
    assert teacher_solution(task, 0.0) == ToolUseSuite().gold(task)
    wrong = teacher_solution(task, 1.0)
    (call,) = wrong.turns[0]
    assert call.name == tool and next(iter(call.arguments.values())) == wrong_arg
    assert wrong.final_answer == wrong_answer != answer


@pytest.mark.parametrize(
    ("question", "answer", "guess"),  # worked out by hand: level 1's operands, level 2's second factor rounded
    [
        ("What is 473 * 28?", "13244", "14190"),
        ("What is 120 * 44?", "5280", "4800"),
        ("What is 301 * 70?", "21070", "21070"),
        ("What is 47 + 38?", "85", "90"),
        ("What is 44 + 36?", "80", "80"),
        ("What is 61 - 15?", "46", "40"),
        ("What is 15 - 61?", "-46", "-40"),
    ],
)
def test_guesses_skip_the_tool(question: str, answer: str, guess: str) -> None:
    task = _task(question, "calculator", question.removeprefix("What is ").rstrip("?"), answer)
    wrong = teacher_solution(task, 1.0)
    assert wrong.turns == () and wrong.final_answer == guess


def test_other_questions_are_always_right() -> None:
    task = _task("Reverse the word 'lemon'.", "python", "print('lemon'[::-1])", "nomel")
    assert teacher_solution(task, 1.0) == ToolUseSuite().gold(task)


def test_error_rate_is_the_fraction_of_eligible_demonstrations_it_gets_wrong() -> None:
    items = list(zip(gold_trajectories("train"), gold_trajectories("train", teacher_error_rate=0.5), strict=True))
    for level in (1, 2, 3):
        eligible = [(g, t) for g, t in items if g["difficulty"] == level]
        changed = sum(g["messages"] != t["messages"] for g, t in eligible)
        assert 0.45 < changed / len(eligible) < 0.55
