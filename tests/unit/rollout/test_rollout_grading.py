"""The grader's rules without a sandbox: which agent changes reach the grading tree, the canary verdict,
the harness files, environment identity and the Kubernetes image choice."""

from __future__ import annotations

import base64
import json

import pytest

from forgerl.rollout import harness
from forgerl.rollout.grading import Change, refusal, screen, verdict
from forgerl.rollout.sandbox.base import ExecResult, SandboxInfraError, SandboxRequest, TaskEnvironment
from forgerl.rollout.sandbox.environments import EnvironmentBuilder, EnvironmentBuildError
from forgerl.rollout.sandbox.kubernetes import DEFAULT_IMAGE, KubernetesSandbox, KubernetesSandboxFactory
from forgerl.rollout.tasks import Task

pytestmark = pytest.mark.unit


def _task(**extra: object) -> Task:
    values: dict[str, object] = {
        "id": "t/test/x",
        "suite": "t",
        "split": "test",
        "instructions": "",
        "test_command": harness.COMMAND,
        "time_budget_s": 1,
        "baseline_s": 1,
        "files": {"pkg/mod.py": "x = 1\n", "pkg/tests/test_mod.py": "", "setup.cfg": "", ".gitignore": "*.pyc\n"},
        "test_files": {"pkg/tests/test_mod.py": "def test_x(): pass\n"},
        "fail_to_pass": ("pkg/tests/test_mod.py::test_x",),
        "harness": "pytest",
        **extra,
    }
    return Task(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("pkg/mod.py", None),  # the source under repair
        ("pkg/new_helper.py", None),  # a new source module
        ("README.md", None),
        (".gitignore", None),  # a hidden file the task has: the agent may edit it
        ("pkg/tests/test_mod.py", "a test file"),
        ("pkg/tests/__init__.py", "under a test folder"),
        ("pkg/tests/helpers.py", "under a test folder"),
        ("tests/test_new.py", "under a test folder"),  # a folder named tests, even one the task lacks
        ("conftest.py", "conftest.py: pytest loads it"),
        ("pkg/conftest.py", "conftest.py: pytest loads it"),
        ("pytest.ini", "test runner configuration"),
        ("pkg/tox.ini", "test runner configuration"),
        ("setup.cfg", "test runner configuration"),
        ("pyproject.toml", "test runner configuration"),
        (".pytest.ini", "test runner configuration"),
        ("sitecustomize.py", "runs at interpreter start-up"),
        ("pkg/usercustomize.py", "runs at interpreter start-up"),
        ("pkg/evil.pth", "runs at interpreter start-up"),
        ("pkg/__pycache__/mod.cpython-311.pyc", "bytecode"),
        ("mod.pyc", "bytecode"),
        ("evil-1.0.dist-info/entry_points.txt", "package metadata"),
        ("evil.egg-info/entry_points.txt", "package metadata"),
        (".local/lib/python3.11/site-packages/x.py", "hidden path"),
        (".forgerl/run_tests.py", "harness"),
        ("answer.txt", None),
    ],
)
def test_which_changes_reach_the_grading_tree(path: str, reason: str | None) -> None:
    found = refusal(_task(), path)
    assert (found is None) if reason is None else (found is not None and reason in found), found


def test_the_answer_file_is_the_final_answer_not_an_edit() -> None:
    assert "final answer" in (refusal(_task(answer_file="answer.txt"), "answer.txt") or "")


def test_screen_applies_source_edits_and_deletions_and_restores_the_rest() -> None:
    task = _task()
    changes = [
        Change("pkg/mod.py", "file", b"x = 2\n"),
        Change("pkg/extra.py", "file", b"y = 3\n"),
        Change("conftest.py", "file", b"import pytest\n"),
        Change("pkg/tests/test_mod.py", "file", b"def test_x(): assert True\n"),
        Change("link.py", "symlink", note="/etc/passwd"),
        Change("big.py", "too_large", note="9999999"),
        Change(".tmp", "pruned", note=".tmp"),
    ]
    tree = screen(task, changes, deleted=["README.gone", "setup.cfg", "pkg/tests/test_mod.py"])
    assert tree.files == {
        "pkg/mod.py": b"x = 2\n",
        "pkg/extra.py": b"y = 3\n",
        "pkg/tests/test_mod.py": "def test_x(): pass\n",  # the task's test file, not the agent's
        "setup.cfg": "",  # its deletion dropped
        ".gitignore": "*.pyc\n",
    }
    assert set(tree.dropped) == {
        "conftest.py", "pkg/tests/test_mod.py", "link.py", "big.py", ".tmp", "setup.cfg",
    }  # fmt: skip
    assert tree.dropped["link.py"].startswith("a symbolic link (to /etc/passwd)")
    assert tree.dropped["setup.cfg"].startswith("deleted; setup.cfg: test runner configuration")
    assert "README.gone" not in tree.dropped  # not a task file: nothing to delete, nothing dropped


def _run(stdout: str, exit_code: int | None = 0) -> ExecResult:
    return ExecResult(exit_code=exit_code, signal=None, stdout=stdout, stderr="", duration_s=0.1)


def _lines(nonce: str, results: dict[str, str], runner: dict[str, object] | None = None) -> str:
    runner = runner or {"exit": 0, "signal": None, "python": "/env/bin/python"}
    return f"FORGERL_RUNNER {nonce} {json.dumps(runner)}\nFORGERL_RESULTS {nonce} {json.dumps(results)}\n"


