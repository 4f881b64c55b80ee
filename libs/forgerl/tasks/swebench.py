"""SWE-bench / SWE-Gym-format instances as ForgeRL tasks, each validated before it is kept.

An instance (one JSON object a line) names a repository, a `base_commit`, the gold `patch`, the
`test_patch` that adds the tests, and the pytest node ids that must go from failing to passing
(`FAIL_TO_PASS`) or keep passing (`PASS_TO_PASS`; SWE-bench stores both as JSON text, SWE-Gym as lists).
The repository comes from a local clone under `--repos DIR` (`DIR/owner__name`, SWE-bench's layout, or
`DIR/owner/name`); nothing is fetched.

The task is the tree at `base_commit` (the agent's work directory; text files only) with the files the
test patch writes as its test files, added at grading over the agent's. What the tests run with comes
from the specs file, per repository and version: `{"owner/name": {"1.0": {"python": "3.11",
"requirements": ["pytest==8.3.3", ...]}}}`; the local sandbox builds that environment once and caches it
(forgerl.rollout.sandbox.environments: the cache key is the interpreter and the requirements, so every
instance of one repo@version shares one build).

Validation runs the grader itself (forgerl.rollout.grading.run_tests, with the built-in pytest harness)
twice: on the base tree and on the base tree with the gold patch. An instance is valid when every
FAIL_TO_PASS test does not pass before and passes after, and every PASS_TO_PASS test passes both times.
Every instance gets a verdict line, with the reason when it is invalid or could not be built.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgerl.rollout.grading import run_tests
from forgerl.rollout.sandbox.base import SandboxFactory, SandboxRequest, TaskEnvironment
from forgerl.rollout.tasks import Grading, Task

SUITE = "swebench"
# An imported task's episode budget and speed baseline (SWE-bench publishes neither): 30 min / 10 min.
TIME_BUDGET_S = 1800.0
BASELINE_S = 600.0
GIT_TIMEOUT_S = 120.0


class ImportProblem(Exception):
    """Why one instance could not be turned into a task (it is reported, never dropped)."""


@dataclass(frozen=True)
class Instance:
    instance_id: str
    repo: str
    base_commit: str
    patch: str
    test_patch: str
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]
    version: str = ""
    problem_statement: str = ""
    created_at: str = ""

    def to_json(self) -> dict[str, Any]:
        """The instance as a SWE-bench line (FAIL_TO_PASS / PASS_TO_PASS as JSON text, as SWE-bench has them)."""
        return {
            "instance_id": self.instance_id,
            "repo": self.repo,
            "base_commit": self.base_commit,
            "patch": self.patch,
            "test_patch": self.test_patch,
            "problem_statement": self.problem_statement,
            "hints_text": "",
            "created_at": self.created_at,
            "version": self.version,
            "FAIL_TO_PASS": json.dumps(list(self.fail_to_pass)),
            "PASS_TO_PASS": json.dumps(list(self.pass_to_pass)),
        }


@dataclass
class Verdict:
    """One instance's outcome: valid or not and why, the test results before and after the gold patch."""

    instance_id: str
    valid: bool
    reason: str
    before: Mapping[str, str] = field(default_factory=dict)
    after: Mapping[str, str] = field(default_factory=dict)
    task: Task | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "valid": self.valid,
            "reason": self.reason,
            "before": dict(self.before),
            "after": dict(self.after),
            "task": self.task.to_json() if self.task is not None else None,
        }


def _ids(raw: Any, name: str) -> tuple[str, ...]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(value, list) or not all(isinstance(i, str) for i in value):
        raise ImportProblem(f"{name} must be a list of test ids (or its JSON text), got {str(raw)[:80]!r}")
    return tuple(value)


def parse_instance(raw: Any) -> Instance:
    if not isinstance(raw, Mapping):
        raise ImportProblem("not a JSON object")
    missing = [k for k in ("instance_id", "repo", "base_commit", "patch", "test_patch") if not raw.get(k)]
    if missing:
        raise ImportProblem(f"missing {', '.join(missing)}")
    try:
        fail_to_pass = _ids(raw.get("FAIL_TO_PASS", []), "FAIL_TO_PASS")
        pass_to_pass = _ids(raw.get("PASS_TO_PASS", []), "PASS_TO_PASS")
    except json.JSONDecodeError as err:
        raise ImportProblem(f"FAIL_TO_PASS / PASS_TO_PASS is not JSON: {err}") from None
    if not fail_to_pass:
        raise ImportProblem("FAIL_TO_PASS is empty: the instance has nothing to fix")
    return Instance(
        instance_id=str(raw["instance_id"]),
        repo=str(raw["repo"]),
        base_commit=str(raw["base_commit"]),
        patch=str(raw["patch"]),
        test_patch=str(raw["test_patch"]),
        fail_to_pass=fail_to_pass,
        pass_to_pass=pass_to_pass,
        version=str(raw.get("version") or ""),
        problem_statement=str(raw.get("problem_statement") or ""),
        created_at=str(raw.get("created_at") or ""),
    )


