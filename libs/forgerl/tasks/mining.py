"""SWE-bench-format instances mined from a repository's own history.

Walks the first-parent history (newest first): each commit, or merge commit of a pull request, is compared
with its first parent, so a merged PR counts as one change with the merge message as its text. Its
changed files split in two by path: test files (under a `test`/`tests`/`testing` folder, `test_*.py`,
`*_test.py`, `conftest.py`) make the `test_patch`, every other file the gold `patch`. The tests run twice,
each time in a fresh sandbox on the repository's environment: at the parent with the test patch, and at
the commit. FAIL_TO_PASS are the tests passing at the commit and not before (failing, erroring, or absent
because the test file did not import); PASS_TO_PASS are the tests passing both times. A commit with at
least one FAIL_TO_PASS is then validated the way `forgerl tasks import` validates (swebench.check, with
the grader's pytest harness): only instances that pass it are written. Every commit gets an outcome:
kept, or skipped with its reason.

The test command (default: pytest over the whole tree) is run with `sh -c` in the sandbox; it must print
pytest's `-rA` short summary (`PASSED tests/test_m.py::test_x`, `FAILED ...`), from which each test's
status is read. Exit codes 0, 1 and 5 (pytest: passed, some failed, none collected) are test outcomes;
any other code, or a run with tests but no summary, is a test error and the commit is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from forgerl.rollout.grading import GRADING_TIMEOUT_S, RESULTS_OUTPUT_BYTES
from forgerl.rollout.sandbox.base import SandboxFactory, SandboxRequest, TaskEnvironment
from forgerl.tasks.swebench import ImportProblem, Instance, build_task, check, fixed, run_git

# --continue-on-collection-errors: a new test file that imports what only the fix adds must not stop the
# run before the other tests (pytest interrupts the whole session on a collection error by default).
DEFAULT_TEST_COMMAND = "python3 -m pytest -rA -p no:cacheprovider --continue-on-collection-errors"
TEST_FOLDERS = frozenset({"test", "tests", "testing"})
PYTEST_OUTCOMES = frozenset({0, 1, 5})  # pytest's exit codes: all passed, some failed, none collected
NO_TESTS_COLLECTED = 5
_SUMMARY_STATUS = {"PASSED": "pass", "FAILED": "fail", "ERROR": "error", "XFAIL": "xfail", "XPASS": "xfail"}

# Why a commit is skipped: the summary counts commits by these.
ROOT_COMMIT = "root commit"
NO_TESTS = "no tests touched"
ONLY_TESTS = "only tests changed"
BUILD_FAILED = "cannot be built"
TESTS_ERROR = "tests error"
NO_FAILING_TEST = "no failing test"
INVALID = "fails validation"


class Skipped(Exception):
    """Why a commit gives no instance: `kind` (one of the names above) and the details."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Mined:
    """One commit's outcome: the instance it gave, or why it was skipped (`skip` the kind, `reason` why)."""

    commit: str
    subject: str
    instance: Instance | None = None
    skip: str = ""
    reason: str = ""

    def line(self) -> str:
        if self.instance is not None:
            f2p, p2p = len(self.instance.fail_to_pass), len(self.instance.pass_to_pass)
            return f"{self.commit[:12]} {self.subject[:60]}: kept ({f2p} FAIL_TO_PASS, {p2p} PASS_TO_PASS)"
        return f"{self.commit[:12]} {self.subject[:60]}: skipped, {self.skip}: {self.reason}"


def repo_name(clone: Path) -> str:
    """owner/name from SWE-bench's clone layout `owner__name`; `local/<folder>` otherwise."""
    owner, sep, name = clone.resolve().name.partition("__")
    return f"{owner}/{name}" if sep and owner and name else f"local/{clone.resolve().name}"


def is_test_path(path: str) -> bool:
    pure = PurePosixPath(path)
    name = pure.name
    return (
        bool(TEST_FOLDERS & set(pure.parts[:-1]))
        or (name.startswith("test_") and name.endswith(".py"))
        or name.endswith("_test.py")
        or name == "conftest.py"
    )


