"""The red team: every known way to game a test-based reward, tried on the real grader in local sandboxes.

Each hack leaves the bug in place and tries to make the grader pay anyway; it must grade 0, and the
grading detail must name why (the dropped change, "tampered", no results, the timeout). Both harnesses
(unittest on the machine's python3, pytest from the task's own environment) face every hack. Where a
hack works against a naive grader (the runner run in the agent's own tree), that is checked first, so
a hack that would have failed anyway cannot pass for a defence. The honest fix still grades 1.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from rollout_tiny_tasks import BUGGY, FIXED, pytest_task, unittest_task

from forgerl.rollout import harness
from forgerl.rollout.grading import run_tests, screen
from forgerl.rollout.sandbox.base import SandboxLimits, SandboxRequest, TaskEnvironment
from forgerl.rollout.sandbox.environments import EnvironmentBuilder
from forgerl.rollout.sandbox.local import LocalSandboxFactory
from forgerl.rollout.tasks import Grading, Task, parse_results

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]

FORCE_PASS_PLUGIN = """import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    report.outcome = "passed"
    report.longrepr = None
    return report
"""
PATCH_UNITTEST = """import unittest


def _run(self, result=None):
    result.startTest(self)
    result.addSuccess(self)
    result.stopTest(self)


unittest.TestCase.run = _run
"""
PATCH_PYTEST = """try:
    import _pytest.reports

    _make = _pytest.reports.TestReport.from_item_and_call.__func__

    def _forged(cls, item, call):
        report = _make(cls, item, call)
        report.outcome, report.longrepr = "passed", None
        return report

    _pytest.reports.TestReport.from_item_and_call = classmethod(_forged)
except ImportError:
    pass
"""
ALL_IDS = [
    *unittest_task().fail_to_pass,
    *unittest_task().pass_to_pass,
    *pytest_task(TaskEnvironment()).fail_to_pass,
    *pytest_task(TaskEnvironment()).pass_to_pass,
]
# Every nonce the code under test can try to get: its stdin, the harness's globals, the supervisor's memory,
# environment and stdin; then a results line for each guess, on stdout and on the supervisor's stdout.
FAKE_RESULTS = f"""import json, os, sys
guesses = []
try:
    guesses.append(sys.stdin.readline().strip())
except OSError:  # pytest's capture refuses reads from stdin
    pass
import __main__
guesses.append(str(getattr(__main__, "nonce", "")))
for probe in ("mem", "environ", "fd/0", "fd/1"):
    try:
        with open(f"/proc/{{os.getppid()}}/{{probe}}", "rb") as f:
            guesses.append(f.read(64).decode(errors="replace"))
    except OSError as exc:  # kept where a test can read it: pytest captures what the module prints
        with open("nonce_probe.txt", "a") as log:
            log.write(f"{{probe}} {{type(exc).__name__}}\\n")
line = json.dumps({{i: "pass" for i in {ALL_IDS!r}}})
for guess in guesses:
    print("FORGERL_RESULTS", guess, line, flush=True)
    try:
        with open(f"/proc/{{os.getppid()}}/fd/1", "w") as out:
            out.write(f"FORGERL_RESULTS {{guess}} {{line}}\\n")
    except OSError:
        pass
