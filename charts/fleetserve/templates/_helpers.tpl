{{/* Names and labels shared by the chart's objects. */}}
{{- define "fleetserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "fleetserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: fleetserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "fleetserve.selectorLabels" -}}
app.kubernetes.io/name: fleetserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fleetserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fleetserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions on namespaced resources: exactly the verbs it uses.
- inferenceservices: watched; patched by kopf (finalizer, progress annotations).
- /status: kopf writes status; /scale: the built-in autoscaler scales through it.
- /finalizers update: never called, but the OwnerReferencesPermissionEnforcement admission plugin
  (on in OpenShift) requires it to create children with blockOwnerDeletion owner references.
- deployments, services: read, created, patched; watched for status. Deleted only when spec.router is
  switched off (the router's Deployment and Service; everything else goes by owner references).
- serviceaccounts, roles, rolebindings: the per-service router's identity (read, created, patched).
- endpointslices, endpoints: list/watch is never called by the operator, but Kubernetes lets it grant
  in the router's Role only what it holds itself (RBAC escalation prevention).
- persistentvolumeclaims: read, created, patched (labels / owner references only).
- poddisruptionbudgets: read, created, patched (policy/v1, or policy/v1beta1 on 1.20); deleted when
  spec.rollout.podDisruptionBudget is switched off.
- pods: watched for readiness, failures and metrics targets.
- events: one per reconcile change, scale decision and invalid spec.
- kopfpeerings (KopfPeering in each watched namespace): with replicaCount > 1, kopf's keep-alives
  (patch) and the watch of the peers. All namespaces: clusterkopfpeerings, in fleetserve.clusterRules.
*/}}
{{- define "fleetserve.namespacedRules" -}}
- apiGroups: ["serving.fleetserve.dev"]
  resources: ["inferenceservices"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["serving.fleetserve.dev"]
  resources: ["inferenceservices/status", "inferenceservices/scale"]
  verbs: ["patch"]
- apiGroups: ["serving.fleetserve.dev"]
  resources: ["inferenceservices/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["endpoints"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and (gt (int .Values.replicaCount) 1) .Values.watchNamespaces }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end -}}

{{/* Cluster-wide mode only (no watchNamespaces): the peering object is a ClusterKopfPeering. */}}
{{- define "fleetserve.clusterRules" -}}
{{- if gt (int .Values.replicaCount) 1 }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["list", "watch", "patch"]
{{- end }}
{{- end -}}
