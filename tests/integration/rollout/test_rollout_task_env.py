"""Task environments in the local sandbox: a pytest task with its own requirements, graded where the
machine's python3 has neither pytest nor the task's package.

The environment (pytest and `forgerl-demo-units`, from wheels made on this machine) is built once per
session by the `env_with_pytest` fixture; these tests check that it is what the sandbox runs, that it is
read-only there, that a second request finds it cached, and that a whole episode (agent tools and
grading) runs on it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from rollout_tiny_tasks import BUGGY, FIXED, pytest_task

from forgerl.rollout.episode import EpisodeRunner, EpisodeSpec
from forgerl.rollout.grading import run_tests
from forgerl.rollout.sandbox.base import FILESYSTEM, SandboxInfraError, SandboxLimits, SandboxRequest, TaskEnvironment
from forgerl.rollout.sandbox.environments import MARKER, EnvironmentBuilder, EnvironmentBuildError
from forgerl.rollout.sandbox.local import LocalSandboxFactory
from forgerl.rollout.tasks import GoldSolution, Suite, Task, ToolCallSpec

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
EnvFixture = tuple[EnvironmentBuilder, TaskEnvironment]


async def test_a_pytest_task_runs_and_grades_on_its_own_environment(
    sandbox_root: Path, limits: SandboxLimits, env_with_pytest: EnvFixture
) -> None:
    builder, env = env_with_pytest
    factory = LocalSandboxFactory(sandbox_root, limits, environments=builder)
    task = pytest_task(env)
    bare = await factory.create(SandboxRequest())
    try:  # the machine's python3, which a task without an environment gets, has neither package
        for module in ("pytest", "demo_units"):
            missing = await bare.exec(["python3", "-c", f"import {module}"])
            assert missing.exit_code == 1 and "ModuleNotFoundError" in missing.stderr, missing
    finally:
        await bare.close()
    work = await factory.create(SandboxRequest(files=task.files, environment=env))
    try:
        where = await work.exec(["python3", "-c", "import sys, pytest, demo_units; print(sys.prefix)"])
        assert where.ok and where.stdout.strip() == str(builder.path(env)), where
        tamper = await work.exec(["sh", "-c", 'echo x > "$VIRTUAL_ENV/lib/python3.11/site-packages/evil.pth"'])
        assert not tamper.ok and FILESYSTEM in tamper.violations, tamper  # read-only inside the sandbox
        buggy = await run_tests(factory, work, task, "")
        assert (await work.write_files({"calc.py": FIXED})).ok
        fixed = await run_tests(factory, work, task, "")
    finally:
        await work.close()
    assert not buggy.success and buggy.results == {
        "tests/test_calc.py::test_add": "fail",
        "tests/test_calc.py::test_sub": "pass",
        "tests/test_calc.py::test_units": "pass",  # imports demo_units: the declared requirement
    }, buggy
    assert fixed.success and fixed.performance == 1.0, fixed
    assert str(fixed.runner["pytest_file"]).startswith(str(builder.path(env))), fixed.runner
    assert str(fixed.runner["python"]).startswith(str(builder.path(env))), fixed.runner
    marker = builder.path(env) / MARKER
    built_at = marker.stat().st_mtime_ns
    assert builder.ensure(env) == builder.path(env)
    assert marker.stat().st_mtime_ns == built_at, "rebuilt, not cached"


async def test_a_requirement_that_cannot_be_installed_fails_the_sandbox_not_the_agent(
    sandbox_root: Path, limits: SandboxLimits, env_with_pytest: EnvFixture
) -> None:
    builder, _ = env_with_pytest
    factory = LocalSandboxFactory(sandbox_root, limits, environments=builder)
    missing = TaskEnvironment(python="3", requirements=("forgerl-no-such-package==1.0",))
    with pytest.raises(EnvironmentBuildError, match=r"pip install failed .*forgerl-no-such-package"):
        await factory.create(SandboxRequest(environment=missing))
    assert not builder.path(missing).exists(), "a failed build must not be left for the next episode"
    assert isinstance(EnvironmentBuildError("x"), SandboxInfraError)  # rollout retries or reports it
    with pytest.raises(EnvironmentBuildError, match=r"python3\.1 is not installed"):
        await factory.create(SandboxRequest(environment=TaskEnvironment(python="3.1")))


class TinySuite(Suite):
    """The pytest task as a suite, with the gold fix and a test run through the bash tool."""

    name = "tiny"
    splits = ("test",)

    def __init__(self, task: Task) -> None:
        self.task = task

    def tasks(self, split: str) -> Sequence[Task]:
        return [self.task]

    def gold(self, task: Task) -> GoldSolution:
        old, new = "return a - b\n\n\ndef sub", "return a + b\n\n\ndef sub"
        assert BUGGY.replace(old, new) == FIXED
        fix = ToolCallSpec("str_replace", {"path": "calc.py", "old": old, "new": new})
        check = ToolCallSpec("bash", {"command": "python3 -m pytest -q -p no:cacheprovider tests"})
        return GoldSolution(turns=((fix,), (check,)), final_answer="Fixed add.")


async def test_an_episode_runs_the_agent_and_the_grader_on_the_environment(
    sandbox_root: Path, limits: SandboxLimits, env_with_pytest: EnvFixture
) -> None:
    builder, env = env_with_pytest
    task = pytest_task(env)
    runner = EpisodeRunner(LocalSandboxFactory(sandbox_root, limits, environments=builder), {"tiny": TinySuite(task)})
    fixed = await runner.run(EpisodeSpec(run_id="it", task=task, scaffold_version="oracle", publish=False))
    assert fixed.success and fixed.tool_errors == 0 and fixed.tests.dropped == {}, (fixed.tests, fixed.stopped)
    untouched = await runner.run(EpisodeSpec(run_id="it", task=task, scaffold_version="noop", publish=False))
    assert not untouched.success and untouched.tests.results["tests/test_calc.py::test_units"] == "pass"


async def test_a_thousand_test_ids_fit_the_result_line(
    sandbox_root: Path, limits: SandboxLimits, env_with_pytest: EnvFixture
) -> None:
    """SWE-bench tasks list hundreds to thousands of PASS_TO_PASS ids: 1,500 here, ~100 KB of result line."""
    builder, env = env_with_pytest
    many = (
        "import pytest\n\n\n@pytest.mark.parametrize('case', range(1500))\n"
        "def test_a_long_name_for_each(case):\n    pass\n"
    )
    base = pytest_task(env)
    p2p = tuple(f"tests/test_many.py::test_a_long_name_for_each[{i}]" for i in range(1500))
    task = dataclasses.replace(
        base,
        files={**base.files, "tests/test_many.py": many},
        test_files={**base.test_files, "tests/test_many.py": many},
        pass_to_pass=p2p,
    )
    factory = LocalSandboxFactory(sandbox_root, limits, environments=builder)
    work = await factory.create(SandboxRequest(files={**task.files, "calc.py": FIXED}, environment=env))
    try:
        grading = await run_tests(factory, work, task, "")
    finally:
        await work.close()
    assert len(json.dumps(grading.results)) > 64 << 10
    assert grading.success and len(grading.results) == 1501, grading.detail


async def test_a_pytest_task_without_an_environment_says_what_is_missing(
    sandbox_root: Path, limits: SandboxLimits
) -> None:
    task = dataclasses.replace(pytest_task(TaskEnvironment()), environment=None)
    factory = LocalSandboxFactory(sandbox_root, limits)
    work = await factory.create(SandboxRequest(files={**task.files, "calc.py": FIXED}))
    try:
        grading = await run_tests(factory, work, task, "")
    finally:
        await work.close()
    assert not grading.success and "tampered" not in grading.detail, grading.detail
    assert "pytest is not installed for /usr/bin/python3: declare it in the task's environment" in grading.detail
