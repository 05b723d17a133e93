//! The stand-in's state and its HTTP handlers.
//!
//! Written from /work/shared/mas/README.md (MAS 1.22 as measured), the
//! OpenAPI document MAS serves (admin-api-spec.json) and Synapse's own MAS
//! integration (synapse/api/auth/mas.py, synapse/rest/synapse/mas/). Where
//! neither says what MAS answers, a `// Guess:` comment says so.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::super::synapse::{http_client, parse_body};
use super::util::{base64_decode, form_pairs, is_ulid, now_ms, random_upper, rfc3339, token, ulid};

/// The MAS version the stand-in claims to be.
/// As `GET /api/admin/v1/version` says it (measured: with the `v`).
pub const MAS_VERSION: &str = "v1.22.0";
/// Admin tokens from `client_credentials` live this long (as measured).
pub const ADMIN_TOKEN_LIFETIME_SECS: u64 = 300;
/// The API scope Synapse demands in an introspected token.
pub const SCOPE_MATRIX_API: &str = "urn:matrix:client:api:*";
/// Synapse's admin scope.
pub const SCOPE_SYNAPSE_ADMIN: &str = "urn:synapse:admin:*";
/// MAS's admin API scope.
pub const SCOPE_MAS_ADMIN: &str = "urn:mas:admin";
const DEVICE_SCOPE_PREFIX: &str = "urn:matrix:client:device:";

/// The stand-in's password policy, standing in for MAS's zxcvbn score >= 3
/// (`minimum_password_complexity: 3`), which is not reproducible here.
/// Guess (deterministic substitute): a password is strong when it has at
/// least [`MIN_PASSWORD_LEN`] characters and at least
/// [`MIN_PASSWORD_CLASSES`] of the classes lower case, upper case, digit,
/// other. `"password"` is weak (for MAS too); [`STRONG_PASSWORD`] is strong.
pub const MIN_PASSWORD_LEN: usize = 8;
/// See [`MIN_PASSWORD_LEN`].
pub const MIN_PASSWORD_CLASSES: usize = 3;
/// A password both the stand-in and a real MAS (zxcvbn 3) accept.
pub const STRONG_PASSWORD: &str = "Tortoise-Lantern-Quarry-58";
/// A password both refuse.
pub const WEAK_PASSWORD: &str = "password";

/// Whether the stand-in's policy accepts `password` (see [`MIN_PASSWORD_LEN`]).
pub fn password_is_strong(password: &str) -> bool {
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ];
    password.chars().count() >= MIN_PASSWORD_LEN && classes.iter().filter(|&&c| c).count() >= MIN_PASSWORD_CLASSES
}

/// MAS's username rule (mas-handlers, admin `POST /users`): 1–255 bytes of
/// `a-z 0-9 = _ - . / +`, not starting with `_`.
pub fn username_valid(username: &str) -> bool {
    !username.is_empty()
        && username.len() <= 255
        && !username.starts_with('_')
        && username
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "=_-./+".contains(c))
}

/// One OAuth client MAS knows (`clients:` in MAS's config).
#[derive(Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    /// Listed in `policy.data.admin_clients`: may get `urn:mas:admin`.
    pub admin: bool,
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthClient")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("admin", &self.admin)
            .finish()
    }
}

/// An upstream OAuth 2.0 provider (`upstream_oauth2.providers` in MAS's config).
#[derive(Clone, Debug)]
pub struct UpstreamProvider {
    pub id: String,
    pub issuer: Option<String>,
    pub human_name: Option<String>,
    pub brand_name: Option<String>,
    pub created_ms: u64,
    pub disabled_ms: Option<u64>,
}

/// One request the stand-in received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasRequest {
    pub method: Method,
    /// The path, without the query.
    pub path: String,
    /// The query string (`""` if none). MAS's API never carries secrets in
    /// queries; form bodies (token, introspection) are not recorded.
    pub query: String,
    /// The status answered; 0 when the connection was dropped (`set_down`).
    pub status: u16,
    /// Authenticated with the Synapse shared secret (Synapse introspecting).
    pub from_synapse: bool,
}

impl MasRequest {
    /// A write to MAS's admin API (not a read, not a token or
    /// introspection call).
    pub fn is_admin_write(&self) -> bool {
        self.method != Method::GET && self.path.starts_with("/api/admin/")
    }
    /// `POST /api/admin/v1/users`, for readable assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct User {
    pub id: String,
    pub username: String,
    pub created_ms: u64,
    pub locked_ms: Option<u64>,
    pub deactivated_ms: Option<u64>,
    pub admin: bool,
    pub password: Option<String>,
}

impl User {
    fn is_valid(&self) -> bool {
        self.locked_ms.is_none() && self.deactivated_ms.is_none()
    }
}

#[derive(Clone, Debug)]
struct Email {
    id: String,
    user_id: String,
    email: String,
    created_ms: u64,
}

#[derive(Clone, Debug)]
struct Link {
    id: String,
    provider_id: String,
    subject: String,
    user_id: Option<String>,
    human_account_name: Option<String>,
    created_ms: u64,
}

#[derive(Clone, Debug)]
struct PersonalSession {
    id: String,
    owner_client_id: String,
    actor_user_id: String,
    human_name: String,
    scope: String,
    created_ms: u64,
    expires_ms: Option<u64>,
    revoked_ms: Option<u64>,
    /// The session's token now: `regenerate` replaces (and so ends) it.
    token: String,
}

impl PersonalSession {
    /// The device its scope names, which MAS keeps in Synapse while an
    /// active session names it.
    fn device(&self) -> Option<&str> {
        self.scope.split(' ').find_map(|s| s.strip_prefix(DEVICE_SCOPE_PREFIX))
    }
}

#[derive(Clone, Debug)]
enum Token {
    /// `client_credentials` (`mat_…`).
    Admin {
        client_id: String,
        scope: String,
        issued_ms: u64,
        expires_ms: u64,
    },
    /// Compatibility session (`mct_…`): password login or
    /// `mas-cli manage issue-compatibility-token`.
    Compat {
        session_id: String,
        user_id: String,
        device_id: String,
        admin: bool,
        issued_ms: u64,
    },
    /// Personal access token (`mpt_…`).
    Personal { session_id: String, issued_ms: u64 },
}

#[derive(Clone, Debug)]
struct CompatSession {
    user_id: String,
    device_id: String,
    created_ms: u64,
    finished: bool,
}

/// A Synapse job MAS queues (its `ProvisionUserJob`, `DeactivateUserJob`,
/// `ReactivateUserJob`). Provisioning reads MAS's state when it runs, as
/// MAS's job does.
#[derive(Clone, Debug)]
pub(crate) enum Job {
    Provision {
        user_id: String,
        set_displayname: Option<String>,
        set_avatar_url: Option<String>,
    },
    Delete {
        localpart: String,
        erase: bool,
    },
    Reactivate {
        localpart: String,
    },
}

#[derive(Default)]
pub(crate) struct State {
    pub users: Vec<User>,
    emails: Vec<Email>,
    links: Vec<Link>,
    pub providers: Vec<UpstreamProvider>,
    tokens: HashMap<String, Token>,
    compat_sessions: HashMap<String, CompatSession>,
    personal_sessions: Vec<PersonalSession>,
    requests: Vec<MasRequest>,
    synapse_url: Option<String>,
    job_delay: Option<Duration>,
    /// Per-username delays, over `job_delay`.
    user_job_delays: HashMap<String, Option<Duration>>,
    job_errors: Vec<String>,
}

impl State {
    pub fn with_providers(providers: Vec<UpstreamProvider>) -> State {
        State {
            providers,
            ..State::default()
        }
    }
    fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }
    fn user_mut(&mut self, id: &str) -> Option<&mut User> {
        self.users.iter_mut().find(|u| u.id == id)
    }
    pub fn user_by_username(&self, username: &str) -> Option<&User> {
        self.users.iter().find(|u| u.username == username)
    }
}

pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub clients: Mutex<Vec<OAuthClient>>,
    pub shared_secret: String,
    pub server_name: String,
    pub addr: SocketAddr,
    /// While set, connections are dropped unanswered.
    pub down: AtomicBool,
    /// While set, every request gets 503.
    pub unavailable: AtomicBool,
    /// Synapse jobs spawned and not finished yet.
    pub pending_jobs: AtomicUsize,
}

