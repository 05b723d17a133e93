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
# Read by name before the first write to Synapse, so that no write is
# based on a stale cache; listed by field selector before an existing
# account is taken as a resource's own (one owner per Matrix ID).
- apiGroups: ["matrix-operator.io"]
  resources: ["matrixusers"]
  verbs: ["get", "list", "watch", "patch"]
# Status is written by server-side apply on the status subresource.
- apiGroups: ["matrix-operator.io"]
  resources: ["matrixusers/status"]
  verbs: ["patch"]
# Homeservers: watched by their controller and by the MatrixUser
# controller; read by name when a MatrixUser is reconciled; the finalizer
# helper adds and removes matrix-operator.io/cleanup (a Homeserver being
# deleted waits for its MatrixUsers) with a JSON patch.
- apiGroups: ["matrix-operator.io"]
  resources: ["homeservers"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["matrix-operator.io"]
  resources: ["homeservers/status"]
  verbs: ["patch"]
# MatrixAccessTokens: listed and watched by their controller (and listed
# by a Homeserver being deleted, which waits for them); the finalizer
# helper adds and removes matrix-operator.io/revoke-token with a JSON
# patch; status by server-side apply. Their Secrets are created and
# patched (the token, its record, the finalizer
# matrix-operator.io/access-token) under the Secrets rule below.
- apiGroups: ["matrix-operator.io"]
  resources: ["matrixaccesstokens"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["matrix-operator.io"]
  resources: ["matrixaccesstokens/status"]
  verbs: ["patch"]
# Secrets: read by name (admin tokens, passwords); watched by metadata
# only, so a password rotation reaches Synapse in seconds without the
# operator holding Secret values in a cache; created for password.generate;
# patched to put the finalizer matrix-operator.io/admin-token on a
# Homeserver's admin token Secret (and take it off), so that deleting the
# namespace leaves the token readable until the deletion policies ran.
# This is the narrowest grant that sees rotations across all namespaces;
# overlays/single-namespace narrows it to one namespace.
# In this chart: watchNamespaces narrows it to those namespaces.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Events on MatrixUsers and MatrixAccessTokens; the recorder patches a repeated Event's series.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
