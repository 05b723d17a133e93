use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{CONTENT_TYPE, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use url::Url;

use super::{BodySummary, DecodeProblem, Endpoint, ErrCode, SynapseError, SynapseUser, UserId, UserUpdate};
use crate::backend::scrub::RequestSecrets;
use crate::backend::{BodyError, MAX_VERSION_BYTES, RequestObserver};
use crate::secret::SecretString;
use crate::tls::ExtraRoots;

/// How much of Synapse's `error` text an error keeps.
pub(crate) const MAX_MESSAGE_BYTES: usize = 200;
/// Matrix error codes and media types are short; anything longer is not one.
pub(crate) const MAX_CODE_BYTES: usize = 64;
/// The longest Matrix user ID (the spec's limit).
const MAX_USER_ID_BYTES: usize = 255;

/// How to reach one homeserver.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URL of the client and admin API.
    pub base_url: String,
    pub admin_token: SecretString,
    /// Synapse's `registration_shared_secret`, when it was given: new
    /// accounts are then created with their password and profile in one
    /// create-only call (see [`SynapseClient::register`]).
    pub registration_shared_secret: Option<SecretString>,
    /// At most this many requests in flight at once.
    pub max_concurrent_requests: usize,
    /// Limit on each request, from connect to the last byte.
    pub timeout: Duration,
    /// Told of every request: endpoint, HTTP status (`None` when no
    /// response came) and duration. For metrics.
    pub observer: Option<RequestObserver>,
    /// CA certificates trusted besides the system's (a private CA).
    pub extra_roots: ExtraRoots,
}

