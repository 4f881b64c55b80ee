"""Kubernetes sandbox: one Pod per episode, created and deleted through the `kubernetes` client.

The Pod (`build_pod`) runs `sleep` as PID 1 and the episode's commands arrive by `exec`. It carries:

- resource limits and requests: CPU, memory, ephemeral storage; an emptyDir work directory with a size
  limit; per-command process / file-size / CPU-time limits by `ulimit` in the exec wrapper, and a
  wall-clock limit by `timeout -s KILL` (plus `activeDeadlineSeconds` for the whole Pod);
- no service-account token (`automountServiceAccountToken: false`), no service links, no host
  namespaces, a non-root uid, no privilege escalation, every capability dropped, RuntimeDefault seccomp,
  a read-only root file system (only /workspace and /tmp are writable);
- the label `forgerl.io/egress: deny`, which the deny-all NetworkPolicy (`build_network_policy`,
  installed once per namespace, e.g. by the Helm chart) selects: no egress and no ingress at all.

Honest status: the Pod and NetworkPolicy specs are validated against the Kubernetes schema in the tests
(kubernetes-validate); the create / exec / delete path needs a cluster and is exercised by a kind e2e tier,
not by this repository's tests.
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from forgerl.rollout.sandbox.base import (
    ExecResult,
    Sandbox,
    SandboxFactory,
    SandboxInfraError,
    SandboxLimits,
    SandboxRequest,
    classify,
    quote,
    shell_argv,
)

EGRESS_LABEL = "forgerl.io/egress"
SANDBOX_LABEL = "forgerl.io/sandbox"
DEFAULT_IMAGE = "python:3.11-slim"
WORKDIR = "/workspace"
SANDBOX_UID = 65534
STDIN_CHUNK = 96 << 10  # base64 characters per exec argument (the kernel allows 128 KiB per argument)
_LABEL_VALUE = re.compile(r"[^A-Za-z0-9._-]")


def _label_value(value: str) -> str:
    """A valid label value: at most 63 characters of [A-Za-z0-9._-], alphanumeric at both ends."""
    cleaned = _LABEL_VALUE.sub("_", value)[:63].strip("._-")
    return cleaned or "x"


def _quantity_bytes(n: int) -> str:
    return f"{max(1, n // (1 << 20))}Mi"


def build_pod(
    name: str,
    namespace: str,
    limits: SandboxLimits,
    *,
    image: str = DEFAULT_IMAGE,
    labels: Mapping[str, str] | None = None,
    active_deadline_s: int = 900,
    runtime_class: str | None = None,
) -> Any:
    """The sandbox Pod as a `kubernetes.client.V1Pod`."""
    from kubernetes import client as k8s

    pod_labels = {SANDBOX_LABEL: "true", EGRESS_LABEL: "deny", "app.kubernetes.io/managed-by": "forgerl-rollout"}
    for key, value in (labels or {}).items():
        pod_labels[f"forgerl.io/{_label_value(key.split('/')[-1])}"] = _label_value(value)
    resources = {
        "cpu": str(limits.cpu_cores),
        "memory": _quantity_bytes(limits.memory_bytes),
        "ephemeral-storage": _quantity_bytes(limits.disk_bytes),
    }
    container = k8s.V1Container(
        name="sandbox",
        image=image,
        image_pull_policy="IfNotPresent",
        command=["sleep", str(active_deadline_s + 60)],
        working_dir=WORKDIR,
        env=[
            k8s.V1EnvVar(name="HOME", value=WORKDIR),
            k8s.V1EnvVar(name="TMPDIR", value="/tmp"),
            k8s.V1EnvVar(name="PYTHONDONTWRITEBYTECODE", value="1"),
        ],
        resources=k8s.V1ResourceRequirements(limits=resources, requests=dict(resources)),
        security_context=k8s.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=SANDBOX_UID,
            run_as_group=SANDBOX_UID,
            allow_privilege_escalation=False,
            privileged=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volume_mounts=[
            k8s.V1VolumeMount(name="workspace", mount_path=WORKDIR),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
        ],
    )
    spec = k8s.V1PodSpec(
        containers=[container],
        restart_policy="Never",
        automount_service_account_token=False,
        enable_service_links=False,
        host_network=False,
        host_pid=False,
        host_ipc=False,
        share_process_namespace=False,
        termination_grace_period_seconds=0,
        active_deadline_seconds=active_deadline_s,
        dns_policy="None",
        dns_config=k8s.V1PodDNSConfig(nameservers=["127.0.0.1"]),  # no name resolution either
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=SANDBOX_UID,
            run_as_group=SANDBOX_UID,
            fs_group=SANDBOX_UID,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[
            k8s.V1Volume(
                name="workspace", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit=_quantity_bytes(limits.disk_bytes))
            ),
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource(size_limit="64Mi")),
        ],
        runtime_class_name=runtime_class,
    )
    return k8s.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace, labels=pod_labels),
        spec=spec,
    )


def build_network_policy(namespace: str, name: str = "forgerl-sandbox-deny-all") -> Any:
    """Deny all egress and ingress for Pods labelled `forgerl.io/egress: deny`."""
    from kubernetes import client as k8s

    return k8s.V1NetworkPolicy(
        api_version="networking.k8s.io/v1",
        kind="NetworkPolicy",
        metadata=k8s.V1ObjectMeta(name=name, namespace=namespace),
        spec=k8s.V1NetworkPolicySpec(
            pod_selector=k8s.V1LabelSelector(match_labels={EGRESS_LABEL: "deny"}),
            policy_types=["Ingress", "Egress"],
            ingress=[],
            egress=[],
        ),
    )


def to_dict(obj: Any) -> dict[str, Any]:
    """A client model as the plain dict the API server receives (camelCase keys, no None)."""
    from kubernetes import client as k8s

    result: dict[str, Any] = k8s.ApiClient().sanitize_for_serialization(obj)
    return result


def wrap_command(argv: Sequence[str], limits: SandboxLimits, timeout_s: float) -> list[str]:
    """`sh -c 'ulimit ...; exec timeout -s KILL T cmd'`: the per-command limits inside the Pod."""
    ulimits = (
        f"ulimit -u {limits.processes}; ulimit -f {max(1, limits.file_size_bytes // 512)}; "
        f"ulimit -t {limits.cpu_seconds}; ulimit -n {limits.open_files}; ulimit -c 0"
    )
    return ["sh", "-c", f"{ulimits}; cd {WORKDIR} && exec timeout -s KILL {max(1, int(timeout_s))} {quote(argv)}"]


class KubernetesSandbox(Sandbox):
    kind = "kubernetes"
    workdir = WORKDIR

    def __init__(self, factory: KubernetesSandboxFactory, name: str) -> None:
        super().__init__(name, factory.limits)
        self.factory = factory
        self.name = name

    async def exec(
        self,
        argv: Sequence[str] | str,
        *,
        timeout_s: float | None = None,
        stdin: bytes | None = None,
        env: Mapping[str, str] | None = None,
        output_bytes: int | None = None,
    ) -> ExecResult:
        if self.closed:
            raise SandboxInfraError(f"sandbox {self.id} is closed")
        timeout = self.limits.command_timeout_s if timeout_s is None else timeout_s
        command = shell_argv(argv)
        if env:
            command = ["env", *(f"{k}={v}" for k, v in env.items()), *command]
        if stdin is not None:  # the exec stream's stdin is awkward to close; hand the bytes over in base64
            command = await self._staged_stdin(stdin, command)
        wrapped = wrap_command(command, self.limits, timeout)
        start = time.monotonic()
        try:
            out, err, code = await asyncio.wait_for(
                asyncio.to_thread(self.factory.exec_in_pod, self.name, wrapped), timeout + 30.0
            )
        except TimeoutError as exc:
            raise SandboxInfraError(f"pod {self.name}: exec did not return") from exc
        duration = time.monotonic() - start
        timed_out = code == 137 and duration >= timeout - 0.5
        sig = code - 128 if code is not None and code > 128 else None
        exit_code = None if sig is not None else code
        cap = output_bytes or self.limits.output_bytes
        truncated = len(out) > cap or len(err) > cap
        return ExecResult(
            exit_code=exit_code,
            signal=sig,
            stdout=out[:cap],
            stderr=err[:cap],
            duration_s=duration,
            timed_out=timed_out,
            truncated=truncated,
            violations=classify(exit_code, sig, err, timed_out=timed_out, truncated=truncated),
        )

    async def _staged_stdin(self, stdin: bytes, command: list[str]) -> list[str]:
        """The command reading `stdin` from a file staged by earlier execs (one argument holds 128 KiB at
        most) and unlinked before the command starts. Never inline: the bytes would sit in the argv of
        `timeout` for the whole command, where any process of the Pod reads them (/proc/*/cmdline), and the
        grader's nonce must stay out of the tests' reach."""
        encoded = base64.b64encode(stdin).decode()
        staged = f"/tmp/.stdin-{uuid.uuid4().hex[:8]}"
        for i in range(0, len(encoded), STDIN_CHUNK):
            part = encoded[i : i + STDIN_CHUNK]
            await asyncio.to_thread(self.factory.exec_in_pod, self.name, ["sh", "-c", f"printf %s {part} >> {staged}"])
        unstage = f"base64 -d {staged} > {staged}.raw && exec < {staged}.raw && rm -f {staged} {staged}.raw"
        return ["sh", "-c", f"{unstage} && exec {quote(command)}"]

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await asyncio.to_thread(self.factory.delete_pod, self.name)


class KubernetesSandboxFactory(SandboxFactory):
    kind = "kubernetes"

    def __init__(
        self,
        namespace: str,
        limits: SandboxLimits | None = None,
        *,
        image: str = DEFAULT_IMAGE,
        kubeconfig: str | None = None,
        start_timeout_s: float = 120.0,
        runtime_class: str | None = None,
        api: Any = None,
        poll_s: float = 0.5,
    ) -> None:
        if api is None:
            from kubernetes import client as k8s
            from kubernetes import config as k8s_config

            if kubeconfig:
                k8s_config.load_kube_config(config_file=kubeconfig)
            else:
                try:
                    k8s_config.load_incluster_config()
                except k8s_config.ConfigException:
                    k8s_config.load_kube_config()
            api = k8s.CoreV1Api()
        self.api = api  # CoreV1Api (tests pass a stand-in)
        self.poll_s = poll_s
        self.namespace = namespace
        self.limits = limits or SandboxLimits()
        self.image = image
        self.start_timeout_s = start_timeout_s
        self.runtime_class = runtime_class

    async def create(self, request: SandboxRequest) -> Sandbox:
        start = time.monotonic()
        name = f"forgerl-sbx-{uuid.uuid4().hex[:12]}"
        pod = build_pod(
            name,
            self.namespace,
            self.limits,
            image=self.image_for(request),
            labels=request.labels,
            active_deadline_s=int(request.time_budget_s),
            runtime_class=self.runtime_class,
        )
        sandbox = KubernetesSandbox(self, name)
        try:
            await asyncio.to_thread(self.api.create_namespaced_pod, self.namespace, pod)
            await self._wait_running(name)
            if request.files:
                result = await sandbox.write_files(request.files)
                if not result.ok:
                    raise SandboxInfraError(f"pod {name}: could not write the task files: {result.describe()}")
        except SandboxInfraError:
            await sandbox.close()
            raise
        except Exception as exc:
            await sandbox.close()
            raise SandboxInfraError(f"pod {name}: {exc}") from exc
        sandbox.start_latency_s = time.monotonic() - start
        return sandbox

    def image_for(self, request: SandboxRequest) -> str:
        """The task environment's ready image, or the factory's default when the task declares none."""
        env = request.environment
        if env is None:
            return self.image
        if env.image:
            return env.image
        if env.requirements:
            raise SandboxInfraError(
                f"the task environment declares requirements ({', '.join(env.requirements)}) but no image: "
                "sandbox Pods have no network to install them; build an image with them and declare it as `image`"
            )
        return self.image

    async def _wait_running(self, name: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            pod = await asyncio.to_thread(self.api.read_namespaced_pod_status, name, self.namespace)
            phase = pod.status.phase if pod.status else None
            if phase == "Running":
                return
            if phase in ("Failed", "Succeeded", "Unknown"):
                raise SandboxInfraError(f"pod {name} is {phase}: {pod.status.message or pod.status.reason}")
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                waiting = cs.state.waiting if cs.state else None
                if waiting and waiting.reason in ("ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError"):
                    raise SandboxInfraError(f"pod {name}: {waiting.reason}: {waiting.message}")
            await asyncio.sleep(self.poll_s)
        raise SandboxInfraError(f"pod {name} not running after {self.start_timeout_s:.0f}s")

    def exec_in_pod(self, name: str, argv: list[str]) -> tuple[str, str, int | None]:
        """Blocking exec through the API server's exec subresource: (stdout, stderr, exit code)."""
        import yaml
        from kubernetes.stream import stream

        resp = stream(
            self.api.connect_get_namespaced_pod_exec,
            name,
            self.namespace,
            container="sandbox",
            command=argv,
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        out, err = [], []
        while resp.is_open():
            resp.update(timeout=1)
            if resp.peek_stdout():
                out.append(resp.read_stdout())
            if resp.peek_stderr():
                err.append(resp.read_stderr())
        status = yaml.safe_load(resp.read_channel(3) or "{}") or {}
        resp.close()
        code: int | None = 0
        if status.get("status") != "Success":
            code = 1
            for cause in (status.get("details") or {}).get("causes", []):
                if cause.get("reason") == "ExitCode":
                    code = int(cause.get("message", 1))
        return "".join(out), "".join(err), code

    def delete_pod(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
        except ApiException as exc:
            if exc.status != 404:
                raise SandboxInfraError(f"pod {name}: delete failed: {exc.reason}") from exc
