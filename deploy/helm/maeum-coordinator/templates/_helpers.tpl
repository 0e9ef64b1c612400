{{/* Names and labels. */}}
{{- define "maeum-coordinator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "maeum-coordinator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "maeum-coordinator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maeum-coordinator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "maeum-coordinator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "maeum-coordinator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: coordinator
app.kubernetes.io/part-of: maeum
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "maeum-coordinator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "maeum-coordinator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "maeum-coordinator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The coordinator's HOME: the root of the persistent volume. */}}
{{- define "maeum-coordinator.home" -}}
/var/lib/maeum/coordinator
{{- end }}

{{/* Files of the keys Secret mounted into HOME (what `serve` reads, plus signing.pub). */}}
{{- define "maeum-coordinator.keyFiles" -}}
{{- $files := list "consortium.json" "ca.pem" "server.pem" "server.key" "signing.key" "signing.pub" }}
{{- if .Values.keys.operator }}
{{- $files = concat $files (list "operator.pem" "operator.key") }}
{{- end }}
{{- toJson $files }}
{{- end }}

{{/* Volume mounts shared by the doctor init container and the coordinator. */}}
{{- define "maeum-coordinator.volumeMounts" -}}
- name: state
  mountPath: {{ include "maeum-coordinator.home" . }}
{{- range (include "maeum-coordinator.keyFiles" . | fromJsonArray) }}
- name: keys
  mountPath: {{ include "maeum-coordinator.home" $ }}/{{ . }}
  subPath: {{ . }}
  readOnly: true
{{- end }}
{{- if .Values.sitesConfigMap }}
- name: sites
  mountPath: {{ include "maeum-coordinator.home" . }}/sites
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "maeum-coordinator.env" -}}
- name: MAEUM_COORDINATOR_HOME
  value: {{ include "maeum-coordinator.home" . | quote }}
- name: MAEUM_OPS_LISTEN
  value: {{ printf "0.0.0.0:%d" (int .Values.service.opsPort) | quote }}
- name: MAEUM_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: MAEUM_LOG
  value: {{ .Values.logFilter | quote }}
# Two glibc malloc arenas: freed transfer buffers do not stay resident.
- name: MALLOC_ARENA_MAX
  value: "2"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
