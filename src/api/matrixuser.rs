// kube's repeated printcolumn(type_ = ...) arguments are not duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A Matrix account on a Synapse homeserver, kept in line with this spec.
///
/// A field left out of the spec is not managed: the operator leaves it as it
/// is in Synapse.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "matrix-operator.io",
    version = "v1alpha1",
    kind = "MatrixUser",
    namespaced,
    doc = "A Matrix account on a Synapse homeserver, kept in line with its spec by matrix-user-operator.",
    status = "MatrixUserStatus",
    shortname = "mxu",
    category = "matrix",
    // Lets the operator find, by field selector, every MatrixUser that could
    // own a Matrix ID before it adopts one (see controller::ownership).
    selectable = ".spec.localpart",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "User ID", type_ = "string", json_path = ".status.userId"),
    printcolumn(name = "Homeserver", type_ = "string", json_path = ".spec.homeserverRef.name"),
    printcolumn(name = "Rooms", type_ = "integer", json_path = ".status.joinedRooms"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = 1
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
// The rules stay off metadata.name: the apiserver sees it as a string of
// unbounded length, and a rule on it (a regex above all) can exceed the
// CRD's CEL cost budget. A name that is no valid localpart is reported by
// the operator as InvalidSpec instead.
#[x_kube(
    validation = Rule::new(
        "has(self.localpart) == has(oldSelf.localpart) && (!has(self.localpart) || self.localpart == oldSelf.localpart)"
    ).message("the localpart is immutable (it may not be added, changed or removed): a Matrix ID can never change"),
    validation = Rule::new(
        "!(has(self.deactivated) && self.deactivated && has(self.locked) && self.locked)"
    ).message("deactivated and locked cannot both be true")
)]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserSpec {
    /// The Homeserver (in the same namespace) the account lives on. Immutable.
    #[x_kube(validation = Rule::new("self == oldSelf").message("homeserverRef is immutable"))]
    pub homeserver_ref: HomeserverRef,

    /// The localpart of the Matrix ID (`@localpart:server`). Defaults to
    /// metadata.name. Immutable: a Matrix ID can never change or be reused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9._=/+-]+$"), length(min = 1, max = 252))]
    #[x_kube(
        validation = Rule::new("!self.startsWith('_')").message("a localpart may not start with '_'"),
        validation = Rule::new("!self.matches('^[0-9]+$')").message("a localpart may not be all digits")
    )]
    pub localpart: Option<String>,

    /// The display name; `""` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub display_name: Option<String>,

    /// The avatar, an `mxc://` URI; `""` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(mxc://[^/\s]+/[^/\s]+)?$"), length(max = 512))]
    pub avatar_url: Option<String>,

    /// Server admin. Allowed only when the Homeserver's policy.allowAdminUsers is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,

    /// Deactivate the account (it keeps its Matrix ID; emails, devices and
    /// password are removed by Synapse). `false` re-activates it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deactivated: Option<bool>,

    /// Lock the account: its sessions stop working until unlocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked: Option<bool>,

    /// The kind of account: `bot` or `support`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "user_type_schema")]
    pub user_type: Option<UserType>,

    /// The password: from a Secret, or generated into `<name>-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordSpec>,

    /// Third-party IDs (emails, phone numbers) bound to the account; `[]`
    /// means none. An address bound to another account is a conflict, never
    /// taken over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["medium".into(), "address".into()]))]
    pub threepids: Option<Vec<ThreepidSpec>>,

    /// Links to SSO identity providers; `[]` means none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["authProvider".into(), "externalId".into()]))]
    pub external_ids: Option<Vec<ExternalIdSpec>>,

    /// Rooms (and spaces, which are rooms too) the account is a member of:
    /// each a room ID (`!abc:example.org`) or an alias (`#general:example.org`).
    /// A listed room the account is not in is joined through Synapse's
    /// admin API (a room that is not public needs the admin in it, with the
    /// power to invite). A room the operator joined for this resource is
    /// left, as the user, when it is removed from the list; rooms the
    /// account joined on its own are never left. `[]`: none of the rooms
    /// the operator joined. Left out: memberships are not managed. At most
    /// 50: every room costs a join on the first pass and a line in status,
    /// and a pass has a deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "rooms_schema")]
    pub rooms: Option<Vec<RoomName>>,

    /// What deleting this MatrixUser does to the account.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Take over an account that already exists in Synapse and was not
    /// created for this resource. Needs the Homeserver's policy.allowAdoption.
    #[serde(default)]
    pub adopt: bool,

    /// `Manage` (the default) makes the account match the spec. `Observe`
    /// never writes to the homeserver: it only reports whether the account
    /// matches (`Ready` reason `InSync`, else `Drifted` or `NotFound`), and
    /// deleting an observed MatrixUser only lets go of the account.
    #[serde(default)]
    pub management_policy: ManagementPolicy,
}

