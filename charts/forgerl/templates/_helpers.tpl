{{/* Names, labels and the pod template every ForgeRL service shares. Helpers are prefixed `forgerl.`. */}}

{{- define "forgerl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "forgerl.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<component>"; args: (list $ "gateway"). 45 characters of fullname leave room for suffixes. */}}
{{- define "forgerl.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "forgerl.fullname" $root | trunc 45 | trimSuffix "-") (index . 1) -}}
{{- end -}}

{{- define "forgerl.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "forgerl.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "forgerl.labels" -}}
{{- $root := index . 0 -}}
{{- include "forgerl.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: forgerl
{{- end -}}

{{/* The image of a family (services, gpu, inferenceCpu); args: (list $ "services"). */}}
{{- define "forgerl.image" -}}
{{- $root := index . 0 -}}
{{- $images := $root.Values.images -}}
{{- printf "%s/%s:%s" $images.registry (index $images (index . 1)) (default $root.Chart.AppVersion $images.tag) -}}
{{- end -}}

{{/* The gRPC health service name of a component: forgerl.v1.<Name>Service. */}}
{{- define "forgerl.grpcService" -}}
{{- printf "forgerl.v1.%sService" (title .) -}}
{{- end -}}

{{/* host:port of a component's gRPC Service; inference and the trainer are reached at pod 0. */}}
{{- define "forgerl.address" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $name := include "forgerl.componentName" (list $root $component) -}}
{{- $port := (index $root.Values $component).port -}}
{{- printf "%s.%s.svc:%v" $name $root.Release.Namespace $port -}}
{{- end -}}

{{/* Comma-separated addresses of every inference pod (the gateway balances over them). */}}
{{- define "forgerl.inferenceReplicas" -}}
{{- $root := . -}}
{{- $name := include "forgerl.componentName" (list $root "inference") -}}
{{- $addresses := list -}}
{{- range $i := until (int $root.Values.inference.replicas) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s-headless.%s.svc:%v" $name $i $name $root.Release.Namespace $root.Values.inference.port) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/* Who calls whom: each component's gRPC callers. NetworkPolicies and env wiring both read this. */}}
{{- define "forgerl.callers" -}}
inference: [gateway, trainer]
datapool: [gateway, rollout, trainer]
gateway: [rollout, evolution, trainer]
rollout: [trainer, evolution]
trainer: [evolution]
evolution: []
{{- end -}}

{{/* The services that open the run store (a `database_url` in their config class). */}}
{{- define "forgerl.storeClients" -}}
[datapool, trainer, evolution, inference]
{{- end -}}

{{/* Components with an HTTP port besides gRPC: the gateway's OpenAI API, the evolution console. */}}
{{- define "forgerl.httpPort" -}}
{{- $values := index (index . 0).Values (index . 1) -}}
{{- if has (index . 1) (list "gateway" "evolution") }}{{ $values.httpPort }}{{ end -}}
{{- end -}}

{{/* A value as an env string. YAML numbers reach templates as float64, which print as 2.68435456e+08:
integral ones are printed as integers. */}}
{{- define "forgerl.envValue" -}}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) -}}
{{- int64 . | toString | quote -}}
{{- else -}}
{{- . | toString | quote -}}
{{- end -}}
{{- end -}}

{{/* Service config as env: FORGERL_<SERVICE>_<KEY> for each key of `<component>.config`. */}}
{{- define "forgerl.configEnv" -}}
{{- $component := index . 1 -}}
{{- $values := index (index . 0).Values $component -}}
{{- range $key, $value := $values.config }}
- name: {{ printf "FORGERL_%s_%s" (upper $component) (upper $key) }}
  value: {{ include "forgerl.envValue" $value }}
{{- end }}
{{- end -}}

{{/* The run store's URL for datapool and trainer. */}}
{{- define "forgerl.databaseEnv" -}}
{{- $root := index . 0 -}}
{{- $prefix := printf "FORGERL_%s_" (upper (index . 1)) -}}
{{- if eq $root.Values.postgresql.mode "external" }}
- name: {{ $prefix }}DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.postgresql.external.urlSecret }}
      key: {{ $root.Values.postgresql.external.urlSecretKey }}
{{- else }}
- name: FORGERL_DEV_DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "forgerl.componentName" (list $root "postgresql") }}
      key: password
- name: {{ $prefix }}DATABASE_URL
  value: {{ printf "postgresql+psycopg://%s:$(FORGERL_DEV_DATABASE_PASSWORD)@%s.%s.svc:5432/%s" $root.Values.postgresql.dev.database (include "forgerl.componentName" (list $root "postgresql")) $root.Release.Namespace $root.Values.postgresql.dev.database | quote }}
{{- end }}
{{- end -}}

{{- define "forgerl.kafkaBootstrap" -}}
{{- if eq .Values.kafka.mode "external" -}}
{{- .Values.kafka.external.bootstrapServers -}}
{{- else -}}
{{- printf "%s.%s.svc:%v" (include "forgerl.componentName" (list . "kafka")) .Release.Namespace .Values.kafka.dev.port -}}
{{- end -}}
{{- end -}}

{{/* The wiring every service gets: bind address, ports, state, logs, token, and where its peers are. */}}
{{- define "forgerl.env" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
{{- $prefix := printf "FORGERL_%s_" (upper $component) -}}
- name: {{ $prefix }}HOST
  value: "0.0.0.0"
- name: {{ $prefix }}PORT
  value: {{ $values.port | quote }}
- name: {{ $prefix }}METRICS_PORT
  value: {{ $values.metricsPort | quote }}
- name: {{ $prefix }}STATE_DIR
  value: /var/lib/forgerl
- name: FORGERL_LOG_LEVEL
  value: {{ $root.Values.logLevel | quote }}
- name: FORGERL_LOG_FORMAT
  value: {{ $root.Values.logFormat | quote }}
{{- if $root.Values.auth.existingSecret }}
- name: FORGERL_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.auth.existingSecret }}
      key: {{ $root.Values.auth.secretKey }}
{{- end }}
{{ include (printf "forgerl.env.%s" $component) $root }}
{{- include "forgerl.configEnv" . }}
{{- end -}}

{{- define "forgerl.env.inference" -}}
- name: FORGERL_INFERENCE_MODEL_PATH
  value: {{ .Values.inference.modelPath | quote }}
- name: FORGERL_INFERENCE_MAX_MODEL_LEN
  value: {{ include "forgerl.envValue" .Values.inference.maxModelLen }}
- name: FORGERL_INFERENCE_TENSOR_PARALLEL_SIZE
  value: {{ max 1 (int .Values.inference.gpu.count) | quote }}
{{- include "forgerl.databaseEnv" (list . "inference") }}
{{- end -}}

{{- define "forgerl.env.datapool" -}}
- name: FORGERL_DATAPOOL_KAFKA_BOOTSTRAP
  value: {{ include "forgerl.kafkaBootstrap" . | quote }}
{{- include "forgerl.kafkaSecurityEnv" . }}
{{- include "forgerl.databaseEnv" (list . "datapool") }}
{{- end -}}

{{/* Kafka SASL/TLS of an external cluster (libs/forgerl/datapool/security.py reads these keys): the
username from its secret, the password and the TLS files as files mounted by forgerl.kafkaVolumes. */}}
{{- define "forgerl.kafkaSasl" -}}
{{- $external := .Values.kafka.external -}}
{{- if and (eq .Values.kafka.mode "external") (hasPrefix "SASL_" $external.securityProtocol) -}}true{{- end -}}
{{- end -}}

{{- define "forgerl.kafkaTls" -}}
{{- $external := .Values.kafka.external -}}
{{- if and (eq .Values.kafka.mode "external") (has $external.securityProtocol (list "SSL" "SASL_SSL")) $external.tls.existingSecret -}}true{{- end -}}
{{- end -}}

{{- define "forgerl.kafkaSecurityEnv" -}}
{{- $external := .Values.kafka.external -}}
{{- if eq .Values.kafka.mode "external" }}
- name: FORGERL_DATAPOOL_KAFKA_SECURITY_PROTOCOL
  value: {{ $external.securityProtocol | quote }}
{{- if include "forgerl.kafkaSasl" . }}
- name: FORGERL_DATAPOOL_KAFKA_SASL_MECHANISM
  value: {{ $external.sasl.mechanism | quote }}
- name: FORGERL_DATAPOOL_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ $external.sasl.existingSecret }}
      key: {{ $external.sasl.usernameKey }}
