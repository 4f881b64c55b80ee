"""Wheels for task-environment tests, made on this machine so that no test reaches a package index.

`wheel_from_installed` packs a pure-Python distribution installed in the test's own interpreter back into
a wheel (its files as RECORD lists them, scripts left for pip to regenerate from entry_points.txt);
`wheel_from_files` makes a wheel of a tiny package. pip installs both with `--no-index --find-links`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import zipfile
from collections.abc import Mapping
from pathlib import Path

# pytest and what it needs on Python 3.11 (exceptiongroup, tomli and colorama only below 3.11 / on Windows).
PYTEST_DISTRIBUTIONS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
_INSTALL_ONLY = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json")


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def _write_wheel(dest: Path, filename: str, dist_info: str, files: Mapping[str, bytes]) -> Path:
    target = dest / filename
    record = [_record_line(p, d) for p, d in files.items()] + [f"{dist_info}/RECORD,,"]
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as whl:
        for path, data in files.items():
            whl.writestr(path, data)
        whl.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return target


def wheel_from_installed(dest: Path, name: str) -> Path:
    dist = importlib.metadata.distribution(name)
    files: dict[str, bytes] = {}
    dist_info = ""
    for item in dist.files or ():
        path = str(item)
        if path.startswith("..") or "__pycache__" in path:
            continue
        top = path.split("/", 1)[0]
        if top.endswith(".dist-info"):
            dist_info = top
            if path.rsplit("/", 1)[-1] in _INSTALL_ONLY:
                continue
        files[path] = Path(str(dist.locate_file(item))).read_bytes()
    wheel_meta = files[f"{dist_info}/WHEEL"].decode()
    if "Root-Is-Purelib: true" not in wheel_meta:
        raise ValueError(f"{name} is not pure Python: cannot be repacked here")
    tag = next(line.split(": ", 1)[1] for line in wheel_meta.splitlines() if line.startswith("Tag: "))
    stem = dist_info.removesuffix(".dist-info")
    return _write_wheel(dest, f"{stem}-{tag.strip()}.whl", dist_info, files)


def wheel_from_files(dest: Path, name: str, version: str, modules: Mapping[str, str]) -> Path:
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {path: text.encode() for path, text in modules.items()}
    files[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: forgerl-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    return _write_wheel(dest, f"{name.replace('-', '_')}-{version}-py3-none-any.whl", dist_info, files)


def wheelhouse_with_pytest(dest: Path) -> str:
    """Wheels of pytest and its dependencies in `dest`; returns the pinned requirement for pytest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PYTEST_DISTRIBUTIONS:
        wheel_from_installed(dest, name)
    return f"pytest=={importlib.metadata.version('pytest')}"
