"""The sandbox Pod and NetworkPolicy pass Kubernetes schema validation and carry the restrictions."""

from __future__ import annotations

import pytest

kubernetes_validate = pytest.importorskip("kubernetes_validate")
pytest.importorskip("kubernetes")

from forgerl.rollout.sandbox.base import SandboxLimits  # noqa: E402
from forgerl.rollout.sandbox.kubernetes import (  # noqa: E402
    EGRESS_LABEL,
    build_network_policy,
    build_pod,
    to_dict,
    wrap_command,
)

pytestmark = pytest.mark.unit
LIMITS = SandboxLimits(memory_bytes=512 << 20, cpu_cores=0.5, disk_bytes=256 << 20, processes=32)
VERSIONS = ["1.37.0", "1.33.0", "1.30.0"]


def pod() -> dict:
    labels = {"forgerl/run": "run-1", "forgerl/task": "swe/train/mathutils-clamp-upper", "forgerl/episode": "e" * 80}
    return to_dict(build_pod("forgerl-sbx-0123456789ab", "sandboxes", LIMITS, labels=labels, active_deadline_s=720))


@pytest.mark.parametrize("version", VERSIONS)
def test_pod_and_network_policy_pass_schema_validation(version: str) -> None:
    kubernetes_validate.validate(pod(), version, strict=True)
    kubernetes_validate.validate(to_dict(build_network_policy("sandboxes")), version, strict=True)


def test_the_validator_is_not_a_rubber_stamp() -> None:
    bad = pod()
    bad["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = "no"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)
    unknown = pod()
    unknown["spec"]["sandboxMode"] = "strict"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, VERSIONS[0], strict=True)


def test_pod_carries_limits_and_restrictions() -> None:
    p = pod()
    spec, (container,) = p["spec"], p["spec"]["containers"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is False and spec["restartPolicy"] == "Never"
    assert not spec["hostNetwork"] and not spec["hostPID"] and not spec["hostIPC"]
    assert spec["activeDeadlineSeconds"] == 720 and spec["terminationGracePeriodSeconds"] == 0
    assert p["metadata"]["labels"][EGRESS_LABEL] == "deny"
    assert all(len(v) <= 63 for v in p["metadata"]["labels"].values())
    assert container["resources"]["limits"] == {"cpu": "0.5", "memory": "512Mi", "ephemeral-storage": "256Mi"}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0 and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"} and sc["privileged"] is False
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"/workspace", "/tmp"}
    assert {v["name"]: v["emptyDir"]["sizeLimit"] for v in spec["volumes"]}["workspace"] == "256Mi"


def test_network_policy_denies_everything_for_labelled_pods() -> None:
    policy = to_dict(build_network_policy("sandboxes"))
    assert policy["spec"]["podSelector"] == {"matchLabels": {EGRESS_LABEL: "deny"}}
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert policy["spec"]["egress"] == [] and policy["spec"]["ingress"] == []


def test_exec_wrapper_applies_per_command_limits() -> None:
    argv = wrap_command(["python3", "-c", "print('hi there')"], LIMITS, 12.5)
    assert argv[:2] == ["sh", "-c"]
    script = argv[2]
    assert "ulimit -u 32" in script and "ulimit -t 120" in script and "ulimit -c 0" in script
    assert "exec timeout -s KILL 12 python3 -c 'print('\"'\"'hi there'\"'\"')'" in script


