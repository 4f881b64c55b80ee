"""The agent's sandbox at the start of an episode: the task's files and, for a task cut from a repository's
history, a git repository of one commit that holds exactly those files.

A task imported or mined from git (forgerl.tasks: `metadata["base_commit"]`) is the tree at its base commit;
the fix is a later commit of the same repository. The sandbox never gets the source clone, so it has no
later commit, tag, branch, reflog entry or packed object to read the answer from: the repository is made
inside the sandbox, from the task's files (`git init`, `git add -A`, one commit), so the agent can use
`git diff` / `git status` as on a checkout. Where the sandbox has no `git` (a bare image), the work
directory stays a plain tree, which holds no history either; the episode goes on and the log says why.
The grader never reads `.git` (forgerl.rollout.grading: only the work tree's files are collected).
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping

from forgerl.rollout.sandbox.base import ExecResult, Sandbox, SandboxFactory, SandboxRequest
from forgerl.rollout.tasks import Task

log = logging.getLogger("forgerl.rollout")
BASE_COMMIT = "base_commit"  # Task.metadata key of tasks cut from a repository's history
GIT_TIMEOUT_S = 120.0
# One commit of the work tree, by a fixed identity. `init.defaultBranch` and `-b` are avoided (git < 2.28
# lacks `-b`); the branch is named through HEAD. On failure, nothing half-made stays behind.
_COMMIT_BASE = (
    "git init -q && git symbolic-ref HEAD refs/heads/main && git add -A"
    " && git -c user.name=forgerl -c user.email=forgerl@localhost -c commit.gpgsign=false"
    " commit -q --no-verify -m {message}"
    " || {{ status=$?; rm -rf .git; exit $status; }}"
)


async def commit_base(sandbox: Sandbox, task: Task) -> ExecResult:
    """Make the sandbox's work directory a git repository whose only commit is its current tree."""
    message = shlex.quote(f"{task.id}: the repository at its base commit")
    return await sandbox.exec(_COMMIT_BASE.format(message=message), timeout_s=GIT_TIMEOUT_S)


async def open_workspace(
    sandboxes: SandboxFactory, task: Task, *, labels: Mapping[str, str], time_budget_s: float
) -> Sandbox:
    """A started sandbox holding the task's files (and, for a task with a base commit, their repository)."""
    sandbox = await sandboxes.create(
        SandboxRequest(files=task.files, labels=labels, time_budget_s=time_budget_s, environment=task.environment)
    )
    if not task.metadata.get(BASE_COMMIT):
        return sandbox
    try:
        done = await commit_base(sandbox, task)
    except BaseException:
        await sandbox.close()
        raise
    if not done.ok:
        log.warning(
            "task %s: the work directory stays without a git repository (%s): %s",
            task.id,
            done.describe(),
            done.stderr.strip()[-300:],
        )
    return sandbox
