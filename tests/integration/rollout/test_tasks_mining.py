"""`forgerl tasks mine`: instances mined from the history of a repository this test makes, then accepted by
`forgerl tasks import`; and the agent's sandbox of a mined task holds nothing of the fix.

The expected outcomes are written from how the history was made (which commit fixes what, which tests it
adds, which tests existed and passed before), not from the miner."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from git_repos import commit, git
from typer.testing import CliRunner

from forgerl.cli.main import app
from forgerl.rollout.grading import collect_changes
from forgerl.rollout.sandbox.base import TaskEnvironment
from forgerl.rollout.sandbox.environments import EnvironmentBuilder
from forgerl.rollout.sandbox.local import LocalSandboxFactory
from forgerl.rollout.workspace import open_workspace
from forgerl.tasks.mining import commits
from forgerl.tasks.swebench import build_task, parse_instance

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the local sandbox needs root (namespaces, uid switch)"),
]
BUGGY = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"
FIXED = BUGGY.replace("return a - b\n\n\ndef sub", "return a + b\n\n\ndef sub")
DOCUMENTED = '"""Arithmetic."""\n\n' + FIXED
WITH_MUL = DOCUMENTED + "\n\ndef mul(a, b):\n    return a * b\n"
SUB_TEST = "from calc import sub\n\n\ndef test_sub():\n    assert sub(5, 3) == 2\n"
SUB_TESTS = SUB_TEST + "\n\ndef test_sub_negative():\n    assert sub(-1, 1) == -2\n"
ADD_TEST = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
ADD_TESTS = ADD_TEST + "\n\ndef test_add_zero():\n    assert add(0, 0) == 0\n"
MUL_TEST = "from calc import mul\n\n\ndef test_mul():\n    assert mul(4, 5) == 20\n"
FIX_MESSAGE = "Fix add: it returned a - b\n\nadd(2, 3) gave -1; it adds now."
MERGE_MESSAGE = "Merge pull request #7 from acme/mul\n\nAdd mul(a, b)"


def make_history(repo: Path) -> dict[str, str]:
    """acme/calc's history, oldest first, by what each commit is; one PR branch merged with --no-ff."""
    repo.mkdir(parents=True)
    git(repo, "init", "-q")
    git(repo, "symbolic-ref", "HEAD", "refs/heads/main")
    made = {"root": commit(repo, "calc with a bug in add", {"calc.py": BUGGY, "tests/test_calc_base.py": SUB_TEST})}
    made["docs"] = commit(repo, "docs: usage", {"README.md": "Use add and sub.\n"})
    made["fix"] = commit(repo, FIX_MESSAGE, {"calc.py": FIXED, "tests/test_calc.py": ADD_TEST})
    made["tests_only"] = commit(repo, "tests: sub of negatives", {"tests/test_calc_base.py": SUB_TESTS})
    made["no_failing"] = commit(
        repo, "docstring, add of zero", {"calc.py": DOCUMENTED, "tests/test_calc.py": ADD_TESTS}
    )
    git(repo, "checkout", "-q", "-b", "mul")
    made["pr_branch"] = commit(repo, "add mul", {"calc.py": WITH_MUL, "tests/test_mul.py": MUL_TEST})
    git(repo, "checkout", "-q", "main")
    git(repo, "merge", "-q", "--no-ff", "-m", MERGE_MESSAGE, "mul")
    made["merge"] = git(repo, "rev-parse", "HEAD").strip()
    broken = {"calc.py": WITH_MUL + "\n# tidy\n", "conftest.py": "raise RuntimeError('broken test setup')\n"}
    made["tests_error"] = commit(repo, "tidy, with a broken conftest", broken)
    git(repo, "tag", "v1.0", made["fix"])  # a tag past the fix: the sandbox must not have it
    return made


@dataclass
class Setup:
    clones: Path
    made: dict[str, str]  # commit ids by what the commit is
    specs: Path
    sandbox_root: Path
    builder: EnvironmentBuilder
    environment: TaskEnvironment

    def cli(self, *argv: str) -> str:
        """Run `forgerl` with these sandboxes and environments; its output (stderr too)."""
        pip = [arg for option in self.builder.pip_options for arg in ("--pip-option", option)]
        sandboxes = ["--sandbox-root", str(self.sandbox_root), "--env-root", str(self.builder.root), *pip]
        result = CliRunner().invoke(app, [*argv, "--specs", str(self.specs), *sandboxes])
        assert result.exit_code == 0, result.output
        return result.output

    def mine(self, out: Path, *extra: str) -> str:
        return self.cli("tasks", "mine", str(self.clones / "acme__calc"), "--version", "1.0", "--out", str(out), *extra)


@pytest.fixture
def setup(tmp_path: Path, sandbox_root: Path, env_with_pytest: tuple[EnvironmentBuilder, TaskEnvironment]) -> Setup:
    builder, env = env_with_pytest
    made = make_history(tmp_path / "clones" / "acme__calc")
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"acme/calc": {"1.0": {"python": env.python, "requirements": list(env.requirements)}}}))
    return Setup(tmp_path / "clones", made, specs, sandbox_root, builder, env)