- name: FORGERL_DATAPOOL_KAFKA_SASL_PASSWORD_FILE
  value: {{ printf "/etc/forgerl/kafka-sasl/%s" $external.sasl.passwordKey | quote }}
{{- end }}
{{- if has $external.securityProtocol (list "SSL" "SASL_SSL") }}
- name: FORGERL_DATAPOOL_KAFKA_SSL_CHECK_HOSTNAME
  value: {{ $external.tls.checkHostname | quote }}
{{- if include "forgerl.kafkaTls" . }}
{{- range $key, $file := dict "ca" $external.tls.caKey "cert" $external.tls.certKey "key" $external.tls.keyKey }}
{{- if $file }}
- name: {{ printf "FORGERL_DATAPOOL_KAFKA_SSL_%sFILE" (upper $key) }}
  value: {{ printf "/etc/forgerl/kafka-tls/%s" $file | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The secrets of forgerl.kafkaSecurityEnv as read-only files; args: $ (volumeMounts or volumes). */}}
{{- define "forgerl.kafkaVolumeMounts" -}}
{{- if include "forgerl.kafkaSasl" . }}
- {name: kafka-sasl, mountPath: /etc/forgerl/kafka-sasl, readOnly: true}
{{- end }}
{{- if include "forgerl.kafkaTls" . }}
- {name: kafka-tls, mountPath: /etc/forgerl/kafka-tls, readOnly: true}
{{- end }}
{{- end -}}

