{{/* Workload, Service, ServiceAccount and NetworkPolicy of one ForgeRL service; args: (list $ "gateway"). */}}

{{- define "forgerl.deployment" -}}
{{- $root := index . 0 -}}
{{- $values := index $root.Values (index . 1) -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
  {{- if eq (index . 1) "rollout" }}
  annotations:
    checkov.io/skip1: CKV_K8S_38=rollout creates, execs into and deletes sandbox pods through the API (sandbox/rbac.yaml)
  {{- end }}
spec:
  replicas: {{ $values.replicas }}
  revisionHistoryLimit: 3
  {{- if eq (int $values.replicas) 1 }}
  strategy:
    type: Recreate
  {{- end }}
  selector:
    matchLabels:
      {{- include "forgerl.selectorLabels" . | nindent 6 }}
  template:
    {{- include "forgerl.podTemplate" . | nindent 4 }}
{{- end -}}

{{/* inference and the trainer: stable pod names behind a headless Service. */}}
{{- define "forgerl.statefulSet" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
spec:
  serviceName: {{ include "forgerl.componentName" . }}-headless
  {{- if eq $component "trainer" }}
  replicas: {{ int (include "forgerl.trainerJob" $root | fromYaml).nodes }}
  {{- else }}
  replicas: {{ $values.replicas }}
  {{- end }}
  podManagementPolicy: Parallel
  revisionHistoryLimit: 3
  selector:
    matchLabels:
      {{- include "forgerl.selectorLabels" . | nindent 6 }}
  template:
    {{- include "forgerl.podTemplate" . | nindent 4 }}
{{- end -}}

{{- define "forgerl.headlessService" -}}
{{- $root := index . 0 -}}
{{- $values := index $root.Values (index . 1) -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "forgerl.componentName" . }}-headless
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
spec:
  clusterIP: None
  # Peers find each other (torchrun's rendezvous, the gateway's replica list) before they are ready.
  publishNotReadyAddresses: true
  selector:
    {{- include "forgerl.selectorLabels" . | nindent 4 }}
  ports:
    - {name: grpc, port: {{ $values.port }}, targetPort: grpc, protocol: TCP}
    {{- if eq (index . 1) "trainer" }}
    - {name: rendezvous, port: {{ $values.rendezvousPort }}, targetPort: rendezvous, protocol: TCP}
    {{- end }}
{{- end -}}

{{- define "forgerl.service" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "forgerl.selectorLabels" . | nindent 4 }}
    {{- if eq $component "trainer" }}
    # Only pod 0 owns runs; the other trainer pods are torchrun workers.
    apps.kubernetes.io/pod-index: "0"
    {{- end }}
  ports:
    - {name: grpc, port: {{ $values.port }}, targetPort: grpc, protocol: TCP, appProtocol: grpc}
    - {name: metrics, port: {{ $values.metricsPort }}, targetPort: metrics, protocol: TCP}
    {{- with include "forgerl.httpPort" . }}
    - {name: http, port: {{ . }}, targetPort: http, protocol: TCP}
    {{- end }}
{{- end -}}

{{- define "forgerl.serviceAccount" -}}
{{- $root := index . 0 -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
automountServiceAccountToken: false
{{- end -}}

{{/* Pods of this release with one of the given components, as NetworkPolicy peers. */}}
{{- define "forgerl.peers" -}}
{{- $root := index . 0 -}}
{{- range index . 1 }}
- podSelector:
    matchLabels:
      {{- include "forgerl.selectorLabels" (list $root .) | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Ingress from the component's callers and the helm tests; egress to what it calls, DNS and storage. */}}
{{- define "forgerl.networkPolicy" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
{{- $callers := index (include "forgerl.callers" $root | fromYaml) $component -}}
{{- $callees := list -}}
{{- range $callee, $its := include "forgerl.callers" $root | fromYaml -}}
{{- if has $component $its -}}{{- $callees = append $callees $callee -}}{{- end -}}
{{- end -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "forgerl.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress, Egress]
  ingress:
    - from:
        {{- include "forgerl.peers" (list $root (append $callers "test")) | nindent 8 }}
      ports:
        - {port: grpc, protocol: TCP}
        {{- if include "forgerl.httpPort" . }}
        - {port: http, protocol: TCP}
        {{- end }}
    - from:
        - namespaceSelector:
            matchLabels:
              {{- toYaml $root.Values.networkPolicy.metricsNamespaceSelector | nindent 14 }}
      ports:
        - {port: metrics, protocol: TCP}
    {{- if eq $component "trainer" }}
    - from:
        {{- include "forgerl.peers" (list $root (list "trainer")) | nindent 8 }}
    {{- end }}
  egress:
    - to:
        - namespaceSelector: {}
          podSelector:
            matchLabels:
              k8s-app: kube-dns
      ports:
        - {port: 53, protocol: UDP}
        - {port: 53, protocol: TCP}
    {{- range $callees }}
    - to:
        {{- include "forgerl.peers" (list $root (list .)) | nindent 8 }}
      ports:
        - {port: {{ (index $root.Values .).port }}, protocol: TCP}
    {{- end }}
    {{- if eq $component "trainer" }}
    - to:
        {{- include "forgerl.peers" (list $root (list "trainer")) | nindent 8 }}
    {{- end }}
    {{- if eq $component "datapool" }}
    {{- if eq $root.Values.kafka.mode "dev" }}
    - to:
        {{- include "forgerl.peers" (list $root (list "kafka")) | nindent 8 }}
      ports:
        - {port: {{ $root.Values.kafka.dev.port }}, protocol: TCP}
    {{- else }}
    - ports:
        - {port: {{ $root.Values.kafka.external.port }}, protocol: TCP}
    {{- end }}
    {{- end }}
    {{- if has $component (include "forgerl.storeClients" $root | fromYamlArray) }}
    {{- if eq $root.Values.postgresql.mode "dev" }}
    - to:
        {{- include "forgerl.peers" (list $root (list "postgresql")) | nindent 8 }}
      ports:
        - {port: 5432, protocol: TCP}
    {{- else }}
    - ports:
        - {port: {{ $root.Values.postgresql.external.port }}, protocol: TCP}
    {{- end }}
    {{- end }}
    {{- if and (eq $component "rollout") $root.Values.sandbox.enabled }}
    - to:
        {{- range $root.Values.networkPolicy.apiServerCidrs }}
        - ipBlock: {cidr: {{ . }}}
        {{- end }}
      ports:
        {{- range $root.Values.networkPolicy.apiServerPorts }}
        - {port: {{ . }}, protocol: TCP}
        {{- end }}
    {{- end }}
{{- end -}}

{{/* Everything of one service but its workload; args: (list $ "gateway"). */}}
{{- define "forgerl.serviceObjects" -}}
{{- $root := index . 0 -}}
{{ include "forgerl.service" . }}
---
{{ include "forgerl.serviceAccount" . }}
{{- if $root.Values.networkPolicy.enabled }}
---
{{ include "forgerl.networkPolicy" . }}
{{- end }}
{{- if $root.Values.serviceMonitor.enabled }}
---
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
    {{- with $root.Values.serviceMonitor.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  selector:
    matchLabels:
      {{- include "forgerl.selectorLabels" . | nindent 6 }}
  endpoints:
    - {port: metrics, path: /metrics, interval: {{ $root.Values.serviceMonitor.interval }}}
{{- end }}
{{- end -}}

{{- define "forgerl.pdb" -}}
{{- $root := index . 0 -}}
{{- $values := index $root.Values (index . 1) -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "forgerl.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
spec:
  minAvailable: {{ $values.pdb.minAvailable }}
  selector:
    matchLabels:
      {{- include "forgerl.selectorLabels" . | nindent 6 }}
{{- end -}}