/// What a handler answers.
pub(crate) enum Reply {
    Json(u16, Value),
    Text(u16, String),
    Empty(u16),
}

impl Reply {
    fn status(&self) -> u16 {
        match self {
            Reply::Json(s, _) | Reply::Text(s, _) | Reply::Empty(s) => *s,
        }
    }
}

/// MAS's admin API error: `{"errors": [{"title": …}]}`.
fn error(status: u16, title: impl Into<String>) -> Reply {
    Reply::Json(status, json!({"errors": [{"title": title.into()}]}))
}

/// A Matrix C-S API error, as MAS's compatibility layer answers.
fn matrix_error(status: u16, errcode: &str, message: &str) -> Reply {
    Reply::Json(status, json!({"errcode": errcode, "error": message}))
}

/// An OAuth 2.0 error (RFC 6749 §5.2), as MAS's `/oauth2/*` answers.
fn oauth_error(status: u16, error: &str, description: Option<&str>) -> Reply {
    let mut body = json!({"error": error});
    if let Some(description) = description {
        body["error_description"] = json!(description);
    }
    Reply::Json(status, body)
}

fn user_not_found(id: &str) -> Reply {
    error(404, format!("User ID {id} not found"))
}

/// Whether the request says its body is JSON.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Deserialises a required JSON body. Anything malformed (syntax or shape)
/// is 422 in plain text, as measured. Guess: the texts follow axum's `Json`
/// rejections (MAS is an axum app), which also answer 415 without
/// `Content-Type: application/json`.
fn json_body<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, Reply> {
    if !is_json(headers) {
        return Err(Reply::Text(
            415,
            "Expected request with `Content-Type: application/json`".to_owned(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        Reply::Text(
            422,
            format!("Failed to deserialize the JSON body into the target type: {e}"),
        )
    })
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn synapse_url(&self) -> Result<String, String> {
        self.lock()
            .synapse_url
            .clone()
            .ok_or_else(|| "the stand-in has no Synapse yet".to_owned())
    }

    /// A call to Synapse's `/_synapse/mas/*` API with the shared secret.
    async fn synapse_call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let url = format!("{}/_synapse/mas/{path_and_query}", self.synapse_url()?);
        let mut request = http_client()
            .request(method.clone(), &url)
            .bearer_auth(&self.shared_secret);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| format!("{method} {url}: {e}"))?;
        Ok((status, parse_body(&text)))
    }

    /// Runs MAS's queued Synapse jobs: at once (before the admin API
    /// answers) unless a delay is set, then in the background after it.
    pub(crate) async fn run_jobs(self: &Arc<Self>, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let delay = {
            let state = self.lock();
            let username = match &jobs[0] {
                Job::Provision { user_id, .. } => state.user(user_id).map(|u| u.username.clone()),
                Job::Delete { localpart, .. } | Job::Reactivate { localpart } => Some(localpart.clone()),
            };
            match username.and_then(|u| state.user_job_delays.get(&u).copied()) {
                Some(delay) => delay,
                None => state.job_delay,
            }
        };
        match delay {
            None => {
                for job in jobs {
                    self.run_job(job).await;
                }
            }
            Some(delay) => {
                self.pending_jobs.fetch_add(1, Ordering::SeqCst);
                let shared = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    for job in jobs {
                        shared.run_job(job).await;
                    }
                    shared.pending_jobs.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }
    }

    async fn run_job(&self, job: Job) {
        let (path, body) = match &job {
            Job::Provision {
                user_id,
                set_displayname,
                set_avatar_url,
            } => {
                let state = self.lock();
                let Some(user) = state.user(user_id) else { return };
                let emails: Vec<&str> = state
                    .emails
                    .iter()
                    .filter(|e| &e.user_id == user_id)
                    .map(|e| e.email.as_str())
                    .collect();
                // MAS sends the full email list each time; Synapse diffs it.
                let mut body = json!({
                    "localpart": user.username,
                    "locked": user.locked_ms.is_some(),
                });
                if emails.is_empty() {
                    body["unset_emails"] = json!(true);
                } else {
                    body["set_emails"] = json!(emails);
                }
                if let Some(name) = set_displayname {
                    body["set_displayname"] = json!(name);
                }
                if let Some(url) = set_avatar_url {
                    body["set_avatar_url"] = json!(url);
                }
                ("provision_user", body)
            }
            Job::Delete { localpart, erase } => ("delete_user", json!({"localpart": localpart, "erase": erase})),
            Job::Reactivate { localpart } => ("reactivate_user", json!({"localpart": localpart})),
        };
        let result = self.synapse_call(Method::POST, path, Some(body)).await;
        let failure = match result {
            Ok((200 | 201, _)) => return,
            Ok((status, body)) => format!("POST /_synapse/mas/{path}: {status} {body}"),
            Err(message) => message,
        };
        // Real MAS retries failed jobs; the stand-in records them for tests.
        self.lock().job_errors.push(format!("{job:?}: {failure}"));
    }

    pub fn set_synapse(&self, url: String) {
        self.lock().synapse_url = Some(url);
    }
    pub fn set_job_delay(&self, delay: Option<Duration>) {
        self.lock().job_delay = delay;
    }
    pub fn set_user_job_delay(&self, username: &str, delay: Option<Duration>) {
        self.lock().user_job_delays.insert(username.to_owned(), delay);
    }
    pub fn clear_user_job_delay(&self, username: &str) {
        self.lock().user_job_delays.remove(username);
    }
    pub fn job_errors(&self) -> Vec<String> {
        self.lock().job_errors.clone()
    }
    /// The personal sessions of the MAS user `actor`: `(human_name, revoked)`.
    pub fn personal_sessions_of(&self, actor: &str) -> Vec<(String, bool)> {
        self.lock()
            .personal_sessions
            .iter()
            .filter(|p| p.actor_user_id == actor)
            .map(|p| (p.human_name.clone(), p.revoked_ms.is_some()))
            .collect()
    }

    pub fn requests(&self) -> Vec<MasRequest> {
        self.lock().requests.clone()
    }
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }
    /// Whether `token` is an admin token this stand-in issued.
    pub fn expire_admin_token(&self, token: &str) -> bool {
        match self.lock().tokens.get_mut(token) {
            Some(Token::Admin { expires_ms, .. }) => {
                *expires_ms = (*expires_ms).min(now_ms());
                true
            }
            _ => false,
        }
    }
    pub fn expire_admin_tokens(&self) {
        let now = now_ms();
        for token in self.lock().tokens.values_mut() {
            if let Token::Admin { expires_ms, .. } = token {
                *expires_ms = (*expires_ms).min(now);
            }
        }
    }

    // -----------------------------------------------------------------
    // Operations shared by the HTTP API and the harness
    // -----------------------------------------------------------------

    /// `POST /api/admin/v1/users`.
    pub(crate) async fn create_user(
        self: &Arc<Self>,
        username: &str,
        displayname: Option<String>,
        avatar_url: Option<String>,
        skip_homeserver_check: bool,
    ) -> Result<User, Reply> {
        if !username_valid(username) {
            return Err(error(400, "Username is not valid"));
        }
        if self.lock().user_by_username(username).is_some() {
            return Err(error(409, "User already exists"));
        }
        if !skip_homeserver_check {
            let query = format!(
                "is_localpart_available?localpart={}",
                url::form_urlencoded::byte_serialize(username.as_bytes()).collect::<String>()
            );
            match self.synapse_call(Method::GET, &query, None).await {
                Ok((200, _)) => {}
                // Synapse refuses all-digit localparts (reserved for guests)
                // and taken ones with 400.
                Ok(_) => return Err(error(409, "Username is reserved by the homeserver")),
                // Guess: MAS answers 500 when the homeserver cannot be asked.
                Err(message) => return Err(error(500, message)),
            }
        }
        let user = {
            let mut state = self.lock();
            if state.user_by_username(username).is_some() {
                return Err(error(409, "User already exists"));
            }
            let user = User {
                id: ulid(),
                username: username.to_owned(),
                created_ms: now_ms(),
                locked_ms: None,
                deactivated_ms: None,
                admin: false,
                password: None,
            };
            state.users.push(user.clone());
            user
        };
        self.run_jobs(vec![Job::Provision {
            user_id: user.id.clone(),
            set_displayname: displayname,
            set_avatar_url: avatar_url,
        }])
        .await;
        Ok(user)
    }

    /// A compatibility session and its token, as MAS's compat login or
    /// `mas-cli manage issue-compatibility-token` makes: the device is
    /// upserted on Synapse first. `admin` grants `urn:synapse:admin:*`.
    pub(crate) async fn issue_compat_token(
        &self,
        user_id: &str,
        device_id: Option<String>,
        display_name: Option<String>,
        admin: bool,
    ) -> Result<(String, String), String> {
        let localpart = self
            .lock()
            .user(user_id)
            .map(|u| u.username.clone())
            .ok_or_else(|| format!("no user {user_id}"))?;
        let device_id = device_id.unwrap_or_else(|| random_upper(10));
        let mut body = json!({"localpart": localpart, "device_id": device_id});
        if let Some(name) = display_name {
            body["display_name"] = json!(name);
        }
        match self.synapse_call(Method::POST, "upsert_device", Some(body)).await? {
            (200 | 201, _) => {}
            (status, body) => return Err(format!("POST /_synapse/mas/upsert_device: {status} {body}")),
        }
        let session_id = ulid();
        let access_token = token("mct");
        let mut state = self.lock();
        state.compat_sessions.insert(
            session_id.clone(),
            CompatSession {
                user_id: user_id.to_owned(),
                device_id: device_id.clone(),
                created_ms: now_ms(),
                finished: false,
            },
        );
        state.tokens.insert(
            access_token.clone(),
            Token::Compat {
                session_id,
                user_id: user_id.to_owned(),
                device_id: device_id.clone(),
                admin,
                issued_ms: now_ms(),
            },
        );
        Ok((access_token, device_id))
    }

    pub(crate) fn set_admin(&self, user_id: &str, admin: bool) {
        if let Some(user) = self.lock().user_mut(user_id) {
            user.admin = admin;
        }
    }
}