{{- define "forgerl.kafkaVolumes" -}}
{{- $external := .Values.kafka.external -}}
{{- if include "forgerl.kafkaSasl" . }}
- name: kafka-sasl
  secret:
    secretName: {{ $external.sasl.existingSecret }}
    defaultMode: 0440
    items:
      - {key: {{ $external.sasl.passwordKey }}, path: {{ $external.sasl.passwordKey }}}
{{- end }}
{{- if include "forgerl.kafkaTls" . }}
- name: kafka-tls
  secret:
    secretName: {{ $external.tls.existingSecret }}
    defaultMode: 0440
    items:
      {{- range (list $external.tls.caKey $external.tls.certKey $external.tls.keyKey) | compact }}
      - {key: {{ . }}, path: {{ . }}}
      {{- end }}
{{- end }}
{{- end -}}

{{- define "forgerl.env.gateway" -}}
- name: FORGERL_GATEWAY_HTTP_PORT
  value: {{ .Values.gateway.httpPort | quote }}
- name: FORGERL_GATEWAY_INFERENCE_REPLICAS
  value: {{ include "forgerl.inferenceReplicas" . | quote }}
- name: FORGERL_GATEWAY_DATAPOOL_ADDRESS
  value: {{ include "forgerl.address" (list . "datapool") | quote }}
- name: FORGERL_GATEWAY_MAX_MODEL_LEN
  value: {{ include "forgerl.envValue" .Values.inference.maxModelLen }}
- name: FORGERL_GATEWAY_PUBLIC_BASE_URL
  value: {{ printf "http://%s.%s.svc:%v/v1" (include "forgerl.componentName" (list . "gateway")) .Release.Namespace .Values.gateway.httpPort | quote }}
{{- end -}}

{{- define "forgerl.env.rollout" -}}
- name: FORGERL_ROLLOUT_GATEWAY_ADDRESS
  value: {{ include "forgerl.address" (list . "gateway") | quote }}
- name: FORGERL_ROLLOUT_DATAPOOL_ADDRESS
  value: {{ include "forgerl.address" (list . "datapool") | quote }}
- name: FORGERL_ROLLOUT_SCAFFOLD_DIR
  value: {{ printf "%s/scaffolds" .Values.checkpoints.mountPath | quote }}
{{- if .Values.sandbox.enabled }}
- name: FORGERL_ROLLOUT_SANDBOX
  value: kubernetes
- name: FORGERL_ROLLOUT_K8S_NAMESPACE
  value: {{ .Values.sandbox.namespace | quote }}