def read_instances(path: Path) -> Iterable[tuple[int, Instance | ImportProblem, str]]:
    """(line number, the instance or why the line is not one, its instance_id if known) per non-empty line."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, ImportProblem(f"line {number} is not JSON: {err.msg}"), f"line-{number}"
            continue
        name = str(raw.get("instance_id") or f"line-{number}") if isinstance(raw, dict) else f"line-{number}"
        try:
            yield number, parse_instance(raw), name
        except ImportProblem as problem:
            yield number, problem, name


def load_specs(path: Path | None) -> dict[tuple[str, str], TaskEnvironment]:
    """The environments of the specs file, by (repo, version)."""
    if path is None:
        return {}
    raw = json.loads(path.read_text())
    specs = {}
    for repo, versions in raw.items():
        for version, spec in versions.items():
            specs[(repo, str(version))] = TaskEnvironment(
                python=str(spec.get("python", "3")), requirements=tuple(spec.get("requirements", ()))
            )
    return specs


def find_clone(repos: Path, repo: str) -> Path:
    owner, _, name = repo.partition("/")
    for candidate in (repos / f"{owner}__{name}", repos / owner / name, repos / name):
        if (candidate / ".git").exists() or (candidate / "HEAD").is_file():
            return candidate
    raise ImportProblem(f"no clone of {repo} under {repos} (looked for {owner}__{name}, {repo}, {name})")


def run_git(clone: Path, *args: str, stdin: bytes | None = None, cwd: Path | None = None) -> bytes:
    argv = ["git", *(["-C", str(clone)] if cwd is None else []), *args]
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=GIT_TIMEOUT_S, cwd=cwd, check=False)
    if done.returncode != 0:
        raise ImportProblem(f"git {args[0]} failed: {done.stderr.decode(errors='replace').strip()[-400:]}")
    return done.stdout


def tree_at(clone: Path, commit: str) -> dict[str, bytes]:
    """Every regular file of `commit`, by path (git archive: no history comes along)."""
    data = run_git(clone, "archive", "--format=tar", commit)
    files = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                handle = tar.extractfile(member)
                if handle is not None:
                    files[member.name] = handle.read()
    return files


def apply_patch(clone: Path, files: Mapping[str, bytes], patch: str, what: str) -> dict[str, bytes | None]:
    """The files `patch` writes (None: deleted), applied with `git apply` to `files` in a scratch folder."""
    if not patch.strip():
        return {}
    with tempfile.TemporaryDirectory(prefix="forgerl-import-") as scratch:
        root = Path(scratch)
        touched = [
            line.split("\t", 2)[2]
            for line in run_git(clone, "apply", "--numstat", "-", stdin=patch.encode()).decode().splitlines()
        ]
        for path in touched:
            if path in files:
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(files[path])
        try:
            run_git(clone, "apply", "--whitespace=nowarn", "-", stdin=patch.encode(), cwd=root)
        except ImportProblem as problem:
            raise ImportProblem(f"the {what} does not apply at base_commit: {problem}") from None
        return {p: (root / p).read_bytes() if (root / p).is_file() else None for p in touched}


def _text_files(files: Mapping[str, bytes | None]) -> tuple[dict[str, str], list[str]]:
    text, binary = {}, []
    for path, data in files.items():
        if data is None:
            continue
        try:
            text[path] = data.decode()
        except UnicodeDecodeError:
            binary.append(path)
    return text, binary


def build_task(instance: Instance, clone: Path, environment: TaskEnvironment) -> tuple[Task, dict[str, str | None]]:
    """The task of an instance, and the gold patch's files (None: deleted) for validation."""
    base = tree_at(clone, instance.base_commit)
    test_files, binary_tests = _text_files(apply_patch(clone, base, instance.test_patch, "test patch"))
    if binary_tests:
        raise ImportProblem(f"the test patch writes binary files ({', '.join(binary_tests)}): tests must be text")
    files, binary = _text_files(base)
    gold_raw = apply_patch(clone, base, instance.patch, "gold patch")
    gold: dict[str, str | None] = {p: None if d is None else d.decode(errors="replace") for p, d in gold_raw.items()}
    task = Task(
        id=instance.instance_id,
        suite=SUITE,
        split="imported",
        instructions=instance.problem_statement,
        test_command="",
        time_budget_s=TIME_BUDGET_S,
        baseline_s=BASELINE_S,
        files=files,
        test_files=test_files,
        fail_to_pass=instance.fail_to_pass,
        pass_to_pass=instance.pass_to_pass,
        tools=("bash", "read_file", "write_file", "str_replace"),
        metadata={
            "repo": instance.repo,
            "base_commit": instance.base_commit,
            "version": instance.version,
            "binary_files_left_out": str(len(binary)),
        },
        harness="pytest",
        environment=environment,
    )
    return task, gold


