#!/usr/bin/env bash
# make e2e-kind: the end-to-end suite against the chart on a kind cluster, where Docker and a registry
# are reachable (kind's node image and the sandbox image are pulled; ForgeRL's images are built here).
#
#   1. create a kind cluster (KIND_CLUSTER, default forgerl-e2e), or reuse one that exists;
#   2. build the services and inference-cpu images (make images) and `kind load` them;
#   3. helm install the chart with charts/forgerl/ci/kind-values.yaml and wait for it;
#   4. `helm test` (gRPC health of every service, one episode), then the e2e suite through port-forwards
#      (FORGERL_E2E_TARGET=cluster);
#   5. on failure: pod status, events and every container's logs into $E2E_LOGS (default runs/e2e-kind);
#   6. helm uninstall; the release's namespace and the sandbox namespace are deleted and checked gone;
#      the cluster is deleted unless KEEP_CLUSTER=1 (or it existed before).
#
# Needs: docker, kind, and .tools/bin/{helm,kubectl} (make tools). Nothing here runs on a machine without
# a Kubernetes API server: the repository's own CI has none (see /work/shared/CONTAINERS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-forgerl-e2e}
NAMESPACE=${E2E_NAMESPACE:-forgerl-e2e}
RELEASE=${E2E_RELEASE:-forgerl}
LOGS=${E2E_LOGS:-runs/e2e-kind}
HELM=.tools/bin/helm
KUBECTL=.tools/bin/kubectl
IMAGE_REGISTRY=forgerl.local
IMAGE_TAG=dev
SERVICES=(inference datapool gateway rollout trainer evolution)
# Local ports of the port-forwards, one per service (above the local topology's 50051-50056).
BASE_PORT=${E2E_BASE_PORT:-31051}
created_cluster=0
forwards=()

need() { command -v "$1" >/dev/null || { echo "e2e-kind: $1 is missing ($2)" >&2; exit 2; }; }
need docker "install Docker"
need kind "install kind: https://kind.sigs.k8s.io"
[[ -x $HELM && -x $KUBECTL ]] || { echo "e2e-kind: run 'make tools' first" >&2; exit 2; }

kube() { "$KUBECTL" --context "kind-$CLUSTER" "$@"; }

dump_logs() {
  mkdir -p "$LOGS"
  echo "e2e-kind: failed; logs in $LOGS" >&2
  kube get all,pvc,networkpolicy -A -o wide >"$LOGS/resources.txt" 2>&1 || true
  kube get events -A --sort-by=.lastTimestamp >"$LOGS/events.txt" 2>&1 || true
  for ns in "$NAMESPACE" forgerl-sandboxes; do
    for pod in $(kube -n "$ns" get pods -o name 2>/dev/null); do
      kube -n "$ns" describe "$pod" >"$LOGS/${ns}_${pod#pod/}.describe.txt" 2>&1 || true
      kube -n "$ns" logs "$pod" --all-containers --prefix >"$LOGS/${ns}_${pod#pod/}.log" 2>&1 || true
      kube -n "$ns" logs "$pod" --all-containers --prefix --previous >>"$LOGS/${ns}_${pod#pod/}.log" 2>/dev/null || true
    done
  done
}

cleanup() {
  local status=$?
  for pid in "${forwards[@]}"; do kill "$pid" 2>/dev/null || true; done
  [[ $status -ne 0 ]] && dump_logs
  "$HELM" --kube-context "kind-$CLUSTER" uninstall "$RELEASE" -n "$NAMESPACE" --wait 2>/dev/null || true
  kube delete namespace "$NAMESPACE" --wait=true --ignore-not-found
  # Uninstalling leaves nothing: no namespace, no cluster-scoped object of the release.
  leftovers=$(kube get namespaces,validatingadmissionpolicies,validatingadmissionpolicybindings,runtimeclasses \
    -l "app.kubernetes.io/instance=$RELEASE" -o name 2>/dev/null || true)
  if [[ -n $leftovers ]]; then echo "e2e-kind: left behind after uninstall: $leftovers" >&2; status=1; fi
  if [[ $created_cluster -eq 1 && ${KEEP_CLUSTER:-0} != 1 ]]; then kind delete cluster --name "$CLUSTER"; fi
  exit $status
}
trap cleanup EXIT

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
  created_cluster=1
fi

make images IMAGE_REGISTRY="$IMAGE_REGISTRY" IMAGE_TAG="$IMAGE_TAG"
for family in services inference-cpu; do
  kind load docker-image --name "$CLUSTER" "$IMAGE_REGISTRY/forgerl-$family:$IMAGE_TAG"
done

kube create namespace "$NAMESPACE" --dry-run=client -o yaml | kube apply -f -
"$HELM" --kube-context "kind-$CLUSTER" install "$RELEASE" charts/forgerl -n "$NAMESPACE" \
  -f charts/forgerl/ci/kind-values.yaml --wait --timeout 15m
"$HELM" --kube-context "kind-$CLUSTER" test "$RELEASE" -n "$NAMESPACE" --timeout 15m --logs

addresses=()
for i in "${!SERVICES[@]}"; do
  service=${SERVICES[$i]}
  port=$((BASE_PORT + i))
  kube -n "$NAMESPACE" port-forward "svc/$RELEASE-$service" "$port:50051" >"/tmp/e2e-kind-$service.log" 2>&1 &
  forwards+=($!)
  addresses+=("$service=127.0.0.1:$port")
done
FORGERL_E2E_TARGET=cluster FORGERL_E2E_ADDRESSES=$(IFS=,; echo "${addresses[*]}") \
  .venv/bin/pytest e2e_tests/test_deployment.py -p no:cacheprovider