- name: FORGERL_ROLLOUT_K8S_IMAGE
  value: {{ .Values.sandbox.image | quote }}
{{- if .Values.sandbox.runtimeClassName }}
- name: FORGERL_ROLLOUT_K8S_RUNTIME_CLASS
  value: {{ .Values.sandbox.runtimeClassName | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "forgerl.env.trainer" -}}
- name: FORGERL_TRAINER_ROLLOUT_ADDRESS
  value: {{ include "forgerl.address" (list . "rollout") | quote }}
- name: FORGERL_TRAINER_DATAPOOL_ADDRESS
  value: {{ include "forgerl.address" (list . "datapool") | quote }}
- name: FORGERL_TRAINER_INFERENCE_ADDRESS
  value: {{ printf "%s-0.%s-headless.%s.svc:%v" (include "forgerl.componentName" (list . "inference")) (include "forgerl.componentName" (list . "inference")) .Release.Namespace .Values.inference.port | quote }}
- name: FORGERL_TRAINER_INFERENCE_MODEL_PATH
  value: {{ .Values.inference.modelPath | quote }}
- name: FORGERL_TRAINER_RUNS_DIR
  value: {{ printf "%s/runs" .Values.checkpoints.mountPath | quote }}
{{- include "forgerl.databaseEnv" (list . "trainer") }}
{{- $job := include "forgerl.trainerJob" . | fromYaml }}
{{- if $job.distributed }}
{{- $pod0 := printf "%s-0.%s-headless.%s.svc" (include "forgerl.componentName" (list . "trainer")) (include "forgerl.componentName" (list . "trainer")) .Release.Namespace }}
- name: PET_NNODES
  value: {{ int $job.nodes | quote }}
- name: PET_NPROC_PER_NODE
  value: {{ int $job.nprocPerNode | quote }}
- name: PET_NODE_RANK
  valueFrom:
    fieldRef:
      fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
- name: PET_RDZV_BACKEND
  value: c10d
- name: PET_RDZV_ENDPOINT
  value: {{ printf "%s:%v" $pod0 .Values.trainer.rendezvousPort | quote }}
- name: MASTER_ADDR
  value: {{ $pod0 | quote }}
{{- end }}
{{- end -}}

{{/* The trainer's torchrun job: {nodes, nprocPerNode, worldSize, distributed}. One torchrun process per
GPU of a pod (trainer.gpu.count, at least 1). With trainer.parallel's dp_replicate or dp_shard set, the
world size is dp_replicate x dp_shard (an unset one counts 1: the run file's dp_replicate fill then gives
the same layout) and the pods are world size / GPUs per pod; unset, `trainer.nodes` pods of DDP ranks, as
before. A layout the pods cannot hold fails `helm template` saying what to change. */}}
{{- define "forgerl.trainerJob" -}}
{{- $trainer := .Values.trainer -}}
{{- $parallel := $trainer.parallel -}}
{{- $nproc := max 1 (int $trainer.gpu.count) -}}
{{- $replicate := int $parallel.dp_replicate -}}
{{- $shard := int $parallel.dp_shard -}}
{{- $ep := max 1 (int $parallel.ep) -}}
{{- if mod (max 1 $shard) $ep -}}
{{- fail (printf "trainer.parallel.ep %d must divide dp_shard %d: expert parallelism is carved out of the data-sharding ranks (efsdp = dp_shard / ep)" $ep (max 1 $shard)) -}}
{{- end -}}
{{- $nodes := int $trainer.nodes -}}
{{- $world := mul $nodes $nproc -}}
{{- $distributed := gt $nodes 1 -}}
{{- if or (gt $replicate 0) (gt $shard 0) -}}
{{- $world = mul (max 1 $replicate) (max 1 $shard) -}}
{{- if mod $world $nproc -}}
{{- fail (printf "trainer.parallel: world size %d (dp_replicate %d x dp_shard %d) does not divide into trainer pods of %d GPUs (trainer.gpu.count: torchrun's --nproc-per-node): make dp_replicate x dp_shard a multiple of %d, or change trainer.gpu.count" $world (max 1 $replicate) (max 1 $shard) $nproc $nproc) -}}
{{- end -}}
{{- if and (ne $nodes 1) (ne $nodes (div $world $nproc)) -}}
{{- fail (printf "trainer.nodes %d disagrees with trainer.parallel: world size %d on pods of %d GPUs is %d pods; leave trainer.nodes at 1 (the pods then follow trainer.parallel) or set it to %d" $nodes $world $nproc (div $world $nproc) (div $world $nproc)) -}}
{{- end -}}
{{- $nodes = div $world $nproc -}}
{{- $distributed = gt $world 1 -}}
{{- end -}}
{{- toYaml (dict "nodes" $nodes "nprocPerNode" $nproc "worldSize" $world "distributed" $distributed) -}}
{{- end -}}