// ---------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------

/// The error that makes hyper drop a connection without an answer.
#[derive(Debug)]
pub(crate) struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the MAS stand-in is down")
    }
}

impl std::error::Error for Down {}

pub(crate) async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if shared.down.load(Ordering::SeqCst) {
            continue;
        }
        let serving = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| respond(serving.clone(), request));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

struct Incoming_ {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

async fn respond(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Down> {
    let (parts, body) = request.into_parts();
    let mut record = MasRequest {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        status: 0,
        from_synapse: bearer(&parts.headers) == Some(shared.shared_secret.as_str()),
    };
    if shared.down.load(Ordering::SeqCst) {
        shared.lock().requests.push(record);
        return Err(Down);
    }
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let incoming = Incoming_ {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        headers: parts.headers,
        body,
    };
    let reply = if shared.unavailable.load(Ordering::SeqCst) {
        Reply::Text(503, "Service Unavailable".to_owned())
    } else {
        route(&shared, &incoming).await
    };
    record.status = reply.status();
    shared.lock().requests.push(record);
    let builder =
        Response::builder().status(StatusCode::from_u16(reply.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR));
    let response = match reply {
        Reply::Json(_, value) => builder
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&value).expect("JSON")))),
        Reply::Text(_, text) => builder
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(text))),
        Reply::Empty(_) => builder.body(Full::new(Bytes::new())),
    };
    Ok(response.expect("a response"))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

async fn route(shared: &Arc<Shared>, req: &Incoming_) -> Reply {
    let path = req.path.as_str();
    match (&req.method, path) {
        (&Method::GET, "/.well-known/openid-configuration") => discovery(shared),
        (&Method::POST, "/oauth2/token") => token_endpoint(shared, req),
        (&Method::POST, "/oauth2/introspect") => introspect(shared, req),
        (&Method::GET, "/_matrix/client/v3/login" | "/_matrix/client/r0/login") => Reply::Json(
            200,
            // Guess: MAS lists more flows (m.login.sso, m.login.token) when configured.
            json!({"flows": [{"type": "m.login.password"}]}),
        ),
        (&Method::POST, "/_matrix/client/v3/login" | "/_matrix/client/r0/login") => compat_login(shared, req).await,
        (&Method::POST, "/_matrix/client/v3/logout" | "/_matrix/client/r0/logout") => compat_logout(shared, req).await,
        (_, "/.well-known/openid-configuration" | "/oauth2/token" | "/oauth2/introspect") => Reply::Empty(405),
        _ if path.starts_with("/api/admin/v1/") => match admin_auth(shared, &req.headers) {
            Ok(caller) => admin(shared, req, &caller).await,
            Err(reply) => reply,
        },
        // Guess: axum's fallback, an empty 404.
        _ => Reply::Empty(404),
    }
}

fn discovery(shared: &Shared) -> Reply {
    let base = shared.base_url();
    Reply::Json(
        200,
        json!({
            "issuer": format!("{base}/"),
            "authorization_endpoint": format!("{base}/authorize"),
            "token_endpoint": format!("{base}/oauth2/token"),
            "jwks_uri": format!("{base}/oauth2/keys.json"),
            "registration_endpoint": format!("{base}/oauth2/registration"),
            "scopes_supported": ["openid", "email"],
            "response_types_supported": ["code", "id_token", "code id_token"],
            "response_modes_supported": ["form_post", "query", "fragment"],
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials",
                "urn:ietf:params:oauth:grant-type:device_code"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post",
                "client_secret_jwt", "private_key_jwt", "none"],
            "revocation_endpoint": format!("{base}/oauth2/revoke"),
            "introspection_endpoint": format!("{base}/oauth2/introspect"),
            "userinfo_endpoint": format!("{base}/oauth2/userinfo"),
            "device_authorization_endpoint": format!("{base}/oauth2/device"),
            "code_challenge_methods_supported": ["plain", "S256"],
            "account_management_uri": format!("{base}/account/"),
            "account_management_actions_supported": ["org.matrix.profile", "org.matrix.sessions_list",
                "org.matrix.session_view", "org.matrix.session_end", "org.matrix.cross_signing_reset"],
            "prompt_values_supported": ["none", "login", "create"],
        }),
    )
}

/// The client authenticated by Basic auth or by form fields, if any.
fn client_auth(shared: &Shared, headers: &HeaderMap, form: &[(String, String)]) -> Result<OAuthClient, Reply> {
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let basic = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(base64_decode)
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let (id, secret) = match basic {
        // RFC 6749 §2.3.1: both parts are form-urlencoded inside Basic.
        Some(pair) => match pair.split_once(':') {
            Some((id, secret)) => (decode(id), Some(decode(secret))),
            None => return Err(oauth_error(401, "invalid_client", None)),
        },
        None => match field("client_id") {
            Some(id) => (id, field("client_secret")),
            None => return Err(oauth_error(401, "invalid_client", None)),
        },
    };
    let clients = shared.clients.lock().unwrap_or_else(|p| p.into_inner());
    match clients.iter().find(|c| c.client_id == id) {
        Some(client) if secret.as_deref() == Some(client.client_secret.as_str()) => Ok(client.clone()),
        _ => Err(oauth_error(401, "invalid_client", None)),
    }
}

fn decode(s: &str) -> String {
    form_pairs(&format!("x={s}")).pop().map(|(_, v)| v).unwrap_or_default()
}

