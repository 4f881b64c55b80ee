"""Grading on a clean tree: the tests see the task, its tests and harness, and only the agent's source edits.

RL pays for what the grader says, so the grader must not be steerable from the work directory. After the
agent has finished:

1. `collect_changes` lists, from inside the agent's sandbox, what differs from the task's files: changed
   and new regular files (with their content), deleted files, and what cannot be a source edit (symbolic
   links, FIFOs, files over the size caps). The work directory's own `.git` (forgerl.rollout.workspace) is
   not read: the repository is the agent's scratch, never graded.
2. `screen` keeps the edits to source files and drops, with the reason, every change that could change
   how the tests run rather than what they test: test files and anything under a test folder, the harness
   directory, conftest.py, test runner configuration (pytest.ini, .pytest.ini, tox.ini, setup.cfg,
   pyproject.toml: kept as the task has them, test sections and all), sitecustomize.py / usercustomize.py
   and .pth files (run at interpreter start-up), bytecode (an unchecked .pyc stands in for its source,
   PEP 552), package metadata (a *.dist-info's entry points load pytest plugins), hidden paths the task
   did not have (the sandbox's HOME is the work directory: ~/.local holds a user site-packages), links.
3. The tests run in a fresh sandbox holding the task's files, the kept edits (deletions applied), the
   task's test files and, for the built-in harnesses, the supervisor, runner and a canary
   (forgerl.rollout.harness). Nothing the agent started survives into it. The run's environment is
   explicit: plugins named by variables (PYTEST_ADDOPTS, PYTEST_PLUGINS) are removed and the interpreter
   runs with `-I` (no PYTHONPATH, PYTHONSTARTUP, user site).
4. No result line with this run's nonce, a canary that must fail reporting a pass, or a canary missing:
   the run grades 0; the detail says "tampered" for the canary, and lists every dropped change.

What this cannot stop: code under test that reads the canary's names at run time and fakes exactly the
outcomes the grader expects. The canary catches the runner being patched wholesale, the only form a
patch can take without reading the harness's state from inside the test process.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from forgerl.rollout.harness import COMMAND, HARNESS_DIR, Canary, harness_files
from forgerl.rollout.sandbox.base import ExecResult, Sandbox, SandboxFactory, SandboxRequest
from forgerl.rollout.tasks import Grading, Task, grade, parse_results, tagged_json

GRADING_TIMEOUT_S = 120.0
COLLECT_TIMEOUT_S = 60.0
MAX_FILE_BYTES = 1 << 20  # a source file larger than this is not a hand edit
MAX_CHANGED_BYTES = 4 << 20  # all kept edits together: the grading sandbox gets them in one request
MAX_ENTRIES = 2000  # changed paths listed at most (a tree of generated files is not a source edit)
# The result line holds every test of the test files run: 1,000 pytest node ids are ~90 KB, over the
# sandbox's default 64 KiB per stream. Test output goes to stderr; stdout holds the harness's two lines.
RESULTS_OUTPUT_BYTES = 8 << 20
RUNNER_MARKER = "FORGERL_RUNNER"
RUNNER_CONFIG = frozenset({"pytest.ini", ".pytest.ini", "tox.ini", "setup.cfg", "pyproject.toml"})
# Folders of tests by name, beside the folders of the task's own test files. Not "test": Django's source
# package django/test/ is code an agent may have to fix (SWE-bench has such tasks).
TEST_FOLDER_NAMES = frozenset({"tests"})
PRUNED = {".tmp": "the sandbox's temporary directory", "__pycache__": "bytecode: a .pyc can stand in for its source"}
# The work directory's own git repository (forgerl.rollout.workspace): neither read nor graded, so its
# objects count against no cap; a .git anywhere deeper is a hidden path like any other.
WORKSPACE_REPOSITORY = ".git"

# Runs in the agent's sandbox as `python3 -I -S` (no site, no .pth: nothing the agent left there runs) and
# prints what changed; files are opened with O_NOFOLLOW, so a link swapped in mid-walk is not followed.
_COLLECT = """
import base64,hashlib,json,os,stat,sys
a=json.load(sys.stdin)
known,budget,out,seen=a['known'],a['max_total'],[],set()
def add(p,kind,**kw):
    if len(out)<a['max_entries']: out.append(dict(path=p,kind=kind,**kw))
    else: seen.add(p); a['more']=a.get('more',0)+1
