{{/*
The rules of deploy/base/rbac.yaml's ClusterRole, comments included; the
ClusterRole (all namespaces) and each Role (watchNamespaces) get them.
Least privilege: exactly the verbs the binary uses (tests/helm.rs checks
every API call the code makes against them, and that they equal
deploy/base/rbac.yaml's).
*/}}
{{- define "matrix-user-operator.rules" -}}
# The MatrixUser controller lists and watches its resources; the finalizer
# helper adds and removes matrix-operator.io/cleanup with a JSON patch.
- apiGroups: ["matrix-operator.io"]
  resources: ["matrixusers"]
  verbs: ["list", "watch", "patch"]
# Status is written by server-side apply on the status subresource.
- apiGroups: ["matrix-operator.io"]
  resources: ["matrixusers/status"]
  verbs: ["patch"]
# Homeservers: watched by their controller and by the MatrixUser
# controller; read by name when a MatrixUser is reconciled.
- apiGroups: ["matrix-operator.io"]
  resources: ["homeservers"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["matrix-operator.io"]
  resources: ["homeservers/status"]
  verbs: ["patch"]
# Secrets: read by name (admin tokens, passwords); watched by metadata
# only, so a password rotation reaches Synapse in seconds without the
# operator holding Secret values in a cache; created for password.generate.
# This is the narrowest grant that sees rotations across all namespaces;
# overlays/single-namespace narrows it to one namespace.
# In this chart: watchNamespaces narrows it to those namespaces.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create"]
# Events on MatrixUsers; the recorder patches a repeated Event's series.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
