use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use url::Url;

use super::{BodySummary, DecodeProblem, Endpoint, ErrCode, SynapseError, SynapseUser, UserId, UserUpdate};
use crate::backend::RequestObserver;
use crate::backend::scrub::RequestSecrets;
use crate::secret::SecretString;

/// How much of Synapse's `error` text an error keeps.
pub(crate) const MAX_MESSAGE_BYTES: usize = 200;
/// Matrix error codes and media types are short; anything longer is not one.
pub(crate) const MAX_CODE_BYTES: usize = 64;

/// How to reach one homeserver.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URL of the client and admin API.
    pub base_url: String,
    pub admin_token: SecretString,
    /// At most this many requests in flight at once.
    pub max_concurrent_requests: usize,
    /// Limit on each request, from connect to the last byte.
    pub timeout: Duration,
    /// Told of every request: endpoint, HTTP status (`None` when no
    /// response came) and duration. For metrics.
    pub observer: Option<RequestObserver>,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, admin_token: SecretString) -> Self {
        Self {
            base_url: base_url.into(),
            admin_token,
            max_concurrent_requests: 8,
            timeout: Duration::from_secs(30),
            observer: None,
        }
    }
}

/// What a `PUT /_synapse/admin/v2/users/<id>` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// 201: the account did not exist and was created by this call.
    pub created: bool,
    pub user: SynapseUser,
}

/// A client of one homeserver's admin API. Cheap to clone; clones share the
/// connection pool and the limit on concurrent requests.
#[derive(Clone, Debug)]
pub struct SynapseClient {
    base: Url,
    token: SecretString,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    observer: Option<RequestObserver>,
}

#[derive(Deserialize)]
struct MatrixError {
    #[serde(default)]
    errcode: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

impl SynapseClient {
    pub fn new(config: ClientConfig) -> Result<Self, SynapseError> {
        let (base, http) = crate::backend::http_client(&config.base_url, config.timeout)
            .map_err(|reason| SynapseError::InvalidUrl { reason })?;
        Ok(Self {
            base,
            token: config.admin_token,
            http,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            observer: config.observer,
        })
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new(): the base URL can be a base")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends one request and decodes its 2xx answer as `T`. Any other
    /// answer is an error, and what it keeps of the answer is scrubbed of the
    /// request's secret values.
    async fn send<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        method: Method,
        segments: &[&str],
        body: Option<Body<'_>>,
    ) -> Result<(StatusCode, T), SynapseError> {
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let mut request = self
            .http
            .request(method, self.url(segments))
            .bearer_auth(self.token.expose());
        let mut secrets = vec![&self.token];
        if let Some(body) = body {
            secrets.extend(body.secrets);
            request = request.header(CONTENT_TYPE, "application/json").body(body.json);
        }
        let started = std::time::Instant::now();
        let observe = |status: Option<StatusCode>| {
            if let Some(o) = &self.observer {
                (o.0)(endpoint.as_str(), status.map(|s| s.as_u16()), started.elapsed());
            }
        };
        let transport = |source: reqwest::Error| {
            observe(None);
            SynapseError::Transport {
                endpoint,
                source: source.without_url(),
            }
        };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let bytes = response.bytes().await.map_err(transport)?;
        observe(Some(status));
        if status.is_redirection() {
            return Err(SynapseError::Redirected {
                endpoint,
                status: status.as_u16(),
            });
        }
        let secrets = || RequestSecrets::new(secrets.iter().copied());
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map(|answer| (status, answer))
                .map_err(|e| SynapseError::Undecodable {
                    endpoint,
                    status: status.as_u16(),
                    problem: DecodeProblem::of(&e),
                    body: summary(&secrets(), content_type.as_ref(), bytes.len()),
                });
        }
        let secrets = secrets();
        Err(match serde_json::from_slice::<MatrixError>(&bytes) {
            Ok(MatrixError {
                errcode: Some(errcode),
                error,
                retry_after_ms,
            }) => SynapseError::Api {
                endpoint,
                status: status.as_u16(),
                errcode: ErrCode::parse(&secrets.scrub(&errcode, MAX_CODE_BYTES)),
                message: secrets.scrub(error.as_deref().unwrap_or_default(), MAX_MESSAGE_BYTES),
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            _ => SynapseError::UnexpectedResponse {
                endpoint,
                status: status.as_u16(),
                body: summary(&secrets, content_type.as_ref(), bytes.len()),
            },
        })
    }

    /// The user ID the admin token belongs to; its domain is the server name.
    pub async fn whoami(&self) -> Result<String, SynapseError> {
        #[derive(Deserialize)]
        struct Whoami {
            user_id: String,
        }
        let (_, w): (_, Whoami) = self
            .send(
                Endpoint::Whoami,
                Method::GET,
                &["_matrix", "client", "v3", "account", "whoami"],
                None,
            )
            .await?;
        Ok(w.user_id)
    }

    pub async fn server_version(&self) -> Result<String, SynapseError> {
        #[derive(Deserialize)]
        struct Version {
            server_version: String,
        }
        let (_, v): (_, Version) = self
            .send(
                Endpoint::ServerVersion,
                Method::GET,
                &["_synapse", "admin", "v1", "server_version"],
                None,
            )
            .await?;
        Ok(v.server_version)
    }

