{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "imagetag.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; components append -gateway, -worker, -redis (so keep it <= 50). */}}
{{- define "imagetag.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "imagetag.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imagetag.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagetag.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imagetag.redisName" -}}
{{- printf "%s-redis" (include "imagetag.fullname" .) }}
{{- end }}

{{/* Labels: call with (dict "root" $ "component" "gateway") ---------------------------- */}}

{{- define "imagetag.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagetag.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end }}

{{- define "imagetag.labels" -}}
helm.sh/chart: {{ include "imagetag.chart" .root }}
{{ include "imagetag.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: imagetag
{{- end }}

{{/* The label the Redis NetworkPolicy admits. */}}
{{- define "imagetag.redisClientLabel" -}}
imagetag.io/redis-client: "true"
{{- end }}

{{/* Images: call with (dict "root" $ "image" .Values.gateway.image) --------------------- */}}

{{- define "imagetag.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Secrets ---------------------------------------------------------------------------- */}}

{{/* The chart-managed Secret. */}}
{{- define "imagetag.secretName" -}}
{{- include "imagetag.fullname" . }}
{{- end }}

{{- define "imagetag.masterKeySecret" -}}
{{- default (include "imagetag.secretName" .) .Values.masterKey.existingSecret }}
{{- end }}

{{- define "imagetag.masterKeySecretKey" -}}
{{- if .Values.masterKey.existingSecret }}{{ .Values.masterKey.existingSecretKey }}{{ else }}master-key{{ end }}
{{- end }}

{{- define "imagetag.adminSecret" -}}
{{- default (include "imagetag.secretName" .) .Values.bootstrap.existingSecret }}
{{- end }}

{{- define "imagetag.adminSecretKey" -}}
{{- if .Values.bootstrap.existingSecret }}{{ .Values.bootstrap.existingSecretKey }}{{ else }}admin-password{{ end }}
{{- end }}

{{- define "imagetag.redisPasswordSecret" -}}
{{- default (include "imagetag.secretName" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{- define "imagetag.redisPasswordSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{- define "imagetag.externalRedisSecret" -}}
{{- default (include "imagetag.secretName" .) .Values.externalRedis.existingSecret }}
{{- end }}

{{- define "imagetag.externalRedisSecretKey" -}}
{{- if .Values.externalRedis.existingSecret }}{{ .Values.externalRedis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{/*
Changes whenever a secret value given in the values (or the choice of Secrets) changes, so pods
that read them at start-up roll; generated values are stable across upgrades and not hashed.
*/}}
{{- define "imagetag.secretChecksum" -}}
{{- list .Values.masterKey .Values.bootstrap.password .Values.bootstrap.existingSecret .Values.bootstrap.existingSecretKey .Values.redis.auth .Values.redis.enabled .Values.externalRedis | toJson | sha256sum }}
{{- end }}

{{/*
A generated secret value that survives upgrades: the value already in the cluster's Secret if
there is one (lookup; empty when rendering offline), else a new random one. Base64-encoded.
Call with (dict "root" $ "key" "master-key" "length" 48).
*/}}
{{- define "imagetag.generatedSecret" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "imagetag.secretName" .root) }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}

{{/* Configuration ------------------------------------------------------------------------ */}}

{{/* One Settings value as an environment string: lists are comma-joined. */}}
{{- define "imagetag.settingValue" -}}
{{- if kindIs "slice" . }}
{{- join "," . }}
{{- else if kindIs "float64" . }}
{{- /* YAML numbers arrive as float64; print integers without an exponent or a ".0". */}}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* Settings as env entries, from a map of Settings field names: (dict "config" .) */}}
{{- define "imagetag.settingsEnv" -}}
{{- range $field, $value := .config }}
{{- if not (kindIs "invalid" $value) }}
- name: IMAGETAG_{{ upper $field }}
  value: {{ include "imagetag.settingValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The environment every imagetag container gets: Redis (URL with the password interpolated from
REDIS_PASSWORD, which must come first), the master key, and writable homes for the libraries.
*/}}
{{- define "imagetag.commonEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "imagetag.redisPasswordSecret" . }}
      key: {{ include "imagetag.redisPasswordSecretKey" . }}
- name: IMAGETAG_REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d/%d" (include "imagetag.redisName" .) (int .Values.redis.port) (int .Values.redis.database) | quote }}
{{- else }}
- name: IMAGETAG_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "imagetag.externalRedisSecret" . }}
      key: {{ include "imagetag.externalRedisSecretKey" . }}
{{- end }}
- name: IMAGETAG_MASTER_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "imagetag.masterKeySecret" . }}
      key: {{ include "imagetag.masterKeySecretKey" . }}
- name: IMAGETAG_DATA_DIR
  value: /data
- name: HOME
  value: /tmp
- name: YOLO_CONFIG_DIR
  value: /tmp/Ultralytics
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
{{- end }}

{{/*
Detector weights. The containers see them at weights.mountPath (/weights, as in the images):
fetched by an initContainer into an emptyDir, a PersistentVolumeClaim, or (source=image) the
image's own /weights (an image built with WEIGHTS=bake). The initContainer mounts the emptyDir
elsewhere and fetches into it with --dir, leaving IMAGETAG_WEIGHTS_DIR as the image sets it. With
cache.enabled, fetched weights go to <cache.mountPath>/weights on the persistent cache instead,
where the next start finds and verifies them, and the containers read them from there.
*/}}
{{- define "imagetag.fetchDir" -}}
{{- if .Values.cache.enabled }}{{ include "imagetag.cachedWeightsDir" . }}{{ else }}/fetched-weights{{ end }}
{{- end }}

{{/* Fetched weights live on the cache volume when there is one; containers then read them there. */}}
{{- define "imagetag.weightsCached" -}}
{{- if and .Values.cache.enabled (eq .Values.weights.source "fetch") }}true{{ end }}
{{- end }}

{{- define "imagetag.cachedWeightsDir" -}}
{{- printf "%s/weights" .Values.cache.mountPath }}
{{- end }}

{{/* The detector files, the first and weights.extraDetectors, comma-separated as the setting takes them. */}}
{{- define "imagetag.detectorPaths" -}}
{{- $weights := .Values.weights -}}
{{- $mount := ternary (include "imagetag.cachedWeightsDir" .) (trimSuffix "/" $weights.mountPath) (eq (include "imagetag.weightsCached" .) "true") -}}
{{- $paths := list -}}
{{- if eq $weights.source "fetch" -}}
{{- range prepend ($weights.extraDetectors | default list) $weights.detector }}{{ $paths = append $paths (printf "%s/%s.pt" $mount .) }}{{ end -}}
{{- else -}}
{{- range prepend ($weights.extraDetectors | default list) $weights.detectorFile }}{{ $paths = append $paths (printf "%s/%s" $mount .) }}{{ end -}}
{{- end -}}
{{- join "," $paths -}}
{{- end }}

{{- define "imagetag.weightsEnv" -}}
- name: IMAGETAG_DETECTOR_WEIGHTS
  value: {{ include "imagetag.detectorPaths" . | quote }}
{{- if .Values.cache.enabled }}
- name: IMAGETAG_RUNTIME_CACHE_DIR
  value: {{ printf "%s/runtimes" .Values.cache.mountPath | quote }}
{{- end }}
{{- end }}

{{- define "imagetag.cacheClaim" -}}
{{- default (printf "%s-cache" (include "imagetag.fullname" .)) .Values.cache.existingClaim }}
{{- end }}

{{- define "imagetag.weightsVolumes" -}}
{{- if .Values.cache.enabled }}
- name: cache
  persistentVolumeClaim:
    claimName: {{ include "imagetag.cacheClaim" . }}
{{- end }}
{{- if include "imagetag.weightsCached" . }}
{{- else if eq .Values.weights.source "pvc" }}
- name: weights
  persistentVolumeClaim:
    claimName: {{ .Values.weights.existingClaim }}
    readOnly: true
{{- else if eq .Values.weights.source "fetch" }}
- name: weights
  emptyDir:
    sizeLimit: {{ .Values.weights.sizeLimit }}
{{- end }}
{{- end }}

{{- define "imagetag.weightsMounts" -}}
{{- if .Values.cache.enabled }}
# Writable: the runtimes export into it (fetched weights are checked again at every start).
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- end }}
{{- if include "imagetag.weightsCached" . }}
{{- else if ne .Values.weights.source "image" }}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "image" .Values.gateway.image "extraEnv" .Values.gateway.extraEnv) */}}
{{- define "imagetag.weightsInitContainers" -}}
{{- if eq .root.Values.weights.source "fetch" }}
{{- range $index, $detector := prepend (.root.Values.weights.extraDetectors | default list) .root.Values.weights.detector }}
- name: {{ if eq $index 0 }}fetch-weights{{ else }}fetch-weights-{{ $index }}{{ end }}
  image: {{ include "imagetag.image" $ }}
  imagePullPolicy: {{ $.image.pullPolicy }}
  {{- if $.root.Values.cache.enabled }}
  command: ["python", "-c", {{ $.root.Files.Get "files/fetch-cached.py" | toJson }}, "weights", "fetch", {{ $detector | quote }}, "--dir", {{ include "imagetag.fetchDir" $.root | quote }}]
  {{- else }}
  command: ["imagetag", "weights", "fetch", {{ $detector | quote }}, "--dir", {{ include "imagetag.fetchDir" $.root | quote }}]
  {{- end }}
  env:
    - name: HOME
      value: /tmp
    {{- with $.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- toYaml $.root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $.root.Values.weights.fetchResources | nindent 4 }}
  volumeMounts:
    {{- if $.root.Values.cache.enabled }}
    - name: cache
      mountPath: {{ $.root.Values.cache.mountPath }}
    {{- else }}
    - name: weights
      mountPath: {{ include "imagetag.fetchDir" $.root }}
    {{- end }}
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}
{{- end }}

{{/* Checks that fail the render with a clear message. */}}
{{- define "imagetag.validate" -}}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.url) (not .Values.externalRedis.existingSecret) }}
{{- fail "redis.enabled=false needs externalRedis.url or externalRedis.existingSecret" }}
{{- end }}
{{- if and (eq .Values.weights.source "pvc") (not .Values.weights.existingClaim) }}
{{- fail "weights.source=pvc needs weights.existingClaim" }}
{{- end }}
{{- $keda := .Values.worker.autoscaling.keda }}
{{- if and .Values.worker.enabled $keda.enabled (not .Values.worker.autoscaling.enabled) }}
{{- fail "worker.autoscaling.keda.enabled needs worker.autoscaling.enabled=true (KEDA takes minReplicas, maxReplicas and behavior from there)" }}
{{- end }}
{{- if and .Values.worker.enabled .Values.worker.autoscaling.enabled $keda.enabled (not .Values.redis.enabled) (not $keda.externalRedis.address) }}
{{- fail "worker.autoscaling.keda with redis.enabled=false needs worker.autoscaling.keda.externalRedis.address (host:port)" }}
{{- end }}
{{- if and .Values.redis.enabled .Values.redis.auth.password (not (regexMatch "^[A-Za-z0-9._~-]+$" .Values.redis.auth.password)) }}
{{- fail "redis.auth.password must be URL-safe (letters, digits, . _ ~ -): it is part of IMAGETAG_REDIS_URL" }}
{{- end }}
{{- end }}