async def _grade(sandboxes: SandboxFactory, task: Task, files: Mapping[str, str]) -> Grading:
    work = await sandboxes.create(SandboxRequest(files=dict(files), environment=task.environment))
    try:
        return await run_tests(sandboxes, work, task, "", labels={"forgerl/phase": "import-validation"})
    finally:
        await work.close()


def judge(task: Task, before: Grading, after: Grading) -> str:
    """Why the instance is invalid, or "" when FAIL_TO_PASS fail then pass and PASS_TO_PASS always pass."""
    problems = []
    passed_early = [t for t in task.fail_to_pass if before.results.get(t) == "pass"]
    if passed_early:
        problems.append(f"FAIL_TO_PASS already pass without the gold patch: {', '.join(passed_early)}")
    for name, grading in (("without", before), ("with", after)):
        broken = [
            f"{t} ({grading.results.get(t, 'missing')})" for t in task.pass_to_pass if grading.results.get(t) != "pass"
        ]
        if broken:
            problems.append(f"PASS_TO_PASS do not pass {name} the gold patch: {', '.join(broken)}")
    unfixed = [f"{t} ({after.results.get(t, 'missing')})" for t in task.fail_to_pass if after.results.get(t) != "pass"]
    if unfixed:
        problems.append(f"FAIL_TO_PASS do not pass with the gold patch: {', '.join(unfixed)}")
    if after.dropped:
        problems.append(f"the grader leaves out gold-patch files: {', '.join(sorted(after.dropped))}")
    if problems and (after.detail or before.detail):
        problems.append(f"grader: {after.detail or before.detail}")
    return "; ".join(problems)


def environment_for(specs: Mapping[tuple[str, str], TaskEnvironment], repo: str, version: str) -> TaskEnvironment:
    environment = specs.get((repo, version))
    if environment is None:
        raise ImportProblem(
            f"no environment for {repo} version {version!r} in the specs file: add "
            f'"{repo}": {{"{version}": {{"python": ..., "requirements": [...]}}}}'
        )
    return environment


def fixed(task: Task, gold: Mapping[str, str | None]) -> dict[str, str]:
    """The task's files with the gold patch's (`gold`: its files, None deleted) applied."""
    files = {p: d for p, d in task.files.items() if p not in gold}
    files.update({p: d for p, d in gold.items() if d is not None})
    return files


async def check(sandboxes: SandboxFactory, task: Task, gold: Mapping[str, str | None]) -> Verdict:
    """Run the task's tests without and with the gold patch and judge."""
    before = await _grade(sandboxes, task, task.files)
    after = await _grade(sandboxes, task, fixed(task, gold))
    reason = judge(task, before, after)
    return Verdict(task.id, not reason, reason, before.results, after.results, task)


async def validate(
    sandboxes: SandboxFactory, instance: Instance, repos: Path, specs: Mapping[tuple[str, str], TaskEnvironment]
) -> Verdict:
    """Build and validate one instance; every failure becomes the verdict's reason."""
    try:
        clone = find_clone(repos, instance.repo)
        task, gold = build_task(instance, clone, environment_for(specs, instance.repo, instance.version))
    except ImportProblem as problem:
        return Verdict(instance.instance_id, False, str(problem))
    return await check(sandboxes, task, gold)


async def import_instances(
    sandboxes: SandboxFactory, path: Path, repos: Path, specs: Mapping[tuple[str, str], TaskEnvironment]
) -> list[Verdict]:
    """A verdict for every line of `path`, in order (instances are validated one after the other)."""
    verdicts = []
    for _, item, name in read_instances(path):
        if isinstance(item, ImportProblem):
            verdicts.append(Verdict(name, False, str(item)))
        else:
            verdicts.append(await validate(sandboxes, item, repos, specs))
    return verdicts


def write_verdicts(verdicts: Sequence[Verdict], out: Path) -> None:
    """One JSON line per instance: the verdict, its reason, both test runs and the task (when built)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(v.to_json()) + "\n" for v in verdicts))
