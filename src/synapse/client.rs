use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use url::Url;

use super::{Endpoint, ErrCode, SynapseError, SynapseUser, UserId, UserUpdate};
use crate::secret::SecretString;

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

/// A callback told of every admin request.
#[derive(Clone)]
pub struct RequestObserver(pub Arc<dyn Fn(Endpoint, Option<u16>, Duration) + Send + Sync>);

impl std::fmt::Debug for RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestObserver")
    }
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
        let invalid = |reason: String| SynapseError::InvalidUrl { reason };
        let base = Url::parse(&config.base_url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(invalid("it must be an http:// or https:// URL".into()));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(invalid("it must not carry credentials".into()));
        }
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| invalid(e.without_url().to_string()))?;
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

    /// Sends one request and returns its status and body. Every non-2xx
    /// status becomes an error, except those `accept` lists.
    async fn send(
        &self,
        endpoint: Endpoint,
        method: Method,
        segments: &[&str],
        body: Option<&(dyn erased::Body + Sync)>,
        accept: &[StatusCode],
    ) -> Result<(StatusCode, Vec<u8>), SynapseError> {
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let mut request = self
            .http
            .request(method, self.url(segments))
            .bearer_auth(self.token.expose());
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.to_json());
        }
        let started = std::time::Instant::now();
        let observe = |status: Option<StatusCode>| {
            if let Some(o) = &self.observer {
                (o.0)(endpoint, status.map(|s| s.as_u16()), started.elapsed());
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
        let bytes = response.bytes().await.map_err(transport)?.to_vec();
        observe(Some(status));
        if status.is_success() || accept.contains(&status) {
            return Ok((status, bytes));
        }
        Err(match serde_json::from_slice::<MatrixError>(&bytes) {
            Ok(e) if e.errcode.is_some() => SynapseError::Api {
                endpoint,
                status: status.as_u16(),
                errcode: e.errcode.as_deref().map_or(ErrCode::None, ErrCode::parse),
                message: truncate(e.error.unwrap_or_default()),
                retry_after: e.retry_after_ms.map(Duration::from_millis),
            },
            _ => SynapseError::UnexpectedResponse {
                endpoint,
                status: status.as_u16(),
                detail: truncate(String::from_utf8_lossy(&bytes).into_owned()),
            },
        })
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        method: Method,
        segments: &[&str],
        body: Option<&(dyn erased::Body + Sync)>,
    ) -> Result<T, SynapseError> {
        let (status, bytes) = self.send(endpoint, method, segments, body, &[]).await?;
        decode(endpoint, status, &bytes)
    }

    /// The user ID the admin token belongs to; its domain is the server name.
    pub async fn whoami(&self) -> Result<String, SynapseError> {
        #[derive(Deserialize)]
        struct Whoami {
            user_id: String,
        }
        let w: Whoami = self
            .send_json(
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
        let v: Version = self
            .send_json(
                Endpoint::ServerVersion,
                Method::GET,
                &["_synapse", "admin", "v1", "server_version"],
                None,
            )
            .await?;
        Ok(v.server_version)
    }

    /// The account, or `None` when Synapse has no such user.
    pub async fn get_user(&self, user_id: &UserId) -> Result<Option<SynapseUser>, SynapseError> {
        self.get_user_raw(user_id.as_str()).await
    }

    /// Like [`get_user`](Self::get_user) for an ID that was not validated
    /// (the admin's own, from whoami).
    pub async fn get_user_raw(&self, user_id: &str) -> Result<Option<SynapseUser>, SynapseError> {
        let segments = ["_synapse", "admin", "v2", "users", user_id];
        let (status, bytes) = self
            .send(
                Endpoint::GetUser,
                Method::GET,
                &segments,
                None,
                &[StatusCode::NOT_FOUND],
            )
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode(Endpoint::GetUser, status, &bytes).map(Some)
    }

    /// Creates or modifies an account. Synapse treats this as an upsert and
    /// may apply part of the body before failing: read the account again
    /// after an error.
    pub async fn put_user(&self, user_id: &UserId, update: &UserUpdate) -> Result<PutOutcome, SynapseError> {
        let segments = ["_synapse", "admin", "v2", "users", user_id.as_str()];
        let (status, bytes) = self
            .send(Endpoint::PutUser, Method::PUT, &segments, Some(update), &[])
            .await?;
        let user = decode(Endpoint::PutUser, status, &bytes)?;
        Ok(PutOutcome {
            created: status == StatusCode::CREATED,
            user,
        })
    }

    /// Deactivates an account, erasing it (profile hidden, messages marked
    /// erased) when `erase` is true. Works on an account already deactivated.
    pub async fn deactivate(&self, user_id: &UserId, erase: bool) -> Result<(), SynapseError> {
        let segments = ["_synapse", "admin", "v1", "deactivate", user_id.as_str()];
        let body = serde_json::json!({ "erase": erase });
        self.send(Endpoint::Deactivate, Method::POST, &segments, Some(&body), &[])
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
        let (status, bytes) = self
            .send(endpoint, Method::GET, segments, None, &[StatusCode::NOT_FOUND])
            .await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        decode::<Owner>(endpoint, status, &bytes).map(|o| Some(o.user_id))
    }
}

fn decode<T: DeserializeOwned>(endpoint: Endpoint, status: StatusCode, bytes: &[u8]) -> Result<T, SynapseError> {
    serde_json::from_slice(bytes).map_err(|e| SynapseError::UnexpectedResponse {
        endpoint,
        status: status.as_u16(),
        detail: format!("cannot decode the body: {e}"),
    })
}

/// Error bodies go into conditions and logs: keep them short.
fn truncate(mut s: String) -> String {
    const MAX: usize = 300;
    if s.len() > MAX {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// Request bodies of different types behind one `dyn`.
mod erased {
    pub trait Body {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Body for T {
        fn to_json(&self) -> Vec<u8> {
            // Serialising plain data structs to JSON cannot fail.
            serde_json::to_vec(self).unwrap_or_default()
        }
    }
}
