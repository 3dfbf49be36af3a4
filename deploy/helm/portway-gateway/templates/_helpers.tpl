{{/* The chart's name, overridable. */}}
{{- define "portway-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of every object: the release name when it already holds the chart's
name (a release called portway-gateway gives portway-gateway, not
portway-gateway-portway-gateway).
*/}}
{{- define "portway-gateway.fullname" -}}
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
{{- define "portway-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "portway-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portway
{{- end }}

{{/* The labels that select the gateway's pods; never change them on upgrade. */}}
{{- define "portway-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portway-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "portway-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding the admin token: the user's, or the chart's own. */}}
{{- define "portway-gateway.adminSecretName" -}}
{{- default (printf "%s-admin" (include "portway-gateway.fullname" .)) .Values.admin.existingSecret }}
{{- end }}

{{/* The chart's Secret for agent tokens given in values. */}}
{{- define "portway-gateway.tokensSecretName" -}}
{{- printf "%s-agent-tokens" (include "portway-gateway.fullname" .) }}
{{- end }}

{{/*
The environment variable that carries an agent's token: what the gateway
reads (PORTWAY_AGENT_TOKEN_ and the name in capitals, every character other
than a letter or digit turned into "_").
*/}}
{{- define "portway-gateway.agentTokenEnv" -}}
{{- printf "PORTWAY_AGENT_TOKEN_%s" (regexReplaceAll "[^A-Z0-9]" (upper .) "_") }}
{{- end }}

{{/* Whether the state lives on a PersistentVolumeClaim. */}}
{{- define "portway-gateway.usePVC" -}}
{{- if and .Values.persistence.enabled (not .Values.cluster.enabled) }}true{{ end }}
{{- end }}

{{/*
gateway.yaml, built as a map and written with toYaml so that no value can
break the YAML. Secrets never appear in it: tokens come from the
environment (PORTWAY_ADMIN_TOKEN, PORTWAY_AGENT_TOKEN_<NAME>).
*/}}
{{- define "portway-gateway.config" -}}
{{- $v := .Values -}}
{{- if not $v.gateway.publicHost }}
{{- fail "gateway.publicHost is required: the host name clients and agents use to reach the gateway (printed in every endpoint)" }}
{{- end }}
{{- $lowHigh := splitList "-" (toString $v.gateway.portRange) }}
{{- if ne (len $lowHigh) 2 }}
{{- fail (printf "gateway.portRange %q: want low-high, like 10000-10099" (toString $v.gateway.portRange)) }}
{{- end }}
{{- $cfg := dict
  "listen" (printf ":%d" (int $v.gateway.port))
  "public_host" $v.gateway.publicHost
  "port_range" (toString $v.gateway.portRange)
  "bind_address" $v.gateway.bindAddress
  "admin" (dict "listen" (printf ":%d" (int $v.admin.port)))
-}}
{{- if $v.tls.secretName }}
{{- $_ := set $cfg "tls" (dict "cert_file" "/etc/portway/tls/tls.crt" "key_file" "/etc/portway/tls/tls.key") }}
{{- else if $v.gateway.insecure }}
{{- $_ := set $cfg "insecure" true }}
{{- else }}
{{- fail "tls.secretName is required (a kubernetes.io/tls Secret with tls.crt and tls.key, such as cert-manager writes), or set gateway.insecure: true behind a proxy that terminates TLS" }}
{{- end }}
{{- $agents := list }}
{{- range $i, $a := $v.agents }}
{{- if not $a.name }}
{{- fail (printf "agents[%d].name is required" $i) }}
{{- end }}
{{- $entry := dict "name" $a.name }}
{{- $sources := 0 }}
{{- if $a.tokenSHA256 }}
{{- $sources = add1 $sources }}
{{- if not (regexMatch "^[0-9a-fA-F]{64}$" (toString $a.tokenSHA256)) }}
{{- fail (printf "agents[%d].tokenSHA256 must be 64 hex digits (the first field of sha256sum's output, without the trailing \"  -\")" $i) }}
{{- end }}
{{- $_ := set $entry "token_sha256" (lower $a.tokenSHA256) }}
{{- end }}
{{- if $a.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if $a.token }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne $sources 1 }}
{{- fail (printf "agents[%d] (%s): set exactly one of tokenSHA256, existingSecret or token" $i $a.name) }}
{{- end }}
{{- if $a.maxServices }}
{{- $_ := set $entry "max_services" (int $a.maxServices) }}
{{- end }}
{{- $agents = append $agents $entry }}
{{- end }}
{{- if $agents }}
{{- $_ := set $cfg "agents" $agents }}
{{- end }}
{{- if $v.cluster.enabled }}
{{- if not $v.cluster.etcd.endpoints }}
{{- fail "cluster.etcd.endpoints is required when cluster.enabled is true" }}
{{- end }}
{{- $etcd := dict "endpoints" $v.cluster.etcd.endpoints "prefix" $v.cluster.etcd.prefix }}
{{- if $v.cluster.etcd.tls.secretName }}
{{- $_ := set $etcd "tls" (dict "ca_file" "/etc/portway/etcd-tls/ca.crt" "cert_file" "/etc/portway/etcd-tls/tls.crt" "key_file" "/etc/portway/etcd-tls/tls.key") }}
{{- end }}
{{- if $v.cluster.etcd.username }}
{{- $_ := set $etcd "username" $v.cluster.etcd.username }}
{{- end }}
{{- $_ := set $cfg "cluster" (dict "etcd" $etcd) }}
{{- else }}
{{- $_ := set $cfg "state_file" "/var/lib/portway/gateway.db" }}
{{- end }}
{{- $cfg = mustMergeOverwrite $cfg (deepCopy $v.config) }}
{{- toYaml $cfg }}
{{- end }}
