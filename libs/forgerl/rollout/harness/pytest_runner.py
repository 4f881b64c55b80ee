"""The pytest test runner of the grading harness (a child of the supervisor).

Runs pytest from the task's environment on the task's test files (`spec.json` "tests", the files of the
FAIL_TO_PASS / PASS_TO_PASS node ids, as SWE-bench does) and the canary, and reports one status per node
id (`tests/test_m.py::TestClass::test_name`). Plugins named by environment variables are removed first;
the clean grading tree already holds no agent conftest.py or ini file.
"""

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner_common

sys.path.pop(0)

for _name in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS"):
    os.environ.pop(_name, None)

try:
    import pytest
except ImportError:
    sys.exit(f"pytest is not installed for {sys.executable}: declare it in the task's environment (requirements)")

_OUTCOME = {"passed": "pass", "failed": "fail", "skipped": "skip"}


class Collect:
    """A pytest plugin: the status of every test from its reports (setup, call, teardown)."""

    def __init__(self) -> None:
        self.status: dict[str, str] = {}

    def pytest_configure(self, config: Any) -> None:
        # After pytest loaded its entry-point plugins: package metadata in the work directory is never seen.
        runner_common.repository_on_path()

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call":
            # Stricter than SWE-bench, which counts XFAIL as passing: a FAIL_TO_PASS test must pass.
            self.status[report.nodeid] = "xfail" if hasattr(report, "wasxfail") else _OUTCOME[report.outcome]
        elif report.failed:  # a fixture broke in setup or teardown
            self.status[report.nodeid] = "error"
        elif report.skipped and report.when == "setup":
            self.status[report.nodeid] = "skip"


def main() -> None:
    fd = int(sys.argv[1])
    spec = runner_common.spec()
    collect = Collect()
    args = ["-p", "no:cacheprovider", "--rootdir", os.getcwd(), "--continue-on-collection-errors", "-rA"]
    pytest.main([*args, spec["canary"], *spec["tests"]], plugins=[collect])
    runner_common.report(fd, collect.status, {"pytest": pytest.__version__, "pytest_file": pytest.__file__})


if __name__ == "__main__":
    main()