def test_mine_then_import(setup: Setup, tmp_path: Path) -> None:
    made, clone = setup.made, setup.clones / "acme__calc"
    out = tmp_path / "mined.jsonl"
    output = setup.mine(out)

    instances = [json.loads(line) for line in out.read_text().splitlines()]
    assert [i["instance_id"] for i in instances] == [f"acme__calc-{made[k][:12]}" for k in ("merge", "fix")]
    merge, fix = instances
    assert (fix["base_commit"], fix["problem_statement"], fix["repo"]) == (made["docs"], FIX_MESSAGE, "acme/calc")
    assert json.loads(fix["FAIL_TO_PASS"]) == ["tests/test_calc.py::test_add"]
    assert json.loads(fix["PASS_TO_PASS"]) == ["tests/test_calc_base.py::test_sub"]
    assert fix["patch"] == git(clone, "diff", made["docs"], made["fix"], "--", "calc.py")
    assert fix["test_patch"] == git(clone, "diff", made["docs"], made["fix"], "--", "tests")
    # the PR counts as one change against the merge's first parent, with the merge message as its text
    assert (merge["base_commit"], merge["problem_statement"]) == (made["no_failing"], MERGE_MESSAGE)
    assert json.loads(merge["FAIL_TO_PASS"]) == ["tests/test_mul.py::test_mul"]
    assert json.loads(merge["PASS_TO_PASS"]) == [
        "tests/test_calc.py::test_add",
        "tests/test_calc.py::test_add_zero",
        "tests/test_calc_base.py::test_sub",
        "tests/test_calc_base.py::test_sub_negative",
    ]
    # every commit of the first-parent history has its outcome, with the reason when skipped
    assert "2 instance(s) from 7 commit(s); skipped 5" in output
    for key, reason in [
        ("tests_error", "skipped, tests error: at the parent with the test patch"),
        ("no_failing", "skipped, no failing test: 4 test(s) pass at the commit, all of them before it too"),
        ("tests_only", "skipped, only tests changed"),
        ("docs", "skipped, no tests touched"),
        ("root", "skipped, root commit"),
    ]:
        assert f"{made[key][:12]} " in output and reason in output.split(made[key][:12], 2)[-1].splitlines()[0]
    assert made["pr_branch"][:12] not in output  # the PR's own commit is not on the first-parent history

    verdicts = tmp_path / "verdicts.jsonl"
    output = setup.cli("tasks", "import", str(out), "--repos", str(setup.clones), "--out", str(verdicts))
    assert "2 valid, 0 invalid of 2 instance(s)" in output


def test_max_and_since(setup: Setup, tmp_path: Path) -> None:
    made = setup.made
    since_tests_only = commits(setup.clones / "acme__calc", since=made["tests_only"])
    assert since_tests_only == [made["tests_error"], made["merge"], made["no_failing"]]
    out = tmp_path / "mined.jsonl"
    output = setup.mine(out, "--since", made["docs"], "--max", "1")
    assert "1 instance(s) from 2 commit(s)" in output  # stopped at the merge, the first instance
    assert [json.loads(line)["instance_id"] for line in out.read_text().splitlines()] == [
        f"acme__calc-{made['merge'][:12]}"
    ]


def blob_id(text: str) -> str:
    data = text.encode()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id of a blob


def test_sandbox_of_a_mined_task_holds_no_history_past_base(setup: Setup) -> None:
    made, clone = setup.made, setup.clones / "acme__calc"
    raw = {
        "instance_id": "acme__calc-fix",
        "repo": "acme/calc",
        "base_commit": made["docs"],
        "patch": git(clone, "diff", made["docs"], made["fix"], "--", "calc.py"),
        "test_patch": git(clone, "diff", made["docs"], made["fix"], "--", "tests"),
        "problem_statement": "add(2, 3) gives -1",
        "FAIL_TO_PASS": ["tests/test_calc.py::test_add"],
    }
    task, _ = build_task(parse_instance(raw), clone, setup.environment)
    # What git holds of the base commit's tree: the same objects must be all the sandbox has, bar its commit.
    listing = git(clone, "ls-tree", "-r", "-t", made["docs"]).splitlines()
    base_objects = {line.split()[2] for line in listing} | {git(clone, "rev-parse", f"{made['docs']}^{{tree}}").strip()}
    fix_objects = {blob_id(FIXED), blob_id(ADD_TEST), made["fix"], git(clone, "rev-parse", "v1.0").strip()}
    assert not fix_objects & base_objects

    async def inspect() -> dict[str, str]:
        factory = LocalSandboxFactory(setup.sandbox_root, environments=setup.builder)
        sandbox = await open_workspace(factory, task, labels={}, time_budget_s=120.0)
        commands = {
            "log": "git log --all --format='%H %s%n%b'",
            "reflog": "git reflog",
            "tags": "git tag",
            "refs": "git for-each-ref --format='%(refname)'",
            "objects": "git cat-file --batch-all-objects --batch-check",
            "grep": "grep -r -a -l -e 'Fix add' -e 'return a + b' -e 'test_add' -e v1.0 .git; echo rc=$?",
            "status": "git status --porcelain",
        }
        try:
            done = {name: await sandbox.exec(command) for name, command in commands.items()}
            # the grader reads the work tree only: the repository is not an agent change, nor in its caps
            assert await collect_changes(sandbox, task) == ([], [])
        finally:
            await sandbox.close()
        assert all(r.ok for r in done.values()), {n: r.stderr for n, r in done.items()}
        return {name: r.stdout for name, r in done.items()}

    seen = asyncio.run(inspect())
    log_lines = [line for line in seen["log"].splitlines() if line.strip()]
    assert len(log_lines) == 1 and "Fix add" not in seen["log"] and made["fix"] not in seen["log"]
    assert len(seen["reflog"].splitlines()) == 1 and seen["tags"] == ""
    assert seen["refs"].split() == ["refs/heads/main"]
    objects = {line.split()[0]: line.split()[1] for line in seen["objects"].splitlines()}
    assert sorted(objects.values()).count("commit") == 1
    assert {sha for sha, kind in objects.items() if kind != "commit"} == base_objects
    assert not fix_objects & set(objects)
    assert seen["grep"].strip() == "rc=1"  # grep found no file of .git with the fix's text or its tag
    assert seen["status"] == ""  # the work tree is the commit: the agent's `git diff` shows only its edits
