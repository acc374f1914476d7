{{/* Prefix of every object's name: the release name, with "-toolmesh" unless it already says so. */}}
{{- define "toolmesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains "toolmesh" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-toolmesh" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "toolmesh.labels" -}}
app.kubernetes.io/name: toolmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: toolmesh
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels that select one component's pods: call with (dict "ctx" $ "component" "operator"). */}}
{{- define "toolmesh.selectorLabels" -}}
app.kubernetes.io/name: toolmesh
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "toolmesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "toolmesh.registryURL" -}}
http://{{ include "toolmesh.fullname" . }}-registry.{{ .Release.Namespace }}.svc:{{ .Values.registry.port }}
{{- end -}}

{{/* The webhook's Secret: cert-manager's when it issues the certificate, else the one the operator writes. */}}
{{- define "toolmesh.webhookSecret" -}}
{{- if .Values.webhook.certManager.enabled -}}
{{ include "toolmesh.fullname" . }}-webhook-tls
{{- else -}}
toolmesh-webhook-tls
{{- end -}}
{{- end -}}

{{/* operator.namespaceSelector as the operator's --namespace-selector: key=value pairs, sorted, comma-separated. */}}
{{- define "toolmesh.namespaceSelector" -}}
{{- $pairs := list -}}
{{- range $key, $value := .Values.operator.namespaceSelector -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," (sortAlpha $pairs) -}}
{{- end -}}

{{/* The labels of operator.namespaceSelector as namespaceSelector matchExpressions (as operator/webhook.py renders). */}}
{{- define "toolmesh.webhookNamespaceLabels" -}}
{{- range $i, $key := keys .Values.operator.namespaceSelector | sortAlpha }}
{{- if $i }}{{ "\n" }}{{ end -}}
- key: {{ $key }}
  operator: In
  values: [{{ get $.Values.operator.namespaceSelector $key | quote }}]
{{- end }}
{{- end -}}
