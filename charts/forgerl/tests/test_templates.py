"""Template tests over `helm template` output: one or more per template folder, each against an
independent reference (the services' config classes, the sandbox backend's Pod, Kubernetes semantics)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from chart_render import NAMESPACE, RELEASE, Manifest, find, render, schema_module

from forgerl.rollout.sandbox.base import SandboxLimits
from forgerl.rollout.sandbox.kubernetes import build_pod, to_dict
from forgerl.runtime.config import SHARED_KEYS, ServiceConfig

pytestmark = pytest.mark.chart

SERVICES: dict[str, type[ServiceConfig]] = schema_module().CONFIG_CLASSES
PREFIX = f"{RELEASE}-forgerl"
# Variables besides FORGERL_<SERVICE>_<KEY> that a service container may carry: HOME, torchrun's
# rendezvous (PET_*, MASTER_ADDR) and the dev database's password that the URL interpolates.
OTHER_ENV = {"HOME", "MASTER_ADDR", "FORGERL_DEV_DATABASE_PASSWORD"}


def workload(manifests: list[Manifest], service: str) -> Manifest:
    kind = "StatefulSet" if service in ("inference", "trainer") else "Deployment"
    return find(manifests, kind, f"{PREFIX}-{service}")


def container(manifests: list[Manifest], service: str) -> dict[str, Any]:
    containers = workload(manifests, service)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env(manifests: list[Manifest], service: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifests, service)["env"]}


def runtime_env(manifests: list[Manifest], service: str) -> dict[str, str]:
    """The container's variables as the process sees them: a secretKeyRef stands for its secret's value."""
    resolved = {}
    for name, value in env(manifests, service).items():
        if isinstance(value, dict) and "secretKeyRef" in value:
            value = "<secret {name}/{key}>".format(**value["secretKeyRef"])
        if isinstance(value, str):
            resolved[name] = value
    return resolved


@pytest.mark.parametrize("profile", ["default", "gpu", "kind"])
@pytest.mark.parametrize("service", list(SERVICES))
def test_env_sets_only_keys_the_service_reads(profile: str, service: str) -> None:
    """Every FORGERL_* variable is a field of the service's config class (a misspelt key would be ignored
    silently by load_config), and the pod binds 0.0.0.0 on the port its probes and Service use."""
    manifests = render(profile)
    variables = env(manifests, service)
    fields = set(SERVICES[service].model_fields)
    own = {f"FORGERL_{service.upper()}_{f.upper()}" for f in fields}
    shared = {f"FORGERL_{k.upper()}" for k in SHARED_KEYS}
    unknown = {v for v in variables if v not in own | shared | OTHER_ENV and not v.startswith("PET_")}
    assert unknown == set()
    prefix = f"FORGERL_{service.upper()}_"
    assert variables[prefix + "HOST"] == "0.0.0.0"
    c = container(manifests, service)
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    assert variables[prefix + "PORT"] == str(grpc_port)
    assert c["readinessProbe"]["grpc"] == {"port": grpc_port, "service": f"forgerl.v1.{service.title()}Service"}
    assert c["startupProbe"]["grpc"]["port"] == grpc_port
    assert c["args"] == ["serve", service]
    config = SERVICES[service].model_validate(
        {k.removeprefix(prefix).lower(): v for k, v in runtime_env(manifests, service).items() if k.startswith(prefix)}
    )
    assert config.port == grpc_port  # what the service itself would parse from the rendered values


def test_peers_point_at_the_services_that_exist() -> None:
    manifests = render()
    services = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Service"}
    for service in SERVICES:
        for key, value in env(manifests, service).items():
            if not key.endswith("_ADDRESS") and not key.endswith("_REPLICAS"):
                continue
            for address in str(value).split(","):
                host, port = address.rsplit(":", 1)
                name, namespace = host.split(".")[-3], host.split(".")[-2]
                assert namespace == NAMESPACE, address
                assert int(port) in [p["port"] for p in services[name]["spec"]["ports"]], address


def test_gpu_block_requests_gpus_and_schedules_on_the_pool() -> None:
    manifests = render("gpu")
    for service, count in (("inference", 4), ("trainer", 8)):
        spec = workload(manifests, service)["spec"]["template"]["spec"]
        resources = spec["containers"][0]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == count
        assert spec["runtimeClassName"] == "nvidia"
        assert spec["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    default = workload(render(), "inference")["spec"]["template"]["spec"]
    assert "runtimeClassName" not in default  # empty by default: the cluster's default runtime
    # vLLM shards the model over every GPU the pod gets (gpu profile: 4), one GPU by default.
    assert env(manifests, "inference")["FORGERL_INFERENCE_TENSOR_PARALLEL_SIZE"] == "4"
    assert env(render(), "inference")["FORGERL_INFERENCE_TENSOR_PARALLEL_SIZE"] == "1"
    kind = container(render("kind"), "inference")["resources"]
    assert "nvidia.com/gpu" not in kind["limits"]


def test_shm_is_memory_backed_only_with_several_gpus_or_nodes() -> None:
    def shm(manifests: list[Manifest], service: str) -> dict[str, Any] | None:
        volumes = workload(manifests, service)["spec"]["template"]["spec"]["volumes"]
        return next((v["emptyDir"] for v in volumes if v["name"] == "shm"), None)

    gpu = render("gpu")
    assert shm(gpu, "inference") == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert shm(gpu, "trainer") == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert shm(render("kind"), "inference") is None
    assert shm(render("default", inference__gpu__count=1), "inference") is None
    assert shm(render("default", inference__gpu__count=2, inference__shmSize="3Gi"), "inference") == {
        "medium": "Memory",
        "sizeLimit": "3Gi",
    }
    assert shm(render("default", trainer__gpu__count=1, trainer__nodes=2), "trainer") is not None


def test_trainer_is_a_statefulset_with_rendezvous_on_pod_0() -> None:
    manifests = render("gpu")
    sts = workload(manifests, "trainer")
    headless = find(manifests, "Service", f"{PREFIX}-trainer-headless")
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    variables = env(manifests, "trainer")
    pod0 = f"{PREFIX}-trainer-0.{PREFIX}-trainer-headless.{NAMESPACE}.svc"
    assert variables["PET_RDZV_ENDPOINT"] == f"{pod0}:29400" and variables["MASTER_ADDR"] == pod0
    assert variables["PET_NNODES"] == "2" and variables["PET_NPROC_PER_NODE"] == "8"
    assert variables["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    # Clients reach pod 0 only: it owns the runs.
    selector = find(manifests, "Service", f"{PREFIX}-trainer")["spec"]["selector"]
    assert selector["apps.kubernetes.io/pod-index"] == "0"
    assert not any(k.startswith("PET_") for k in env(render(), "trainer"))  # one node: no rendezvous


def test_startup_probes_come_from_values() -> None:
    probe = container(render(), "inference")["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] == 1800  # a 30-minute model load
    custom = container(
        render(
            "default",
            inference__probes={
                "startup": {"periodSeconds": 3, "failureThreshold": 7},
                "liveness": {"periodSeconds": 10, "failureThreshold": 3},
                "readiness": {"periodSeconds": 5, "failureThreshold": 3},
            },
        ),
        "inference",
    )["startupProbe"]
    assert (custom["periodSeconds"], custom["failureThreshold"]) == (3, 7)


def test_kafka_dev_broker_or_external() -> None:
    dev = render()
    broker = find(dev, "Deployment", f"{PREFIX}-kafka")["spec"]["template"]["spec"]["containers"][0]
    assert broker["command"] == ["tansu"] and "memory://tansu/" in broker["args"]
    advertised = broker["args"][broker["args"].index("--advertised-listener-url") + 1]
    assert env(dev, "datapool")["FORGERL_DATAPOOL_KAFKA_BOOTSTRAP"] == advertised.removeprefix("tcp://")
    external = render("gpu")
    assert not [m for m in external if m["metadata"]["name"] == f"{PREFIX}-kafka"]
    assert env(external, "datapool")["FORGERL_DATAPOOL_KAFKA_BOOTSTRAP"].startswith("kafka-0.kafka.data.svc:9093")


def test_kafka_sasl_and_tls_reach_the_datapool_as_files_from_their_secrets() -> None:
    """gpu profile (SASL_SSL, SCRAM-SHA-512, CA + client pair): each *_FILE variable names a file that
    Kubernetes makes from the right secret key (mountPath/item path), the username comes from the
    secret, no password is in the manifest, and the data pool's own config class accepts the result."""
    manifests = render("gpu")
    spec = workload(manifests, "datapool")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    files: dict[str, tuple[str, str]] = {}  # path in the container -> (secret, key)
    for volume in spec["volumes"]:
        if "secret" in volume:
            assert mounts[volume["name"]]["readOnly"] is True
            for item in volume["secret"]["items"]:
                path = f"{mounts[volume['name']]['mountPath']}/{item['path']}"
                files[path] = (volume["secret"]["secretName"], item["key"])
    variables = env(manifests, "datapool")
    expected = {
        "FORGERL_DATAPOOL_KAFKA_SASL_PASSWORD_FILE": ("forgerl-kafka-user", "password"),
        "FORGERL_DATAPOOL_KAFKA_SSL_CAFILE": ("forgerl-kafka-tls", "ca.crt"),
        "FORGERL_DATAPOOL_KAFKA_SSL_CERTFILE": ("forgerl-kafka-tls", "tls.crt"),
        "FORGERL_DATAPOOL_KAFKA_SSL_KEYFILE": ("forgerl-kafka-tls", "tls.key"),
    }
    assert {name: files[variables[name]] for name in expected} == expected
    assert variables["FORGERL_DATAPOOL_KAFKA_SASL_USERNAME"] == {
        "secretKeyRef": {"name": "forgerl-kafka-user", "key": "username"}
    }
    assert not [name for name in variables if name.endswith("_PASSWORD")]
    prefix = "FORGERL_DATAPOOL_"
    config = SERVICES["datapool"].model_validate(
        {
            k.removeprefix(prefix).lower(): v
            for k, v in runtime_env(manifests, "datapool").items()
            if k.startswith(prefix)
        }
    )
    assert (config.kafka_security_protocol, config.kafka_sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert config.kafka_ssl_check_hostname is True


def test_kafka_tls_with_only_a_ca_and_plaintext_by_default() -> None:
    tls = render(
        kafka__mode="external",
        kafka__external__bootstrapServers="kafka:9093",
        kafka__external__securityProtocol="SSL",
        kafka__external__tls__existingSecret="broker-ca",
    )
    spec = workload(tls, "datapool")["spec"]["template"]["spec"]
    secrets = [v["secret"] for v in spec["volumes"] if "secret" in v]
    assert secrets == [
        {"secretName": "broker-ca", "defaultMode": 0o440, "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    ]
    variables = env(tls, "datapool")
    assert variables["FORGERL_DATAPOOL_KAFKA_SSL_CAFILE"] == "/etc/forgerl/kafka-tls/ca.crt"
    assert not {"FORGERL_DATAPOOL_KAFKA_SSL_CERTFILE", "FORGERL_DATAPOOL_KAFKA_SASL_MECHANISM"} & set(variables)
    for manifests in (render(), render("kind")):  # the dev broker: plaintext inside the release
        spec = workload(manifests, "datapool")["spec"]["template"]["spec"]
        assert not [v for v in spec["volumes"] if "secret" in v]
        assert not [name for name in env(manifests, "datapool") if "KAFKA_S" in name]


def test_postgresql_dev_or_external() -> None:
    dev = render()
    url = env(dev, "trainer")["FORGERL_TRAINER_DATABASE_URL"]
    assert url.startswith("postgresql+psycopg://forgerl:$(FORGERL_DEV_DATABASE_PASSWORD)@rel-forgerl-postgresql.")
    names = [e["name"] for e in container(dev, "trainer")["env"]]
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    assert names.index("FORGERL_DEV_DATABASE_PASSWORD") < names.index("FORGERL_TRAINER_DATABASE_URL")
    assert find(dev, "Secret", f"{PREFIX}-postgresql")["data"]["password"]
    external = env(render("gpu"), "datapool")["FORGERL_DATAPOOL_DATABASE_URL"]
    assert external == {"secretKeyRef": {"name": "forgerl-run-store", "key": "url"}}


def test_checkpoints_claim_created_or_existing() -> None:
    created = render()
    pvc = find(created, "PersistentVolumeClaim", f"{PREFIX}-checkpoints")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for manifests, claim in ((created, f"{PREFIX}-checkpoints"), (render("gpu"), "forgerl-checkpoints")):
        for service in ("trainer", "inference"):
            volumes = workload(manifests, service)["spec"]["template"]["spec"]["volumes"]
            assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": claim}} in volumes
    assert not [m for m in render("gpu") if m["kind"] == "PersistentVolumeClaim"]


def sandbox_pod() -> dict[str, Any]:
    return to_dict(build_pod("forgerl-sbx-test", "forgerl-sandboxes", SandboxLimits(), active_deadline_s=900))


def test_sandbox_namespace_rbac_and_rollout_wiring() -> None:
    manifests = render()
    namespace = find(manifests, "Namespace", "forgerl-sandboxes")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    role = find(manifests, "Role", f"{PREFIX}-sandbox-manager")
    assert role["metadata"]["namespace"] == "forgerl-sandboxes"
    rules = {(r["resources"][0], v) for r in role["rules"] for v in r["verbs"]}
    # exactly what KubernetesSandboxFactory calls: create/read-status/exec/delete, nothing cluster-wide
    assert rules == {("pods", "create"), ("pods", "get"), ("pods", "delete"), ("pods/status", "get")} | {
        ("pods/exec", "create"),
        ("pods/exec", "get"),
    }
    assert not [m for m in manifests if m["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = find(manifests, "RoleBinding", f"{PREFIX}-sandbox-manager")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{PREFIX}-rollout", "namespace": NAMESPACE}]
    variables = env(manifests, "rollout")
    assert variables["FORGERL_ROLLOUT_SANDBOX"] == "kubernetes"
    assert variables["FORGERL_ROLLOUT_K8S_NAMESPACE"] == "forgerl-sandboxes"
    rollout_spec = workload(manifests, "rollout")["spec"]["template"]["spec"]
    assert rollout_spec["automountServiceAccountToken"] is True
    for service in set(SERVICES) - {"rollout"}:
        assert workload(manifests, service)["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_sandbox_network_policy_selects_the_backends_pods() -> None:
    manifests = render()
    labels = sandbox_pod()["metadata"]["labels"]
    deny_all = find(manifests, "NetworkPolicy", f"{PREFIX}-sandbox-default-deny")
    assert deny_all["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    policy = find(manifests, "NetworkPolicy", f"{PREFIX}-sandbox")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()  # it selects the pods build_pod() makes
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "rollout"
    assert policy["spec"]["egress"] == []


def test_sandbox_public_egress_never_reaches_private_or_metadata_addresses() -> None:
    policy = find(render(sandbox__publicEgress=True), "NetworkPolicy", f"{PREFIX}-sandbox")
    (rule,) = policy["spec"]["egress"]
    block = rule["to"][0]["ipBlock"]
    excepted = [ipaddress.ip_network(c) for c in block["except"]]

    def allowed(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(ip in net for net in excepted)

    for private in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.10", "127.0.0.1"):
        assert not allowed(private), private
    assert allowed("1.1.1.1") and allowed("151.101.0.223")


def test_sandbox_admission_policy_and_runtime_class() -> None:
    manifests = render("gpu")
    policy = find(manifests, "ValidatingAdmissionPolicy", f"{PREFIX}-sandbox-pods")
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    for needle in ("automountServiceAccountToken", "activeDeadlineSeconds", "RuntimeDefault", "'ALL'"):
        assert needle in expressions
    assert "runtimeClassName == 'gvisor'" in expressions
    binding = find(manifests, "ValidatingAdmissionPolicyBinding", f"{PREFIX}-sandbox-pods")
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "forgerl-sandboxes"
    }
    assert find(manifests, "RuntimeClass", "gvisor")["handler"] == "runsc"
    assert env(manifests, "rollout")["FORGERL_ROLLOUT_K8S_RUNTIME_CLASS"] == "gvisor"
    # The backend's pod meets what the policy asks: no token, a deadline, an ephemeral-storage limit.
    pod = sandbox_pod()
    assert pod["spec"]["automountServiceAccountToken"] is False and pod["spec"]["activeDeadlineSeconds"] <= 3600
    assert "ephemeral-storage" in pod["spec"]["containers"][0]["resources"]["limits"]
    limit_range = find(manifests, "LimitRange", f"{PREFIX}-sandbox")
    assert limit_range["spec"]["limits"][0]["max"]["ephemeral-storage"] == "2Gi"


def test_every_service_has_a_network_policy_open_to_its_callers_only() -> None:
    manifests = render()
    callers = {"inference": {"gateway", "trainer"}, "datapool": {"gateway", "rollout", "trainer"}}
    for service in SERVICES:
        policy = find(manifests, "NetworkPolicy", f"{PREFIX}-{service}")
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
        grpc_rule = policy["spec"]["ingress"][0]
        sources = {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in grpc_rule["from"]}
        assert "test" in sources and service not in sources - {"trainer"}
        if service in callers:
            assert sources == callers[service] | {"test"}
    rollout_egress = find(manifests, "NetworkPolicy", f"{PREFIX}-rollout")["spec"]["egress"]
    assert any(r.get("to", [{}])[0].get("ipBlock") for r in rollout_egress)  # the API server, for sandboxes
    assert not [m for m in render(networkPolicy__enabled=False) if m["kind"] == "NetworkPolicy"]


def test_pods_run_unprivileged() -> None:
    for profile in ("default", "gpu", "kind"):
        for manifest in render(profile):
            spec = _pod_spec(manifest)
            if spec is None:
                continue
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            for c in spec["containers"] + spec.get("initContainers", []):
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
                assert sc["readOnlyRootFilesystem"] is True


def _pod_spec(manifest: Manifest) -> dict[str, Any] | None:
    if manifest["kind"] == "Pod":
        return dict(manifest["spec"])
    if manifest["kind"] in ("Deployment", "StatefulSet"):
        return dict(manifest["spec"]["template"]["spec"])
    return None


def test_pdbs_for_gateway_and_evolution_and_service_monitor_off_by_default() -> None:
    manifests = render()
    pdbs = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "PodDisruptionBudget"}
    assert set(pdbs) == {f"{PREFIX}-gateway", f"{PREFIX}-evolution"}
    assert pdbs[f"{PREFIX}-gateway"]["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "gateway"
    assert not [m for m in manifests if m["kind"] == "ServiceMonitor"]
    monitors = [m for m in render(serviceMonitor__enabled=True) if m["kind"] == "ServiceMonitor"]
    assert len(monitors) == len(SERVICES)
    assert all(m["spec"]["endpoints"][0]["port"] == "metrics" for m in monitors)


def test_helm_tests_check_health_of_every_service_and_run_one_episode() -> None:
    manifests = render()
    health = find(manifests, "Pod", f"{PREFIX}-test-health")
    episode = find(manifests, "Pod", f"{PREFIX}-test-episode")
    for pod in (health, episode):
        assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert pod["spec"]["containers"][0]["command"] == ["python", "-m", "forgerl.deploy.checks"]
    targets = dict(a.split("=", 1) for a in health["spec"]["containers"][0]["args"] if "=" in a)
    assert set(targets) == set(SERVICES)
    args = episode["spec"]["containers"][0]["args"]
    assert args[:2] == ["episode", "--rollout"] and args[2] == targets["rollout"]


def test_kind_profile_serves_a_fresh_debug_checkpoint_on_cpu() -> None:
    manifests = render("kind")
    spec = workload(manifests, "inference")["spec"]["template"]["spec"]
    assert spec["containers"][0]["image"] == "forgerl.local/forgerl-inference-cpu:dev"
    (init,) = spec["initContainers"]
    assert "ensure_initial_checkpoint(Path('/checkpoints/init'), 'debug')" in init["args"][0].replace('"', "'")
    assert env(manifests, "trainer")["FORGERL_TRAINER_INFERENCE_MODEL_PATH"] == "/checkpoints/init"
    assert all(
        c["imagePullPolicy"] == "Never"
        for m in manifests
        if (s := _pod_spec(m)) and m["metadata"]["name"] != f"{PREFIX}-postgresql"
        for c in s["containers"]
    )


def test_rollout_runs_the_scaffolds_evolution_writes() -> None:
    """Evolution writes scaffold versions that rollout loads by name: both see one directory, on the shared
    checkpoints volume mounted at the same path."""
    manifests = render()
    rollout_dir = env(manifests, "rollout")["FORGERL_ROLLOUT_SCAFFOLD_DIR"]
    assert rollout_dir == env(manifests, "evolution")["FORGERL_EVOLUTION_SCAFFOLD_DIR"] == "/checkpoints/scaffolds"
    for service in ("rollout", "evolution"):
        mounts = container(manifests, service)["volumeMounts"]
        assert {"name": "checkpoints", "mountPath": "/checkpoints"} in mounts


def test_gateway_reads_the_tokenizer_inference_serves() -> None:
    """With no tokenizer_path the gateway loads the tokenizer from the model path inference reports
    (services/gateway/config.py): that path must exist in the gateway's pod too."""
    manifests = render()
    model_path = env(manifests, "inference")["FORGERL_INFERENCE_MODEL_PATH"]
    assert "FORGERL_GATEWAY_TOKENIZER_PATH" not in env(manifests, "gateway")
    mounts = container(manifests, "gateway")["volumeMounts"]
    assert any(model_path.startswith(m["mountPath"] + "/") and m["name"] == "checkpoints" for m in mounts)
