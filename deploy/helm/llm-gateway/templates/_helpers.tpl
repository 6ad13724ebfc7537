{{/* Names and labels. */}}

{{- define "llm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llm-gateway.fullname" -}}
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

{{- define "llm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-gateway.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The gateway pods: selector labels plus the component. */}}
{{- define "llm-gateway.gatewaySelectorLabels" -}}
{{ include "llm-gateway.selectorLabels" . }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "llm-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "llm-gateway.envoyImage" -}}
{{- printf "%s:%s" .Values.envoy.image.repository .Values.envoy.image.tag -}}
{{- end -}}

{{/* Secret names: the user's, else the one the chart makes (or expects). */}}
{{- define "llm-gateway.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "llm-gateway.fullname" .)) -}}
{{- end -}}

{{- define "llm-gateway.providerKeysSecret" -}}
{{- .Values.providerKeys.existingSecret | default (printf "%s-provider-keys" (include "llm-gateway.fullname" .)) -}}
{{- end -}}

{{- define "llm-gateway.adminSecret" -}}
{{- .Values.adminToken.existingSecret | default (printf "%s-admin" (include "llm-gateway.fullname" .)) -}}
{{- end -}}

{{- define "llm-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "llm-gateway.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
The gateway config, parsed: the chart needs its providers' api_key_env names. A value
that is not YAML fails the render with the parser's message.
*/}}
{{- define "llm-gateway.parsedConfig" -}}
{{- $config := fromYaml .Values.config -}}
{{- if hasKey $config "Error" -}}
{{- fail (printf "values.config is not valid YAML: %s" (get $config "Error")) -}}
{{- end -}}
{{- if not (kindIs "map" (get $config "providers")) -}}
{{- fail "values.config has no providers: it must be a gateway.yaml (providers, models, policies, applications)" -}}
{{- end -}}
{{- toJson $config -}}
{{- end -}}

{{/* Every env name ext-proc reads a provider key from: the config's api_key_env names
and the keys of providerKeys.values, sorted, once each (a JSON list). */}}
{{- define "llm-gateway.providerKeyNames" -}}
{{- $config := include "llm-gateway.parsedConfig" . | fromJson -}}
{{- $names := list -}}
{{- range $name, $provider := $config.providers -}}
{{- if and (kindIs "map" $provider) (get $provider "api_key_env") -}}
{{- $names = append $names (get $provider "api_key_env") -}}
{{- end -}}
{{- end -}}
{{- range $key, $_ := .Values.providerKeys.values -}}
{{- $names = append $names $key -}}
{{- end -}}
{{- toJson ($names | uniq | sortAlpha) -}}
{{- end -}}

{{/* DATABASE_URL / REDIS_URL from a Secret (the Job passes its own hook copy's name). */}}
{{- define "llm-gateway.databaseEnv" -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef: {name: {{ .secret }}, key: DATABASE_URL}
- name: REDIS_URL
  valueFrom:
    secretKeyRef: {name: {{ .secret }}, key: REDIS_URL, optional: true}
{{- end -}}

{{/*
The probes of ext-proc: its admin API binds 127.0.0.1 (GET /v1/usage has no auth), so
the kubelet cannot reach it over the pod IP; a bare-socket request in the container
(python -I -S: stdlib only, ~20 ms CPU; urllib costs ~5x).
*/}}
{{- define "llm-gateway.adminProbe" -}}
exec:
  command:
    - python
    - -I
    - -S
    - -c
    - 'import socket,sys; s=socket.create_connection(("127.0.0.1",8080),2); s.sendall(b"GET {{ . }} HTTP/1.0\r\n\r\n"); sys.exit(0 if s.recv(64).startswith(b"HTTP/1.1 200") else 1)'
{{- end -}}

{{/* `ext-proc envoy-config` for the sidecar pod (the renderer init container). */}}
{{- define "llm-gateway.renderArgs" -}}
- envoy-config
- -c
- /etc/gateway/gateway.yaml
- --ext-proc-host
- 127.0.0.1
- --ext-proc-port
- "50051"
{{- if gt (int .Values.extProc.processes) 1 }}
- --ext-proc-processes
- {{ .Values.extProc.processes | quote }}
{{- end }}
- --stats-port
- "9902"
{{- if .Values.tls.enabled }}
- --tls-cert
- /etc/envoy-tls/tls.crt
- --tls-key
- /etc/envoy-tls/tls.key
- --tls-min-version
- {{ .Values.tls.minVersion | quote }}
{{- if .Values.tls.reload }}
- --tls-reload
- /etc/envoy/listener-tls.yaml
{{- end }}
{{- if .Values.tls.clientCA.enabled }}
- --tls-client-ca
- /etc/envoy-client-ca/{{ .Values.tls.clientCA.key }}
{{- end }}
{{- end }}
{{- range .Values.envoy.render.extraArgs }}
- {{ . | quote }}
{{- end }}
- -o
- /etc/envoy/envoy.yaml
{{- end -}}

{{/* Combinations the schema cannot express, refused with what to change. */}}
{{- define "llm-gateway.validate" -}}
{{- if and .Values.database.url .Values.database.existingSecret -}}
{{- fail "database: give either existingSecret or url (and redisUrl), not both" -}}
{{- end -}}
{{- if and .Values.database.redisUrl (not .Values.database.url) -}}
{{- fail "database.redisUrl is set without database.url: with an existing Secret, put REDIS_URL in it" -}}
{{- end -}}
{{- if and .Values.providerKeys.values .Values.providerKeys.existingSecret -}}
{{- fail "providerKeys: give either existingSecret or values, not both" -}}
{{- end -}}
{{- if and .Values.adminToken.value .Values.adminToken.existingSecret -}}
{{- fail "adminToken: give either existingSecret or value, not both" -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret (tls.crt, tls.key)" -}}
{{- end -}}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) -}}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled and tls.secretName" -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas is below autoscaling.minReplicas" -}}
{{- end -}}
{{- end -}}
