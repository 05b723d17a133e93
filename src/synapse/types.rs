use std::fmt;

use serde::{Deserialize, Serialize};

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
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a localpart or Matrix ID is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidUserId {
    #[error("the localpart is empty")]
    Empty,
    #[error("the localpart {0:?} may only hold a-z, 0-9 and . _ = - / +")]
    BadCharacter(String),
    #[error("the localpart {0:?} may not start with '_'")]
    LeadingUnderscore(String),
    #[error("the localpart {0:?} may not be all digits")]
    AllDigits(String),
    #[error("the Matrix ID {0:?} is longer than 255 bytes")]
    TooLong(String),
    #[error("the server name is empty")]
    EmptyServerName,
}

/// Checks a localpart against the grammar Synapse accepts for new users.
pub fn validate_localpart(localpart: &str) -> Result<(), InvalidUserId> {
    if localpart.is_empty() {
        return Err(InvalidUserId::Empty);
    }
    if !localpart
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
    {
        return Err(InvalidUserId::BadCharacter(localpart.to_string()));
    }
    if localpart.starts_with('_') {
        return Err(InvalidUserId::LeadingUnderscore(localpart.to_string()));
    }
    if localpart.bytes().all(|b| b.is_ascii_digit()) {
        return Err(InvalidUserId::AllDigits(localpart.to_string()));
    }
    Ok(())
}

/// A Matrix user ID, `@localpart:server_name`, checked to be one Synapse
/// would create.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId {
    full: String,
    colon: usize,
}

impl UserId {
    pub fn new(localpart: &str, server_name: &str) -> Result<Self, InvalidUserId> {
        validate_localpart(localpart)?;
        if server_name.is_empty() {
            return Err(InvalidUserId::EmptyServerName);
        }
        let full = format!("@{localpart}:{server_name}");
        if full.len() > 255 {
            return Err(InvalidUserId::TooLong(full));
        }
        Ok(Self {
            colon: localpart.len() + 1,
            full,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.full
    }

    pub fn localpart(&self) -> &str {
        &self.full[1..self.colon]
    }

    pub fn server_name(&self) -> &str {
        &self.full[self.colon + 1..]
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// A third-party ID as Synapse reports and accepts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Threepid {
    pub medium: String,
    pub address: String,
}

/// A link to an SSO identity provider as Synapse reports and accepts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExternalId {
    pub auth_provider: String,
    pub external_id: String,
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
    fn user_id_parts() {
        let id = UserId::new("alice", "example.org").unwrap();
        assert_eq!(id.as_str(), "@alice:example.org");
        assert_eq!(id.localpart(), "alice");
        assert_eq!(id.server_name(), "example.org");
    }

    #[test]
    fn localpart_grammar() {
        for ok in ["alice", "a.b_c=d-e/f+g", "0day", "x"] {
            assert_eq!(validate_localpart(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_localpart(""), Err(InvalidUserId::Empty));
        for bad in ["Alice", "a b", "ä", "a:b", "@a"] {
            assert!(
                matches!(validate_localpart(bad), Err(InvalidUserId::BadCharacter(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            validate_localpart("_bridge"),
            Err(InvalidUserId::LeadingUnderscore(_))
        ));
        assert!(matches!(validate_localpart("1234"), Err(InvalidUserId::AllDigits(_))));
    }

    #[test]
    fn whole_id_at_most_255_bytes() {
        let server = "example.org";
        let fits = "a".repeat(255 - 2 - server.len());
        assert!(UserId::new(&fits, server).is_ok());
        let over = "a".repeat(256 - 2 - server.len());
        assert!(matches!(UserId::new(&over, server), Err(InvalidUserId::TooLong(_))));
        assert_eq!(UserId::new("a", ""), Err(InvalidUserId::EmptyServerName));
    }

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
