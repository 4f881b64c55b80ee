"""Lay out the build context of one image family under images/.build/<family>/ (`make images`).

    python images/prepare.py services|inference-cpu|gpu

A context holds `requirements.txt` (the lines of requirements/lock.txt that the family needs at run time:
the closure of the project's dependencies, plus the `cpu` extra for inference-cpu, read from the installed
packages' metadata; for gpu everything but torch, which the CUDA build replaces), and `wheels/` (those wheels,
downloaded with their hashes checked, and the project's own wheel). The Dockerfiles install from there
with no package index: a build needs the Debian mirror for apt only.
"""

from __future__ import annotations

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
        needed.update({key, name})
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue  # excluded from the lock on purpose (requirements/lock.py EXCLUDED)
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
    shutil.rmtree(out, ignore_errors=True)
    (out / "wheels").mkdir(parents=True)
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
    with tempfile.TemporaryDirectory() as tmp:  # setuptools' build/ stays out of the work tree
        source = Path(tmp) / "src"
        source.mkdir()
        for name in SOURCES:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, source / name, symlinks=True)
            else:
                shutil.copy(ROOT / name, source / name)
        wheel = ["wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "wheels"), str(source)]
        subprocess.run([*pip, *wheel], check=True)
    print(f"{out}: {len(lines)} locked packages + forgerl")
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in FAMILIES:
        sys.exit(f"usage: python images/prepare.py {{{'|'.join(FAMILIES)}}}")
    prepare(sys.argv[1])
