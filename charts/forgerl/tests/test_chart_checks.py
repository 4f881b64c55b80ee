"""The chart's static checks for every profile in ci/: helm lint, Kubernetes 1.35 schemas, a policy scan,
values.schema.json in step with values.yaml and the services' config classes, bad values refused."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from chart_render import CHART, PROFILES, REPO, helm, render, render_text, schema_module

pytestmark = pytest.mark.chart

KUBERNETES_VERSION = "1.35.0"
CHECKOV = REPO / ".venv-tools" / "bin" / "checkov"
# Skipped for the whole chart, each for a reason that holds for every resource (the others are skipped
# inline, on the resource, with their reason as an annotation):
#   CKV_K8S_43 image digests: images are built by the user (images/) and pinned by tag in values;
#   CKV_K8S_15 pull policy Always: tags are immutable releases, and kind loads images with no registry;
#   CKV_K8S_35 secrets as env: services read their config from FORGERL_* variables by design (the run
#              store URL and the bearer token), as the local topology does.
CHECKOV_SKIPS = "CKV_K8S_43,CKV_K8S_15,CKV_K8S_35"


@pytest.mark.parametrize("profile", PROFILES)
def test_helm_lint(profile: str) -> None:
    result = helm("lint", str(CHART), "--strict", "-f", str(CHART / "ci" / f"{profile}-values.yaml"), check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_manifests_valid_for_kubernetes_1_35(profile: str) -> None:
    manifests = render(profile)
    assert len(manifests) > 30
    for manifest in manifests:
        # strict: an unknown field is an error (a typo would otherwise be dropped by the API server)
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_kubernetes_validate_refuses_an_unknown_field() -> None:
    """The validator is not vacuous: a misspelt field of a rendered Deployment fails."""
    deployment = next(m for m in render() if m["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_policy_scan_passes(tmp_path: Path) -> None:
    """checkov over every profile: no failed check (stricter than no failed HIGH: the open-source build
    reports no severities). It runs in a network namespace of its own: checkov asks its vendor's API for
    guidelines unless it cannot reach anything."""
    if not CHECKOV.exists():
        pytest.fail(f"{CHECKOV} is missing: run `make tools` (checkov from requirements/checkov.txt)")
    unshare = shutil.which("unshare")
    assert unshare, "unshare (util-linux) is needed to run checkov without network"
    for profile in PROFILES:
        (tmp_path / f"{profile}.yaml").write_text(render_text(profile))
    command = [unshare, "-n", str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "--skip-download"]
    command += ["--quiet", "--compact", "-o", "json", "--skip-check", CHECKOV_SKIPS]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    report = json.loads(result.stdout)
    summary = report["summary"] if isinstance(report, dict) else report[0]["summary"]
    failed = [] if isinstance(report, dict) and "results" not in report else report["results"]["failed_checks"]
    details = [f"{f['check_id']} {f['resource']} ({f['file_path']}): {f['check_name']}" for f in failed]
    assert summary["failed"] == 0, "\n".join(details)
    assert summary["resource_count"] > 100 and summary["passed"] > 1000, summary


def test_schema_is_generated_from_the_config_classes() -> None:
    result = subprocess.run([sys.executable, str(CHART / "schema.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _leaf_paths(values: Any, prefix: str = "") -> set[str]:
    """Dotted paths of values.yaml down to its scalars, lists and free-form maps."""
    if not isinstance(values, dict) or not values:
        return {prefix}
    return set().union(*(_leaf_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in values.items()))


def _schema_paths(schema: dict[str, Any], defs: dict[str, Any], prefix: str = "") -> set[str]:
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[1]]
    properties = schema.get("properties")
    if schema.get("type") != "object" or properties is None or schema.get("required") == []:
        return {prefix}
    return set().union(*(_schema_paths(s, defs, f"{prefix}.{k}" if prefix else k) for k, s in properties.items()))


def _free_form_paths() -> tuple[set[str], set[str], set[str]]:
    """(paths in values.yaml, paths in the schema, free-form blocks): a block is free-form (a service's
    `config`, `resources`, `nodeSelector`) where the schema stops and values.yaml goes on."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    in_values = _leaf_paths(values)
    in_schema = _schema_paths(schema, schema["$defs"])
    free_form = {p for p in in_schema if p not in in_values and any(v.startswith(p + ".") for v in in_values)}
    return in_values, in_schema, free_form