fn token_endpoint(shared: &Shared, req: &Incoming_) -> Reply {
    let form = form_pairs(&String::from_utf8_lossy(&req.body));
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let client = match client_auth(shared, &req.headers, &form) {
        Ok(client) => client,
        Err(reply) => return reply,
    };
    if field("grant_type") != Some("client_credentials") {
        // Guess: only client_credentials is modelled.
        return oauth_error(400, "unsupported_grant_type", None);
    }
    let scope = field("scope").unwrap_or_default().to_owned();
    // MAS's policy: `urn:mas:admin` only for `admin_clients`; Synapse's admin
    // scope (and anything else) never for client_credentials.
    for s in scope.split(' ').filter(|s| !s.is_empty()) {
        let allowed = s == SCOPE_MAS_ADMIN && client.admin;
        if !allowed {
            // Measured: 403, error `invalid_scope`; the description's wording
            // is as the README quotes it.
            return oauth_error(403, "invalid_scope", Some(&format!("scope '{s}' not allowed")));
        }
    }
    let access_token = token("mat");
    let issued_ms = now_ms();
    shared.lock().tokens.insert(
        access_token.clone(),
        Token::Admin {
            client_id: client.client_id.clone(),
            scope: scope.clone(),
            issued_ms,
            expires_ms: issued_ms + ADMIN_TOKEN_LIFETIME_SECS * 1000,
        },
    );
    Reply::Json(
        200,
        json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": ADMIN_TOKEN_LIFETIME_SECS,
            "scope": scope,
        }),
    )
}

fn introspect(shared: &Shared, req: &Incoming_) -> Reply {
    let form = form_pairs(&String::from_utf8_lossy(&req.body));
    let from_synapse = bearer(&req.headers) == Some(shared.shared_secret.as_str());
    if !from_synapse && let Err(reply) = client_auth(shared, &req.headers, &form) {
        return reply;
    }
    let Some(token) = form.iter().find(|(k, _)| k == "token").map(|(_, v)| v.as_str()) else {
        return oauth_error(400, "invalid_request", Some("missing token"));
    };
    let explicit_device = req.headers.contains_key("x-mas-supports-device-id");
    let inactive = Reply::Json(200, json!({"active": false}));
    let now = now_ms();
    let state = shared.lock();
    let Some(found) = state.tokens.get(token) else {
        return inactive;
    };
    match found {
        Token::Admin {
            client_id,
            scope,
            issued_ms,
            expires_ms,
        } => {
            if now >= *expires_ms {
                return inactive;
            }
            Reply::Json(
                200,
                json!({
                    "active": true,
                    "scope": scope,
                    "client_id": client_id,
                    "token_type": "access_token",
                    "iat": issued_ms / 1000,
                    "exp": expires_ms / 1000,
                    "expires_in": (expires_ms - now) / 1000,
                }),
            )
        }
        Token::Compat {
            session_id,
            user_id,
            device_id,
            admin,
            issued_ms,
        } => {
            let session_ok = state.compat_sessions.get(session_id).is_some_and(|s| !s.finished);
            let Some(user) = state.user(user_id).filter(|u| u.is_valid() && session_ok) else {
                return inactive;
            };
            let mut scope = vec![SCOPE_MATRIX_API.to_owned()];
            if !explicit_device {
                scope.push(format!("{DEVICE_SCOPE_PREFIX}{device_id}"));
            }
            if *admin {
                scope.push(SCOPE_SYNAPSE_ADMIN.to_owned());
            }
            // Compatibility tokens carry no expiry (Synapse: no `expires_in`).
            let mut body = json!({
                "active": true,
                "scope": scope.join(" "),
                "client_id": "legacy",
                "username": user.username,
                "sub": user.id,
                "token_type": "access_token",
                "iat": issued_ms / 1000,
            });
            if explicit_device {
                body["device_id"] = json!(device_id);
            }
            Reply::Json(200, body)
        }
        Token::Personal { session_id, issued_ms } => {
            let Some(session) = state
                .personal_sessions
                .iter()
                .find(|s| &s.id == session_id && s.revoked_ms.is_none() && s.token == token)
            else {
                return inactive;
            };
            if session.expires_ms.is_some_and(|e| now >= e) {
                return inactive;
            }
            let Some(user) = state.user(&session.actor_user_id).filter(|u| u.is_valid()) else {
                return inactive;
            };
            let mut body = json!({
                "active": true,
                "scope": session.scope,
                "client_id": session.owner_client_id,
                "username": user.username,
                "sub": user.id,
                "token_type": "access_token",
                "iat": issued_ms / 1000,
            });
            if let Some(expires) = session.expires_ms {
                body["exp"] = json!(expires / 1000);
                body["expires_in"] = json!((expires - now) / 1000);
            }
            Reply::Json(200, body)
        }
    }
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

async fn compat_login(shared: &Arc<Shared>, req: &Incoming_) -> Reply {
    let Ok(body) = serde_json::from_slice::<LoginBody>(&req.body) else {
        return matrix_error(400, "M_NOT_JSON", "Invalid JSON body");
    };
    if body.kind != "m.login.password" {
        // Guess: m.login.token and SSO are not modelled.
        return matrix_error(400, "M_UNRECOGNIZED", "Invalid login type");
    }
    let user = match &body.identifier {
        Some(identifier) if identifier["type"] == "m.id.user" => identifier["user"].as_str().map(str::to_owned),
        Some(_) => return matrix_error(400, "M_UNRECOGNIZED", "Unsupported identifier type"),
        None => body.user.clone(),
    };
    let Some(user) = user else {
        return matrix_error(400, "M_BAD_JSON", "Missing user");
    };
    // A full MXID names the same localpart on this server.
    let localpart = match user.strip_prefix('@').and_then(|u| u.split_once(':')) {
        Some((localpart, server)) if server == shared.server_name => localpart.to_owned(),
        Some(_) => return matrix_error(403, "M_FORBIDDEN", "Invalid username/password"),
        None => user,
    };
    let forbidden = matrix_error(403, "M_FORBIDDEN", "Invalid username/password");
    let user_id = {
        let state = shared.lock();
        // Deactivated users are not found at all (as measured: 403).
        let Some(found) = state
            .user_by_username(&localpart)
            .filter(|u| u.deactivated_ms.is_none())
        else {
            return forbidden;
        };
        // Guess: MAS checks the lock before the password.
        if found.locked_ms.is_some() {
            return matrix_error(401, "M_USER_LOCKED", "User account has been locked");
        }
        if found.password.is_none() || found.password != body.password {
            return forbidden;
        }
        found.id.clone()
    };
    match shared
        .issue_compat_token(
            &user_id,
            body.device_id.clone(),
            body.initial_device_display_name.clone(),
            false,
        )
        .await
    {
        Ok((access_token, device_id)) => Reply::Json(
            200,
            json!({
                "access_token": access_token,
                "device_id": device_id,
                "user_id": format!("@{localpart}:{}", shared.server_name),
                "home_server": shared.server_name,
            }),
        ),
        Err(message) => matrix_error(500, "M_UNKNOWN", &message),
    }
}

/// Ends the compatibility session of the bearer token and deletes its
/// device on Synapse, as MAS's compatibility `/logout` does.
async fn compat_logout(shared: &Arc<Shared>, req: &Incoming_) -> Reply {
    let unknown = matrix_error(401, "M_UNKNOWN_TOKEN", "Invalid access token");
    let Some(token) = bearer(&req.headers) else {
        return matrix_error(401, "M_MISSING_TOKEN", "Missing access token");
    };
    let (localpart, device_id) = {
        let mut state = shared.lock();
        let Some(Token::Compat {
            session_id,
            user_id,
            device_id,
            ..
        }) = state.tokens.get(token).cloned()
        else {
            return unknown;
        };
        match state.compat_sessions.get_mut(&session_id) {
            Some(session) if !session.finished => session.finished = true,
            _ => return unknown,
        }
        let Some(user) = state.user(&user_id) else {
            return unknown;
        };
        (user.username.clone(), device_id)
    };
    let body = json!({"localpart": localpart, "device_id": device_id});
    match shared.synapse_call(Method::POST, "delete_device", Some(body)).await {
        Ok((200 | 204, _)) => Reply::Json(200, json!({})),
        Ok((status, body)) => matrix_error(500, "M_UNKNOWN", &format!("delete_device: {status} {body}")),
        Err(message) => matrix_error(500, "M_UNKNOWN", &message),
    }
}

/// The admin API's bearer check: the calling client's ID.
fn admin_auth(shared: &Shared, headers: &HeaderMap) -> Result<String, Reply> {
    // Guess: the titles of MAS's 401s; the status is as measured.
    let Some(token) = bearer(headers) else {
        return Err(error(401, "Missing Authorization header"));
    };
    let state = shared.lock();
    match state.tokens.get(token) {
        Some(Token::Admin {
            scope,
            expires_ms,
            client_id,
            ..
        }) => {
            if now_ms() >= *expires_ms {
                Err(error(401, "Access token has expired"))
            } else if scope.split(' ').any(|s| s == SCOPE_MAS_ADMIN) {
                Ok(client_id.clone())
            } else {
                Err(error(403, "Missing urn:mas:admin scope"))
            }
        }
        _ => Err(error(401, "Invalid access token")),
    }
}

fn query_map(query: &str) -> HashMap<String, String> {
    form_pairs(query).into_iter().collect()
}

fn bool_filter(q: &HashMap<String, String>, name: &str) -> Result<Option<bool>, Reply> {
    match q.get(name).map(String::as_str) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        // Guess: axum's Query rejection, 400 in plain text.
        Some(other) => Err(Reply::Text(
            400,
            format!("Failed to deserialize query string: {name}: invalid value {other:?}"),
        )),
    }
}

