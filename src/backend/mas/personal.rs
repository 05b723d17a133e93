//! Personal sessions (MAS 1.5 and later): access tokens MAS issues to a
//! user on an admin's request, for bots (`MatrixAccessToken`).
//!
//! Measured on MAS 1.22.0: `POST /personal-sessions` answers 201 with the
//! token (only then); a scope `urn:matrix:client:device:<ID>` makes MAS
//! create that device in Synapse, and two sessions may share one device
//! (revoking one keeps the device while another active session names
//! it); `regenerate` revokes the session's previous token at once (no
//! grace: rotation makes a new session instead); `revoke` of a revoked
//! session is 409, of an unknown one 404; deactivating the user revokes
//! its sessions; a deactivated user gets 410 "User is not active", an
//! unknown one 404 "User not found".

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::client::{Single, decode, to_json};
use super::{MasClient, MasEndpoint, MasError};
use crate::secret::SecretString;

/// The scope of a bot's token: the client-server API.
pub const SCOPE_CLIENT_API: &str = "urn:matrix:client:api:*";
/// The scope that binds a session to a device (MAS creates it in Synapse).
pub const SCOPE_DEVICE_PREFIX: &str = "urn:matrix:client:device:";

/// The scope of a personal session for a bot, with `device_id` if any.
pub fn bot_scope(device_id: Option<&str>) -> String {
    match device_id {
        Some(device) => format!("{SCOPE_CLIENT_API} {SCOPE_DEVICE_PREFIX}{device}"),
        None => SCOPE_CLIENT_API.to_string(),
    }
}

/// A personal session's attributes, as the operator reads them.
#[derive(Clone, Debug, Deserialize)]
pub struct PersonalSession {
    /// The MAS user the session acts for.
    #[serde(default)]
    pub actor_user_id: String,
    #[serde(default)]
    pub human_name: String,
    #[serde(default)]
    pub revoked_at: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    pub scope: String,
}

/// A session just created, with its token (MAS sends it only then).
#[derive(Clone, Debug)]
pub struct IssuedSession {
    pub id: String,
    pub access_token: SecretString,
    pub expires_at: Option<String>,
}

/// What a revocation found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    Now,
    /// Revoked before (409), or unknown to MAS (404).
    Already,
}

impl MasClient {
    /// A new personal session of the MAS user `actor` (its ULID) with
    /// `scope`, its token valid `expires_in` seconds or for ever.
    pub async fn create_personal_session(
        &self,
        actor: &str,
        human_name: &str,
        scope: &str,
        expires_in: Option<u32>,
    ) -> Result<IssuedSession, MasError> {
        #[derive(Serialize)]
        struct Body<'a> {
            actor_user_id: &'a str,
            human_name: &'a str,
            scope: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            expires_in: Option<u32>,
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(default)]
            access_token: Option<SecretString>,
            #[serde(default)]
            expires_at: Option<String>,
        }
        let endpoint = MasEndpoint::CreatePersonalSession;
        let json = to_json(&Body {
            actor_user_id: actor,
            human_name,
            scope,
            expires_in,
        });
        let (status, body) = self
            .admin(
                endpoint,
                Method::POST,
                &["personal-sessions"],
                &[],
                Some((json, Vec::new())),
            )
            .await?;
        let created: Single<Created> = decode(endpoint, status, &body)?;
        let unfit = |len| MasError::Undecodable {
            endpoint,
            status: status.as_u16(),
            problem: crate::synapse::DecodeProblem::UnfitValue,
            body: crate::synapse::BodySummary {
                content_type: None,
                len,
            },
        };
        let Some(access_token) = created.data.attributes.access_token else {
            return Err(unfit(body.len()));
        };
        let t = access_token.expose();
        if t.is_empty() || t.len() > 1024 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(unfit(t.len()));
        }
        if !is_id(&created.data.id) {
            return Err(unfit(created.data.id.len()));
        }
        Ok(IssuedSession {
            id: created.data.id,
            access_token,
            expires_at: created.data.attributes.expires_at.filter(|e| e.len() <= 64),
        })
    }

    /// The personal session `id`, or `None` when MAS has none of that ID.
    pub async fn personal_session(&self, id: &str) -> Result<Option<PersonalSession>, MasError> {
        let endpoint = MasEndpoint::GetPersonalSession;
        match self
            .admin(endpoint, Method::GET, &["personal-sessions", id], &[], None)
            .await
        {
            Ok((status, body)) => Ok(Some(
                decode::<Single<PersonalSession>>(endpoint, status, &body)?
                    .data
                    .attributes,
            )),
            Err(MasError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Revokes the personal session `id` (its token stops working; a
    /// device only it named is deleted from Synapse).
    pub async fn revoke_personal_session(&self, id: &str) -> Result<Revoked, MasError> {
        let endpoint = MasEndpoint::RevokePersonalSession;
        match self
            .admin(endpoint, Method::POST, &["personal-sessions", id, "revoke"], &[], None)
            .await
        {
            Ok((status, body)) => {
                decode::<Single<serde::de::IgnoredAny>>(endpoint, status, &body).map(|_| Revoked::Now)
            }
            Err(MasError::Api { status: 404 | 409, .. }) => Ok(Revoked::Already),
            Err(e) => Err(e),
        }
    }
}

/// A ULID as MAS writes them: 26 characters of Crockford's Base32.
pub fn is_id(id: &str) -> bool {
    id.len() == 26 && id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}