    /// The issuer of the authorization server Synapse delegates to (MAS),
    /// or `None` when it authenticates users itself (its own 404).
    pub async fn auth_metadata_issuer(&self) -> Result<Option<String>, SynapseError> {
        #[derive(Deserialize)]
        struct Metadata {
            issuer: String,
        }
        let segments = ["_matrix", "client", "v1", "auth_metadata"];
        match self
            .send::<Metadata>(Endpoint::AuthMetadata, Method::GET, &segments, None)
            .await
        {
            // The issuer goes into a condition message: printable and short.
            Ok((_, m)) => Ok(Some(RequestSecrets::new([]).scrub(&m.issuer, MAX_MESSAGE_BYTES))),
            Err(SynapseError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The account, or `None` when Synapse has no such user.
    pub async fn get_user(&self, user_id: &UserId) -> Result<Option<SynapseUser>, SynapseError> {
        self.get_user_raw(user_id.as_str()).await
    }

    /// Like [`get_user`](Self::get_user) for an ID that was not validated
    /// (the admin's own, from whoami).
    pub async fn get_user_raw(&self, user_id: &str) -> Result<Option<SynapseUser>, SynapseError> {
        let segments = ["_synapse", "admin", "v2", "users", user_id];
        match self.send(Endpoint::GetUser, Method::GET, &segments, None).await {
            Ok((_, user)) => Ok(Some(user)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates or modifies an account. Synapse treats this as an upsert and
    /// may apply part of the body before failing: read the account again
    /// after an error.
    pub async fn put_user(&self, user_id: &UserId, update: &UserUpdate) -> Result<PutOutcome, SynapseError> {
        let segments = ["_synapse", "admin", "v2", "users", user_id.as_str()];
        let (status, user) = self
            .send(
                Endpoint::PutUser,
                Method::PUT,
                &segments,
                Some(Body::user_update(update)),
            )
            .await?;
        Ok(PutOutcome {
            created: status == StatusCode::CREATED,
            user,
        })
    }

    /// Deactivates an account, erasing it (profile hidden, messages marked
    /// erased) when `erase` is true. Works on an account already deactivated.
    pub async fn deactivate(&self, user_id: &UserId, erase: bool) -> Result<(), SynapseError> {
        let segments = ["_synapse", "admin", "v1", "deactivate", user_id.as_str()];
        let body = Body::plain(&serde_json::json!({ "erase": erase }));
        // Any JSON will do; a web page answering 200 has deactivated nothing.
        let (_, IgnoredAny) = self
            .send(Endpoint::Deactivate, Method::POST, &segments, Some(body))
            .await?;
        Ok(())
    }

    /// The account a third-party ID is bound to, if any. Email addresses
    /// are looked up lower-cased: Synapse stores them so and its lookup is
    /// case-sensitive.
    pub async fn threepid_owner(&self, medium: &str, address: &str) -> Result<Option<String>, SynapseError> {
        let address = if medium == "email" {
            address.to_lowercase()
        } else {
            address.to_string()
        };
        let segments = ["_synapse", "admin", "v1", "threepid", medium, "users", address.as_str()];
        self.lookup(Endpoint::ThreepidLookup, &segments).await
    }

    /// The account an SSO identity is linked to, if any.
    pub async fn external_id_owner(
        &self,
        auth_provider: &str,
        external_id: &str,
    ) -> Result<Option<String>, SynapseError> {
        let segments = [
            "_synapse",
            "admin",
            "v1",
            "auth_providers",
            auth_provider,
            "users",
            external_id,
        ];
        self.lookup(Endpoint::ExternalIdLookup, &segments).await
    }

    async fn lookup(&self, endpoint: Endpoint, segments: &[&str]) -> Result<Option<String>, SynapseError> {
        #[derive(Deserialize)]
        struct Owner {
            user_id: String,
        }
        match self.send::<Owner>(endpoint, Method::GET, segments, None).await {
            Ok((_, owner)) => Ok(Some(owner.user_id)),
            Err(e) if is_absent(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Whether Synapse itself said the user or binding does not exist. A 404
/// without its M_NOT_FOUND comes from something else at the URL (a web
/// server, an ingress without the route) and says nothing of the account.
fn is_absent(e: &SynapseError) -> bool {
    matches!(
        e,
        SynapseError::Api {
            status: 404,
            errcode: ErrCode::NotFound,
            ..
        }
    )
}

/// The body of an answer that is kept out of the error, by its media type
/// and length.
pub(crate) fn summary(secrets: &RequestSecrets, content_type: Option<&HeaderValue>, len: usize) -> BodySummary {
    let content_type = content_type.map(|value| {
        let value = String::from_utf8_lossy(value.as_bytes());
        let media_type = value.split(';').next().unwrap_or_default().trim();
        secrets.scrub(media_type, MAX_CODE_BYTES)
    });
    BodySummary { content_type, len }
}

/// A JSON request body and the secret values in it.
struct Body<'a> {
    json: Vec<u8>,
    secrets: Vec<&'a SecretString>,
}

impl<'a> Body<'a> {
    /// A body that carries no secret value.
    fn plain(value: &impl Serialize) -> Self {
        Self {
            json: to_json(value),
            secrets: Vec::new(),
        }
    }

    fn user_update(update: &'a UserUpdate) -> Self {
        Self {
            json: to_json(update),
            secrets: update.secrets().collect(),
        }
    }
}

fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}