fn ulid_filter(q: &HashMap<String, String>, name: &str) -> Result<Option<String>, Reply> {
    match q.get(name) {
        None => Ok(None),
        Some(v) if is_ulid(v) => Ok(Some(v.to_ascii_uppercase())),
        Some(v) => Err(Reply::Text(
            400,
            format!("Failed to deserialize query string: {name}: invalid ULID {v:?}"),
        )),
    }
}

/// A page of `items` (sorted by ID), as MAS's paginated responses.
fn paginate(base: &str, q: &HashMap<String, String>, items: Vec<(String, Value)>) -> Reply {
    let number = |name: &str| -> Result<Option<usize>, Reply> {
        match q.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(Some(n)),
                _ => Err(Reply::Text(
                    400,
                    format!("Failed to deserialize query string: {name}: invalid value {v:?}"),
                )),
            },
        }
    };
    let (first, last) = match (number("page[first]"), number("page[last]")) {
        (Ok(f), Ok(l)) => (f, l),
        (Err(r), _) | (_, Err(r)) => return r,
    };
    if first.is_some() && last.is_some() {
        // Guess: title.
        return error(400, "Only one of page[first] and page[last] may be set");
    }
    let after = q.get("page[after]").cloned();
    let before = q.get("page[before]").cloned();
    let count_mode = q.get("count").map(String::as_str).unwrap_or("true");
    let total = items.len();
    let window: Vec<(String, Value)> = items
        .into_iter()
        .filter(|(id, _)| after.as_ref().is_none_or(|a| id > a) && before.as_ref().is_none_or(|b| id < b))
        .collect();
    let (page, more_after, more_before) = match last {
        Some(n) => {
            let skip = window.len().saturating_sub(n);
            (window[skip..].to_vec(), before.is_some(), skip > 0)
        }
        None => {
            let n = first.unwrap_or(10);
            (
                window.iter().take(n).cloned().collect(),
                window.len() > n,
                after.is_some(),
            )
        }
    };
    let n = first.or(last).unwrap_or(10);
    let filters: Vec<String> = {
        let mut f: Vec<(&String, &String)> = q.iter().filter(|(k, _)| k.starts_with("filter[")).collect();
        f.sort();
        f.into_iter()
            .map(|(k, v)| {
                format!(
                    "{k}={}",
                    url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                )
            })
            .collect()
    };
    let link = |page_part: String| {
        let mut parts = filters.clone();
        parts.push(page_part);
        format!("{base}?{}", parts.join("&"))
    };
    let mut self_parts = filters.clone();
    for key in ["page[after]", "page[before]", "page[first]", "page[last]"] {
        if let Some(v) = q.get(key) {
            self_parts.push(format!("{key}={v}"));
        }
    }
    let mut links = json!({
        "self": if self_parts.is_empty() { base.to_owned() } else { format!("{base}?{}", self_parts.join("&")) },
        "first": link(format!("page[first]={n}")),
        "last": link(format!("page[last]={n}")),
    });
    if more_after && let Some((id, _)) = page.last() {
        links["next"] = json!(link(format!("page[after]={id}&page[first]={n}")));
    }
    if more_before && let Some((id, _)) = page.first() {
        links["prev"] = json!(link(format!("page[before]={id}&page[last]={n}")));
    }
    let data: Vec<Value> = page
        .into_iter()
        .map(|(id, mut resource)| {
            resource["meta"] = json!({"page": {"cursor": id}});
            resource
        })
        .collect();
    let mut body = json!({"links": links});
    match count_mode {
        "false" => body["data"] = json!(data),
        "only" => body["meta"] = json!({"count": total}),
        _ => {
            body["meta"] = json!({"count": total});
            body["data"] = json!(data);
        }
    }
    Reply::Json(200, body)
}

fn resource(kind: &str, collection: &str, id: &str, attributes: Value) -> Value {
    json!({
        "type": kind,
        "id": id,
        "attributes": attributes,
        "links": {"self": format!("/api/admin/v1/{collection}/{id}")},
    })
}

fn compat_session_resource(id: &str, c: &CompatSession) -> Value {
    json!({
        "type": "compat-session",
        "id": id,
        "attributes": {
            "user_id": c.user_id,
            "device_id": c.device_id,
            "user_session_id": null,
            "redirect_uri": null,
            "created_at": rfc3339(c.created_ms),
            "user_agent": null,
            "last_active_at": null,
            "last_active_ip": null,
            "finished_at": if c.finished { json!(rfc3339(now_ms())) } else { Value::Null },
            "human_name": null,
        },
        "links": {"self": format!("/api/admin/v1/compat-sessions/{id}")},
    })
}

fn single(resource: Value, self_link: String) -> Reply {
    single_status(200, resource, self_link)
}

fn single_status(status: u16, resource: Value, self_link: String) -> Reply {
    Reply::Json(status, json!({"data": resource, "links": {"self": self_link}}))
}

fn user_resource(u: &User) -> Value {
    resource(
        "user",
        "users",
        &u.id,
        json!({
            "username": u.username,
            "created_at": rfc3339(u.created_ms),
            "locked_at": u.locked_ms.map(rfc3339),
            "deactivated_at": u.deactivated_ms.map(rfc3339),
            "admin": u.admin,
            "legacy_guest": false,
        }),
    )
}

fn email_resource(e: &Email) -> Value {
    resource(
        "user-email",
        "user-emails",
        &e.id,
        json!({"created_at": rfc3339(e.created_ms), "user_id": e.user_id, "email": e.email}),
    )
}

fn link_resource(l: &Link) -> Value {
    resource(
        "upstream-oauth-link",
        "upstream-oauth-links",
        &l.id,
        json!({
            "created_at": rfc3339(l.created_ms),
            "provider_id": l.provider_id,
            "subject": l.subject,
            "user_id": l.user_id,
            "human_account_name": l.human_account_name,
        }),
    )
}

fn provider_resource(p: &UpstreamProvider) -> Value {
    resource(
        "upstream-oauth-provider",
        "upstream-oauth-providers",
        &p.id,
        json!({
            "issuer": p.issuer,
            "human_name": p.human_name,
            "brand_name": p.brand_name,
            "created_at": rfc3339(p.created_ms),
            "disabled_at": p.disabled_ms.map(rfc3339),
            "registration_token_required": false,
        }),
    )
}

fn personal_resource(p: &PersonalSession, access_token: Option<&str>) -> Value {
    let mut attributes = json!({
        "created_at": rfc3339(p.created_ms),
        "revoked_at": p.revoked_ms.map(rfc3339),
        "owner_user_id": null,
        "owner_client_id": p.owner_client_id,
        "actor_user_id": p.actor_user_id,
        "human_name": p.human_name,
        "scope": p.scope,
        "last_active_at": null,
        "last_active_ip": null,
        // "None if the current token won't expire or if the session is revoked."
        "expires_at": p.expires_ms.filter(|_| p.revoked_ms.is_none()).map(rfc3339),
    });
    if let Some(token) = access_token {
        attributes["access_token"] = json!(token);
    }
    resource("personal-session", "personal-sessions", &p.id, attributes)
}

