//! A typed client of MAS's admin API (`/api/admin/v1`), with its OAuth 2.0
//! token: `client_credentials` with scope `urn:mas:admin`, kept until
//! shortly before it expires (MAS gives 5 minutes) and renewed once when
//! MAS answers 401.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Semaphore};
use url::Url;

use super::error::{MasEndpoint, MasError};
use crate::backend::scrub::RequestSecrets;
use crate::backend::{BodyError, MAX_VERSION_BYTES, RequestObserver};
use crate::secret::SecretString;
use crate::synapse::{DecodeProblem, MAX_CODE_BYTES, MAX_MESSAGE_BYTES, summary};
use crate::tls::ExtraRoots;

/// A token is renewed this long before MAS says it expires.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(30);
/// A token is kept at most this long, whatever `expires_in` says (MAS
/// gives 5 minutes): a revoked client then loses access within the hour,
/// and no `expires_in` can overflow the clock.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Users, emails and links are listed this many a page (MAS's default: 10).
const PAGE_SIZE: usize = 100;
/// A listing is paged through at most this far: 50 pages of 100. What the
/// operator lists is small — one user's emails and upstream links (a
/// handful), the holders of one email or link (one, at most a few), the
/// upstream providers (MAS's configuration, tens) — except one user's
/// active sessions, one a login, which a bot logging in without logging
/// out gathers by the hundreds. 5,000 leaves room for that and still ends a
/// listing from a MAS (or proxy) that never stops.
const MAX_LIST_PAGES: usize = 50;
/// And at most this many bytes of answers in all, which bounds what a
/// listing holds in memory (a real page of 100 sessions is ≈50 KB).
const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;
// The errors of `list` say these numbers.
const _: () = assert!(PAGE_SIZE == 100 && MAX_LIST_PAGES == 50 && MAX_LIST_BYTES == 8 * 1024 * 1024);

/// How to reach one MAS.
#[derive(Clone, Debug)]
pub struct MasConfig {
    pub base_url: String,
    /// An OAuth 2.0 client listed in MAS's `policy.data.admin_clients`.
    pub client_id: String,
    pub client_secret: SecretString,
    pub max_concurrent_requests: usize,
    pub timeout: Duration,
    /// Told of every request, as Synapse's client tells its own.
    pub observer: Option<RequestObserver>,
    /// CA certificates trusted besides the system's (a private CA).
    pub extra_roots: ExtraRoots,
}

impl MasConfig {
    pub fn new(base_url: impl Into<String>, client_id: impl Into<String>, client_secret: SecretString) -> Self {
        Self {
            base_url: base_url.into(),
            client_id: client_id.into(),
            client_secret,
            max_concurrent_requests: 8,
            timeout: Duration::from_secs(30),
            observer: None,
            extra_roots: ExtraRoots::default(),
        }
    }
}

/// A resource of MAS's admin API: `{type, id, attributes}`.
#[derive(Clone, Debug, Deserialize)]
pub struct Resource<A> {
    pub id: String,
    pub attributes: A,
}

#[derive(Deserialize)]
pub(super) struct Single<A> {
    pub(super) data: Resource<A>,
}

#[derive(Deserialize)]
struct Page<A> {
    #[serde(default = "Vec::new")]
    data: Vec<Resource<A>>,
}