def test_the_canary_decides_tampering() -> None:
    task = _task()
    canary = harness.Canary.new()
    must_fail, must_pass = canary.ids("pytest")
    honest = {"pkg/tests/test_mod.py::test_x": "pass", must_fail: "fail", must_pass: "pass"}
    good = verdict(task, _run(_lines("n1", honest)), "n1", canary, {})
    assert good.success and good.performance == 1.0 and good.results == {"pkg/tests/test_mod.py::test_x": "pass"}
    assert good.runner["python"] == "/env/bin/python"
    forced = verdict(task, _run(_lines("n1", {**honest, must_fail: "pass"})), "n1", canary, {"conftest.py": "why"})
    assert not forced.success and forced.performance == 0.0
    assert forced.detail.startswith("tampered: the canary that must fail reported pass")
    assert "dropped 1 agent change(s): conftest.py (why)" in forced.detail
    no_canary = verdict(task, _run(_lines("n1", {"pkg/tests/test_mod.py::test_x": "pass"})), "n1", canary, {})
    assert no_canary.performance == 0.0 and "reported missing, the one that must pass missing" in no_canary.detail
    wrong_nonce = verdict(task, _run(_lines("guess", honest)), "n1", canary, {})
    assert wrong_nonce.performance == 0.0 and "printed no results with this run's nonce" in wrong_nonce.detail
    silent = verdict(task, _run(f"FORGERL_RUNNER n1 {json.dumps({'exit': 0, 'report': 'none'})}\n"), "n1", canary, {})
    assert silent.performance == 0.0 and "the test runner ended (exit code 0) without a report" in silent.detail


def test_canary_names_differ_per_run_and_match_each_runner() -> None:
    a, b = harness.Canary.new(), harness.Canary.new()
    assert len({a.token, b.token}) == 2 and len({a.failing, a.passing, b.failing, b.passing}) == 4
    assert a.ids("pytest")[0] == f".forgerl/canary_{a.token}.py::{a.cls}::{a.failing}"
    assert a.ids("unittest")[1] == f"canary_{a.token}.{a.cls}.{a.passing}"
    assert f"def {a.failing}(self)" in a.source() and f"class {a.cls}(unittest.TestCase)" in a.source()


def test_harness_files_name_the_tests_each_runner_loads() -> None:
    canary = harness.Canary.new()
    ids = ["tests/test_a.py::TestA::test_x", "tests/test_a.py::test_y", "tests/sub/test_b.py::test_z[1-2]"]
    files = harness.harness_files("pytest", ids, canary)
    assert json.loads(files[".forgerl/spec.json"]) == {
        "kind": "pytest",
        "tests": ["tests/sub/test_b.py", "tests/test_a.py"],
        "canary": canary.path,
    }
    assert set(files) == {
        ".forgerl/run_tests.py", ".forgerl/runner_common.py", ".forgerl/pytest_runner.py", ".forgerl/spec.json",
        canary.path,
    }  # fmt: skip
    unit = harness.harness_files("unittest", ["tests.test_a.TestA.test_x", "pkg.tests.test_b.TestB.test_y"], canary)
    assert json.loads(unit[".forgerl/spec.json"])["tests"] == ["pkg.tests.test_b", "tests.test_a"]
    with pytest.raises(ValueError, match="harness 'nose'"):
        harness.harness_files("nose", ids, canary)


def test_an_environment_is_named_by_what_it_holds() -> None:
    builder = EnvironmentBuilder("/var/tmp/forgerl-envs-unit", pip_options=("--no-index",))
    one = TaskEnvironment(python="3", requirements=("pytest==8.3.3", "attrs==24.2.0"))
    same = TaskEnvironment(python="3", requirements=("attrs==24.2.0", "pytest==8.3.3"), image="any:1")
    other = TaskEnvironment(python="3", requirements=("pytest==8.3.4", "attrs==24.2.0"))
    assert builder.path(one) == builder.path(same)  # order and image do not change the virtualenv
    assert builder.path(one) != builder.path(other)
    offline = EnvironmentBuilder("/var/tmp/forgerl-envs-unit", pip_options=("--find-links", "/w"))
    assert offline.path(one) != builder.path(one)  # where packages come from is part of the build
    with pytest.raises(EnvironmentBuildError, match="declare a version such as"):
        builder.path(TaskEnvironment(python="python3; rm -rf /"))


def test_kubernetes_runs_the_declared_image_and_refuses_requirements_without_one() -> None:
    factory = KubernetesSandboxFactory("ns", api=object())
    assert factory.image_for(SandboxRequest()) == DEFAULT_IMAGE
    ready = TaskEnvironment(python="3.12", requirements=("pytest==8.3.3",), image="registry.local/task:1")
    assert factory.image_for(SandboxRequest(environment=ready)) == "registry.local/task:1"
    bare = TaskEnvironment(python="3.12", requirements=("pytest==8.3.3",))
    with pytest.raises(SandboxInfraError, match=r"declares requirements .* but no image"):
        factory.image_for(SandboxRequest(environment=bare))


async def test_kubernetes_keeps_the_nonce_out_of_the_commands_argv() -> None:
    """Inline, stdin would sit in the argv of `timeout` for the whole test run, readable from the tests."""
    factory = KubernetesSandboxFactory("ns", api=object())
    calls: list[list[str]] = []
    factory.exec_in_pod = lambda name, argv: (calls.append(argv), ("", "", 0))[1]  # type: ignore[method-assign]
    sandbox = KubernetesSandbox(factory, "forgerl-sbx-x")
    await sandbox.exec(harness.COMMAND, stdin=b"n0nce-5ecret\n", timeout_s=5)
    encoded = base64.b64encode(b"n0nce-5ecret\n").decode()
    staging, run = calls
    assert encoded in staging[2] and encoded not in run[2] and "n0nce" not in run[2]
    assert "exec < /tmp/.stdin-" in run[2] and "rm -f /tmp/.stdin-" in run[2]
