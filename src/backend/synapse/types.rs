use std::fmt;

use serde::{Deserialize, Serialize};

use crate::account::Account;
pub use crate::account::{ExternalId, InvalidUserId, Threepid, UserId, validate_localpart};
use crate::plan::Changes;
use crate::secret::SecretString;

/// The admin API endpoints the operator calls: a closed set, so it can label
/// metrics and errors without unbounded cardinality.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Whoami,
    ServerVersion,
    GetUser,
    PutUser,
    Deactivate,
    ThreepidLookup,
    ExternalIdLookup,
    AuthMetadata,
    RegisterNonce,
    Register,
    /// The admin login API: a token of a user, without a device.
    AdminLogin,
    /// The client login, as the user (a token with a device).
    Login,
    /// whoami with a user's token.
    TokenWhoami,
    /// The client logout, with the token to end.
    Logout,
    /// The rooms a user is in (admin API).
    JoinedRooms,
    /// An alias looked up in the room directory.
    ResolveAlias,
    /// The admin join API.
    JoinRoom,
    /// The client leave, with a token of the user.
    LeaveRoom,
    /// A page of the user list (`GET /_synapse/admin/v2/users`).
    ListUsers,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Whoami => "whoami",
            Endpoint::ServerVersion => "server_version",
            Endpoint::GetUser => "get_user",
            Endpoint::PutUser => "put_user",
            Endpoint::Deactivate => "deactivate",
            Endpoint::ThreepidLookup => "threepid_lookup",
            Endpoint::ExternalIdLookup => "external_id_lookup",
            Endpoint::AuthMetadata => "auth_metadata",
            Endpoint::RegisterNonce => "register_nonce",
            Endpoint::Register => "register",
            Endpoint::AdminLogin => "admin_login",
            Endpoint::Login => "login",
            Endpoint::TokenWhoami => "token_whoami",
            Endpoint::Logout => "logout",
            Endpoint::JoinedRooms => "joined_rooms",
            Endpoint::ResolveAlias => "resolve_alias",
            Endpoint::JoinRoom => "join_room",
            Endpoint::LeaveRoom => "leave_room",
            Endpoint::ListUsers => "list_users",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An account as `GET /_synapse/admin/v2/users/<id>` reports it (the fields
/// the operator reads; Synapse sends more).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct SynapseUser {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub locked: bool,
    #[serde(default)]
    pub erased: bool,
    #[serde(default)]
    pub user_type: Option<String>,
    #[serde(default)]
    pub displayname: Option<String>,
    #[serde(default)]
    pub avatar_url: Option<String>,
    #[serde(default)]
    pub threepids: Vec<Threepid>,
    #[serde(default)]
    pub external_ids: Vec<ExternalId>,
    /// Seconds since the epoch.
    #[serde(default)]
    pub creation_ts: Option<i64>,
    /// The application service (bridge) that registered the account, if
    /// one did: its users are the bridge's, never a MatrixUser's.
    #[serde(default)]
    pub appservice_id: Option<String>,
}

impl From<SynapseUser> for Account {
    fn from(u: SynapseUser) -> Self {
        Account {
            name: u.name,
            account_id: None,
            admin: u.admin,
            deactivated: u.deactivated,
            locked: u.locked,
            erased: u.erased,
            user_type: u.user_type,
            displayname: u.displayname,
            avatar_url: u.avatar_url,
            threepids: u.threepids,
            external_ids: u.external_ids,
            creation_ts: u.creation_ts,
        }
    }
}

/// The body of `PUT /_synapse/admin/v2/users/<id>`. A field left `None` is
/// left out of the body: Synapse rejects explicit nulls for some fields and
/// leaves omitted ones unchanged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UserUpdate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretString>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logout_devices: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub displayname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avatar_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threepids: Option<Vec<Threepid>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_ids: Option<Vec<ExternalId>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deactivated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub locked: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_type: Option<String>,
}

impl From<&Changes> for UserUpdate {
    /// Every field of the plan's changes is a field of Synapse's user PUT
    /// (of the same name): the body sends them all. Destructured whole, so
    /// a field added to the plan must be placed here.
    fn from(changes: &Changes) -> Self {
        let Changes {
            password,
            displayname,
            avatar_url,
            threepids,
            external_ids,
            admin,
            deactivated,
            locked,
            user_type,
        } = changes;
        UserUpdate {
            password: password.as_ref().map(|p| p.value.clone()),
            logout_devices: password.as_ref().map(|p| p.logout_devices),
            displayname: displayname.clone(),
            avatar_url: avatar_url.clone(),
            threepids: threepids.clone(),
            external_ids: external_ids.clone(),
            admin: *admin,
            deactivated: *deactivated,
            locked: *locked,
            user_type: user_type.clone(),
        }
    }
}

impl UserUpdate {
    /// The secret values this body carries, to keep out of whatever an
    /// answer to it turns into.
    pub(super) fn secrets(&self) -> impl Iterator<Item = &SecretString> {
        self.password.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_are_left_out_of_the_body() {
        let body = UserUpdate {
            displayname: Some(String::new()),
            admin: Some(false),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&body).unwrap(),
            serde_json::json!({"displayname": "", "admin": false})
        );
        assert_eq!(
            serde_json::to_value(UserUpdate::default()).unwrap(),
            serde_json::json!({})
        );
    }

    #[test]
    fn password_is_sent_but_never_debug_printed() {
        let body = UserUpdate {
            password: Some(SecretString::new("s3cret")),
            ..Default::default()
        };
        assert_eq!(serde_json::to_value(&body).unwrap()["password"], "s3cret");
        assert!(!format!("{body:?}").contains("s3cret"));
    }
}