/// A MAS user's attributes.
#[derive(Clone, Debug, Deserialize)]
pub struct MasUser {
    pub username: String,
    pub created_at: String,
    #[serde(default)]
    pub locked_at: Option<String>,
    #[serde(default)]
    pub deactivated_at: Option<String>,
    #[serde(default)]
    pub admin: bool,
    /// A guest of Synapse's before it moved to MAS.
    #[serde(default)]
    pub legacy_guest: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MasEmail {
    pub user_id: String,
    pub email: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MasLink {
    pub provider_id: String,
    pub subject: String,
    #[serde(default)]
    pub user_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MasProvider {
    #[serde(default)]
    pub human_name: Option<String>,
    #[serde(default)]
    pub disabled_at: Option<String>,
}

#[derive(Deserialize)]
struct Errors {
    errors: Vec<ErrorItem>,
}

#[derive(Deserialize)]
struct ErrorItem {
    #[serde(default)]
    title: String,
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: SecretString,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A client of one MAS. Cheap to clone; clones share the connection pool,
/// the request limit and the token.
#[derive(Clone, Debug)]
pub struct MasClient {
    base: Url,
    client_id: String,
    client_secret: SecretString,
    http: reqwest::Client,
    permits: Arc<Semaphore>,
    token: Arc<Mutex<Option<(SecretString, Instant)>>>,
    observer: Option<RequestObserver>,
}

/// What a create did.
pub enum CreateOutcome {
    Created(Resource<MasUser>),
    /// MAS has a user of that name already (409 "User already exists").
    Exists,
}

impl MasClient {
    pub fn new(config: MasConfig) -> Result<Self, MasError> {
        let (base, http) = crate::backend::http_client(&config.base_url, config.timeout, &config.extra_roots)
            .map_err(|reason| MasError::InvalidUrl { reason })?;
        Ok(Self {
            base,
            client_id: config.client_id,
            client_secret: config.client_secret,
            http,
            permits: Arc::new(Semaphore::new(config.max_concurrent_requests.max(1))),
            token: Arc::default(),
            observer: config.observer,
        })
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked in new(): the base URL can be a base")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends one request and returns a 2xx answer's status and body; any
    /// other answer is an error, scrubbed of the request's secrets.
    async fn exchange(
        &self,
        endpoint: MasEndpoint,
        request: reqwest::RequestBuilder,
        secrets: &[&SecretString],
    ) -> Result<(StatusCode, Vec<u8>), MasError> {
        let _permit = self.permits.acquire().await.expect("the semaphore is never closed");
        let started = Instant::now();
        let observe = |status: Option<StatusCode>| {
            if let Some(o) = &self.observer {
                (o.0)(endpoint.as_str(), status.map(|s| s.as_u16()), started.elapsed());
            }
        };
        let transport = |source: reqwest::Error| {
            observe(None);
            MasError::Transport {
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
                return Err(MasError::TooLarge {
                    endpoint,
                    status: status.as_u16(),
                });
            }
        };
        observe(Some(status));
        if status.is_redirection() {
            return Err(MasError::Redirected {
                endpoint,
                status: status.as_u16(),
            });
        }
        if status.is_success() {
            return Ok((status, bytes));
        }
        let secrets = RequestSecrets::new(secrets.iter().copied());
        if let Ok(Errors { errors }) = serde_json::from_slice(&bytes) {
            let title = errors.first().map(|e| e.title.as_str()).unwrap_or_default();
            return Err(MasError::Api {
                endpoint,
                status: status.as_u16(),
                title: secrets.scrub(title, MAX_MESSAGE_BYTES),
            });
        }
        if let Ok(OAuthError { error }) = serde_json::from_slice(&bytes) {
            return Err(MasError::OAuth {
                endpoint,
                status: status.as_u16(),
                error: secrets.scrub(&error, MAX_CODE_BYTES),
            });
        }
        Err(MasError::UnexpectedResponse {
            endpoint,
            status: status.as_u16(),
            body: summary(&secrets, content_type.as_ref(), bytes.len()),
        })
    }

    /// A token for the admin API: the cached one, or a new one. `rejected`
    /// is a token MAS refused: renewed only if it is still the cached one,
    /// so calls refused together (their token expired) share one renewal.
    async fn token(&self, rejected: Option<&SecretString>) -> Result<SecretString, MasError> {
        let mut cached = self.token.lock().await;
        if let Some((token, until)) = cached.as_ref()
            && Instant::now() < *until
            && rejected != Some(token)
        {
            return Ok(token.clone());
        }
        let endpoint = MasEndpoint::Token;
        let credentials = self.basic_credentials();
        let request = self
            .http
            .post(self.url(&["oauth2", "token"], &[]))
            .header(AUTHORIZATION, credentials.expose())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&scope=urn%3Amas%3Aadmin");
        let requested = Instant::now();
        let (status, body) = self
            .exchange(endpoint, request, &[&self.client_secret, &credentials])
            .await?;
        let answer: TokenAnswer = decode(endpoint, status, &body)?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(300)).min(MAX_TOKEN_LIFETIME);
        let kept = lifetime.saturating_sub(RENEW_BEFORE_EXPIRY.min(lifetime / 2));
        // Bounded above, so this cannot overflow; if it could, the token
        // would be used once and not kept.
        *cached = requested
            .checked_add(kept)
            .map(|until| (answer.access_token.clone(), until));
        Ok(answer.access_token)
    }

    /// The `Authorization` value of a token request: client_secret_basic,
    /// both parts form-encoded, then Base64 (RFC 6749, 2.3.1).
    fn basic_credentials(&self) -> SecretString {
        let form = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        SecretString::new(format!(
            "Basic {}",
            base64_encode(format!("{}:{}", form(&self.client_id), form(self.client_secret.expose())).as_bytes())
        ))
    }

    /// An admin API call with the token, renewed once if MAS says 401.
    pub(super) async fn admin(
        &self,
        endpoint: MasEndpoint,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<(Vec<u8>, Vec<&SecretString>)>,
    ) -> Result<(StatusCode, Vec<u8>), MasError> {
        let mut path = vec!["api", "admin", "v1"];
        path.extend_from_slice(segments);
        let url = self.url(&path, query);
        let mut rejected: Option<SecretString> = None;
        loop {
            let token = self.token(rejected.as_ref()).await?;
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(token.expose());
            let mut secrets = vec![&token];
            if let Some((json, body_secrets)) = &body {
                request = request.header(CONTENT_TYPE, "application/json").body(json.clone());
                secrets.extend(body_secrets.iter().copied());
            }
            match self.exchange(endpoint, request, &secrets).await {
                Err(MasError::Api { status: 401, .. }) if rejected.is_none() => rejected = Some(token),
                other => return other,
            }
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        endpoint: MasEndpoint,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<T, MasError> {
        let (status, body) = self.admin(endpoint, Method::GET, segments, query, None).await?;
        decode(endpoint, status, &body)
    }

    async fn post<T: DeserializeOwned>(
        &self,
        endpoint: MasEndpoint,
        segments: &[&str],
        body: &impl Serialize,
    ) -> Result<T, MasError> {
        let (status, answer) = self
            .admin(endpoint, Method::POST, segments, &[], Some((to_json(body), Vec::new())))
            .await?;
        decode(endpoint, status, &answer)
    }

    /// Every resource of a list, page by page.
    async fn list<A: DeserializeOwned>(
        &self,
        endpoint: MasEndpoint,
        segments: &[&str],
        filters: &[(&str, &str)],
    ) -> Result<Vec<Resource<A>>, MasError> {
        let size = PAGE_SIZE.to_string();
        let mut out: Vec<Resource<A>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut bytes = 0;
        for _ in 0..MAX_LIST_PAGES {
            let mut query = filters.to_vec();
            query.push(("page[first]", &size));
            let after = out.last().map(|r| r.id.clone());
            if let Some(after) = &after {
                query.push(("page[after]", after));
            }
            let (status, body) = self.admin(endpoint, Method::GET, segments, &query, None).await?;
            bytes += body.len();
            if bytes > MAX_LIST_BYTES {
                return Err(MasError::EndlessListing {
                    endpoint,
                    problem: "the listing's pages exceed 8 MiB in all, the most the operator reads of one",
                });
            }
            let page: Page<A> = decode(endpoint, status, &body)?;
            let full = page.data.len() == PAGE_SIZE;
            // A MAS (or proxy) ignoring page[after] answers the same page
            // again: the listing would never end.
            if !page.data.iter().all(|r| seen.insert(r.id.clone())) {
                return Err(MasError::EndlessListing {
                    endpoint,
                    problem: "the next page repeats the last one: the listing's cursor (page[after]) does not move",
                });
            }
            out.extend(page.data);
            if !full {
                return Ok(out);
            }
        }
        Err(MasError::EndlessListing {
            endpoint,
            problem: "the listing goes on past 50 pages of 100, the most the operator pages through",
        })
    }

    /// MAS's version (`GET /api/admin/v1/version`); also proves the client
    /// may use the admin API.
    pub async fn version(&self) -> Result<String, MasError> {
        #[derive(Deserialize)]
        struct Version {
            version: String,
        }
        let v: Version = self.get(MasEndpoint::Version, &["version"], &[]).await?;
        // It goes into status: scrubbed of every secret this client knows
        // (a MAS URL that is not MAS had them all), printable and short.
        let token = self.token.lock().await.as_ref().map(|(token, _)| token.clone());
        let basic = self.basic_credentials();
        let secrets = RequestSecrets::new([&self.client_secret, &basic].into_iter().chain(&token));
        Ok(secrets.scrub_ascii(&v.version, MAX_VERSION_BYTES))
    }

    /// A page of every user, `PAGE_SIZE` at most, in the order of their IDs
    /// (ULIDs, which sort by creation), after the user `after`; and whether
    /// a next page may follow (this one is full).
    pub async fn users_page(&self, after: Option<&str>) -> Result<(Vec<Resource<MasUser>>, bool), MasError> {
        let size = PAGE_SIZE.to_string();
        let mut query = vec![("page[first]", size.as_str())];
        if let Some(after) = after {
            query.push(("page[after]", after));
        }
        let page: Page<MasUser> = self.get(MasEndpoint::ListUsers, &["users"], &query).await?;
        let full = page.data.len() == PAGE_SIZE;
        Ok((page.data, full))
    }

    /// The user of this username, or `None`.
    pub async fn user_by_username(&self, username: &str) -> Result<Option<Resource<MasUser>>, MasError> {
        match self
            .get::<Single<MasUser>>(MasEndpoint::GetUser, &["users", "by-username", username], &[])
            .await
        {
            Ok(u) => Ok(Some(u.data)),
            // MAS's own 404 (with its error body) says there is no such user;
            // a 404 page of something else at the URL says nothing.
            Err(MasError::Api { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn create_user(&self, username: &str) -> Result<CreateOutcome, MasError> {
        let body = serde_json::json!({ "username": username });
        match self
            .post::<Single<MasUser>>(MasEndpoint::CreateUser, &["users"], &body)
            .await
        {
            Ok(u) => Ok(CreateOutcome::Created(u.data)),
            Err(MasError::Api { status: 409, title, .. }) if title == "User already exists" => {
                Ok(CreateOutcome::Exists)
            }
            Err(e) => Err(e),
        }
    }

    pub async fn set_password(&self, id: &str, password: &SecretString) -> Result<(), MasError> {
        #[derive(Serialize)]
        struct Body<'a> {
            password: &'a str,
        }
        let json = to_json(&Body {
            password: password.expose(),
        });
        self.admin(
            MasEndpoint::SetPassword,
            Method::POST,
            &["users", id, "set-password"],
            &[],
            Some((json, vec![password])),
        )
        .await?;
        Ok(())
    }

    /// `lock`, `unlock`, `reactivate`: a POST with no body that answers
    /// the user.
    pub async fn user_action(&self, endpoint: MasEndpoint, id: &str, action: &str) -> Result<(), MasError> {
        let (status, body) = self
            .admin(endpoint, Method::POST, &["users", id, action], &[], None)
            .await?;
        decode::<Single<MasUser>>(endpoint, status, &body)?;
        Ok(())
    }

    /// Deactivates the user, erasing it unless `skip_erase`.
    pub async fn deactivate(&self, id: &str, skip_erase: bool) -> Result<(), MasError> {
        let body = serde_json::json!({ "skip_erase": skip_erase });
        self.post::<Single<MasUser>>(MasEndpoint::Deactivate, &["users", id, "deactivate"], &body)
            .await?;
        Ok(())
    }

    pub async fn set_admin(&self, id: &str, admin: bool) -> Result<(), MasError> {
        let body = serde_json::json!({ "admin": admin });
        self.post::<Single<MasUser>>(MasEndpoint::SetAdmin, &["users", id, "set-admin"], &body)
            .await?;
        Ok(())
    }

    pub async fn emails_of(&self, user_id: &str) -> Result<Vec<Resource<MasEmail>>, MasError> {
        self.list(MasEndpoint::ListEmails, &["user-emails"], &[("filter[user]", user_id)])
            .await
    }

    pub async fn email_holders(&self, email: &str) -> Result<Vec<Resource<MasEmail>>, MasError> {
        self.list(MasEndpoint::ListEmails, &["user-emails"], &[("filter[email]", email)])
            .await
    }

    pub async fn add_email(&self, user_id: &str, email: &str) -> Result<(), MasError> {
        let body = serde_json::json!({ "user_id": user_id, "email": email });
        self.post::<Single<MasEmail>>(MasEndpoint::AddEmail, &["user-emails"], &body)
            .await?;
        Ok(())
    }

    pub async fn delete_email(&self, id: &str) -> Result<(), MasError> {
        self.admin(
            MasEndpoint::DeleteEmail,
            Method::DELETE,
            &["user-emails", id],
            &[],
            None,
        )
        .await?;
        Ok(())
    }

    pub async fn links_of(&self, user_id: &str) -> Result<Vec<Resource<MasLink>>, MasError> {
        self.list(
            MasEndpoint::ListLinks,
            &["upstream-oauth-links"],
            &[("filter[user]", user_id)],
        )
        .await
    }

    pub async fn link_holders(&self, provider_id: &str, subject: &str) -> Result<Vec<Resource<MasLink>>, MasError> {
        self.list(
            MasEndpoint::ListLinks,
            &["upstream-oauth-links"],
            &[("filter[provider]", provider_id), ("filter[subject]", subject)],
        )
        .await
    }

    pub async fn add_link(&self, user_id: &str, provider_id: &str, subject: &str) -> Result<(), MasError> {
        let body = serde_json::json!({ "user_id": user_id, "provider_id": provider_id, "subject": subject });
        self.post::<Single<MasLink>>(MasEndpoint::AddLink, &["upstream-oauth-links"], &body)
            .await?;
        Ok(())
    }

    pub async fn delete_link(&self, id: &str) -> Result<(), MasError> {
        self.admin(
            MasEndpoint::DeleteLink,
            Method::DELETE,
            &["upstream-oauth-links", id],
            &[],
            None,
        )
        .await?;
        Ok(())
    }

    /// Ends every active session of the user: its compatibility sessions
    /// (password logins, each a device in Synapse) and its OAuth 2.0
    /// sessions. Returns how many it ended.
    pub async fn end_sessions(&self, user_id: &str) -> Result<usize, MasError> {
        let active = [("filter[user]", user_id), ("filter[status]", "active")];
        let mut ended = 0;
        for kind in ["compat-sessions", "oauth2-sessions"] {
            let sessions: Vec<Resource<serde::de::IgnoredAny>> =
                self.list(MasEndpoint::ListSessions, &[kind], &active).await?;
            for session in sessions {
                match self
                    .admin(
                        MasEndpoint::FinishSession,
                        Method::POST,
                        &[kind, &session.id, "finish"],
                        &[],
                        None,
                    )
                    .await
                {
                    // Finished meanwhile (400 "already finished"), or gone.
                    Ok(_) | Err(MasError::Api { status: 400 | 404, .. }) => ended += 1,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(ended)
    }

    pub async fn providers(&self) -> Result<Vec<Resource<MasProvider>>, MasError> {
        self.list(MasEndpoint::ListProviders, &["upstream-oauth-providers"], &[])
            .await
    }
}

pub(super) fn decode<T: DeserializeOwned>(
    endpoint: MasEndpoint,
    status: StatusCode,
    body: &[u8],
) -> Result<T, MasError> {
    serde_json::from_slice(body).map_err(|e| MasError::Undecodable {
        endpoint,
        status: status.as_u16(),
        problem: DecodeProblem::of(&e),
        body: crate::synapse::BodySummary {
            content_type: None,
            len: body.len(),
        },
    })
}

pub(super) fn to_json(value: &impl Serialize) -> Vec<u8> {
    // Serialising plain data to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Standard Base64 with padding, for the Basic credentials.
fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_of_rfc_4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want, "{input}");
        }
    }
}
