{{/* The operator's name: its Deployment, ServiceAccount, ClusterRole and Lease. */}}
{{- define "gft.name" -}}
gft-operator
{{- end }}

{{- define "gft.labels" -}}
app.kubernetes.io/name: gemma-finetune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* What selects the operator's pods (the PodMonitor and the PDB rely on the name label). */}}
{{- define "gft.selectorLabels" -}}
app.kubernetes.io/name: gemma-finetune-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gft.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The operator's permissions on the API it serves and the children it makes. */}}
{{- define "gft.rules" -}}
# Every read is a list and a watch: the operator keeps what it needs in memory and never GETs.
# The API it serves. finalizers: children carry an owner reference with blockOwnerDeletion,
# which needs update on the owner's finalizers (OwnerReferencesPermissionEnforcement).
- apiGroups: [finetune.gemma.dev]
  resources: [gemmafinetunes]
  verbs: [list, watch]
- apiGroups: [finetune.gemma.dev]
  resources: [gemmafinetunes/status]
  verbs: [patch]
- apiGroups: [finetune.gemma.dev]
  resources: [gemmafinetunes/finalizers]
  verbs: [update]
# The Job: never updated (a live Job's template is fixed). patch: suspend, and taking its
# outcome finalizer off; delete: ttlSecondsAfterFinished, applied by the operator once the
# run's outcome is in the status.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# The other children (watched with a label selector: only the operator's own); garbage
# collection removes them with the fine-tune.
- apiGroups: [""]
  resources: [configmaps, services, persistentvolumeclaims]
  verbs: [list, watch, create]
# The Ingress follows spec.tensorboard.ingress: server-side apply (patch; create, for the apply
# that makes it), owning only the fields it sets; get: once before it is first applied, so that
# someone else's Ingress of its name (not labelled, so not watched) is never taken over.
- apiGroups: [networking.k8s.io]
  resources: [ingresses]
  verbs: [list, watch, get, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create]
# TensorBoard after the run, for spec.tensorboard.keepAfterFinishSeconds.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [list, watch, create, delete]
# Training pods: watched to explain the phase; patch: taking the outcome finalizer off once the
# status holds what the pod says; delete: stopping a trainer whose Job was deleted under it.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, patch, delete]
{{- if eq .Values.metrics.access "proxy" }}
# Reads the trainers' /metrics through the API server (metrics.access: proxy).
- apiGroups: [""]
  resources: [pods/proxy]
  verbs: [get]
{{- end }}
{{- if .Values.kueue.enabled }}
# Kueue's Workloads (kueue.enabled): why a queued run waits; patch: spec.active for suspend.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [list, watch, patch]
{{- end }}
# Why a pod is stuck (FailedScheduling, FailedMount, FailedCreate), and one Event per transition.
# (Pods: list also when a Job ended and its pods are not seen: one read to record the outcome.)
- apiGroups: [""]
  resources: [events]
  verbs: [list, watch, create]
{{- end }}

{{/* The dashboard's labels: a name of its own, so no selector of the operator's matches it. */}}
{{- define "gft.dashboardLabels" -}}
app.kubernetes.io/name: gemma-finetune-dashboard
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "gft.dashboardSelectorLabels" -}}
app.kubernetes.io/name: gemma-finetune-dashboard
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