impl ClientConfig {
    pub fn new(base_url: impl Into<String>, admin_token: SecretString) -> Self {
        Self {
            base_url: base_url.into(),
            admin_token,
            registration_shared_secret: None,
            max_concurrent_requests: 8,
            timeout: Duration::from_secs(30),
            observer: None,
            extra_roots: ExtraRoots::default(),
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

/// An account for [`SynapseClient::register`] to create.
#[derive(Clone, Copy, Debug)]
pub struct Registration<'a> {
    pub localpart: &'a str,
    pub password: &'a SecretString,
    /// `None`: Synapse's default, the localpart.
    pub displayname: Option<&'a str>,
    pub admin: bool,
    pub user_type: Option<&'a str>,
}

/// A client of one homeserver's admin API. Cheap to clone; clones share the
/// connection pool and the limit on concurrent requests.
#[derive(Clone, Debug)]
pub struct SynapseClient {
    base: Url,
    token: SecretString,
    registration_shared_secret: Option<SecretString>,
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
    /// Any JSON number, bounded when read: a wait of any length must
    /// neither stop the error from being read nor stall the account.
    #[serde(default)]
    retry_after_ms: Option<serde_json::Value>,
}

impl SynapseClient {
    pub fn new(config: ClientConfig) -> Result<Self, SynapseError> {
        let (base, http) = crate::backend::http_client(&config.base_url, config.timeout, &config.extra_roots)
            .map_err(|reason| SynapseError::InvalidUrl { reason })?;
        Ok(Self {
            base,
            token: config.admin_token,
            registration_shared_secret: config.registration_shared_secret,
            http,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            observer: config.observer,
        })
    }

    pub(super) fn url(&self, segments: &[&str]) -> Url {
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
        self.send_as(Bearer::Admin, endpoint, method, segments, body).await
    }

    /// [`send`](Self::send) with the admin token, another token (a user's)
    /// or none.
    pub(super) async fn send_as<T: DeserializeOwned>(
        &self,
        bearer: Bearer<'_>,
        endpoint: Endpoint,
        method: Method,
        segments: &[&str],
        body: Option<Body<'_>>,
    ) -> Result<(StatusCode, T), SynapseError> {
        self.send_to(bearer, endpoint, method, self.url(segments), body).await
    }

    /// [`send_as`](Self::send_as) to a whole URL (one with a query).
    pub(super) async fn send_to<T: DeserializeOwned>(
        &self,
        bearer: Bearer<'_>,
        endpoint: Endpoint,
        method: Method,
        url: Url,
        body: Option<Body<'_>>,
    ) -> Result<(StatusCode, T), SynapseError> {
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let mut request = self.http.request(method, url);
        // The admin token is scrubbed from every answer, whoever asks.
        let mut secrets = vec![&self.token];
        match bearer {
            Bearer::Admin => request = request.bearer_auth(self.token.expose()),
            Bearer::User(token) => {
                request = request.bearer_auth(token.expose());
                secrets.push(token);
            }
            Bearer::None => {}
        }
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
        let bytes = match crate::backend::read_body(response).await {
            Ok(bytes) => bytes,
            Err(BodyError::Transport(e)) => return Err(transport(e)),
            Err(BodyError::TooLarge) => {
                observe(Some(status));
                return Err(SynapseError::TooLarge {
                    endpoint,
                    status: status.as_u16(),
                });
            }
        };
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
                retry_after: retry_after_ms.as_ref().and_then(crate::backend::retry_after_of),
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
        let (status, w): (_, Whoami) = self
            .send(
                Endpoint::Whoami,
                Method::GET,
                &["_matrix", "client", "v3", "account", "whoami"],
                None,
            )
            .await?;
        // It goes into status and is compared with accounts: taken only as
        // a Matrix user ID (at most 255 bytes of printable ASCII), never
        // cleaned into another.
        let fit = w.user_id.len() <= MAX_USER_ID_BYTES
            && w.user_id.starts_with('@')
            && self.secrets().scrub_ascii(&w.user_id, MAX_USER_ID_BYTES) == w.user_id;
        if !fit {
            return Err(SynapseError::Undecodable {
                endpoint: Endpoint::Whoami,
                status: status.as_u16(),
                problem: DecodeProblem::UnfitValue,
                body: BodySummary {
                    content_type: None,
                    len: w.user_id.len(),
                },
            });
        }
        Ok(w.user_id)
    }

    /// Every secret this client knows, to scrub what a server sends of
    /// them: any answer may echo any request.
    pub(super) fn secrets(&self) -> RequestSecrets {
        RequestSecrets::new(std::iter::once(&self.token).chain(&self.registration_shared_secret))
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
        // It goes into status.
        Ok(self.secrets().scrub_ascii(&v.server_version, MAX_VERSION_BYTES))
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
            Ok((_, m)) => Ok(Some(self.secrets().scrub(&m.issuer, MAX_MESSAGE_BYTES))),
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

    /// Whether this client can create accounts with
    /// [`register`](Self::register).
    pub fn can_register(&self) -> bool {
        self.registration_shared_secret.is_some()
    }

    /// Creates an account with its password, displayname, admin flag and
    /// user type in one call that creates only: `Ok(false)` when the Matrix
    /// ID is taken (M_USER_IN_USE), and nothing was changed. The account
    /// gets no device (`inhibit_login`). This is Synapse's shared-secret
    /// registration (`/_synapse/admin/v1/register`): a nonce, then the
    /// request signed with HMAC-SHA1 of the registration shared secret.
    ///
    /// A nonce lives 60 s in the memory of the Synapse process that gave
    /// it; one that went stale (or was given by another worker) is asked
    /// for once more.
    pub async fn register(&self, r: &Registration<'_>) -> Result<bool, SynapseError> {
        let secret = self
            .registration_shared_secret
            .as_ref()
            .ok_or(SynapseError::NoRegistrationSecret)?;
        #[derive(Deserialize)]
        struct Nonce {
            nonce: String,
        }
        #[derive(Serialize)]
        struct Request<'a> {
            nonce: &'a str,
            username: &'a str,
            password: &'a SecretString,
            admin: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            displayname: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            user_type: Option<&'a str>,
            inhibit_login: bool,
            mac: &'a SecretString,
        }
        let segments = ["_synapse", "admin", "v1", "register"];
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (_, Nonce { nonce }) = self.send(Endpoint::RegisterNonce, Method::GET, &segments, None).await?;
            let mac = SecretString::new(registration_mac(secret, &nonce, r));
            let request = Request {
                nonce: &nonce,
                username: r.localpart,
                password: r.password,
                admin: r.admin,
                displayname: r.displayname,
                user_type: r.user_type,
                inhibit_login: true,
                mac: &mac,
            };
            let body = Body {
                json: to_json(&request),
                secrets: vec![r.password, &mac, secret],
            };
            match self
                .send::<IgnoredAny>(Endpoint::Register, Method::POST, &segments, Some(body))
                .await
            {
                Ok(_) => return Ok(true),
                Err(SynapseError::Api {
                    errcode: ErrCode::UserInUse,
                    ..
                }) => return Ok(false),
                Err(SynapseError::Api {
                    status: 400, message, ..
                }) if message == "unrecognised nonce" && attempts < 2 => {}
                Err(e) => return Err(e),
            }
        }
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

/// The `mac` of a shared-secret registration: hex HMAC-SHA1, keyed by the
/// shared secret, of `nonce\0username\0password\0admin|notadmin`, then
/// `\0user_type` when there is one.
fn registration_mac(secret: &SecretString, nonce: &str, r: &Registration<'_>) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.expose().as_bytes());
    let mut signed = ring::hmac::Context::with_key(&key);
    for (i, part) in [
        nonce,
        r.localpart,
        r.password.expose(),
        if r.admin { "admin" } else { "notadmin" },
    ]
    .into_iter()
    .chain(r.user_type)
    .enumerate()
    {
        if i > 0 {
            signed.update(b"\0");
        }
        signed.update(part.as_bytes());
    }
    signed.sign().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The token a request is sent with.
#[derive(Clone, Copy)]
pub(super) enum Bearer<'a> {
    Admin,
    /// A user's token (a bot's, checked or revoked with itself).
    User(&'a SecretString),
    /// None: the client login.
    None,
}

/// A JSON request body and the secret values in it.
pub(super) struct Body<'a> {
    pub(super) json: Vec<u8>,
    pub(super) secrets: Vec<&'a SecretString>,
}

impl<'a> Body<'a> {
    /// A body that carries no secret value.
    pub(super) fn plain(value: &impl Serialize) -> Self {
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

pub(super) fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registration_mac_is_synapses() {
        // Python's hmac.new(b"s3cret", digestmod=hashlib.sha1) over the same
        // parts, as Synapse's UserRegisterServlet computes it.
        let secret = SecretString::new("s3cret");
        let password = SecretString::new("pw");
        let mut r = Registration {
            localpart: "alice",
            password: &password,
            displayname: Some("not signed"),
            admin: false,
            user_type: None,
        };
        assert_eq!(
            registration_mac(&secret, "abc", &r),
            "d7cd8fe38bb2b37bacf757920ef46050075d427d"
        );
        r.admin = true;
        r.user_type = Some("bot");
        assert_eq!(
            registration_mac(&secret, "abc", &r),
            "dfd765b6c92fc9489e0cb8631f40384529ec931a"
        );
    }
}