/// Whether the operator writes to the account or only watches it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum ManagementPolicy {
    /// Create, change, deactivate and re-activate the account as the spec says.
    #[default]
    Manage,
    /// Read the account and report drift; never write to the homeserver.
    Observe,
}

/// A room ID (`!opaque` or `!opaque:server`) or a room alias
/// (`#name:server`), as written in the spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(transparent)]
pub struct RoomName(pub String);

impl RoomName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether it is an alias (`#name:server`), which names a room by way
    /// of the server's directory.
    pub fn is_alias(&self) -> bool {
        self.0.starts_with('#')
    }
}

impl std::fmt::Display for RoomName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The most rooms a MatrixUser lists (see `spec.rooms`).
pub const MAX_ROOMS: usize = 50;

fn rooms_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": MAX_ROOMS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 2,
            "maxLength": 255,
            "pattern": "^(![^\\s]+|#[^:\\s]+:[^\\s]+)$",
        },
    })
}

// Without this, schemars lists `null` among the enum values of an optional
// enum, which is not a structural schema the apiserver should be given.
fn user_type_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The kind of account: `bot` or `support`.",
        "type": "string",
        "enum": ["bot", "support"],
    })
}

/// A Homeserver in the MatrixUser's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct HomeserverRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the referencing resource's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UserType {
    Bot,
    Support,
}

impl UserType {
    /// The value Synapse's admin API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Bot => "bot",
            UserType::Support => "support",
        }
    }
}

/// Where the password comes from: exactly one of `secretRef` or `generate: true`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.secretRef) != (has(self.generate) && self.generate)"
).message("password needs exactly one of secretRef or generate: true"))]
pub struct PasswordSpec {
    /// The Secret key holding the password. A change of the Secret is
    /// applied to Synapse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Generate a password into the Secret `<name>-credentials`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generate: bool,
    /// Log out every device of the account when the password changes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub logout_devices_on_change: bool,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ThreepidMedium {
    Email,
    Msisdn,
}

impl ThreepidMedium {
    pub fn as_str(self) -> &'static str {
        match self {
            ThreepidMedium::Email => "email",
            ThreepidMedium::Msisdn => "msisdn",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
// Synapse case-folds emails, which only agrees with lower-casing for ASCII:
// see plan::normalize_threepid.
#[x_kube(validation = Rule::new(
    "self.medium != 'email' || self.address.matches('^[!-?A-~]+@[!-?A-~]+$')"
).message("an email address is ASCII with exactly one '@'"))]
pub struct ThreepidSpec {
    pub medium: ThreepidMedium,
    #[schemars(length(min = 1, max = 320))]
    pub address: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExternalIdSpec {
    /// The SSO provider's ID in Synapse's config, e.g. `oidc-github`.
    #[schemars(length(min = 1, max = 255))]
    pub auth_provider: String,
    /// The account's ID at that provider.
    #[schemars(length(min = 1, max = 255))]
    pub external_id: String,
}

/// What deleting a MatrixUser does to its account.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
pub enum DeletionPolicy {
    /// Deactivate the account (its Matrix ID stays taken; it cannot be reused).
    #[default]
    Deactivate,
    /// Deactivate and erase it: profile and messages are hidden from new users.
    Erase,
    /// Leave the account as it is.
    Retain,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MatrixUserStatus {
    /// The Matrix ID of the account this resource owns: set once the
    /// account was created for it or adopted by it. The operator writes to
    /// an existing account only when it is recorded here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Synapse's creation time of that account (seconds since the epoch):
    /// an account of the same ID created at another time — on another
    /// server behind a repointed Homeserver, say — is not this resource's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_creation_ts: Option<i64>,
    /// MAS's ID (a ULID) of the account, when the Homeserver's accounts
    /// live in MAS: recorded with the ownership.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mas_user_id: Option<String>,
    /// A salted, slow digest (PBKDF2-HMAC-SHA256) of the password last
    /// applied, to tell when the Secret holds a new one. Never the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_digest: Option<String>,
    /// Where earlier releases recorded a pending creation (now the
    /// annotation `matrix-operator.io/pending-creation`): still read, and
    /// cleared once its outcome is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_creation: Option<PendingCreation>,
    /// The room memberships the operator made for this resource (joined
    /// because `spec.rooms` lists them): the only ones it ever leaves. A
    /// room the account joined on its own is not here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["roomId".into()]))]
    pub rooms: Vec<ManagedRoom>,
    /// How many of the rooms in `spec.rooms` the account is in, as last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_rooms: Option<i32>,
}

/// A room membership the operator made for a MatrixUser.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRoom {
    /// The room's ID.
    pub room_id: String,
    /// The alias it was listed by in `spec.rooms`, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Whether the account was in the room when last seen (a deactivated
    /// account has left every room; it is joined again on re-activation).
    pub joined: bool,
}

/// A creation of an account that was asked for and whose outcome is not
/// recorded yet.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingCreation {
    /// The Matrix ID asked for.
    pub user_id: String,
    /// When the operator was about to ask first (its clock, seconds since
    /// the epoch).
    pub requested_at: i64,
    /// When it asked last, if it asked again without an answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_requested_at: Option<i64>,
}

