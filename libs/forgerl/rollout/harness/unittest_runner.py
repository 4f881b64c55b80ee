"""The unittest test runner of the grading harness (a child of the supervisor). Standard library only.

Loads the canary first, then the task's test modules (`spec.json` "tests", dotted names), runs them and
reports one status per test id (`tests.test_m.TestClass.test_name`).
"""

import importlib.util
import os
import sys
import unittest
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner_common

sys.path.pop(0)


class Collect(unittest.TextTestResult):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.status: dict[str, str] = {}

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.status[test.id()] = "pass"

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self.status[test.id()] = "fail"

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self.status[test.id()] = "error"

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self.status[test.id()] = "skip"

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self.status[test.id()] = "xfail"


def main() -> None:
    fd = int(sys.argv[1])
    spec = runner_common.spec()
    runner_common.repository_on_path()
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    path = spec["canary"]
    name = os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    canary = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(canary)
    suite.addTests(loader.loadTestsFromModule(canary))
    for test_module in spec["tests"]:
        try:
            suite.addTests(loader.loadTestsFromName(test_module))
        except Exception as exc:  # the module under test broke its import: its tests go missing
            print(f"cannot load {test_module}: {exc!r}", file=sys.stderr)
    result = unittest.TextTestRunner(stream=sys.stderr, resultclass=Collect, verbosity=2).run(suite)
    assert isinstance(result, Collect)
    runner_common.report(fd, result.status, {})


if __name__ == "__main__":
    main()
