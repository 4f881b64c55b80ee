"""Write charts/forgerl/values.schema.json: the types of values.yaml, and each service's `config` block typed
from its pydantic config class (services/<service>/config.py), so a key the service does not read, or a
value it would refuse, fails `helm install` with the path of the bad value.

    python charts/forgerl/schema.py            # rewrite values.schema.json
    python charts/forgerl/schema.py --check    # exit 1 when the committed file differs (the chart tests run it)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from forgerl.datapool.security import PROTOCOLS, SASL_MECHANISMS, KafkaSecurity
from forgerl.services.datapool.config import DatapoolConfig
from forgerl.services.evolution.config import EvolutionConfig
from forgerl.services.gateway.config import GatewayConfig
from forgerl.services.inference.config import InferenceConfig
from forgerl.services.rollout.config import RolloutConfig
from forgerl.services.trainer.config import TrainerConfig

SCHEMA_PATH = Path(__file__).with_name("values.schema.json")
CONFIG_CLASSES: dict[str, type[BaseModel]] = {
    "inference": InferenceConfig,
    "datapool": DatapoolConfig,
    "gateway": GatewayConfig,
    "rollout": RolloutConfig,
    "trainer": TrainerConfig,
    "evolution": EvolutionConfig,
}
# Keys the chart sets itself (templates/_helpers.tpl, forgerl.env*): bind address, ports, state, peers,
# storage. A user's `config` block may not set them; everything else in the config class it may.
SHARED_MANAGED = {"host", "port", "metrics_port", "state_dir", "auth_token", "log_level", "log_format", "database_url"}
MANAGED: dict[str, set[str]] = {
    "inference": {"model_path", "max_model_len", "tensor_parallel_size"},
    "datapool": {"kafka_bootstrap"} | {f"kafka_{f.name}" for f in dataclasses.fields(KafkaSecurity)},
    "gateway": {
        "http_port",
        "inference_address",
        "inference_replicas",
        "datapool_address",
        "max_model_len",
        "public_base_url",
    },
    "rollout": {"gateway_address", "datapool_address", "scaffold_dir", "sandbox", "k8s_namespace", "k8s_image"}
    | {"k8s_runtime_class", "k8s_kubeconfig"},
    "trainer": {"rollout_address", "datapool_address", "inference_address", "inference_model_path"} | {"runs_dir"},
    "evolution": {"rollout_address", "trainer_address", "scaffold_dir", "http_port"},
}
RESOURCE_NAME = r"^[a-z0-9.-]+/[a-z0-9.-]+$"
BOOTSTRAP = r"^$|^[A-Za-z0-9.-]+:[0-9]+(,[A-Za-z0-9.-]+:[0-9]+)*$"
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}
Schema = dict[str, Any]


def scalar(kind: str, description: str, **constraints: Any) -> Schema:
    return {"type": kind, "description": description, **constraints}


def obj(description: str, properties: Schema, **extra: Any) -> Schema:
    """A closed object: every property required, nothing else allowed (a typo is an error, not a no-op)."""
    return {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "required": sorted(properties),
        "properties": properties,
        **extra,
    }


def port(description: str) -> Schema:
    return scalar("integer", description, minimum=1, maximum=65535)


def ref(name: str, description: str | None = None) -> Schema:
    return {"$ref": f"#/$defs/{name}", **({"description": description} if description else {})}


def field_schema(field: FieldInfo) -> Schema:
    """One config field as JSON schema: its type (Literal -> enum) and its ge/le/gt/lt/pattern bounds."""
    out: Schema = {"description": field.description or ""}
    if typing.get_origin(field.annotation) is typing.Literal:
        return {**out, "enum": list(typing.get_args(field.annotation))}
    args = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
    out["type"] = JSON_TYPES[args[0]]
    bounds = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
    bounds["pattern"] = "pattern"
    for meta in field.metadata:
        for attr, key in bounds.items():
            if getattr(meta, attr, None) is not None:
                out[key] = getattr(meta, attr)
    return out


def config_keys(service: str) -> list[str]:
    """The keys a values file may set under `<service>.config`."""
    return sorted(set(CONFIG_CLASSES[service].model_fields) - SHARED_MANAGED - MANAGED[service])


def definitions() -> Schema:
    quantity = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
    probe = {"periodSeconds": scalar("integer", "Seconds between probes.", minimum=1)}
    probe["failureThreshold"] = scalar("integer", "Failures before the probe gives up.", minimum=1)
    return {
        "quantity": {
            "description": "A Kubernetes quantity: 500m, 2, 4Gi.",
            "anyOf": [{"type": "string", "pattern": quantity}, {"type": "number", "minimum": 0}],
        },
        "resourceList": {
            "type": "object",
            "description": "Resource name to quantity (cpu, memory, ephemeral-storage).",
            "additionalProperties": ref("quantity"),
        },
        "resources": obj(
            "Container requests and limits.", {"requests": ref("resourceList"), "limits": ref("resourceList")}
        ),
        "gpu": obj(
            "GPU count and scheduling of a component's pods.",
            {
                "count": scalar("integer", "GPUs per pod; 0: none requested.", minimum=0, maximum=16),
                "resourceName": scalar("string", "Extended resource name of the GPU.", pattern=RESOURCE_NAME),
                "runtimeClassName": scalar("string", "RuntimeClass of the pods (e.g. nvidia); empty: the default."),
                "tolerations": scalar("array", "Tolerations for tainted node pools.", items={"type": "object"}),
                "nodeSelector": scalar("object", "Node labels the pods need.", additionalProperties={"type": "string"}),
                "affinity": scalar("object", "Pod affinity, anti-affinity and node affinity."),
            },
        ),
        "probe": obj("Probe timing.", probe),
        "probes": obj(
            "gRPC health probes (native grpc probes on the service's health name).",
            {
                "startup": ref("probe", "Startup probe: periodSeconds x failureThreshold bounds the start."),
                "liveness": ref("probe", "Liveness probe after start-up."),
                "readiness": ref("probe", "Readiness probe after start-up."),
            },
        ),
        "pdb": obj(
            "PodDisruptionBudget.",
            {
                "enabled": scalar("boolean", "Create a PodDisruptionBudget."),
                "minAvailable": scalar("integer", "Pods that stay up through voluntary disruptions.", minimum=0),
            },
        ),
    }


def component(service: str, extra: Schema, images: list[str], replicas_key: str = "replicas") -> Schema:
    config = obj(
        f"Keys of services/{service}/config.py (FORGERL_{service.upper()}_<KEY>); the chart sets the wiring keys.",
        {key: field_schema(CONFIG_CLASSES[service].model_fields[key]) for key in config_keys(service)},
    )
    config["required"] = []
    properties: Schema = {
        "enabled": scalar("boolean", f"Run the {service} service."),
        replicas_key: scalar("integer", "Pods of the workload.", minimum=1),
        "image": scalar("string", "Image family of the component.", enum=images),
        "port": port("gRPC port."),
        "metricsPort": port("Prometheus /metrics port."),
        "config": config,
        "resources": ref("resources"),
        "gpu": ref("gpu"),
        "shmSize": ref("quantity", "Size of the memory-backed /dev/shm (more than one GPU or node)."),
        "probes": ref("probes"),
        "podAnnotations": scalar("object", "Extra pod annotations.", additionalProperties={"type": "string"}),
        **extra,
    }
    return obj(f"The {service} service.", properties)


def required_when_external(key: str) -> Schema:
    """mode external needs external.<key> set: `if mode == external then external.<key> non-empty`."""
    return {
        "if": {"properties": {"mode": {"const": "external"}}},
        "then": {"properties": {"external": {"properties": {key: {"minLength": 1}}}}},
    }


def kafka_external() -> Schema:
    """Your Kafka cluster, with the SASL/TLS settings the data pool's clients use (datapool/security.py)."""
    sasl = obj(
        "SASL (SASL_PLAINTEXT, SASL_SSL).",
        {
            "mechanism": scalar("string", "SASL mechanism.", enum=["", *SASL_MECHANISMS]),
            "existingSecret": scalar("string", "Secret with the username and password."),
            "usernameKey": scalar("string", "Key of the username.", minLength=1),
            "passwordKey": scalar("string", "Key of the password.", minLength=1),
        },
    )
    tls = obj(
        "TLS (SSL, SASL_SSL).",
        {
            "existingSecret": scalar("string", "Secret with the CA and an optional client certificate and key."),
            "caKey": scalar("string", "Key of the CA bundle; empty: the image's trust store."),
            "certKey": scalar("string", "Key of the client certificate; empty: none."),
            "keyKey": scalar("string", "Key of the client key; empty: in the certificate file."),
            "checkHostname": scalar("boolean", "Check that broker certificates name the broker host."),
        },
    )
    sasl_protocols = [p for p in PROTOCOLS if p.startswith("SASL_")]
    # SASL_* needs a mechanism and a secret; the others take neither. TLS files need a TLS protocol.
    set_ = {"minLength": 1}
    unset = {"maxLength": 0}
    rules = [
        {
            "if": {"properties": {"securityProtocol": {"enum": sasl_protocols}}},
            "then": {"properties": {"sasl": {"properties": {"mechanism": set_, "existingSecret": set_}}}},
            "else": {"properties": {"sasl": {"properties": {"mechanism": unset, "existingSecret": unset}}}},
        },
        {
            "if": {"properties": {"securityProtocol": {"enum": ["PLAINTEXT", "SASL_PLAINTEXT"]}}},
            "then": {"properties": {"tls": {"properties": {"existingSecret": unset}}}},
        },
    ]
    return obj(
        "Your Kafka cluster.",
        {
            "bootstrapServers": scalar("string", "host:port[,host:port].", pattern=BOOTSTRAP),
            "port": port("Broker port the datapool may reach."),
            "securityProtocol": scalar("string", "How the data pool connects.", enum=list(PROTOCOLS)),
            "sasl": sasl,
            "tls": tls,
        },
        allOf=rules,
    )