#[derive(Deserialize)]
struct AddUser {
    username: String,
    #[serde(default)]
    skip_homeserver_check: bool,
    displayname: Option<String>,
    avatar_url: Option<String>,
}

#[derive(Deserialize)]
struct SetPassword {
    password: String,
    skip_password_check: Option<bool>,
}

#[derive(Deserialize)]
struct SetAdmin {
    admin: bool,
}

#[derive(Deserialize, Default)]
struct Deactivate {
    #[serde(default)]
    skip_erase: bool,
}

#[derive(Deserialize)]
struct AddEmail {
    user_id: String,
    email: String,
}

#[derive(Deserialize)]
struct AddLink {
    user_id: String,
    provider_id: String,
    subject: String,
    human_account_name: Option<String>,
}

#[derive(Deserialize)]
struct AddPersonalSession {
    actor_user_id: String,
    human_name: String,
    scope: String,
    expires_in: Option<u64>,
}

/// Email syntax, loosely (MAS uses the `email_address` crate).
fn email_valid(email: &str) -> bool {
    match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !domain.contains('@') && !email.contains(' ')
        }
        None => false,
    }
}

async fn admin(shared: &Arc<Shared>, req: &Incoming_, caller: &str) -> Reply {
    let rest = req.path.trim_start_matches("/api/admin/v1/").trim_end_matches('/');
    let segments: Vec<&str> = rest.split('/').collect();
    let q = query_map(&req.query);
    let body = &req.body[..];
    let m = &req.method;
    match (m, segments.as_slice()) {
        (&Method::GET, ["version"]) => Reply::Json(200, json!({"version": MAS_VERSION})),
        (&Method::GET, ["site-config"]) => Reply::Json(
            200,
            json!({
                "server_name": shared.server_name,
                "password_login_enabled": true,
                "password_registration_enabled": false,
                "password_registration_email_required": true,
                "password_registration_token_required": false,
                "registration_token_required": false,
                "email_change_allowed": true,
                "displayname_change_allowed": true,
                "password_change_allowed": true,
                "account_recovery_allowed": false,
                "account_deactivation_allowed": true,
                "captcha_enabled": false,
                "minimum_password_complexity": 3,
            }),
        ),

        // ---- users ----
        (&Method::GET, ["users"]) => list_users(shared, &q),
        (&Method::POST, ["users"]) => {
            let add: AddUser = match json_body(&req.headers, body) {
                Ok(add) => add,
                Err(reply) => return reply,
            };
            match shared
                .create_user(
                    &add.username,
                    add.displayname,
                    add.avatar_url,
                    add.skip_homeserver_check,
                )
                .await
            {
                Ok(user) => single_status(201, user_resource(&user), format!("/api/admin/v1/users/{}", user.id)),
                Err(reply) => reply,
            }
        }
        (&Method::GET, ["users", "by-username", username]) => {
            let username = decode(username);
            match shared.lock().user_by_username(&username) {
                Some(u) => single(user_resource(u), format!("/api/admin/v1/users/by-username/{username}")),
                None => error(404, format!("User with username \"{username}\" not found")),
            }
        }
        (&Method::GET, ["users", id]) => match shared.lock().user(id) {
            Some(u) => single(user_resource(u), format!("/api/admin/v1/users/{id}")),
            None => user_not_found(id),
        },
        // MAS has no user deletion: axum answers 405 for the route's other methods.
        (_, ["users", _]) => Reply::Empty(405),
        (&Method::POST, ["users", id, action]) => user_action(shared, id, action, &req.headers, body).await,

        // ---- sessions ----
        (&Method::GET, ["compat-sessions"]) => {
            let user = match ulid_filter(&q, "filter[user]") {
                Ok(user) => user,
                Err(reply) => return reply,
            };
            let status = q.get("filter[status]").cloned();
            let state = shared.lock();
            if let Some(user) = &user
                && state.user(user).is_none()
            {
                return user_not_found(user);
            }
            let mut items: Vec<(String, Value)> = state
                .compat_sessions
                .iter()
                .filter(|(_, c)| user.as_ref().is_none_or(|u| &c.user_id == u))
                .filter(|(_, c)| match status.as_deref() {
                    Some("active") => !c.finished,
                    Some("finished") => c.finished,
                    _ => true,
                })
                .map(|(id, c)| (id.clone(), compat_session_resource(id, c)))
                .collect();
            items.sort_by(|a, b| a.0.cmp(&b.0));
            paginate("/api/admin/v1/compat-sessions", &q, items)
        }
        (&Method::POST, ["compat-sessions", id, "finish"]) => {
            let (localpart, device_id, resource) = {
                let mut state = shared.lock();
                let Some(session) = state.compat_sessions.get_mut(*id) else {
                    return error(404, format!("Compatibility session with ID {id} not found"));
                };
                if session.finished {
                    return error(400, format!("Compatibility session with ID {id} is already finished"));
                }
                session.finished = true;
                let session = session.clone();
                let resource = compat_session_resource(id, &session);
                let localpart = state
                    .user(&session.user_id)
                    .map(|u| u.username.clone())
                    .unwrap_or_default();
                (localpart, session.device_id, resource)
            };
            // As MAS's job does after a finish: the device goes from Synapse.
            let body = json!({"localpart": localpart, "device_id": device_id});
            match shared.synapse_call(Method::POST, "delete_device", Some(body)).await {
                Ok((200 | 204, _)) => single(resource, format!("/api/admin/v1/compat-sessions/{id}")),
                Ok((status, body)) => error(500, format!("delete_device: {status} {body}")),
                Err(message) => error(500, message),
            }
        }
        // The stand-in has no OAuth 2.0 sessions of users (no OAuth 2.0
        // login): the list of a user's is empty.
        (&Method::GET, ["oauth2-sessions"]) => {
            let user = match ulid_filter(&q, "filter[user]") {
                Ok(user) => user,
                Err(reply) => return reply,
            };
            if let Some(user) = &user
                && shared.lock().user(user).is_none()
            {
                return user_not_found(user);
            }
            paginate("/api/admin/v1/oauth2-sessions", &q, Vec::new())
        }

        // ---- emails ----
        (&Method::GET, ["user-emails"]) => {
            let (user, email) = match (ulid_filter(&q, "filter[user]"), q.get("filter[email]")) {
                (Ok(user), email) => (user, email.cloned()),
                (Err(reply), _) => return reply,
            };
            let state = shared.lock();
            if let Some(user) = &user
                && state.user(user).is_none()
            {
                return user_not_found(user);
            }
            let items = state
                .emails
                .iter()
                .filter(|e| user.as_ref().is_none_or(|u| &e.user_id == u))
                .filter(|e| email.as_ref().is_none_or(|m| &e.email == m))
                .map(|e| (e.id.clone(), email_resource(e)))
                .collect();
            paginate("/api/admin/v1/user-emails", &q, items)
        }
        (&Method::POST, ["user-emails"]) => {
            let add: AddEmail = match json_body(&req.headers, body) {
                Ok(add) => add,
                Err(reply) => return reply,
            };
            let email = {
                let mut state = shared.lock();
                if state.user(&add.user_id).is_none() {
                    return user_not_found(&add.user_id);
                }
                if !email_valid(&add.email) {
                    return error(400, format!("Email \"{}\" is not valid", add.email));
                }
                if state.emails.iter().any(|e| e.email == add.email) {
                    return error(409, format!("User email \"{}\" already in use", add.email));
                }
                let email = Email {
                    id: ulid(),
                    user_id: add.user_id.clone(),
                    email: add.email,
                    created_ms: now_ms(),
                };
                state.emails.push(email.clone());
                email
            };
            shared.run_jobs(vec![provision(&email.user_id)]).await;
            single_status(
                201,
                email_resource(&email),
                format!("/api/admin/v1/user-emails/{}", email.id),
            )
        }
        (&Method::GET, ["user-emails", id]) => match shared.lock().emails.iter().find(|e| e.id == *id) {
            Some(e) => single(email_resource(e), format!("/api/admin/v1/user-emails/{id}")),
            None => error(404, format!("User email ID {id} not found")),
        },
        (&Method::DELETE, ["user-emails", id]) => {
            let removed = {
                let mut state = shared.lock();
                let index = state.emails.iter().position(|e| e.id == *id);
                index.map(|i| state.emails.remove(i))
            };
            match removed {
                Some(email) => {
                    shared.run_jobs(vec![provision(&email.user_id)]).await;
                    Reply::Empty(204)
                }
                None => error(404, format!("User email ID {id} not found")),
            }
        }

        // ---- upstream links ----
        (&Method::GET, ["upstream-oauth-links"]) => {
            let user = match ulid_filter(&q, "filter[user]") {
                Ok(v) => v,
                Err(r) => return r,
            };
            let provider = match ulid_filter(&q, "filter[provider]") {
                Ok(v) => v,
                Err(r) => return r,
            };
            let subject = q.get("filter[subject]");
            let name = q.get("filter[human-account-name]").map(|s| s.to_lowercase());
            let state = shared.lock();
            if let Some(user) = &user
                && state.user(user).is_none()
            {
                return user_not_found(user);
            }
            if let Some(provider) = &provider
                && !state.providers.iter().any(|p| &p.id == provider)
            {
                // Guess: title.
                return error(404, format!("Upstream OAuth 2.0 Provider ID {provider} not found"));
            }
            let items = state
                .links
                .iter()
                .filter(|l| user.as_ref().is_none_or(|u| l.user_id.as_ref() == Some(u)))
                .filter(|l| provider.as_ref().is_none_or(|p| &l.provider_id == p))
                .filter(|l| subject.is_none_or(|s| &l.subject == s))
                .filter(|l| {
                    name.as_ref().is_none_or(|n| {
                        l.human_account_name
                            .as_ref()
                            .is_some_and(|h| h.to_lowercase().contains(n.as_str()))
                    })
                })
                .map(|l| (l.id.clone(), link_resource(l)))
                .collect();
            paginate("/api/admin/v1/upstream-oauth-links", &q, items)
        }
        (&Method::POST, ["upstream-oauth-links"]) => {
            let add: AddLink = match json_body(&req.headers, body) {
                Ok(add) => add,
                Err(reply) => return reply,
            };
            let mut state = shared.lock();
            if state.user(&add.user_id).is_none() {
                return user_not_found(&add.user_id);
            }
            if !state.providers.iter().any(|p| p.id == add.provider_id) {
                // Guess: title.
                return error(
                    404,
                    format!("Upstream OAuth 2.0 Provider ID {} not found", add.provider_id),
                );
            }
            let existing = state
                .links
                .iter_mut()
                .find(|l| l.provider_id == add.provider_id && l.subject == add.subject);
            match existing {
                Some(link) if link.user_id.is_some() => error(
                    409,
                    format!(
                        "Upstream Oauth 2.0 Provider ID {} with subject {} is already linked to a user",
                        add.provider_id, add.subject
                    ),
                ),
                // A link without a user (an unfinished upstream login) gets
                // associated: 200 (spec).
                Some(link) => {
                    link.user_id = Some(add.user_id);
                    if add.human_account_name.is_some() {
                        link.human_account_name = add.human_account_name;
                    }
                    single(
                        link_resource(link),
                        format!("/api/admin/v1/upstream-oauth-links/{}", link.id),
                    )
                }
                None => {
                    let link = Link {
                        id: ulid(),
                        provider_id: add.provider_id,
                        subject: add.subject,
                        user_id: Some(add.user_id),
                        human_account_name: add.human_account_name,
                        created_ms: now_ms(),
                    };
                    state.links.push(link.clone());
                    // Not mirrored into Synapse's external_ids (measured).
                    single_status(
                        201,
                        link_resource(&link),
                        format!("/api/admin/v1/upstream-oauth-links/{}", link.id),
                    )
                }
            }
        }
        (&Method::GET, ["upstream-oauth-links", id]) => match shared.lock().links.iter().find(|l| l.id == *id) {
            Some(l) => single(link_resource(l), format!("/api/admin/v1/upstream-oauth-links/{id}")),
            None => error(404, format!("Upstream OAuth 2.0 Link ID {id} not found")),
        },
        (&Method::DELETE, ["upstream-oauth-links", id]) => {
            let mut state = shared.lock();
            match state.links.iter().position(|l| l.id == *id) {
                Some(i) => {
                    state.links.remove(i);
                    Reply::Empty(204)
                }
                None => error(404, format!("Upstream OAuth 2.0 Link ID {id} not found")),
            }
        }

        // ---- upstream providers ----
        (&Method::GET, ["upstream-oauth-providers"]) => {
            let enabled = match bool_filter(&q, "filter[enabled]") {
                Ok(v) => v,
                Err(r) => return r,
            };
            let state = shared.lock();
            let items = state
                .providers
                .iter()
                .filter(|p| enabled.is_none_or(|e| e == p.disabled_ms.is_none()))
                .map(|p| (p.id.clone(), provider_resource(p)))
                .collect();
            paginate("/api/admin/v1/upstream-oauth-providers", &q, items)
        }
        (&Method::GET, ["upstream-oauth-providers", id]) => {
            match shared.lock().providers.iter().find(|p| p.id == *id) {
                Some(p) => single(
                    provider_resource(p),
                    format!("/api/admin/v1/upstream-oauth-providers/{id}"),
                ),
                // Guess: the spec shows no body for this 404.
                None => error(404, format!("Upstream OAuth 2.0 Provider ID {id} not found")),
            }
        }

        // ---- personal sessions ----
        // Measured on MAS 1.22.0: an unknown actor is 404 "User not found",
        // a deactivated one 410 "User is not active", a locked one gets a
        // session; an empty scope is 400 "Invalid scope" (any other string
        // is taken as it is); a device scope makes MAS create the device
        // in Synapse at once.
        (&Method::POST, ["personal-sessions"]) => {
            let add: AddPersonalSession = match json_body(&req.headers, body) {
                Ok(add) => add,
                Err(reply) => return reply,
            };
            let (session, access_token, localpart) = {
                let mut state = shared.lock();
                let Some(actor) = state.user(&add.actor_user_id) else {
                    return error(404, "User not found");
                };
                if actor.deactivated_ms.is_some() {
                    return error(410, "User is not active");
                }
                let localpart = actor.username.clone();
                if add.scope.split(' ').all(str::is_empty) {
                    return error(400, "Invalid scope");
                }
                let now = now_ms();
                let access_token = token("mpt");
                let session = PersonalSession {
                    id: ulid(),
                    // The client whose token made the call owns the session.
                    owner_client_id: caller.to_owned(),
                    actor_user_id: add.actor_user_id,
                    human_name: add.human_name,
                    scope: add.scope,
                    created_ms: now,
                    expires_ms: add.expires_in.map(|s| now + s * 1000),
                    revoked_ms: None,
                    token: access_token.clone(),
                };
                state.tokens.insert(
                    access_token.clone(),
                    Token::Personal {
                        session_id: session.id.clone(),
                        issued_ms: now,
                    },
                );
                state.personal_sessions.push(session.clone());
                (session, access_token, localpart)
            };
            if let Some(device) = session.device() {
                let body = json!({"localpart": localpart, "device_id": device});
                match shared.synapse_call(Method::POST, "upsert_device", Some(body)).await {
                    Ok((200 | 201, _)) => {}
                    Ok((status, body)) => return error(500, format!("upsert_device: {status} {body}")),
                    Err(message) => return error(500, message),
                }
            }
            single_status(
                201,
                personal_resource(&session, Some(&access_token)),
                format!("/api/admin/v1/personal-sessions/{}", session.id),
            )
        }
        (_, ["personal-sessions", id, ..]) if !is_ulid(id) => Reply::Json(
            400,
            json!({"errors": [{"title": "Invalid ULID in path"}, {"title": "invalid length"}]}),
        ),
        (&Method::GET, ["personal-sessions", id]) => match shared.lock().personal_sessions.iter().find(|p| p.id == *id)
        {
            Some(p) => single(
                personal_resource(p, None),
                format!("/api/admin/v1/personal-sessions/{id}"),
            ),
            None => error(404, "Personal session not found"),
        },
        // Measured: 200 with `revoked_at` set; again 409; unknown 404. A
        // device only this session named is deleted from Synapse (MAS's
        // sync-devices job); one another active session names stays.
        (&Method::POST, ["personal-sessions", id, "revoke"]) => {
            let (session, orphan) = {
                let mut state = shared.lock();
                let Some(i) = state.personal_sessions.iter().position(|p| p.id == *id) else {
                    return error(404, format!("Personal session with ID {id} not found"));
                };
                if state.personal_sessions[i].revoked_ms.is_some() {
                    return error(409, format!("Personal session with ID {id} is already revoked"));
                }
                state.personal_sessions[i].revoked_ms = Some(now_ms());
                let session = state.personal_sessions[i].clone();
                let orphan = session.device().and_then(|device| {
                    let named = state.personal_sessions.iter().any(|p| {
                        p.revoked_ms.is_none() && p.actor_user_id == session.actor_user_id && p.device() == Some(device)
                    }) || state
                        .compat_sessions
                        .values()
                        .any(|c| !c.finished && c.user_id == session.actor_user_id && c.device_id == device);
                    let localpart = state.user(&session.actor_user_id).map(|u| u.username.clone());
                    (!named).then_some(()).and(localpart).map(|l| (l, device.to_owned()))
                });
                (session, orphan)
            };
            if let Some((localpart, device)) = orphan {
                let body = json!({"localpart": localpart, "device_id": device});
                if let Err(message) = shared.synapse_call(Method::POST, "delete_device", Some(body)).await {
                    return error(500, message);
                }
            }
            single(
                personal_resource(&session, None),
                format!("/api/admin/v1/personal-sessions/{id}"),
            )
        }
        // Measured: 201 with the new token; the previous token stops at
        // once; a revoked session is 422 "Session not valid"; the body
        // (`{expires_in}`) must be JSON (415 without).
        (&Method::POST, ["personal-sessions", id, "regenerate"]) => {
            #[derive(Deserialize)]
            struct Regenerate {
                expires_in: Option<u64>,
            }
            let regenerate: Regenerate = match json_body(&req.headers, body) {
                Ok(r) => r,
                Err(reply) => return reply,
            };
            let mut state = shared.lock();
            let Some(i) = state.personal_sessions.iter().position(|p| p.id == *id) else {
                return error(404, "User not found");
            };
            if state.personal_sessions[i].revoked_ms.is_some() {
                return error(422, "Session not valid");
            }
            let now = now_ms();
            let access_token = token("mpt");
            let old = std::mem::replace(&mut state.personal_sessions[i].token, access_token.clone());
            state.tokens.remove(&old);
            state.personal_sessions[i].expires_ms = regenerate.expires_in.map(|s| now + s * 1000);
            state.tokens.insert(
                access_token.clone(),
                Token::Personal {
                    session_id: id.to_string(),
                    issued_ms: now,
                },
            );
            let session = state.personal_sessions[i].clone();
            single_status(
                201,
                personal_resource(&session, Some(&access_token)),
                format!("/api/admin/v1/personal-sessions/{id}"),
            )
        }

        _ => Reply::Empty(404),
    }
}

