"""What both test runners share; copied into the grading sandbox's `.forgerl/` beside them. Standard library only."""

import json
import os
import sys
from typing import Any


def spec() -> dict[str, Any]:
    """`.forgerl/spec.json`: {"kind": ..., "tests": [...], "canary": ".forgerl/canary_<token>.py"}."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec.json")) as f:
        loaded: dict[str, Any] = json.load(f)
    return loaded


def repository_on_path() -> None:
    """The work directory on sys.path after the standard library and before site-packages: the repository
    cannot shadow `json` or `unittest`, and its own packages win over installed copies of themselves."""
    cwd = os.getcwd()
    installed = [i for i, p in enumerate(sys.path) if p.endswith(("site-packages", "dist-packages"))]
    sys.path.insert(installed[0] if installed else len(sys.path), cwd)


def report(fd: int, results: dict[str, str], runner: dict[str, str]) -> None:
    """The one report the supervisor reads, written to the pipe it handed over."""
    data = json.dumps({"results": results, "runner": {"python": sys.executable, **runner}}).encode()
    while data:
        data = data[os.write(fd, data) :]
    os.close(fd)
