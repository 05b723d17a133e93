//! Synapse's user list (`GET /_synapse/admin/v2/users`), a page at a time.

use reqwest::Method;
use serde::Deserialize;

use super::client::Bearer;
use super::{Endpoint, SynapseClient, SynapseError};

/// An account as the user list reports it: less than a user GET (no
/// threepids, no external ids, no `appservice_id`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ListedUser {
    pub name: String,
    #[serde(default)]
    pub is_guest: bool,
    #[serde(default)]
    pub admin: bool,
    #[serde(default)]
    pub deactivated: bool,
    #[serde(default)]
    pub locked: bool,
    #[serde(default)]
    pub user_type: Option<String>,
}

/// One page of the list, and the offset of the next (Synapse's
/// `next_token`, a number), if there is one.
#[derive(Clone, Debug)]
pub struct UsersPage {
    pub users: Vec<ListedUser>,
    pub next: Option<u64>,
    /// What Synapse says the whole list holds: for progress only.
    pub total: Option<u64>,
}

impl SynapseClient {
    /// The page of the user list from offset `from`, `limit` accounts at
    /// most, ordered by name. Synapse's defaults hide locked and
    /// deactivated accounts (measured on 1.163): both are asked for here.
    /// Guests are left out with `guests: false` (when Synapse delegates to
    /// MAS it refuses the list without it: MAS has no guests).
    pub async fn list_users(&self, from: u64, limit: u32, guests: bool) -> Result<UsersPage, SynapseError> {
        #[derive(Deserialize)]
        struct Answer {
            users: Vec<ListedUser>,
            #[serde(default)]
            next_token: Option<serde_json::Value>,
            #[serde(default)]
            total: Option<serde_json::Value>,
        }
        let mut url = self.url(&["_synapse", "admin", "v2", "users"]);
        url.query_pairs_mut()
            .append_pair("from", &from.to_string())
            .append_pair("limit", &limit.to_string())
            .append_pair("guests", if guests { "true" } else { "false" })
            .append_pair("deactivated", "true")
            .append_pair("locked", "true")
            .append_pair("order_by", "name");
        let (status, answer): (_, Answer) = self
            .send_to(Bearer::Admin, Endpoint::ListUsers, Method::GET, url, None)
            .await?;
        // Synapse sends the next offset as a string of digits; a number is
        // taken too. Anything else is not Synapse's.
        let number = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.parse::<u64>().ok(),
            other => other.as_u64(),
        };
        let next = match &answer.next_token {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(number(v).ok_or(SynapseError::Undecodable {
                endpoint: Endpoint::ListUsers,
                status: status.as_u16(),
                problem: super::DecodeProblem::UnfitValue,
                body: super::BodySummary {
                    content_type: None,
                    len: 0,
                },
            })?),
        };
        Ok(UsersPage {
            users: answer.users,
            next,
            total: answer.total.as_ref().and_then(number),
        })
    }
}
