"""The pure parts of `forgerl tasks mine`: which paths are tests, and each test's status read from a real
pytest run's `-rA` summary (the outcomes are written from what each test does, not from the parser)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from forgerl.tasks.mining import DEFAULT_TEST_COMMAND, is_test_path, parse_pytest_summary

PROJECT = {
    "tests/test_mixed.py": (
        "import pytest\n\n\n"
        "def test_ok():\n    pass\n\n\n"
        "def test_bad():\n    assert 1 == 2\n\n\n"
        "@pytest.fixture\ndef broken():\n    raise RuntimeError('setup')\n\n\n"
        "def test_setup_error(broken):\n    pass\n\n\n"
        "@pytest.mark.xfail\ndef test_expected_failure():\n    assert False\n\n\n"
        "@pytest.mark.skip(reason='not here')\ndef test_skipped():\n    pass\n\n\n"
        "@pytest.mark.parametrize('word', ['a b', 'c - d'])\ndef test_words(word):\n    assert word == 'a b'\n\n\n"
        "class TestGroup:\n    def test_method(self):\n        print('PASSED tests/fake.py::test_printed')\n"
    ),
    "tests/test_import_error.py": "from nowhere import thing\n\n\ndef test_never_collected():\n    pass\n",
}
EXPECTED = {
    "tests/test_mixed.py::test_ok": "pass",
    "tests/test_mixed.py::test_bad": "fail",
    "tests/test_mixed.py::test_setup_error": "error",
    "tests/test_mixed.py::test_expected_failure": "xfail",
    "tests/test_mixed.py::test_words[a b]": "pass",
    "tests/test_mixed.py::test_words[c - d]": "fail",  # its summary line: "FAILED <id> - AssertionError..."
    "tests/test_mixed.py::TestGroup::test_method": "pass",
}


def test_status_of_every_test_from_a_real_pytest_run(tmp_path: Path) -> None:
    for path, text in PROJECT.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    command = DEFAULT_TEST_COMMAND.replace("python3", sys.executable, 1).split()
    done = subprocess.run([*command, "-s"], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1, done.stdout[-2000:]  # failures, and the import error did not stop the run
    # a skip has no node id in the summary and the file that failed to import has no tests: neither is listed
    assert parse_pytest_summary(done.stdout) == EXPECTED


def test_no_summary_is_not_an_empty_run() -> None:
    assert parse_pytest_summary("/venv/bin/python3: No module named pytest\n") is None
    assert parse_pytest_summary("=== short test summary info ===\n") == {}


@pytest.mark.parametrize(
    ("path", "is_test"),
    [
        ("tests/test_calc.py", True),
        ("pkg/tests/helpers.py", True),  # a helper of the tests is part of the test patch
        ("test/data/input.json", True),
        ("src/pkg/test_utils.py", True),
        ("src/pkg/calc_test.py", True),
        ("conftest.py", True),
        ("calc.py", False),
        ("docs/testing.md", False),  # a file named after testing is not in a test folder
        ("src/contest.py", False),
        ("latest/calc.py", False),
    ],
)
def test_test_paths(path: str, is_test: bool) -> None:
    assert is_test_path(path) is is_test
