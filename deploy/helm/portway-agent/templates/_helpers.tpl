{{/* The chart's name, overridable. */}}
{{- define "portway-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of every object: the release name when it already holds the chart's
name (a release called portway-gateway gives portway-gateway, not
portway-gateway-portway-gateway).
*/}}
{{- define "portway-agent.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "portway-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "portway-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portway
{{- end }}

{{/* The labels that select the gateway's pods; never change them on upgrade. */}}
{{- define "portway-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portway-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "portway-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The ServiceAccount the agent runs as. */}}
{{- define "portway-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portway-agent.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The Secret holding the agent's token: the chart's own, or the user's. */}}
{{- define "portway-agent.tokenSecretName" -}}
{{- if .Values.token.value }}
{{- printf "%s-token" (include "portway-agent.fullname" .) }}
{{- else }}
{{- required "token.existingSecret (a Secret holding the agent's token) or token.value is required" .Values.token.existingSecret }}
{{- end }}
{{- end }}

{{/*
agent.yaml, built as a map and written with toYaml. The token is never in
it: it comes from the Secret as PORTWAY_GATEWAY_TOKEN.
*/}}
{{- define "portway-agent.config" -}}
{{- $v := .Values -}}
{{- $gw := dict "protocol" $v.gateway.protocol }}
{{- if $v.gateway.urls }}
{{- $_ := set $gw "urls" $v.gateway.urls }}
{{- else }}
{{- $_ := set $gw "url" (required "gateway.url is required (or gateway.urls, for several replicas): the gateway's wss://host:port/v1/tunnel" $v.gateway.url) }}
{{- end }}
{{- with $v.gateway.connections }}
{{- $_ := set $gw "connections" (int .) }}
{{- end }}
{{- if $v.gateway.caSecret.name }}
{{- $_ := set $gw "ca_file" "/etc/portway/ca/ca.crt" }}
{{- end }}
{{- with $v.gateway.serverName }}
{{- $_ := set $gw "server_name" . }}
{{- end }}
{{- $cfg := dict
  "gateway" $gw
  "metrics" (dict "listen" (printf ":%d" (int $v.metrics.port)))
  "kubernetes" (dict "enabled" true "kubeconfig" "")
  "tunnels" $v.tunnels
-}}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy $v.config) }}
{{- toYaml $cfg }}
{{- end }}