def storage_values() -> Schema:
    kafka = obj(
        "Kafka: the dev broker or your cluster.",
        {
            "mode": scalar("string", "dev (Tansu in the release) or external.", enum=["dev", "external"]),
            "external": kafka_external(),
            "dev": obj("The dev broker.", {"port": port("Broker port."), "resources": ref("resources")}),
        },
        **required_when_external("bootstrapServers"),
    )
    postgresql = obj(
        "The run store: a dev database or yours.",
        {
            "mode": scalar("string", "dev (one pod, emptyDir) or external.", enum=["dev", "external"]),
            "external": obj(
                "Your PostgreSQL.",
                {
                    "urlSecret": scalar("string", "Secret with the SQLAlchemy URL."),
                    "urlSecretKey": scalar("string", "Key of the URL in that secret.", minLength=1),
                    "port": port("Database port datapool and trainer may reach."),
                },
            ),
            "dev": obj(
                "The dev database.",
                {
                    "image": scalar("string", "Image of the dev database.", minLength=1),
                    "database": scalar("string", "Database and user name.", pattern="^[a-z_][a-z0-9_]*$"),
                    "resources": ref("resources"),
                },
            ),
        },
        **required_when_external("urlSecret"),
    )
    modes = ["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"]
    checkpoints = obj(
        "Checkpoints and run directories.",
        {
            "existingClaim": scalar("string", "An existing PersistentVolumeClaim; empty: the chart creates one."),
            "accessModes": scalar("array", "Access modes of the created claim.", minItems=1, items={"enum": modes}),
            "size": ref("quantity", "Size of the created claim."),
            "storageClassName": scalar("string", "Storage class of the created claim; empty: the default."),
            "mountPath": scalar("string", "Mount path of the checkpoints volume in the services' pods.", pattern="^/"),
        },
    )
    return {"kafka": kafka, "postgresql": postgresql, "checkpoints": checkpoints}


