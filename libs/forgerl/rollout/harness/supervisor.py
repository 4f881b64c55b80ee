"""Grading supervisor, run in the grading sandbox as `python3 -I .forgerl/run_tests.py`. Standard library only.

It reads the run's nonce (the first line of standard input), starts the test runner
(`.forgerl/<kind>_runner.py`) as a child with no standard input, and prints what the runner reported on a
pipe of its own, tagged with the nonce:

    FORGERL_RESULTS <nonce> {"<test id>": "pass" | "fail" | "error" | "skip" | "xfail", ...}
    FORGERL_RUNNER <nonce> {"exit": code, "signal": n, "python": ..., "pytest": ...}

The agent's code runs only in the child, so the nonce never enters a process the agent's code runs in:
a results line the tests print (or a module under test that reads standard input or the supervisor's
globals) cannot carry it. This process is made non-dumpable first: the child runs as the same uid and
could otherwise read the nonce out of this process's memory (ptrace, /proc/<pid>/mem); the kernel refuses
both for a non-dumpable process (ptrace(2), "Ptrace access mode checking").
"""

import ctypes
import json
import os
import subprocess
import sys

PR_SET_DUMPABLE = 4
RESULTS = "FORGERL_RESULTS"
RUNNER = "FORGERL_RUNNER"


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def main() -> int:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        print("supervisor: cannot make itself non-dumpable; refusing to read the nonce", file=sys.stderr)
        return 2
    nonce = sys.stdin.readline().strip()
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "spec.json")) as f:
        kind = json.load(f)["kind"]
    read_fd, write_fd = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-I", os.path.join(here, f"{kind}_runner.py"), str(write_fd)],
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,  # the tests' own output never mixes with the lines this process prints
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    data = _read_all(read_fd)  # EOF when the runner and everything it started have closed the pipe
    code = child.wait()
    status = {"exit": code if code >= 0 else None, "signal": -code if code < 0 else None}
    try:
        report = json.loads(data)
        results, runner = dict(report["results"]), dict(report["runner"])
    except (ValueError, KeyError, TypeError):
        print(f"{RUNNER} {nonce} {json.dumps({**status, 'report': 'none'})}")
        return 3
    print(f"{RUNNER} {nonce} {json.dumps({**status, **runner})}")
    print(f"{RESULTS} {nonce} {json.dumps(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
