"""Lay out the build context of one image family under images/.build/<family>/ (`make images`).

    python images/prepare.py services|inference-cpu|gpu

A context holds `requirements.txt` (the lines of requirements/lock.txt that the family needs at run time:
the closure of the project's dependencies, plus the `cpu` extra for inference-cpu, read from the installed
packages' metadata; for gpu everything but torch, which the CUDA build replaces), `wheels/` (those wheels,
downloaded with their hashes checked) and `project/` (the project's own wheel, a layer of its own so that a
code change rebuilds a few MB, not the 1.5 GB of dependencies). The Dockerfiles install from there with no
package index: a build needs the Debian mirror for apt only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
FAMILIES = {"services": (), "inference-cpu": ("cpu",), "gpu": ()}
# Built for CUDA in the gpu image (images/gpu.Dockerfile), not taken from the CPU lock.
GPU_REPLACED = {"torch"}
# The CUDA builds of torch and vLLM with their hashes (`make lock-gpu`); the gpu context needs it.
GPU_LOCK = ROOT / "requirements" / "gpu.txt"
GPU_REQUESTS = ["torch==2.13.0", "vllm==0.32.0"]
# What the project's wheel is built from (libs/forgerl/{services,kernels} link to the top-level folders).
SOURCES = ("pyproject.toml", "README.md", "libs", "services", "kernels")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(extras: tuple[str, ...]) -> set[str]:
    """Canonical names of everything `forgerl[extras]` needs at run time, from installed metadata."""
    needed: set[str] = set()
    stack = [(Requirement(r), extras) for r in metadata.requires("forgerl") or []]
    while stack:
        req, active = stack.pop()
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (*active, "")):
            continue
        name = canonical(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in needed:
            continue
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # excluded from the lock on purpose (requirements/lock.py EXCLUDED: torchvision, ...)
        needed.update({key, name})
        stack.extend((Requirement(r), tuple(req.extras)) for r in requires)
    return {n for n in needed if "[" not in n}


def lock_entries() -> dict[str, str]:
    """requirements/lock.txt as canonical name -> its `name==version --hash=...` entry."""
    entries, current = {}, ""
    for line in LOCK.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        current = current + "\n" + line if current else line
        if not line.endswith("\\"):
            entries[canonical(current.split("==")[0])] = current
            current = ""
    return entries


def prepare(family: str) -> Path:
    out = ROOT / "images" / ".build" / family
    if family == "gpu" and not GPU_LOCK.exists():
        sys.exit(f"{GPU_LOCK} is missing: `make lock-gpu` on a machine whose index serves torch's CUDA wheels")
    shutil.rmtree(out, ignore_errors=True)
    (out / "wheels").mkdir(parents=True)
    (out / "project").mkdir()
    needed = runtime_closure(FAMILIES[family]) - (GPU_REPLACED if family == "gpu" else set())
    entries = lock_entries()
    missing = sorted(n for n in needed if n not in entries and n != "forgerl")
    if missing:
        sys.exit(f"not in requirements/lock.txt: {missing}; run `make lock` after changing pyproject.toml")
    lines = [entries[n] for n in sorted(needed) if n in entries]
    (out / "requirements.txt").write_text("\n".join(lines) + "\n")
    pip = [sys.executable, "-m", "pip", "-q"]
    download = ["download", "--no-deps", "--require-hashes", "--only-binary", ":all:", "-d", str(out / "wheels")]
    subprocess.run([*pip, *download, "-r", str(out / "requirements.txt")], check=True)
    if family == "gpu":
        shutil.copy(GPU_LOCK, out / "gpu.txt")
        subprocess.run([*pip, *download, "--platform", "manylinux_2_28_x86_64", "-r", str(GPU_LOCK)], check=True)
    with tempfile.TemporaryDirectory() as tmp:  # setuptools' build/ stays out of the work tree
        source = Path(tmp) / "src"
        source.mkdir()
        for name in SOURCES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name, symlinks=True)
            else:
                shutil.copy(ROOT / name, source / name)
        wheel = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "project"), str(source)]
        subprocess.run([*pip, *wheel], check=True)
    print(f"{out}: {len(lines)} locked packages + forgerl")
    return out


def lock_gpu() -> None:
    """Write requirements/gpu.txt: torch's and vLLM's CUDA builds for manylinux x86_64 CPython 3.11, with
    their hashes (pip's resolution report, as requirements/lock.py makes the main lock)."""
    sys.path.insert(0, str(ROOT / "requirements"))
    from lock import lock_lines

    platforms = [f"--platform={tag}_x86_64" for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014", "linux")]
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed"]
        command += ["--only-binary", ":all:", "--python-version", "3.11", *platforms, "--target", tmp]
        subprocess.run([*command, "--report", str(report), *GPU_REQUESTS], check=True)
        entries = json.loads(report.read_text())["install"]
    already = set(lock_entries()) - GPU_REPLACED
    lines = [line for line in lock_lines(entries) if canonical(line.split("==")[0]) not in already]
    GPU_LOCK.write_text(
        "# `make lock-gpu` (images/prepare.py): CUDA builds for the gpu image.\n" + "\n".join(lines) + "\n"
    )
    print(f"wrote {GPU_LOCK}: {len(lines)} packages")


if __name__ == "__main__":
    if sys.argv[1:] == ["--lock-gpu"]:
        lock_gpu()
    elif len(sys.argv) == 2 and sys.argv[1] in FAMILIES:
        prepare(sys.argv[1])
    else:
        sys.exit(f"usage: python images/prepare.py {{{'|'.join(FAMILIES)}}} | --lock-gpu")