for root,dirs,files in os.walk('.'):
    keep=[]
    for d in dirs:
        full=os.path.join(root,d); p=os.path.normpath(full)
        if os.path.islink(full): files.append(d)
        elif p in a['skip']: continue
        elif d in a['prune']:
            if any(True for _ in os.scandir(full)): add(p,'pruned',name=d)
        else: keep.append(d)
    dirs[:]=keep
    for f in files:
        full=os.path.join(root,f); p=os.path.normpath(full)
        try: st=os.lstat(full)
        except OSError: continue
        if stat.S_ISLNK(st.st_mode): add(p,'symlink',target=os.readlink(full)); continue
        if not stat.S_ISREG(st.st_mode): add(p,'other'); continue
        if st.st_size>a['max_file']: add(p,'too_large',size=st.st_size); continue
        try:
            fd=os.open(full,os.O_RDONLY|os.O_NOFOLLOW); chunks=[]
            while True:
                c=os.read(fd,1<<16)
                if not c: break
                chunks.append(c)
            os.close(fd); data=b''.join(chunks)
        except OSError: add(p,'unreadable'); continue
        seen.add(p)
        if known.get(p)==hashlib.sha256(data).hexdigest(): continue
        if len(data)>budget: add(p,'too_large',size=len(data)); continue
        budget-=len(data); add(p,'file',data=base64.b64encode(data).decode())
gone=sorted(set(known)-seen-{e['path'] for e in out})
print(json.dumps({'changes':out,'deleted':gone,'more':a.get('more',0)}))
"""


@dataclass(frozen=True)
class Change:
    path: str
    kind: str  # file | symlink | other | too_large | unreadable | pruned
    data: bytes | None = None
    note: str = ""  # a link's target, a file's size, a pruned directory's name


@dataclass(frozen=True)
class CleanTree:
    files: dict[str, str | bytes]  # the grading sandbox's files: task, kept edits, tests
    dropped: dict[str, str]  # agent change -> why it was left out


def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


async def collect_changes(work: Sandbox, task: Task) -> tuple[list[Change], list[str]] | str:
    """(changes, deleted task files) in the agent's sandbox, or why they could not be read."""
    request = {
        "known": {path: _sha256(data) for path, data in task.files.items()},
        "max_file": MAX_FILE_BYTES,
        "max_total": MAX_CHANGED_BYTES,
        "max_entries": MAX_ENTRIES,
        "prune": sorted(PRUNED),
        "skip": [WORKSPACE_REPOSITORY],
    }
    result = await work.exec(
        ["python3", "-I", "-S", "-c", _COLLECT],
        stdin=json.dumps(request).encode(),
        timeout_s=COLLECT_TIMEOUT_S,
        output_bytes=2 * MAX_CHANGED_BYTES + (1 << 20),  # base64 is 4/3 of the data, plus paths
    )
    try:
        listing = json.loads(result.stdout)
        changes = [
            Change(
                e["path"],
                e["kind"],
                None if e["kind"] != "file" else base64.b64decode(e["data"]),
                str(e.get("target") or e.get("size") or e.get("name") or ""),
            )
            for e in listing["changes"]
        ]
    except (ValueError, KeyError, TypeError):
        return f"could not read the agent's changes ({result.describe()}): {result.stderr[-300:]}"
    if listing["more"]:
        changes.append(Change(f"... {listing['more']} more paths", "too_many"))
    return changes, [str(p) for p in listing["deleted"]]


def _test_folders(task: Task) -> set[PurePosixPath]:
    folders = {PurePosixPath(p).parent for p in task.test_files}
    return {f for f in folders if f.parts and f.parts[0] != HARNESS_DIR}


def refusal(task: Task, path: str) -> str | None:
    """Why an agent's change to `path` is left out of the grading tree, or None for a source edit."""
    pure = PurePosixPath(path)
    parts, name = pure.parts, pure.name
    if path in task.test_files:
        return "a test file: the task's version is used"
    if parts[0] == HARNESS_DIR:
        return "the grading harness's directory"
    if path == task.answer_file:
        return "the answer file is written from the final answer"
    if "__pycache__" in parts or name.endswith((".pyc", ".pyo")):
        return PRUNED["__pycache__"]
    if any(pure.is_relative_to(f) for f in _test_folders(task)) or TEST_FOLDER_NAMES & set(parts[:-1]):
        return "under a test folder: the tests and their helpers are the task's"
    if name == "conftest.py":
        return "conftest.py: pytest loads it as a plugin"
    if name in RUNNER_CONFIG:
        return f"{name}: test runner configuration; the task's version is used"
    if name in ("sitecustomize.py", "usercustomize.py") or name.endswith(".pth"):
        return f"{name}: runs at interpreter start-up"
    if any(p.endswith((".dist-info", ".egg-info", ".egg-link")) for p in parts):
        return "package metadata: its entry points can load pytest plugins"
    if parts[0].startswith(".") and path not in task.files:
        return "a hidden path the task did not have (the sandbox's HOME and caches)"
    return None


