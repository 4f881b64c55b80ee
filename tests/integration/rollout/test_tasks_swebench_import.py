"""`forgerl tasks import`: SWE-bench-format instances built from a repository this test creates, validated
by running their tests in the local sandbox without and with the gold patch; every instance gets a verdict.

The expectations are written from how the repository was made (which commit has the bug, which test
needs the fix), not from the importer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from git_repos import git
from typer.testing import CliRunner

from forgerl.cli.main import app
from forgerl.rollout.sandbox.base import TaskEnvironment
from forgerl.rollout.sandbox.environments import EnvironmentBuilder

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
BUGGY = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"
FIXED = BUGGY.replace("return a - b\n\n\ndef sub", "return a + b\n\n\ndef sub")
BASE_TEST = "from calc import sub\n\n\ndef test_sub():\n    assert sub(5, 3) == 2\n"
NEW_TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


def make_repo(root: Path) -> tuple[str, str, str]:
    """acme/calc: the base commit has the bug; the fix commit fixes calc.py and adds tests/test_calc.py.
    Returns (base commit, gold patch, test patch)."""
    repo = root / "acme__calc"
    (repo / "tests").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "calc.py").write_text(BUGGY)
    (repo / "tests" / "test_calc_base.py").write_text(BASE_TEST)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "calc with a bug")
    base = git(repo, "rev-parse", "HEAD").strip()
    (repo / "calc.py").write_text(FIXED)
    (repo / "tests" / "test_calc.py").write_text(NEW_TEST)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "fix add")
    return base, git(repo, "diff", base, "HEAD", "--", "calc.py"), git(repo, "diff", base, "HEAD", "--", "tests")


def test_import_validates_every_instance(
    tmp_path: Path, sandbox_root: Path, env_with_pytest: tuple[EnvironmentBuilder, TaskEnvironment]
) -> None:
    builder, env = env_with_pytest
    base, gold, tests = make_repo(tmp_path / "clones")
    instance = {
        "instance_id": "acme__calc-1",
        "repo": "acme/calc",
        "version": "1.0",
        "base_commit": base,
        "patch": gold,
        "test_patch": tests,
        "problem_statement": "add(2, 3) returns -1",
        "FAIL_TO_PASS": json.dumps(["tests/test_calc.py::test_add"]),  # SWE-bench's JSON text
        "PASS_TO_PASS": ["tests/test_calc_base.py::test_sub"],  # SWE-Gym's list
    }
    comment_only = "--- a/calc.py\n+++ b/calc.py\n@@ -1,2 +1,3 @@\n+# tidy\n def add(a, b):\n     return a - b\n"
    lines = [
        instance,
        {**instance, "instance_id": "passes-early", "FAIL_TO_PASS": ["tests/test_calc_base.py::test_sub"]},
        {**instance, "instance_id": "gold-does-not-fix", "patch": comment_only},
        {
            **instance,
            "instance_id": "test-patch-broken",
            "test_patch": "--- a/nope.py\n+++ b/nope.py\n@@ -1 +1 @@\n-x\n+y\n",
        },
        {**instance, "instance_id": "no-clone", "repo": "acme/elsewhere"},
        {**instance, "instance_id": "no-spec", "version": "9.9"},
    ]
    file = tmp_path / "swe.jsonl"
    file.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{not json\n")
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"acme/calc": {"1.0": {"python": env.python, "requirements": list(env.requirements)}}}))
    out = tmp_path / "verdicts.jsonl"
    pip = [arg for option in builder.pip_options for arg in ("--pip-option", option)]
    argv = ["tasks", "import", str(file), "--repos", str(tmp_path / "clones"), "--specs", str(specs), "--out", str(out)]
    argv += ["--sandbox-root", str(sandbox_root), "--env-root", str(builder.root), *pip]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "1 valid, 6 invalid of 7 instance(s)" in result.output

    verdicts = {v["instance_id"]: v for v in map(json.loads, out.read_text().splitlines())}
    good = verdicts["acme__calc-1"]
    assert good["valid"] and good["reason"] == ""
    assert good["before"] == {"tests/test_calc.py::test_add": "fail", "tests/test_calc_base.py::test_sub": "pass"}
    assert good["after"] == {"tests/test_calc.py::test_add": "pass", "tests/test_calc_base.py::test_sub": "pass"}
    task = good["task"]
    assert task["files"]["calc.py"] == BUGGY and "tests/test_calc.py" not in task["files"]  # the agent's start
    assert task["test_files"] == {"tests/test_calc.py": NEW_TEST} and task["harness"] == "pytest"
    assert task["environment"]["requirements"] == list(env.requirements)
    # three instances were graded twice each on acme/calc 1.0's environment, built once and cached
    assert [d.name for d in builder.root.iterdir() if d.is_dir()] == [builder.path(env).name]
    reasons = {name: v["reason"] for name, v in verdicts.items() if not v["valid"]}
    assert "already pass without the gold patch: tests/test_calc_base.py::test_sub" in reasons["passes-early"]
    assert "do not pass with the gold patch: tests/test_calc.py::test_add (fail)" in reasons["gold-does-not-fix"]
    assert "test patch does not apply" in reasons["test-patch-broken"]
    assert "no clone of acme/elsewhere" in reasons["no-clone"]
    assert "no environment for acme/calc version '9.9'" in reasons["no-spec"]
    assert "line 7 is not JSON" in reasons["line-7"]
