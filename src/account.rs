//! The account, neutral between the backends: the Matrix ID it is known
//! by, the third-party IDs and SSO links it carries, and the account as a
//! backend reports it.

use std::fmt;

use serde::{Deserialize, Serialize};

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

/// A threepid's address in the form Synapse stores it (and MAS compares
/// emails in): trimmed, an email lower-cased. See
/// [`crate::plan::normalize_threepid`] for why ASCII lower-casing is enough.
pub fn normalize_address(medium: &str, address: &str) -> String {
    let address = address.trim();
    if medium == "email" {
        address.to_ascii_lowercase()
    } else {
        address.to_string()
    }
}

/// A link to an SSO identity provider as Synapse reports and accepts it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ExternalId {
    pub auth_provider: String,
    pub external_id: String,
}

/// An account as a backend reports it: from Synapse's admin API alone, or
/// from MAS (the account, its emails and upstream links) with Synapse's
/// profile. The plan compares it with the spec.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// The Matrix ID.
    pub name: String,
    /// The backend's own ID of the account, when it has one apart from the
    /// Matrix ID (MAS's ULID).
    pub account_id: Option<String>,
    /// Synapse: a server admin. MAS: may ask for admin scopes.
    pub admin: bool,
    pub deactivated: bool,
    pub locked: bool,
    pub erased: bool,
    pub user_type: Option<String>,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
    pub threepids: Vec<Threepid>,
    /// SSO links: Synapse's external ids, or MAS's upstream OAuth links with
    /// the provider's ID as `auth_provider`.
    pub external_ids: Vec<ExternalId>,
    /// When the account was created, seconds since the epoch.
    pub creation_ts: Option<i64>,
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
}