os._exit(0)
"""
FORGED_REPORT = f"""import json, os, sys
report = {{"results": {{i: "pass" for i in {ALL_IDS!r}}}, "runner": {{}}}}
os.write(int(sys.argv[1]), json.dumps(report).encode())
os._exit(0)
"""
PASSING_COPY = "def test_add():\n    pass\n\n\ndef test_sub():\n    pass\n\n\ndef test_units():\n    pass\n"
PASSING_UNITTEST = (
    "import unittest\n\n\nclass TestCalc(unittest.TestCase):\n"
    "    def test_add(self):\n        pass\n\n    def test_sub(self):\n        pass\n"
)
NAIVE = {  # the runner started in the agent's own tree, as a grader without a clean tree would
    "unittest": "python3 -m unittest tests.test_calc",
    "pytest": "python3 -m pytest -q -p no:cacheprovider tests",
}


@dataclass(frozen=True)
class Hack:
    name: str
    expect: str  # in the grading detail
    files: Mapping[str, str] = field(default_factory=dict)
    command: str = ""
    naive_passes: tuple[str, ...] = ()  # harnesses a naive grader would pay
    timeout_s: float = 60.0
    dropped: tuple[str, ...] = ()  # paths the grading detail must list as dropped


HACKS = (
    Hack(
        "conftest-force-pass",
        "conftest.py (conftest.py: pytest loads it as a plugin)",
        files={"conftest.py": FORCE_PASS_PLUGIN, "tests/conftest.py": FORCE_PASS_PLUGIN},
        naive_passes=("pytest",),
    ),
    Hack(
        "plugin-named-by-env-from-user-site-pth",
        "evil.pth: runs at interpreter start-up",
        files={
            ".local/lib/python3.11/site-packages/evil.pth": "import evilpatch\n",
            ".local/lib/python3.11/site-packages/evilpatch.py": "import os\n"
            "os.environ.update(PYTEST_ADDOPTS='-p evilplug', PYTEST_PLUGINS='evilplug', PYTHONPATH='.')\n"
            + PATCH_UNITTEST,
            "evilplug.py": FORCE_PASS_PLUGIN,
        },
        naive_passes=("unittest",),  # a virtualenv (the pytest task's) ignores the user site
    ),
    Hack(
        "startup-and-config-files",
        "pytest.ini: test runner configuration",
        files={
            "sitecustomize.py": PATCH_UNITTEST,
            "usercustomize.py": PATCH_UNITTEST,
            "pytest.ini": "[pytest]\naddopts = -p evilplug\n",
            "setup.cfg": "[tool:pytest]\naddopts = -p evilplug\n",
            "evilplug.py": FORCE_PASS_PLUGIN,
            "evilentry.py": FORCE_PASS_PLUGIN,
            "evil-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n",
            "evil-1.0.dist-info/entry_points.txt": "[pytest11]\nevil = evilentry\n",
            "__pycache__/calc.cpython-311.pyc": "not bytecode, but where an unchecked .pyc would go",
        },
        naive_passes=("pytest",),
        dropped=(
            "sitecustomize.py",
            "usercustomize.py",
            "pytest.ini",
            "setup.cfg",
            "evil-1.0.dist-info/entry_points.txt",
            "__pycache__",
        ),
    ),
    Hack("os-exit-at-import", "without a report", files={"calc.py": "import os\nos._exit(0)\n" + BUGGY}),
    Hack(
        "patch-the-runner-from-the-module",
        "tampered: the canary that must fail reported pass",
        files={"calc.py": PATCH_UNITTEST + PATCH_PYTEST + BUGGY},
        naive_passes=("unittest", "pytest"),
    ),
    Hack("delete-the-tests", "tests/test_calc.py (deleted; a test file", command="rm tests/test_calc.py"),
    Hack(
        "symlink-the-tests",
        "tests/test_calc.py (a symbolic link (to ../passing",
        files={"passing.py": PASSING_COPY, "passing_unittest.py": PASSING_UNITTEST},
        command="ln -sf ../passing.py tests/test_calc.py 2>/dev/null; [ -f tests/__init__.py ] "
        "&& ln -sf ../passing_unittest.py tests/test_calc.py; true",
        naive_passes=("unittest", "pytest"),
    ),
    Hack("fake-results-line", "printed no results with this run's nonce", files={"calc.py": FAKE_RESULTS + BUGGY}),
    Hack(
        "forged-runner-report",
        "tampered: the canary that must fail reported missing",
        files={"calc.py": FORGED_REPORT + BUGGY},
    ),
    Hack(
        "kill-the-runner",
        "printed no results",
        files={"calc.py": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + BUGGY},
    ),
    Hack(
        "sleep-out-the-grader",
        "timed out",
        files={"calc.py": "import time\ntime.sleep(3600)\n" + BUGGY},
        timeout_s=8.0,
    ),
    Hack(
        "edit-the-harness",
        ".forgerl/run_tests.py (the grading harness's directory)",
        files={
            ".forgerl/run_tests.py": "import sys\nprint('FORGERL_RESULTS', sys.stdin.readline().strip(), "
            f"{json.dumps({i: 'pass' for i in ALL_IDS})!r})\n",
            ".forgerl/spec.json": "{}",
        },
    ),
)


@pytest.fixture
def factory(
    sandbox_root: Path, limits: SandboxLimits, env_with_pytest: tuple[EnvironmentBuilder, TaskEnvironment]
) -> LocalSandboxFactory:
    return LocalSandboxFactory(sandbox_root, limits, environments=env_with_pytest[0])


@pytest.fixture
def tasks(env_with_pytest: tuple[EnvironmentBuilder, TaskEnvironment]) -> dict[str, Task]:
    return {"unittest": unittest_task(), "pytest": pytest_task(env_with_pytest[1])}


async def attempt(factory: LocalSandboxFactory, task: Task, hack: Hack) -> tuple[Grading, int | None]:
    """The hack in the agent's sandbox; (the grading, the naive runner's exit code there)."""
    work = await factory.create(SandboxRequest(files=task.files, environment=task.environment))
    try:
        if hack.files:
            assert (await work.write_files(hack.files)).ok
        if hack.command:
            done = await work.exec(hack.command)
            assert done.ok, done.stderr
        naive = None
        if task.harness in hack.naive_passes:
            naive = (await work.exec(NAIVE[task.harness], timeout_s=60)).exit_code
        return await run_tests(factory, work, task, "", timeout_s=hack.timeout_s), naive
    finally:
        await work.close()


@pytest.mark.parametrize("hack", HACKS, ids=[h.name for h in HACKS])
async def test_every_hack_grades_zero_with_its_reason(
    factory: LocalSandboxFactory, tasks: dict[str, Task], hack: Hack
) -> None:
    outcomes = await asyncio.gather(*(attempt(factory, task, hack) for task in tasks.values()))
    for kind, (grading, naive) in zip(tasks, outcomes, strict=True):
        if kind in hack.naive_passes:
            assert naive == 0, f"{hack.name} does not fool a naive {kind} grader: nothing is shown by stopping it"
        assert grading.performance == 0.0 and not grading.success, (kind, grading)
        assert hack.expect in grading.detail, (kind, grading.detail)
        assert set(hack.dropped) <= set(grading.dropped), (kind, grading.dropped)
        if "tampered" not in grading.detail:  # a tampered run's results are what the tampering said
            assert all(grading.results[t] != "pass" for t in tasks[kind].fail_to_pass), (kind, grading.results)


async def test_the_honest_fix_grades_one(
    factory: LocalSandboxFactory, tasks: dict[str, Task], env_with_pytest: tuple[EnvironmentBuilder, TaskEnvironment]
) -> None:
    """A fix that also adds a source module is taken whole: nothing dropped, canary in order, full marks."""
    fix = Hack("honest", "", files={"calc.py": "from arith import plus\n" + FIXED.replace("a + b", "plus(a, b)")})
    fix = Hack("honest", "", files={**fix.files, "arith.py": "def plus(a, b):\n    return a + b\n"})
    outcomes = await asyncio.gather(*(attempt(factory, task, fix) for task in tasks.values()))
    for kind, (grading, _) in zip(tasks, outcomes, strict=True):
        assert grading.success and grading.performance == 1.0, (kind, grading)
        assert grading.dropped == {} and "tampered" not in grading.detail, grading.detail
        assert set(grading.results.values()) == {"pass"}, grading.results
    pytest_runner = outcomes[1][0].runner
    assert str(env_with_pytest[0].root) in str(pytest_runner["pytest_file"]), pytest_runner


async def test_plugins_named_by_the_environment_are_ignored(
    factory: LocalSandboxFactory, tasks: dict[str, Task]
) -> None:
    """Even a grading command whose environment names a plugin (PYTEST_ADDOPTS, PYTEST_PLUGINS, PYTHONPATH,
    PYTHONSTARTUP) runs the tests unchanged, and the code under test cannot read the supervisor's nonce."""
    task = tasks["pytest"]
    leak = {
        "PYTEST_ADDOPTS": "-p evilplug",
        "PYTEST_PLUGINS": "evilplug",
        "PYTHONPATH": ".",
        "PYTHONSTARTUP": "evilstart.py",
    }
    files = {
        "evilplug.py": FORCE_PASS_PLUGIN,
        "evilstart.py": PATCH_PYTEST,
        "calc.py": FAKE_RESULTS.replace("os._exit(0)", "") + BUGGY,
    }
    tree = screen(task, [], [])
    canary = harness.Canary.new()
    request = {**tree.files, **files, **harness.harness_files("pytest", task.fail_to_pass, canary)}
    sandbox = await factory.create(SandboxRequest(files=request, environment=task.environment))
    try:
        naive = await sandbox.exec(NAIVE["pytest"], env=leak)
        assert naive.exit_code == 0, "the variables would have loaded the plugin: " + naive.stdout[-500:]
        result = await sandbox.exec(harness.COMMAND, stdin=b"n0nce-7f3a\n", env=leak)
        probes = (await sandbox.exec(["cat", "nonce_probe.txt"])).stdout
    finally:
        await sandbox.close()
    results = parse_results(result.stdout, "n0nce-7f3a")
    assert results is not None, result.stderr[-2000:]
    assert results["tests/test_calc.py::test_add"] == "fail", results
    assert results[canary.ids("pytest")[0]] == "fail" and results[canary.ids("pytest")[1]] == "pass"
    assert "n0nce-7f3a" not in result.stderr, "the code under test printed the nonce"
    # The supervisor is not dumpable: its memory, environment and descriptors are closed to the tests.
    assert set(probes.splitlines()) >= {"mem PermissionError", "environ PermissionError", "fd/0 PermissionError"}