def commits(clone: Path, rev: str = "HEAD", since: str | None = None) -> list[str]:
    """The first-parent history of `rev`, newest first, after `since` when given."""
    for name in filter(None, (rev, since)):
        run_git(clone, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    spec = f"{since}..{rev}" if since else rev
    return run_git(clone, "rev-list", "--first-parent", spec).decode().split()


def parse_pytest_summary(output: str) -> dict[str, str] | None:
    """Each test's status from pytest's `-rA` short summary (its last one), None without one; lines without
    a node id (a file that failed to import, a skip reason) are left out."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if "short test summary info" in line]
    if not starts:
        return None
    results: dict[str, str] = {}
    for line in lines[starts[-1] + 1 :]:
        word, _, rest = line.partition(" ")
        node = _node_id(rest.strip())
        if word in _SUMMARY_STATUS and "::" in node:
            results[node] = _SUMMARY_STATUS[word]
    return results


def _node_id(rest: str) -> str:
    """The node id of a summary line's `<node id>[ - <message>]`: a parametrized id (`test_x[a - b]`) may
    hold " - " itself, so a cut is taken only where the brackets are closed."""
    parts = rest.split(" - ")
    for end in range(1, len(parts)):
        node = " - ".join(parts[:end])
        if "[" not in node or node.endswith("]"):
            return node
    return rest


async def run_suite(
    sandboxes: SandboxFactory, files: Mapping[str, str], environment: TaskEnvironment, command: str
) -> dict[str, str] | str:
    """Each test's status after `command` on `files` in a fresh sandbox, or why there is none."""
    sandbox = await sandboxes.create(
        SandboxRequest(
            files=dict(files),
            labels={"forgerl/phase": "mining"},
            time_budget_s=GRADING_TIMEOUT_S + 60.0,
            environment=environment,
        )
    )
    try:
        result = await sandbox.exec(command, timeout_s=GRADING_TIMEOUT_S, output_bytes=RESULTS_OUTPUT_BYTES)
    finally:
        await sandbox.close()
    results = parse_pytest_summary(result.stdout)
    if result.exit_code == NO_TESTS_COLLECTED and results is None:
        return {}
    if result.timed_out or result.exit_code not in PYTEST_OUTCOMES or results is None:
        last = (result.stdout.strip() or result.stderr.strip()).splitlines()[-1:] or [""]
        what = "" if results is not None else ", no pytest -rA summary"
        return f"{command!r}: {result.describe()}{what}; last line: {last[0][-300:]}"
    return results


@dataclass(frozen=True)
class Miner:
    """What mining needs beside the commits: the clone, its name and version, the environment, the command."""

    sandboxes: SandboxFactory
    clone: Path
    repo: str
    version: str
    environment: TaskEnvironment
    test_command: str = DEFAULT_TEST_COMMAND

    async def mine_commit(self, commit: str) -> Mined:
        fields = run_git(self.clone, "log", "-1", "--format=%P%x00%cI%x00%s%x00%B", commit).decode().split("\0")
        parents, created_at, subject, message = fields[0].split(), fields[1], fields[2], fields[3].strip()
        try:
            if not parents:
                raise Skipped(ROOT_COMMIT, "no parent to start from")
            patch, test_patch = self.split(commit, parents[0])
            owner, _, name = self.repo.partition("/")
            instance = Instance(
                instance_id=f"{owner}__{name}-{commit[:12]}",
                repo=self.repo,
                base_commit=parents[0],
                patch=patch,
                test_patch=test_patch,
                fail_to_pass=(),
                pass_to_pass=(),
                version=self.version,
                problem_statement=message,
                created_at=created_at,
            )
            return Mined(commit, subject, instance=await self.with_tests(instance))
        except Skipped as skipped:
            return Mined(commit, subject, skip=skipped.kind, reason=skipped.reason)

    def split(self, commit: str, parent: str) -> tuple[str, str]:
        """(patch, test_patch): the commit's change to source files and to test files."""
        changed = run_git(self.clone, "diff", "--name-only", "--no-renames", "-z", parent, commit).decode()
        paths = [p for p in changed.split("\0") if p]
        tests = [p for p in paths if is_test_path(p)]
        source = [p for p in paths if not is_test_path(p)]
        if not tests:
            raise Skipped(NO_TESTS, f"changes {len(source)} file(s), none of them tests")
        if not source:
            raise Skipped(ONLY_TESTS, f"changes {len(tests)} test file(s) and no source")

        def diff(files: Sequence[str]) -> str:
            args = ("diff", "--binary", "--no-renames", parent, commit, "--", *files)
            try:
                return run_git(self.clone, *args).decode()
            except UnicodeDecodeError:
                raise Skipped(BUILD_FAILED, f"the diff of {', '.join(files[:3])} is not UTF-8 text") from None

        return diff(source), diff(tests)

    async def with_tests(self, instance: Instance) -> Instance:
        """The instance with the tests it fixes and keeps, after both runs and the import's validation."""
        try:
            task, gold = build_task(instance, self.clone, self.environment)
        except ImportProblem as problem:
            raise Skipped(BUILD_FAILED, str(problem)) from None
        runs = []
        for files, when in ((task.files, "at the parent with the test patch"), (fixed(task, gold), "at the commit")):
            results = await run_suite(self.sandboxes, {**files, **task.test_files}, self.environment, self.test_command)
            if isinstance(results, str):
                raise Skipped(TESTS_ERROR, f"{when}: {results}")
            runs.append(results)
        before, after = runs
        passing = sorted(t for t, status in after.items() if status == "pass")
        fail_to_pass = tuple(t for t in passing if before.get(t) != "pass")
        pass_to_pass = tuple(t for t in passing if before.get(t) == "pass")
        if not fail_to_pass:
            failing = sorted(t for t, status in after.items() if status != "pass")
            why = f"{len(passing)} test(s) pass at the commit, all of them before it too"
            raise Skipped(NO_FAILING_TEST, why + (f"; not passing at it: {', '.join(failing[:5])}" if failing else ""))
        task = dataclasses.replace(task, fail_to_pass=fail_to_pass, pass_to_pass=pass_to_pass)
        verdict = await check(self.sandboxes, task, gold)
        if not verdict.valid:
            raise Skipped(INVALID, verdict.reason)
        return dataclasses.replace(instance, fail_to_pass=fail_to_pass, pass_to_pass=pass_to_pass)


async def mine(
    miner: Miner, history: Sequence[str], *, max_instances: int | None = None, progress: Callable[[str], None]
) -> list[Mined]:
    """Each commit's outcome, newest first, until `max_instances` are kept; `progress` gets a line each."""
    outcomes: list[Mined] = []
    for number, commit in enumerate(history, start=1):
        started = time.monotonic()
        outcome = await miner.mine_commit(commit)
        outcomes.append(outcome)
        progress(f"[{number}/{len(history)}] {outcome.line()} ({time.monotonic() - started:.1f} s)")
        if max_instances is not None and sum(o.instance is not None for o in outcomes) >= max_instances:
            break
    return outcomes


def write_instances(outcomes: Sequence[Mined], out: Path) -> int:
    """The kept instances as SWE-bench JSONL (what `forgerl tasks import` reads); returns how many."""
    kept = [o.instance for o in outcomes if o.instance is not None]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(i.to_json()) + "\n" for i in kept))
    return len(kept)


def summary(outcomes: Sequence[Mined]) -> list[str]:
    """Lines for the end of a run: how many kept, skipped by kind, and every skipped commit with its reason."""
    kept = sum(o.instance is not None for o in outcomes)
    kinds = Counter(o.skip for o in outcomes if o.instance is None)
    counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    lines = [
        f"{kept} instance(s) from {len(outcomes)} commit(s); skipped {len(outcomes) - kept}"
        + (f": {counts}" if counts else "")
    ]
    lines += [f"  {o.line()}" for o in outcomes if o.instance is None]
    return lines
