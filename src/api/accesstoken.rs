// kube's repeated printcolumn(type_ = ...) arguments are not duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// An access token of a managed Matrix account, for a bot, written to a
/// Secret its pods mount: issued, rotated and revoked by the operator.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "matrix-operator.io",
    version = "v1alpha1",
    kind = "MatrixAccessToken",
    namespaced,
    doc = "An access token of a MatrixUser's account, kept in a Secret by matrix-user-operator.",
    status = "MatrixAccessTokenStatus",
    shortname = "mxat",
    category = "matrix",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "User", type_ = "string", json_path = ".status.userId"),
    printcolumn(name = "Device", type_ = "string", json_path = ".status.deviceId"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(
    validation = Rule::new(
        "has(self.secretName) == has(oldSelf.secretName) && (!has(self.secretName) || self.secretName == oldSelf.secretName)"
    ).message("secretName is immutable: the bot's pods mount the Secret by name (create another MatrixAccessToken instead)")
)]
#[serde(rename_all = "camelCase")]
pub struct MatrixAccessTokenSpec {
    /// The MatrixUser (in the same namespace) whose account the token is
    /// for. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("userRef is immutable"))]
    pub user_ref: UserRef,

    /// The Secret the token is written to, owned by this resource.
    /// Default: `<name>-token`. Immutable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"), length(min = 1, max = 253))]
    pub secret_name: Option<String>,

    /// A stable device for the token: the bot's end-to-end encryption keys
    /// survive rotation. Without it the token has no device (no E2EE).
    /// On Synapse (without MAS) a device needs a login as the user: only
    /// for a MatrixUser whose password the operator manages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._~-]+$"), length(min = 1, max = 64))]
    pub device_id: Option<String>,

    /// The device's display name, set when the token is issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 100))]
    pub device_display_name: Option<String>,

    /// How long each token is valid (`720h`, `90m`); absent: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(h|m|s))+$"), length(max = 32))]
    pub valid_for: Option<String>,

    /// Rotate this long before the token expires. Default: a third of
    /// `validFor`. Needs `validFor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(h|m|s))+$"), length(max = 32))]
    pub renew_before: Option<String>,

    /// How long a replaced token keeps working after the new one is in
    /// the Secret, so that pods reading the Secret late do not fail at
    /// once. Default: `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(h|m|s))+$"), length(max = 32))]
    pub rotation_grace_period: Option<String>,
}

/// A MatrixUser in the referencing resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct UserRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatrixAccessTokenStatus {
    /// The Matrix ID the token in the Secret belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The device of the token in the Secret, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// When the token in the Secret was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When it expires; absent: never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// MAS's ID of the personal session of the token (MAS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The Homeserver the token was issued by (the MatrixUser's), to
    /// revoke it when the MatrixUser is gone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homeserver: Option<String>,
    /// The value of the `matrix-operator.io/rotate` annotation the token
    /// in the Secret was issued for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<String>,
    /// A replaced token, revoked once its grace period is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring: Option<RetiringToken>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// A token that was replaced in the Secret and still works until
/// `revokeAt`. On Synapse its value stays in the Secret (key
/// `previousAccessToken`) until then: revoking it needs it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetiringToken {
    pub revoke_at: Time,
    /// Its MAS personal session (MAS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

impl MatrixAccessToken {
    /// The Secret this resource writes: `spec.secretName` or `<name>-token`.
    pub fn secret_name(&self) -> String {
        self.spec
            .secret_name
            .clone()
            .unwrap_or_else(|| format!("{}-token", self.metadata.name.as_deref().unwrap_or_default()))
    }
}