class FakeCoreV1:
    """The CoreV1Api calls the sandbox makes, against an in-memory 'cluster'."""

    def __init__(self, phases: list[str], waiting: str | None = None) -> None:
        from types import SimpleNamespace

        self.ns = SimpleNamespace
        self.phases = phases
        self.waiting = waiting
        self.created: list[dict] = []
        self.deleted: list[str] = []

    def create_namespaced_pod(self, namespace: str, body: object) -> None:
        self.created.append(to_dict(body))

    def read_namespaced_pod_status(self, name: str, namespace: str) -> object:
        phase = self.phases.pop(0) if len(self.phases) > 1 else self.phases[0]
        state = self.ns(waiting=self.ns(reason=self.waiting, message="no such image") if self.waiting else None)
        return self.ns(status=self.ns(phase=phase, message="", reason="", container_statuses=[self.ns(state=state)]))

    def delete_namespaced_pod(self, name: str, namespace: str, grace_period_seconds: int) -> None:
        self.deleted.append(name)


async def test_pod_lifecycle_create_wait_exec_delete() -> None:
    from forgerl.rollout.sandbox.base import SandboxRequest
    from forgerl.rollout.sandbox.kubernetes import KubernetesSandboxFactory

    api = FakeCoreV1(["Pending", "Pending", "Running"])
    factory = KubernetesSandboxFactory("sandboxes", LIMITS, api=api, poll_s=0.01)
    calls: list[list[str]] = []

    def exec_in_pod(name: str, argv: list[str]) -> tuple[str, str, int | None]:
        calls.append(argv)
        return ("hello\n", "", 0) if "echo" in argv[2] else ("", "", 0)

    factory.exec_in_pod = exec_in_pod  # type: ignore[method-assign]
    sandbox = await factory.create(SandboxRequest(files={"a.py": "print(1)"}, labels={"forgerl/run": "r"}))
    (pod,) = api.created
    assert pod["metadata"]["namespace"] == "sandboxes" and pod["metadata"]["labels"]["forgerl.io/run"] == "r"
    assert "printf %s" in calls[0][2] and "base64 -d" in calls[1][2], "task files are written through exec"
    result = await sandbox.exec(["echo", "hello"], timeout_s=5)
    assert result.ok and result.stdout == "hello\n" and "timeout -s KILL 5 echo hello" in calls[-1][2]
    await sandbox.close()
    await sandbox.close()
    assert api.deleted == [pod["metadata"]["name"]]


async def test_pod_that_cannot_start_is_an_infrastructure_error_and_is_deleted() -> None:
    from forgerl.rollout.sandbox.base import SandboxInfraError, SandboxRequest
    from forgerl.rollout.sandbox.kubernetes import KubernetesSandboxFactory

    api = FakeCoreV1(["Pending"], waiting="ImagePullBackOff")
    factory = KubernetesSandboxFactory("sandboxes", LIMITS, api=api, poll_s=0.01)
    with pytest.raises(SandboxInfraError, match="ImagePullBackOff"):
        await factory.create(SandboxRequest())
    assert len(api.deleted) == 1
    never = FakeCoreV1(["Pending"])
    factory = KubernetesSandboxFactory("sandboxes", LIMITS, api=never, poll_s=0.01, start_timeout_s=0.05)
    with pytest.raises(SandboxInfraError, match="not running"):
        await factory.create(SandboxRequest())
    assert len(never.deleted) == 1


async def test_large_stdin_is_staged_in_chunks() -> None:
    from forgerl.rollout.sandbox.base import SandboxRequest
    from forgerl.rollout.sandbox.kubernetes import STDIN_CHUNK, KubernetesSandboxFactory

    factory = KubernetesSandboxFactory("sandboxes", LIMITS, api=FakeCoreV1(["Running"]), poll_s=0.01)
    calls: list[list[str]] = []
    factory.exec_in_pod = lambda name, argv: (calls.append(argv), ("", "", 0))[1]  # type: ignore[method-assign]
    sandbox = await factory.create(SandboxRequest())
    await sandbox.exec(["cat"], stdin=b"x" * (STDIN_CHUNK * 2))
    assert max(len(a) for argv in calls for a in argv) < 128 << 10
    assert sum("printf %s" in argv[2] for argv in calls) >= 3 and "base64 -d /tmp/.stdin-" in calls[-1][2]
    await sandbox.close()
