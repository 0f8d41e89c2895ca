{{/* Names, labels and shared pod-spec fragments of the llmep chart. */}}

{{- define "llmep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object the chart names (default: the release name, or "llmep"). */}}
{{- define "llmep.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "llmep.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "llmep.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llmep.operator.fullname" -}}
{{- printf "%s-operator" (include "llmep.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The gateway's Service name is its base_url host, so it does not follow the release name. */}}
{{- define "llmep.gateway.fullname" -}}
{{- default (printf "%s-gateway" (include "llmep.fullname" .)) .Values.gateway.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "llmep.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "llmep.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmep.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "llmep.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "llmep.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object; `helm uninstall` checks and tests select on instance. */}}
{{- define "llmep.labels" -}}
helm.sh/chart: {{ include "llmep.chart" . }}
app.kubernetes.io/name: {{ include "llmep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmep
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "llmep.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "llmep.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{- define "llmep.image" -}}
{{- $img := .image -}}
{{- $tag := default .root.Chart.AppVersion $img.tag -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Namespaces whose LLMEndpoints are served; empty list means the whole cluster. */}}
{{- define "llmep.watchNamespaces" -}}
{{- toJson (.Values.watchNamespaces | default list | uniq) -}}
{{- end -}}

{{/* Restricted pod security, the same for every pod of the chart. */}}
{{- define "llmep.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.runAsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "llmep.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The operator's rights on LLMEndpoints and their children, wherever endpoints are watched. */}}
{{- define "llmep.operator.rules" -}}
- apiGroups: [llmep.io]
  resources: [llmendpoints]
  # Read only: the operator writes status alone (no kopf annotations, no finalizer).
  verbs: [get, list, watch]
- apiGroups: [llmep.io]
  resources: [llmendpoints/status]
  verbs: [get, patch]
- apiGroups: [llmep.io]
  # Children's ownerReferences set blockOwnerDeletion, which needs update on finalizers.
  resources: [llmendpoints/finalizers]
  verbs: [update]
- apiGroups: [ray.io]
  resources: [rayservices]
  # Server-side apply is a PATCH; one that creates the object is also authorised as create.
  verbs: [get, list, watch, create, patch]
- apiGroups: [ray.io]
  # KubeRay leaves a running RayCluster's worker bounds as they were: the operator patches them.
  resources: [rayclusters]
  verbs: [get, patch]
- apiGroups: [""]
  resources: [services, persistentvolumeclaims]
  verbs: [get, list, watch, create, patch]
{{- if .Values.networkPolicy.enabled }}
- apiGroups: [networking.k8s.io]
  # One per endpoint (operator setting network_policy), applied with server-side apply.
  resources: [networkpolicies]
  verbs: [get, create, patch]
{{- end }}
- apiGroups: [batch]
  # cache.prefetch's fill Job: applied, watched, and deleted once the model's source changes.
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  # The last progress line of the fill pod, shown in the endpoint's status.
  resources: [pods/log]
  verbs: [get]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
