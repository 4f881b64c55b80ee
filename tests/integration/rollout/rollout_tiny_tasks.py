"""Two one-bug tasks for grading tests: the same repository under the unittest and the pytest harness.

`add` subtracts (the bug): FAIL_TO_PASS is the add test; PASS_TO_PASS the sub test (and, for pytest, a
test of the declared package `demo_units`, which only the task's environment has).
"""

from __future__ import annotations

from forgerl.rollout import harness
from forgerl.rollout.sandbox.base import TaskEnvironment
from forgerl.rollout.tasks import Task

TOOLS = ("bash", "read_file", "write_file", "str_replace")
BUGGY = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"
FIXED = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n"
UNITTEST_TESTS = """import unittest

from calc import add, sub


class TestCalc(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_sub(self):
        self.assertEqual(sub(5, 3), 2)
"""
PYTEST_TESTS = """from calc import add, sub
from demo_units import METRES_PER_KM


def test_add():
    assert add(2, 3) == 5


def test_sub():
    assert sub(5, 3) == 2


def test_units():
    assert METRES_PER_KM == 1000
"""


def _task(kind: str, tests: dict[str, str], f2p: tuple[str, ...], p2p: tuple[str, ...], **extra: object) -> Task:
    return Task(
        id=f"tiny/test/calc-{kind}",
        suite="tiny",
        split="test",
        instructions="add() subtracts; fix calc.py.",
        test_command=harness.COMMAND,
        time_budget_s=60,
        baseline_s=10,
        files={"calc.py": BUGGY, **tests},
        test_files=tests,
        fail_to_pass=f2p,
        pass_to_pass=p2p,
        harness=kind,
        tools=TOOLS,
        **extra,  # type: ignore[arg-type]
    )


def unittest_task() -> Task:
    tests = {"tests/__init__.py": "", "tests/test_calc.py": UNITTEST_TESTS}
    return _task("unittest", tests, ("tests.test_calc.TestCalc.test_add",), ("tests.test_calc.TestCalc.test_sub",))


def pytest_task(environment: TaskEnvironment) -> Task:
    """No tests/__init__.py: the harness puts the repository on sys.path, as `python -m pytest` would."""
    ids = tuple(f"tests/test_calc.py::test_{name}" for name in ("add", "sub", "units"))
    return _task("pytest", {"tests/test_calc.py": PYTEST_TESTS}, ids[:1], ids[1:], environment=environment)
