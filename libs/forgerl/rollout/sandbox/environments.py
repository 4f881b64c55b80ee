"""Task environments for the local sandbox: one virtualenv per environment, built once and cached.

A task declares `TaskEnvironment(python="3.11", requirements=("pytest==8.3.3", ...))`. The first sandbox
that needs it builds `<root>/<hash>/` with `python3.11 -m venv` and installs the requirements with pip
(the builder's own pip, `pip --python <venv>`, so the venv itself carries no pip); later sandboxes find it
ready. The hash covers the interpreter, the sorted requirements and the pip options (where packages
come from), so a changed requirement is a new environment, never an edit of one in use.

Sandboxes see the virtualenv read-only: it lies outside their work directory, which is the only writable
place of the local sandbox, and it belongs to root. Its `bin/` comes first on the sandbox's PATH, so
`python3`, `pip` and `pytest` are the environment's, not the machine's.

Builds are serialised per environment by an flock (episodes of one task start together) and written in
place, marked ready by a last-written marker file: console scripts (`bin/pytest`) carry the venv's absolute
path in their shebang, so a venv cannot be built elsewhere and renamed. A build without its marker (a crash
half-way) is deleted and redone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from forgerl.rollout.sandbox.base import SandboxInfraError, TaskEnvironment

log = logging.getLogger("forgerl.rollout")
MARKER = "forgerl-environment.json"
_VERSION = re.compile(r"^3(\.\d{1,2})?$")


class EnvironmentBuildError(SandboxInfraError):
    """A task environment could not be built (no such interpreter, pip failed): the episode cannot start."""


class EnvironmentBuilder:
    """Builds and caches task environments under `root`; `ensure` blocks (call it in a thread)."""

    def __init__(
        self,
        root: str | Path,
        *,
        search_path: str = "/usr/local/bin:/usr/bin:/bin",
        pip_python: str | None = None,
        pip_options: Sequence[str] = (),
        timeout_s: float = 900.0,
    ) -> None:
        self.root = Path(root)
        self.search_path = search_path  # where interpreters are looked up: the sandbox's own PATH
        self.pip_python = pip_python or sys.executable  # an interpreter with pip >= 22.3 (`--python`)
        self.pip_options = tuple(pip_options)  # e.g. ("--no-index", "--find-links", "/wheels") offline
        self.timeout_s = timeout_s

    def interpreter(self, env: TaskEnvironment) -> str:
        if not _VERSION.match(env.python):
            raise EnvironmentBuildError(f"python {env.python!r}: declare a version such as '3' or '3.11'")
        found = shutil.which(f"python{env.python}", path=self.search_path)
        if found is None:
            raise EnvironmentBuildError(
                f"python{env.python} is not installed in {self.search_path}: install it on the rollout "
                "machine or declare a version that is"
            )
        return found

    def path(self, env: TaskEnvironment) -> Path:
        """Where the environment lives (built or not)."""
        key = json.dumps(
            {"env": env.key(), "interpreter": os.path.realpath(self.interpreter(env)), "pip": self.pip_options},
            sort_keys=True,
        )
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:16]

    def ensure(self, env: TaskEnvironment) -> Path:
        """The environment's directory, built first if this machine has not built it yet."""
        target = self.path(env)
        if (target / MARKER).is_file():
            return target
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # the sandbox uids run the interpreters inside
        with open(self.root / f"{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another episode may be building the same environment
            if not (target / MARKER).is_file():
                self._build(env, target)
        return target

    def _build(self, env: TaskEnvironment, target: Path) -> None:
        start = time.monotonic()
        shutil.rmtree(target, ignore_errors=True)  # a build that died half-way
        try:
            self._run([self.interpreter(env), "-m", "venv", "--without-pip", str(target)], "venv")
            if env.requirements:
                pip = [self.pip_python, "-m", "pip", "--python", str(target / "bin" / "python")]
                install = ["install", "--no-input", "--disable-pip-version-check", "--no-warn-script-location"]
                self._run([*pip, *install, *self.pip_options, *env.requirements], "pip install")
        except EnvironmentBuildError:
            shutil.rmtree(target, ignore_errors=True)
            raise
        seconds = time.monotonic() - start
        info = {"python": env.python, "requirements": list(env.requirements), "build_s": round(seconds, 2)}
        (target / MARKER).write_text(json.dumps(info))
        log.info("built task environment %s (%s) in %.1fs", target.name, ", ".join(env.requirements), seconds)

    def _run(self, argv: list[str], what: str) -> None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        except subprocess.TimeoutExpired as exc:
            raise EnvironmentBuildError(f"task environment: {what} took over {self.timeout_s:.0f}s") from exc
        if done.returncode != 0:
            raise EnvironmentBuildError(
                f"task environment: {what} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}; "
                "check the declared requirements and where pip may fetch them (pip_options)"
            )