def _kind_refusal(change: Change) -> str:
    return {
        "symlink": f"a symbolic link (to {change.note}): only regular files are taken",
        "other": "not a regular file",
        "too_large": f"{change.note} bytes: over the grader's cap ({MAX_FILE_BYTES} a file, {MAX_CHANGED_BYTES} all)",
        "unreadable": "unreadable by the sandbox user",
        "pruned": PRUNED.get(change.note, "pruned"),
        "too_many": f"over {MAX_ENTRIES} changed paths",
    }.get(change.kind, change.kind)


def screen(task: Task, changes: Sequence[Change], deleted: Sequence[str]) -> CleanTree:
    """The grading tree from the task's files and the agent's changes, and what was dropped, why."""
    dropped: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    for change in changes:
        if change.kind != "file" or change.data is None:
            dropped[change.path] = _kind_refusal(change)
        elif (why := refusal(task, change.path)) is not None:
            dropped[change.path] = why
        else:
            kept[change.path] = change.data
    removed = set()
    for path in deleted:
        why = refusal(task, path)
        if why is None:
            removed.add(path)
        else:
            dropped[path] = f"deleted; {why}"
    files: dict[str, str | bytes] = {p: d for p, d in task.files.items() if p not in removed}
    files.update(kept)
    files.update(task.test_files)
    return CleanTree(files, dropped)


def describe_dropped(dropped: Mapping[str, str], shown: int = 12) -> str:
    items = [f"{path} ({why})" for path, why in sorted(dropped.items())]
    more = f", and {len(items) - shown} more" if len(items) > shown else ""
    return f"dropped {len(items)} agent change(s): {', '.join(items[:shown])}{more}"


def verdict(task: Task, result: ExecResult, nonce: str, canary: Canary | None, dropped: Mapping[str, str]) -> Grading:
    """The grading of one test run: its result line, the canary's two outcomes, and why, in the detail."""
    results = parse_results(result.stdout, nonce)
    runner: dict[str, Any] = tagged_json(result.stdout, nonce, RUNNER_MARKER) or {}
    context = [f"tests: {result.describe()}"]
    if runner.get("report") == "none":
        how = f"signal {runner['signal']}" if runner.get("signal") else f"exit code {runner.get('exit')}"
        last = result.stderr.strip().splitlines()[-1:] or [""]
        context.append(f"the test runner ended ({how}) without a report; its last words: {last[0][-300:]}")
    if dropped:
        context.append(describe_dropped(dropped))
    if results is None:
        graded = grade(task, None, "; ".join(["the tests printed no results with this run's nonce", *context]))
    elif canary is not None and task.harness is not None:
        must_fail, must_pass = canary.ids(task.harness)
        seen = (results.pop(must_fail, "missing"), results.pop(must_pass, "missing"))
        graded = grade(task, results, "; ".join(context))
        if seen != ("fail", "pass"):
            why = f"tampered: the canary that must fail reported {seen[0]}, the one that must pass {seen[1]}"
            graded = dataclasses.replace(graded, performance=0.0, success=False, detail="; ".join([why, *context]))
    else:
        graded = grade(task, results, "; ".join(context))
    return dataclasses.replace(graded, dropped=dict(dropped), runner=runner)


async def run_tests(
    sandboxes: SandboxFactory,
    work: Sandbox,
    task: Task,
    final_answer: str,
    *,
    timeout_s: float = GRADING_TIMEOUT_S,
    labels: Mapping[str, str] | None = None,
) -> Grading:
    """Grade the agent's work in `work` on a clean tree in a fresh sandbox from `sandboxes`."""
    collected = await collect_changes(work, task)
    if isinstance(collected, str):
        return grade(task, None, collected)
    tree = screen(task, *collected)
    files = dict(tree.files)
    command, canary = task.test_command, None
    if task.harness is not None:
        canary = Canary.new()
        files.update(harness_files(task.harness, [*task.fail_to_pass, *task.pass_to_pass], canary))
        command = COMMAND
    if task.answer_file:
        files[task.answer_file] = final_answer
    request = SandboxRequest(
        files=files,
        labels={**(labels or {}), "forgerl/phase": "grading"},
        time_budget_s=timeout_s + COLLECT_TIMEOUT_S,
        environment=task.environment,
    )
    sandbox = await sandboxes.create(request)
    try:
        nonce = secrets.token_hex(16)
        result = await sandbox.exec(
            command, stdin=f"{nonce}\n".encode(), timeout_s=timeout_s, output_bytes=RESULTS_OUTPUT_BYTES
        )
    finally:
        await sandbox.close()
    return verdict(task, result, nonce, canary, tree.dropped)
