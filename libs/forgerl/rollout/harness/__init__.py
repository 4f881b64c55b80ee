"""The grading harnesses: unittest and pytest runners under one supervisor, with a canary in every run.

The files of this package are not imported by ForgeRL: the grader copies them into the grading sandbox's
`.forgerl/` and runs `python3 -I .forgerl/run_tests.py` with the environment's interpreter (supervisor.py
says how the nonce stays out of the agent's reach). Test ids are unittest ids for the unittest harness
(`tests.test_m.TestClass.test_name`) and pytest node ids for the pytest harness
(`tests/test_m.py::TestClass::test_name`, the form of SWE-bench's FAIL_TO_PASS / PASS_TO_PASS).

The canary is a test file written next to the harness with a class and two methods named at random per
run: one must fail, one must pass. A runner patched from inside the code under test (every outcome forced
to pass, or the reporting replaced) shows on the canary; the grader then grades the run 0 as tampered.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

HARNESS_DIR = ".forgerl"
COMMAND = f"python3 -I {HARNESS_DIR}/run_tests.py"
KINDS = ("unittest", "pytest")
_HERE = Path(__file__).parent


@dataclass(frozen=True)
class Canary:
    token: str  # names the file; the class and methods get their own random parts

    cls: str
    failing: str
    passing: str

    @classmethod
    def new(cls) -> Canary:
        return cls(
            token=secrets.token_hex(4),
            cls=f"Test{secrets.token_hex(3).capitalize()}",
            failing=f"test_{secrets.token_hex(4)}",
            passing=f"test_{secrets.token_hex(4)}",
        )

    @property
    def path(self) -> str:
        return f"{HARNESS_DIR}/canary_{self.token}.py"

    def source(self) -> str:
        # A unittest.TestCase: both runners collect it, whatever the task's python_classes / python_files say.
        return (
            "import unittest\n\n\n"
            f"class {self.cls}(unittest.TestCase):\n"
            f"    def {self.failing}(self):\n"
            "        self.assertEqual(1, 2)\n\n"
            f"    def {self.passing}(self):\n"
            "        self.assertEqual(2, 2)\n"
        )

    def ids(self, kind: str) -> tuple[str, str]:
        """(must fail, must pass) as the runner of `kind` names them."""
        if kind == "pytest":
            return f"{self.path}::{self.cls}::{self.failing}", f"{self.path}::{self.cls}::{self.passing}"
        module = f"canary_{self.token}"
        return f"{module}.{self.cls}.{self.failing}", f"{module}.{self.cls}.{self.passing}"


def runner_targets(kind: str, test_ids: Iterable[str]) -> list[str]:
    """What the runner loads: test files (pytest node ids' file part) or test modules (unittest ids less
    the class and method)."""
    if kind == "pytest":
        return sorted({t.split("::", 1)[0] for t in test_ids})
    return sorted({t.rsplit(".", 2)[0] for t in test_ids})


def harness_files(kind: str, test_ids: Iterable[str], canary: Canary) -> Mapping[str, str]:
    """The harness, its spec and the canary, by path in the grading sandbox."""
    if kind not in KINDS:
        raise ValueError(f"harness {kind!r}: choose one of {', '.join(KINDS)}")
    spec = {"kind": kind, "tests": runner_targets(kind, test_ids), "canary": canary.path}
    return {
        f"{HARNESS_DIR}/run_tests.py": (_HERE / "supervisor.py").read_text(),
        f"{HARNESS_DIR}/runner_common.py": (_HERE / "runner_common.py").read_text(),
        f"{HARNESS_DIR}/{kind}_runner.py": (_HERE / f"{kind}_runner.py").read_text(),
        f"{HARNESS_DIR}/spec.json": json.dumps(spec),
        canary.path: canary.source(),
    }
