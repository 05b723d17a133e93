// kube's repeated printcolumn(type_ = ...) arguments are not duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;

/// A connection to one Synapse homeserver, through its admin API (and MAS's,
/// when it delegates authentication to MAS).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "matrix-operator.io",
    version = "v1alpha1",
    kind = "Homeserver",
    namespaced,
    doc = "A connection to one Synapse homeserver through its admin API, used by MatrixUsers in the same namespace.",
    status = "HomeserverStatus",
    shortname = "hs",
    category = "matrix",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Server Name", type_ = "string", json_path = ".status.serverName"),
    printcolumn(name = "Version", type_ = "string", json_path = ".status.serverVersion"),
    printcolumn(name = "Backend", type_ = "string", json_path = ".status.backend"),
    printcolumn(name = "Unmanaged", type_ = "integer", json_path = ".status.accounts.unmanaged"),
    printcolumn(name = "URL", type_ = "string", json_path = ".spec.url", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!(has(self.mas) && has(self.registrationSharedSecretRef))").message(
    "registrationSharedSecretRef is for a Synapse that manages its own accounts: with mas, MAS creates them"
))]
#[serde(rename_all = "camelCase")]
pub struct HomeserverSpec {
    /// Base URL of the homeserver's client and admin API, e.g.
    /// `http://synapse.chat.svc:8008`.
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"))]
    pub url: String,

    /// The Secret key holding an access token of a Synapse server admin.
    pub admin_token_secret_ref: SecretKeyRef,

    /// The Secret key holding Synapse's `registration_shared_secret`
    /// (optional). With it, a new account is created in one call, with its
    /// password, displayname, admin flag and user type, by Synapse's
    /// shared-secret registration, which creates only; without it, an empty
    /// create and then a PUT of the fields, which costs Synapse about twice
    /// as much. The secret lets its holder create server admins, as the
    /// admin token does. Not with `mas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_shared_secret_ref: Option<SecretKeyRef>,

    /// The server name (the part after `:` in Matrix IDs). Discovered from
    /// the admin token when unset; when set, it must match what Synapse says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_name: Option<String>,

    /// At most this many admin API requests in flight to this homeserver.
    #[serde(default = "default_max_concurrent_requests")]
    #[schemars(range(min = 1, max = 256))]
    pub max_concurrent_requests: u32,

    /// What MatrixUsers of this homeserver may ask for.
    #[serde(default)]
    pub policy: HomeserverPolicy,

    /// Set when Synapse delegates authentication to the Matrix
    /// Authentication Service (MAS): accounts, passwords, emails, SSO links,
    /// locking and deactivation are then managed through MAS's admin API,
    /// the profile (displayname, avatar, user type) through Synapse's, with
    /// `adminTokenSecretRef` (a compatibility token with Synapse admin rights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mas: Option<MasSpec>,

    /// The Secret key holding PEM CA certificates to trust, in addition to
    /// the system's roots, for `url` and `mas.url` (optional): a private CA,
    /// such as the `ca.crt` of a cert-manager CA's Secret. At most 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle_secret_ref: Option<SecretKeyRef>,
}

/// How to reach the Matrix Authentication Service a homeserver delegates to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MasSpec {
    /// Base URL of MAS (its admin API is under `/api/admin/v1`, its token
    /// endpoint `/oauth2/token`), e.g. `http://mas.chat.svc:8080`.
    #[schemars(regex(pattern = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"))]
    pub url: String,

    /// The ID of an OAuth 2.0 client listed in MAS's
    /// `policy.data.admin_clients`, with `client_secret_basic` (or
    /// `client_secret_post`) authentication and the `client_credentials` grant.
    #[schemars(length(min = 1, max = 255))]
    pub client_id: String,

    /// The Secret key holding that client's secret.
    pub client_secret_ref: SecretKeyRef,
}

fn default_max_concurrent_requests() -> u32 {
    8
}

impl HomeserverSpec {
    /// Whether the Homeserver reads the Secret `name` (its admin token, its
    /// registration shared secret, its MAS client's secret, or its CA
    /// bundle).
    pub fn uses_secret(&self, name: &str) -> bool {
        self.admin_token_secret_ref.name == name
            || self
                .registration_shared_secret_ref
                .as_ref()
                .is_some_and(|r| r.name == name)
            || self.mas.as_ref().is_some_and(|m| m.client_secret_ref.name == name)
            || self.ca_bundle_secret_ref.as_ref().is_some_and(|r| r.name == name)
    }
}

/// What MatrixUsers that reference a Homeserver may ask for.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HomeserverPolicy {
    /// MatrixUsers may set `admin: true`.
    #[serde(default)]
    pub allow_admin_users: bool,
    /// MatrixUsers with `adopt: true` may take over accounts that already
    /// exist in Synapse and were not created for them.
    #[serde(default)]
    pub allow_adoption: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HomeserverStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The server name Matrix IDs of this homeserver end with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// The user the admin token belongs to. MatrixUsers may not manage it:
    /// locking or deactivating it would cut the operator off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_user_id: Option<String>,
    /// What `/_synapse/admin/v1/server_version` answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_version: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where accounts live: `Synapse`, or `MAS` when `spec.mas` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// What MAS's `/api/admin/v1/version` answered (MAS backend only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mas_version: Option<String>,
    /// The admin token Secret the operator holds with the finalizer
    /// `matrix-operator.io/admin-token`, so that when the namespace is
    /// deleted the MatrixUsers' deletion policies can still reach Synapse.
    /// Released when the Homeserver goes or names another Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_secret: Option<String>,
    /// The Secret of `spec.mas.clientSecretRef`, held the same way: the
    /// deletion policies of MAS accounts need MAS too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_mas_secret: Option<String>,
    /// The accounts on the server, counted on an interval of its own
    /// (`--account-count-interval`); `import` turns the unmanaged ones into
    /// manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accounts: Option<AccountCounts>,
}

/// The accounts of a homeserver by whether a MatrixUser manages them.
/// Application service (bridge) users, guests and the admin token's own
/// account are not counted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, KubeSchema)]
pub struct AccountCounts {
    /// Accounts a MatrixUser records (`status.userId`), in any namespace
    /// the operator watches.
    pub managed: u64,
    /// Active (or locked) accounts no MatrixUser records.
    pub unmanaged: u64,
    /// Deactivated accounts no MatrixUser records.
    pub deactivated: u64,
}