{{- define "forgerl.env.evolution" -}}
- name: FORGERL_EVOLUTION_ROLLOUT_ADDRESS
  value: {{ include "forgerl.address" (list . "rollout") | quote }}
- name: FORGERL_EVOLUTION_TRAINER_ADDRESS
  value: {{ include "forgerl.address" (list . "trainer") | quote }}
- name: FORGERL_EVOLUTION_SCAFFOLD_DIR
  value: {{ printf "%s/scaffolds" .Values.checkpoints.mountPath | quote }}
- name: FORGERL_EVOLUTION_HTTP_PORT
  value: {{ .Values.evolution.httpPort | quote }}
{{- include "forgerl.databaseEnv" (list . "evolution") }}
{{- end -}}

{{/* Native gRPC probes on the service's own health name; args: (list $ "gateway"). */}}
{{- define "forgerl.probes" -}}
{{- $component := index . 1 -}}
{{- $values := index (index . 0).Values $component -}}
{{- $grpc := dict "port" (int $values.port) "service" (include "forgerl.grpcService" $component) -}}
startupProbe:
  grpc: {{ toJson $grpc }}
  periodSeconds: {{ $values.probes.startup.periodSeconds }}
  failureThreshold: {{ $values.probes.startup.failureThreshold }}
livenessProbe:
  grpc: {{ toJson (dict "port" (int $values.port)) }}
  periodSeconds: {{ $values.probes.liveness.periodSeconds }}
  failureThreshold: {{ $values.probes.liveness.failureThreshold }}
readinessProbe:
  grpc: {{ toJson $grpc }}
  periodSeconds: {{ $values.probes.readiness.periodSeconds }}
  failureThreshold: {{ $values.probes.readiness.failureThreshold }}
{{- end -}}

{{- define "forgerl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "forgerl.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* True ("true") when a component needs a memory-backed /dev/shm: more than one GPU, or multi-node. */}}
{{- define "forgerl.needsShm" -}}
{{- $component := index . 1 -}}
{{- $values := index (index . 0).Values $component -}}
{{- $nodes := 1 -}}
{{- if eq $component "trainer" -}}
{{- $nodes = (include "forgerl.trainerJob" (index . 0) | fromYaml).nodes -}}
{{- end -}}
{{- if or (gt (int $values.gpu.count) 1) (gt (int $nodes) 1) -}}true{{- end -}}
{{- end -}}

{{/* Does a component mount the checkpoints volume? The trainer writes checkpoints that inference reads
(and the gateway, for the tokenizer of the model inference reports); evolution writes scaffold versions
(<mountPath>/scaffolds) that rollout runs. */}}
{{- define "forgerl.mountsCheckpoints" -}}
{{- if has (index . 1) (list "inference" "trainer" "gateway" "rollout" "evolution") -}}true{{- end -}}
{{- end -}}

{{- define "forgerl.checkpointsClaim" -}}
{{- default (include "forgerl.componentName" (list . "checkpoints")) .Values.checkpoints.existingClaim -}}
{{- end -}}