impl PendingCreation {
    /// The record of `pending`, a creation of `user_id`.
    pub fn record(user_id: &str, pending: crate::plan::PendingCreation) -> Self {
        PendingCreation {
            user_id: user_id.to_string(),
            requested_at: pending.requested_at,
            last_requested_at: (pending.last_requested_at != pending.requested_at).then_some(pending.last_requested_at),
        }
    }

    /// The creation recorded, if it is one of `user_id`.
    pub fn of(&self, user_id: &str) -> Option<crate::plan::PendingCreation> {
        (self.user_id == user_id).then(|| crate::plan::PendingCreation {
            requested_at: self.requested_at,
            last_requested_at: self.last_requested_at.unwrap_or(self.requested_at),
        })
    }
}

/// Recorded just before the operator asks the homeserver to create the
/// account (in the same write as the finalizer, for a new MatrixUser): if
/// the operator dies before it records the outcome, the account created in
/// that window is recognised as this resource's own. It stays once the
/// outcome is recorded (clearing it would cost a write per account): a
/// record of the account status records, with its creation time, is
/// settled and read as none.
pub const PENDING_CREATION: &str = "matrix-operator.io/pending-creation";

/// The longest record read (a record is under 200 bytes; anyone allowed to
/// edit the MatrixUser can write anything there).
const MAX_PENDING_CREATION_BYTES: usize = 1024;

impl MatrixUser {
    /// The creation this resource asked for whose outcome is not recorded:
    /// the annotation, unless settled (see [`PENDING_CREATION`]); else what
    /// an older release left in status.
    pub fn pending_creation(&self) -> Option<PendingCreation> {
        let status = self.status.as_ref();
        let annotated = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PENDING_CREATION))
            .filter(|v| v.len() <= MAX_PENDING_CREATION_BYTES)
            .and_then(|v| serde_json::from_str::<PendingCreation>(v).ok());
        match annotated {
            Some(p) => {
                let settled = status.is_some_and(|s| {
                    s.user_id.as_deref() == Some(p.user_id.as_str()) && s.account_creation_ts.is_some()
                });
                (!settled).then_some(p)
            }
            None => status.and_then(|s| s.pending_creation.clone()),
        }
    }

    /// Drops the pending-creation annotation when it records nothing any
    /// more (settled: its account is the one in status), so that a cached
    /// copy does not keep it: [`Self::pending_creation`] reads the same
    /// without it.
    pub fn forget_settled_record(&mut self) {
        let recorded = self
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(PENDING_CREATION));
        let legacy = self.status.as_ref().is_some_and(|s| s.pending_creation.is_some());
        if !recorded || legacy || self.pending_creation().is_some() {
            return;
        }
        if let Some(annotations) = self.metadata.annotations.as_mut() {
            annotations.remove(PENDING_CREATION);
            if annotations.is_empty() {
                self.metadata.annotations = None;
            }
        }
    }

    /// The localpart this resource names: `spec.localpart` or else its
    /// name, borrowed.
    pub fn effective_localpart(&self) -> &str {
        self.spec
            .effective_localpart(self.metadata.name.as_deref().unwrap_or_default())
    }
}

impl MatrixUserSpec {
    /// The localpart this resource names: `spec.localpart` or else the
    /// resource's name.
    pub fn effective_localpart<'a>(&'a self, name: &'a str) -> &'a str {
        self.localpart.as_deref().unwrap_or(name)
    }
}