fn provision(user_id: &str) -> Job {
    Job::Provision {
        user_id: user_id.to_owned(),
        set_displayname: None,
        set_avatar_url: None,
    }
}

fn list_users(shared: &Shared, q: &HashMap<String, String>) -> Reply {
    let admin = match bool_filter(q, "filter[admin]") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let guest = match bool_filter(q, "filter[legacy-guest]") {
        Ok(v) => v,
        Err(r) => return r,
    };
    let status = q.get("filter[status]").map(String::as_str);
    if let Some(s) = status
        && !["active", "locked", "deactivated"].contains(&s)
    {
        return Reply::Text(
            400,
            format!("Failed to deserialize query string: filter[status]: unknown variant `{s}`"),
        );
    }
    let search = q.get("filter[search]");
    let state = shared.lock();
    let items = state
        .users
        .iter()
        .filter(|u| admin.is_none_or(|a| u.admin == a))
        .filter(|_| guest.is_none_or(|g| !g))
        .filter(|u| match status {
            Some("active") => u.is_valid(),
            // The spec: `locked` includes deactivated users.
            Some("locked") => !u.is_valid(),
            Some("deactivated") => u.deactivated_ms.is_some(),
            _ => true,
        })
        .filter(|u| search.is_none_or(|s| u.username.contains(s.as_str())))
        .map(|u| (u.id.clone(), user_resource(u)))
        .collect();
    paginate("/api/admin/v1/users", q, items)
}