{{/* The pod template of a ForgeRL service; args: (list $ "gateway"). */}}
{{- define "forgerl.podTemplate" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- $values := index $root.Values $component -}}
{{- $gpu := $values.gpu -}}
metadata:
  labels:
    {{- include "forgerl.labels" . | nindent 4 }}
  annotations:
    checksum/values: {{ toJson $values | sha256sum | trunc 16 }}
    {{- with $values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "forgerl.componentName" . }}
  automountServiceAccountToken: {{ and (eq $component "rollout") $root.Values.sandbox.enabled }}
  enableServiceLinks: false
  {{- with $root.Values.images.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  {{- with $gpu.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with $gpu.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $gpu.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $gpu.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "forgerl.podSecurityContext" . | nindent 4 }}
  terminationGracePeriodSeconds: 30
  {{- if and (eq $component "inference") $values.initialCheckpointPreset }}
  initContainers:
    - name: initial-checkpoint
      image: {{ include "forgerl.image" (list $root $values.image) }}
      imagePullPolicy: {{ $root.Values.images.pullPolicy }}
      command: [python, -c]
      args:
        - {{ printf "from pathlib import Path; from forgerl.local.bootstrap import ensure_initial_checkpoint; ensure_initial_checkpoint(Path(%s), %s)" ($values.modelPath | quote) ($values.initialCheckpointPreset | quote) | quote }}
      env:
        - name: HOME
          value: /var/lib/forgerl
      securityContext:
        {{- include "forgerl.containerSecurityContext" . | nindent 8 }}
      resources:
        {{- toYaml $values.resources | nindent 8 }}
      volumeMounts:
        - {name: state, mountPath: /var/lib/forgerl}
        - {name: tmp, mountPath: /tmp}
        - {name: checkpoints, mountPath: {{ $root.Values.checkpoints.mountPath }}}
  {{- end }}
  containers:
    - name: {{ $component }}
      image: {{ include "forgerl.image" (list $root $values.image) }}
      imagePullPolicy: {{ $root.Values.images.pullPolicy }}
      args: [serve, {{ $component }}]
      env:
        - name: HOME
          value: /var/lib/forgerl
        {{- include "forgerl.env" . | nindent 8 }}
      ports:
        - {name: grpc, containerPort: {{ $values.port }}, protocol: TCP}
        - {name: metrics, containerPort: {{ $values.metricsPort }}, protocol: TCP}
        {{- with include "forgerl.httpPort" . }}
        - {name: http, containerPort: {{ . }}, protocol: TCP}
        {{- end }}
        {{- if eq $component "trainer" }}
        - {name: rendezvous, containerPort: {{ $values.rendezvousPort }}, protocol: TCP}
        {{- end }}
      {{- include "forgerl.probes" . | nindent 6 }}
      securityContext:
        {{- include "forgerl.containerSecurityContext" . | nindent 8 }}
      resources:
        requests:
          {{- toYaml $values.resources.requests | nindent 10 }}
          {{- if gt (int $gpu.count) 0 }}
          {{ $gpu.resourceName }}: {{ $gpu.count }}
          {{- end }}
        limits:
          {{- toYaml $values.resources.limits | nindent 10 }}
          {{- if gt (int $gpu.count) 0 }}
          {{ $gpu.resourceName }}: {{ $gpu.count }}
          {{- end }}
      volumeMounts:
        - {name: state, mountPath: /var/lib/forgerl}
        - {name: tmp, mountPath: /tmp}
        {{- if include "forgerl.needsShm" . }}
        - {name: shm, mountPath: /dev/shm}
        {{- end }}
        {{- if include "forgerl.mountsCheckpoints" . }}
        - {name: checkpoints, mountPath: {{ $root.Values.checkpoints.mountPath }}}
        {{- end }}
        {{- if eq $component "datapool" }}
        {{- include "forgerl.kafkaVolumeMounts" $root | nindent 8 }}
        {{- end }}
  volumes:
    - name: state
      emptyDir: {sizeLimit: 1Gi}
    - name: tmp
      emptyDir: {sizeLimit: 1Gi}
    {{- if include "forgerl.needsShm" . }}
    - name: shm
      emptyDir: {medium: Memory, sizeLimit: {{ $values.shmSize }}}
    {{- end }}
    {{- if include "forgerl.mountsCheckpoints" . }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ include "forgerl.checkpointsClaim" $root }}
    {{- end }}
    {{- if eq $component "datapool" }}
    {{- include "forgerl.kafkaVolumes" $root | nindent 4 }}
    {{- end }}
{{- end -}}