def cluster_values() -> Schema:
    sandbox = obj(
        "Sandbox pods that rollout creates per episode.",
        {
            "enabled": scalar("boolean", "Run episodes in Kubernetes pods."),
            "namespace": scalar("string", "Namespace of sandbox pods.", pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"),
            "createNamespace": scalar("boolean", "Create the sandbox namespace with the release."),
            "image": scalar("string", "Image of sandbox pods.", minLength=1),
            "runtimeClassName": scalar("string", "RuntimeClass of sandbox pods (e.g. gvisor); empty: the default."),
            "runtimeClass": obj("A RuntimeClass the chart creates.", {"handler": scalar("string", "e.g. runsc.")}),
            "publicEgress": scalar("boolean", "Let sandboxes reach public addresses (never private ones)."),
            "maxEphemeralStorage": ref("quantity", "Largest ephemeral storage of one sandbox pod."),
            "maxActiveDeadlineSeconds": scalar("integer", "Longest activeDeadlineSeconds.", minimum=60),
            "maxPods": scalar("integer", "Most sandbox pods at once.", minimum=1),
        },
    )
    cidr = {"type": "string", "pattern": r"^[0-9.]+/[0-9]+$|^[0-9a-fA-F:]+/[0-9]+$"}
    network_policy = obj(
        "NetworkPolicies.",
        {
            "enabled": scalar("boolean", "Create NetworkPolicies."),
            "apiServerCidrs": scalar("array", "Addresses of the Kubernetes API server.", minItems=1, items=cidr),
            "apiServerPorts": scalar("array", "Ports of the API server.", minItems=1, items=port("A port.")),
            "metricsNamespaceSelector": scalar(
                "object", "Namespace labels of the scraping Prometheus.", additionalProperties={"type": "string"}
            ),
        },
    )
    service_monitor = obj(
        "Prometheus Operator ServiceMonitors.",
        {
            "enabled": scalar("boolean", "Create ServiceMonitors."),
            "interval": scalar("string", "Scrape interval.", pattern="^[0-9]+(s|m)$"),
            "labels": scalar("object", "Extra labels.", additionalProperties={"type": "string"}),
        },
    )
    tests = obj(
        "helm test hooks.",
        {
            "episodeTimeoutSeconds": scalar("integer", "Timeout of the one-episode test.", minimum=30),
            "suite": scalar("string", "Suite of the one-episode test.", enum=["tooluse", "swe"]),
        },
    )
    return {"sandbox": sandbox, "networkPolicy": network_policy, "serviceMonitor": service_monitor, "tests": tests}


def trainer_extra() -> Schema:
    """The trainer's rendezvous port and `parallel`, the run file's `trainer.parallel` block (run.proto's
    ParallelLayout) with explicit degrees: the chart sizes the pods from them, so -1 (fill) is refused."""
    degree = "{}; 0: 1 (run.proto ParallelLayout.{})."
    parallel = obj(
        "The run's trainer.parallel: world size dp_replicate x dp_shard = pods x gpu.count torchrun ranks.",
        {
            name: scalar("integer", degree.format(text, name), minimum=0)
            for name, text in (
                ("dp_replicate", "Groups holding a whole (sharded) copy"),
                ("dp_shard", "Ranks FSDP2 shards every parameter over"),
                ("ep", "Expert-parallel ranks carved out of dp_shard"),
            )
        }
        | {
            "activation_checkpoint_every": scalar(
                "integer", "Recompute every n-th decoder layer (0: none); changes no pod.", minimum=0
            )
        },
    )
    return {"rendezvousPort": port("torchrun's rendezvous port on pod 0."), "parallel": parallel}


def service_values() -> Schema:
    cpu = ["services", "gpu", "inferenceCpu"]
    inference_extra = {
        "modelPath": scalar("string", "Checkpoint directory served first.", pattern="^/"),
        "initialCheckpointPreset": scalar("string", "Create a checkpoint of this preset at modelPath if none."),
        "maxModelLen": scalar("integer", "Context of the engine.", minimum=16),
    }
    return {
        "inference": component("inference", inference_extra, ["gpu", "inferenceCpu"]),
        "datapool": component("datapool", {}, cpu),
        "gateway": component(
            "gateway", {"httpPort": port("Port of the OpenAI-compatible HTTP API."), "pdb": ref("pdb")}, cpu
        ),
        "rollout": component("rollout", {}, cpu),
        "trainer": component("trainer", trainer_extra(), ["gpu", "services"], "nodes"),
        "evolution": component(
            "evolution", {"httpPort": port("Port of the operator console (HTTP)."), "pdb": ref("pdb")}, cpu
        ),
    }


def values_schema() -> Schema:
    images = obj(
        "ForgeRL images.",
        {
            "registry": scalar("string", "Registry and path prefix of every ForgeRL image.", minLength=1),
            "tag": scalar("string", "Tag of every ForgeRL image; empty: the chart's appVersion."),
            "pullPolicy": scalar("string", "Pull policy.", enum=["Always", "IfNotPresent", "Never"]),
            "pullSecrets": scalar("array", "Registry credential secrets, by name.", items={"type": "string"}),
            "services": scalar("string", "CPU services image name.", minLength=1),
            "gpu": scalar("string", "CUDA image name.", minLength=1),
            "inferenceCpu": scalar("string", "CPU inference image name.", minLength=1),
        },
    )
    auth = obj(
        "Bearer token of every RPC but health.",
        {
            "existingSecret": scalar("string", "Secret holding the token; empty: no token."),
            "secretKey": scalar("string", "Key of the token in that secret.", minLength=1),
        },
    )
    top: Schema = {
        "nameOverride": scalar("string", "Replaces the chart name in resource names."),
        "fullnameOverride": scalar("string", "Replaces the <release>-<chart> prefix of resource names."),
        "images": images,
        "logLevel": scalar("string", "Log level of every service.", enum=["debug", "info", "warning", "error"]),
        "logFormat": scalar("string", "Log format of every service.", enum=["json", "console"]),
        "auth": auth,
        **storage_values(),
        **cluster_values(),
        **service_values(),
    }
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "ForgeRL chart values"}
    schema.update(obj("Values of the forgerl chart.", top))
    return {**schema, "$defs": definitions()}


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed schema is out of date")
    args = parser.parse_args()
    if not args.check:
        SCHEMA_PATH.write_text(render())
        print(f"wrote {SCHEMA_PATH}")
    elif SCHEMA_PATH.read_text() != render():
        sys.exit(f"{SCHEMA_PATH} is out of date: run `python charts/forgerl/schema.py` and commit the result")


if __name__ == "__main__":
    main()