def test_schema_and_values_have_the_same_keys() -> None:
    """Drift check: every value has a schema entry and every schema entry a value."""
    in_values, in_schema, free_form = _free_form_paths()
    in_values = {v for v in in_values if not any(v.startswith(f + ".") for f in free_form)} | free_form
    assert sorted(in_values - in_schema) == [], "in values.yaml, missing from values.schema.json"
    assert sorted(in_schema - in_values) == [], "in values.schema.json, missing from values.yaml"


def test_every_value_is_documented() -> None:
    """Each key of values.yaml has a comment line right above it (helm-docs' `# --`), unless it opens a
    block whose keys are documented, or sits inside a free-form block documented as a whole."""
    free_form = _free_form_paths()[2]
    stack: list[tuple[int, str]] = []
    undocumented = []
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w-]*):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
        stack = [(n, k) for n, k in stack if n < indent]
        parent = ".".join(k for _, k in stack)
        stack.append((indent, key))
        if any(parent == f or parent.startswith(f + ".") for f in free_form):
            continue
        if rest == "" or lines[i - 1].strip().startswith("#"):
            continue  # a block (its keys are checked), or documented
        undocumented.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert undocumented == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"gateway.replicas": 0}, "at '/gateway/replicas': minimum: got 0, want 1"),
        (
            {"rollout.config": {"max_in_fligt": 8}},
            "at '/rollout/config': additional properties 'max_in_fligt' not allowed",
        ),
        ({"rollout.config": {"max_in_flight": 0}}, "at '/rollout/config/max_in_flight': minimum: got 0, want 1"),
        ({"inference.config": {"dtype": "int4"}}, "at '/inference/config/dtype': value must be one of"),
        ({"inference.gpu.count": -1}, "at '/inference/gpu/count': minimum: got -1, want 0"),
        ({"kafka.mode": "external"}, "at '/kafka/external/bootstrapServers': minLength: got 0, want 1"),
        (
            {"kafka.external.securityProtocol": "TLS"},
            "at '/kafka/external/securityProtocol': value must be one of 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT'",
        ),
        ({"kafka.external.securityProtocol": "SASL_SSL"}, "at '/kafka/external/sasl/existingSecret': minLength: got 0"),
        ({"kafka.external.sasl.mechanism": "GSSAPI"}, "at '/kafka/external/sasl/mechanism': value must be one of"),
        ({"kafka.external.tls.existingSecret": "ca"}, "at '/kafka/external/tls/existingSecret': maxLength: got 2"),
        ({"postgresql.mode": "managed"}, "at '/postgresql/mode': value must be one of 'dev', 'external'"),
        ({"trainer.image": "inferenceCpu"}, "at '/trainer/image': value must be one of 'gpu', 'services'"),
        ({"sandbox.namespce": "x"}, "at '/sandbox': additional properties 'namespce' not allowed"),
    ],
)
def test_schema_refuses_bad_values_naming_the_path(overrides: dict[str, Any], message: str) -> None:
    args = ["template", "rel", str(CHART)]
    for key, value in overrides.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    result = helm(*args, check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr


def test_service_config_keys_are_the_services_own() -> None:
    """The schema's `config` keys come from the config classes, less the keys the chart wires itself."""
    chart_schema = schema_module()
    generated = json.loads((CHART / "values.schema.json").read_text())
    rollout_keys = set(generated["properties"]["rollout"]["properties"]["config"]["properties"])
    assert {"max_in_flight", "sandbox_memory_mb", "reward_alpha"} <= rollout_keys
    assert not rollout_keys & {"gateway_address", "k8s_namespace", "port", "host"}
    for service, cls in chart_schema.CONFIG_CLASSES.items():
        keys = set(generated["properties"][service]["properties"]["config"]["properties"])
        assert keys <= set(cls.model_fields), service
