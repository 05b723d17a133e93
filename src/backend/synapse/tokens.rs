//! Access tokens of managed accounts, for bots (`MatrixAccessToken`): the
//! admin login API (a token without a device), the client login as the
//! user (a token of a device), whoami and logout with the token itself.
//!
//! Measured on Synapse 1.163.2: the admin login API refuses the admin's
//! own account (400); its tokens have no device and survive deactivation
//! and password changes; `/logout` with a token without a device ends that
//! token alone, with a device's token it deletes the device and every
//! token of it.

use reqwest::Method;
use serde::{Deserialize, Serialize};

use super::client::{Bearer, Body, to_json};
use super::{BodySummary, DecodeProblem, Endpoint, ErrCode, SynapseClient, SynapseError, UserId};
use crate::secret::SecretString;

/// The longest user or device ID taken from an answer.
const MAX_ID_BYTES: usize = 255;

/// Whom a token belongs to, as whoami says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenOwner {
    pub user_id: String,
    pub device_id: Option<String>,
}

/// A token from the client login.
#[derive(Clone, Debug)]
pub struct DeviceLogin {
    pub access_token: SecretString,
    pub device_id: String,
}

/// What `/logout` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logout {
    /// The token (and its device, if it had one) was ended now.
    Ended,
    /// Synapse no longer knew the token: it was ended before.
    AlreadyEnded,
}

impl SynapseClient {
    /// A token of `user_id` from the admin login API, valid until
    /// `valid_until_ms` (milliseconds since the epoch) or for ever.
    pub async fn admin_login(
        &self,
        user_id: &UserId,
        valid_until_ms: Option<i64>,
    ) -> Result<SecretString, SynapseError> {
        #[derive(Serialize)]
        struct Request {
            #[serde(skip_serializing_if = "Option::is_none")]
            valid_until_ms: Option<i64>,
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: SecretString,
        }
        let segments = ["_synapse", "admin", "v1", "users", user_id.as_str(), "login"];
        let body = Body::plain(&Request { valid_until_ms });
        let (status, answer): (_, Answer) = self
            .send_as(Bearer::Admin, Endpoint::AdminLogin, Method::POST, &segments, Some(body))
            .await?;
        check_token(Endpoint::AdminLogin, status.as_u16(), &answer.access_token)?;
        Ok(answer.access_token)
    }

    /// A token of a device of the user from the client login with the
    /// user's password: the device `device_id` is created, or reused with
    /// its keys if it exists.
    pub async fn password_login(
        &self,
        localpart: &str,
        password: &SecretString,
        device_id: &str,
        display_name: Option<&str>,
    ) -> Result<DeviceLogin, SynapseError> {
        #[derive(Serialize)]
        struct Identifier<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            user: &'a str,
        }
        #[derive(Serialize)]
        struct Request<'a> {
            #[serde(rename = "type")]
            kind: &'a str,
            identifier: Identifier<'a>,
            password: &'a str,
            device_id: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            initial_device_display_name: Option<&'a str>,
        }
        #[derive(Deserialize)]
        struct Answer {
            access_token: SecretString,
            device_id: String,
        }
        let body = Body {
            json: to_json(&Request {
                kind: "m.login.password",
                identifier: Identifier {
                    kind: "m.id.user",
                    user: localpart,
                },
                password: password.expose(),
                device_id,
                initial_device_display_name: display_name,
            }),
            secrets: vec![password],
        };
        let segments = ["_matrix", "client", "v3", "login"];
        let (status, answer): (_, Answer) = self
            .send_as(Bearer::None, Endpoint::Login, Method::POST, &segments, Some(body))
            .await?;
        check_token(Endpoint::Login, status.as_u16(), &answer.access_token)?;
        let device_id = self.fit_id(
            Endpoint::Login,
            status.as_u16(),
            answer.device_id,
            &[&answer.access_token, password],
        )?;
        Ok(DeviceLogin {
            access_token: answer.access_token,
            device_id,
        })
    }

    /// Whom `token` belongs to; a token Synapse does not know (ended,
    /// expired) is an error of class `Unauthorized`.
    pub async fn token_whoami(&self, token: &SecretString) -> Result<TokenOwner, SynapseError> {
        #[derive(Deserialize)]
        struct Answer {
            user_id: String,
            #[serde(default)]
            device_id: Option<String>,
        }
        let segments = ["_matrix", "client", "v3", "account", "whoami"];
        let (status, answer): (_, Answer) = self
            .send_as(Bearer::User(token), Endpoint::TokenWhoami, Method::GET, &segments, None)
            .await?;
        let status = status.as_u16();
        Ok(TokenOwner {
            user_id: self.fit_id(Endpoint::TokenWhoami, status, answer.user_id, &[token])?,
            device_id: answer
                .device_id
                .map(|d| self.fit_id(Endpoint::TokenWhoami, status, d, &[token]))
                .transpose()?,
        })
    }

    /// Ends `token` with the client logout (its device too, if it has one).
    pub async fn logout(&self, token: &SecretString) -> Result<Logout, SynapseError> {
        let segments = ["_matrix", "client", "v3", "logout"];
        let body = Body::plain(&serde_json::json!({}));
        match self
            .send_as::<serde::de::IgnoredAny>(
                Bearer::User(token),
                Endpoint::Logout,
                Method::POST,
                &segments,
                Some(body),
            )
            .await
        {
            Ok(_) => Ok(Logout::Ended),
            Err(SynapseError::Api {
                status: 401,
                errcode: ErrCode::UnknownToken,
                ..
            }) => Ok(Logout::AlreadyEnded),
            Err(e) => Err(e),
        }
    }

    /// An ID from an answer, taken only as it is: printable ASCII, short,
    /// holding none of the request's secrets nor any this client knows.
    pub(super) fn fit_id(
        &self,
        endpoint: Endpoint,
        status: u16,
        id: String,
        secrets: &[&SecretString],
    ) -> Result<String, SynapseError> {
        let secrets = crate::backend::scrub::RequestSecrets::new(secrets.iter().copied());
        let fit = !id.is_empty()
            && id.len() <= MAX_ID_BYTES
            && self.secrets().scrub_ascii(&id, MAX_ID_BYTES) == id
            && secrets.scrub_ascii(&id, MAX_ID_BYTES) == id;
        if fit {
            Ok(id)
        } else {
            Err(SynapseError::Undecodable {
                endpoint,
                status,
                problem: DecodeProblem::UnfitValue,
                body: BodySummary {
                    content_type: None,
                    len: id.len(),
                },
            })
        }
    }
}

/// A token is what goes into the Secret and an `Authorization` header:
/// printable ASCII without spaces, of a sane length.
fn check_token(endpoint: Endpoint, status: u16, token: &SecretString) -> Result<(), SynapseError> {
    let t = token.expose();
    let fit = !t.is_empty() && t.len() <= 1024 && t.bytes().all(|b| b.is_ascii_graphic());
    if fit {
        Ok(())
    } else {
        Err(SynapseError::Undecodable {
            endpoint,
            status,
            problem: DecodeProblem::UnfitValue,
            body: BodySummary {
                content_type: None,
                len: t.len(),
            },
        })
    }
}