async fn user_action(shared: &Arc<Shared>, id: &str, action: &str, headers: &HeaderMap, body: &[u8]) -> Reply {
    if shared.lock().user(id).is_none() {
        return match action {
            "set-password" | "set-admin" | "deactivate" | "reactivate" | "lock" | "unlock" => user_not_found(id),
            _ => Reply::Empty(404),
        };
    }
    let self_link = format!("/api/admin/v1/users/{id}/{action}");
    let now = now_ms();
    let (jobs, reply) = match action {
        "set-password" => {
            let set: SetPassword = match json_body(headers, body) {
                Ok(set) => set,
                Err(reply) => return reply,
            };
            if !set.skip_password_check.unwrap_or(false) && !password_is_strong(&set.password) {
                return error(400, "Password is too weak");
            }
            if let Some(user) = shared.lock().user_mut(id) {
                user.password = Some(set.password);
            }
            return Reply::Empty(204);
        }
        "set-admin" => {
            let set: SetAdmin = match json_body(headers, body) {
                Ok(set) => set,
                Err(reply) => return reply,
            };
            // MAS only: Synapse's `admin` flag does not change (measured).
            let mut state = shared.lock();
            let user = state.user_mut(id).expect("checked above");
            user.admin = set.admin;
            return single(user_resource(user), self_link);
        }
        "lock" | "unlock" => {
            let mut state = shared.lock();
            let user = state.user_mut(id).expect("checked above");
            if action == "lock" {
                user.locked_ms.get_or_insert(now);
            } else {
                user.locked_ms = None;
            }
            // Locking ends no session: tokens turn inactive in
            // introspection while locked and work again after unlock.
            (vec![provision(id)], single(user_resource(user), self_link))
        }
        "deactivate" => {
            // The body is optional. Guess (axum 0.8's `Option<Json<_>>`):
            // without a JSON content type it is ignored, so a `skip_erase`
            // sent as text/plain erases.
            let deactivate: Deactivate = if body.iter().all(u8::is_ascii_whitespace) || !is_json(headers) {
                Deactivate::default()
            } else {
                match json_body(headers, body) {
                    Ok(d) => d,
                    Err(reply) => return reply,
                }
            };
            let mut state = shared.lock();
            // Deactivation deletes the user's emails in MAS (measured) and
            // ends its compatibility sessions (spec: "invalidates any
            // existing session").
            state.emails.retain(|e| e.user_id != id);
            for session in state.compat_sessions.values_mut().filter(|s| s.user_id == id) {
                session.finished = true;
            }
            // And revokes its personal sessions (measured: `revoked_at` set).
            for session in state
                .personal_sessions
                .iter_mut()
                .filter(|s| s.actor_user_id == id && s.revoked_ms.is_none())
            {
                session.revoked_ms = Some(now);
            }
            let user = state.user_mut(id).expect("checked above");
            user.deactivated_ms.get_or_insert(now);
            let job = Job::Delete {
                localpart: user.username.clone(),
                erase: !deactivate.skip_erase,
            };
            // Repeated deactivation queues another job each time (measured).
            (vec![job], single(user_resource(user), self_link))
        }
        "reactivate" => {
            let mut state = shared.lock();
            let user = state.user_mut(id).expect("checked above");
            user.deactivated_ms = None;
            // Emails are not restored; the displayname Synapse erased stays
            // cleared; the password is kept.
            let job = Job::Reactivate {
                localpart: user.username.clone(),
            };
            (vec![job], single(user_resource(user), self_link))
        }
        _ => return Reply::Empty(404),
    };
    shared.run_jobs(jobs).await;
    reply
}
