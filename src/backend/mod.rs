//! Where accounts live. Each backend reads an account into the neutral
//! [`Account`], turns the plan's neutral [`Changes`] into its own calls, and
//! says what they did:
//!
//! - [`synapse`]: Synapse owns its accounts; every change is a user PUT of
//!   its admin API.
//! - [`mas`]: Synapse delegates authentication to the Matrix Authentication
//!   Service; the account, its password, emails, upstream links, lock and
//!   deactivation live in MAS's admin API, the profile in Synapse's.

pub mod listing;
pub mod mas;
mod scrub;
pub mod synapse;

use std::future::Future;
use std::time::Duration;

use crate::account::{Account, UserId};
use crate::plan::{Changes, Desired, Lookups, Owners, Part};
use mas::{MasBackend, MasError};
use synapse::{SynapseClient, SynapseError};

/// A callback told of every request to a backend: the endpoint's name (a
/// closed set: Synapse's `Endpoint`, MAS's `MasEndpoint`), the HTTP status
/// (`None` when no response came) and the duration. For metrics.
#[derive(Clone)]
pub struct RequestObserver(pub std::sync::Arc<dyn Fn(&'static str, Option<u16>, Duration) + Send + Sync>);

impl std::fmt::Debug for RequestObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestObserver")
    }
}

/// The base URL of a backend and an HTTP client for it, or why the URL
/// cannot be used: http(s), a base, no credentials in it. The client
/// follows no redirect: one would carry the token, and after a 307/308 a
/// body with a password, to wherever it points. It trusts the system's CA
/// roots and `extra_roots`.
pub(crate) fn http_client(
    base_url: &str,
    timeout: Duration,
    extra_roots: &crate::tls::ExtraRoots,
) -> Result<(url::Url, reqwest::Client), String> {
    let base = url::Url::parse(base_url).map_err(|e| e.to_string())?;
    if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
        return Err("it must be an http:// or https:// URL".into());
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err("it must not carry credentials".into());
    }
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder();
    if !extra_roots.is_empty() {
        let certificates = extra_roots.certificates().map_err(|e| e.to_string())?;
        builder = builder.tls_certs_merge(certificates);
    }
    let http = builder
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .build()
        .map_err(|e| e.without_url().to_string())?;
    Ok((base, http))
}

/// The most of an answer's body either backend reads: no answer of the
/// admin APIs it calls comes near it (a user with its threepids and links,
/// a page of 100 MAS resources), and a URL that streams more is cut off
/// here instead of filling the operator's memory.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The most of a version string a server sends that goes into status.
pub const MAX_VERSION_BYTES: usize = 100;

/// The longest wait a server may ask for (Synapse's `retry_after_ms`): the
/// controller's longest backoff. A longer one is cut to this; a server
/// that is still busy then asks again.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Why a body was not read.
#[derive(Debug)]
pub(crate) enum BodyError {
    /// It is longer than [`MAX_BODY_BYTES`] (its Content-Length said so, or
    /// it went on past the limit).
    TooLarge,
    Transport(reqwest::Error),
}

/// The body of `response`, at most [`MAX_BODY_BYTES`] of it: refused at
/// once when its Content-Length says more, else read chunk by chunk and
/// given up as soon as it goes past the limit.
pub(crate) async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, BodyError> {
    if response.content_length().is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A wait a server asked for in milliseconds, of any JSON number: at most
/// [`MAX_RETRY_AFTER`], none for a negative one.
pub(crate) fn retry_after_of(ms: &serde_json::Value) -> Option<Duration> {
    let ms = ms.as_f64()?;
    let max = MAX_RETRY_AFTER.as_millis() as f64;
    // Clamped first: from_millis of a cast is exact, and a cast of a huge
    // or negative float (or the from_secs_f64 of one) never happens.
    Some(Duration::from_millis(ms.clamp(0.0, max) as u64))
}

/// What a failed call means for whoever made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later: the network, a timeout, a 5xx, a race.
    Transient,
    /// Try again after the given wait (M_LIMIT_EXCEEDED).
    RateLimited(Option<Duration>),
    /// The token (or client secret) is missing or not valid: wait for a new
    /// Secret.
    Unauthorized,
    /// The token is valid but may not do this (not a server admin).
    Forbidden,
    /// Something belongs to another account (an external id, a threepid).
    Conflict,
    /// The server rejected the request as it is: wait for a spec change.
    Invalid,
    /// The account (or the looked-up thing) does not exist.
    NotFound,
    /// The URL answers, but not like the API expected there: a web page, a
    /// redirect, JSON of another shape. Wait for a change of the URL.
    NotSynapse,
}

/// A failed call of either backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Synapse(#[from] SynapseError),
    #[error(transparent)]
    Mas(#[from] MasError),
}

impl BackendError {
    pub fn class(&self) -> ErrorClass {
        match self {
            BackendError::Synapse(e) => e.class(),
            BackendError::Mas(e) => e.class(),
        }
    }

    /// Which server answered (or did not): `Synapse` or `MAS`.
    pub fn server(&self) -> &'static str {
        match self {
            BackendError::Synapse(_) => "Synapse",
            BackendError::Mas(_) => "MAS",
        }
    }

    /// Worth retrying: the network, a 5xx, a race, a rate limit.
    pub fn is_transient(&self) -> bool {
        matches!(self.class(), ErrorClass::Transient | ErrorClass::RateLimited(_))
    }

    /// No answer came: the server could not be reached, or went silent.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            BackendError::Synapse(SynapseError::Transport { .. }) | BackendError::Mas(MasError::Transport { .. })
        )
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self.class() {
            ErrorClass::RateLimited(d) => d,
            _ => None,
        }
    }

    /// The server answered with an error of the 4xx kind: it refused the
    /// request, which therefore created nothing.
    pub fn is_refusal(&self) -> bool {
        match self {
            BackendError::Synapse(e) => matches!(e, SynapseError::Api { status: 400..=499, .. }),
            BackendError::Mas(e) => e.is_refusal(),
        }
    }
}

/// What a create did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    /// The account did not exist and this call created it.
    pub created: bool,
    /// The account as the answer reported it, when it did; `None` means
    /// read it again.
    pub account: Option<Account>,
    /// When the created account was created and the backend's ID of it, as
    /// the answer said (also when it reported no whole account).
    pub creation_ts: Option<i64>,
    pub account_id: Option<String>,
    /// The names of the fields the create set besides the account itself
    /// and its password (never their values).
    pub fields: Vec<&'static str>,
    /// The create set the desired password.
    pub password: bool,
}

impl Created {
    /// The account existed already, and the create left it as it was.
    pub fn existing() -> Self {
        Created {
            created: false,
            account: None,
            creation_ts: None,
            account_id: None,
            fields: Vec::new(),
            password: false,
        }
    }
}

/// What applying changes did, whether or not all of it went through.
#[derive(Debug, Default)]
pub struct Applied {
    /// The names of the fields of each write that succeeded.
    pub fields: Vec<Vec<&'static str>>,
    /// The password was set (the backend said so).
    pub password: bool,
    /// A deactivation (`Some(true)`) or re-activation went through.
    pub deactivated: Option<bool>,
    /// Writes sent, including failed ones: a failed one may have been
    /// applied in part.
    pub writes: usize,
    /// The account as the last answer reported it after every write, when
    /// it did; `None` means read it again.
    pub account: Option<Account>,
    /// The call that failed; the changes after it were not sent.
    pub error: Option<BackendError>,
}

/// Why a spec cannot be managed by a backend (a field it does not have, a
/// name it does not know).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Unsupported(pub String);

/// The parts of an account a read must report. A backend that keeps an
/// account in several places (MAS: the user, its emails, its upstream
/// links, and the profile in Synapse) reads only the parts asked for and
/// reports the others empty; a backend with one place reads it whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parts {
    /// Display name, avatar, user type, and whether the account is erased.
    pub profile: bool,
    pub threepids: bool,
    pub external_ids: bool,
}

impl Parts {
    pub const ALL: Parts = Parts {
        profile: true,
        threepids: true,
        external_ids: true,
    };

    /// What a plan for `desired` compares: the fields the spec manages.
    /// Whether the account is erased matters only to a managed display
    /// name or avatar, which an erased account keeps cleared.
    pub fn managed_by(desired: &Desired) -> Parts {
        Parts {
            profile: desired.manages(Part::Profile),
            threepids: desired.manages(Part::Threepids),
            external_ids: desired.manages(Part::ExternalIds),
        }
    }
}

/// One kind of account store, as the executor drives it.
pub trait AccountBackend: Sync {
    /// Puts the desired account in the backend's terms (MAS: the upstream
    /// provider's ID for each SSO link), or says why it cannot be managed.
    fn prepare(
        &self,
        desired: &mut Desired,
    ) -> impl Future<Output = Result<Result<(), Unsupported>, BackendError>> + Send;

    /// The account, or `None` when there is none, with at least `parts`
    /// of it (the others may be reported empty).
    fn read(
        &self,
        user_id: &UserId,
        parts: Parts,
    ) -> impl Future<Output = Result<Option<Account>, BackendError>> + Send;

    /// Who, other than `account`, holds each threepid and SSO link of
    /// `lookups`.
    fn owners(
        &self,
        account: Option<&Account>,
        lookups: Lookups,
    ) -> impl Future<Output = Result<Owners, BackendError>> + Send;

    /// Creates the account of `desired.user_id` if there is none, with
    /// those of its fields the backend can set in the same call (see
    /// [`Created::fields`]). It never changes an account that exists: it
    /// answers `created: false` for one, so it may be tried before reading.
    fn create(&self, desired: &Desired) -> impl Future<Output = Result<Created, BackendError>> + Send;

    /// Whether a resource that never had an account tries the create
    /// before reading: when the create is a call of its own that refuses
    /// an existing account without touching it, and a missing one is then
    /// not read for nothing.
    fn creates_before_reading(&self, desired: &Desired) -> bool;

    /// Applies `changes` to `account`, in as many calls as the backend
    /// needs, stopping at the first that fails. `created_now`: this sync
    /// created the account, so it has no sessions to end yet.
    fn apply(
        &self,
        user_id: &UserId,
        account: &Account,
        changes: &Changes,
        created_now: bool,
    ) -> impl Future<Output = Applied> + Send;

    /// Deactivates the account, erasing it when `erase`.
    fn deactivate(
        &self,
        user_id: &UserId,
        account: &Account,
        erase: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// How long a token the operator makes to act as a user lives, at most:
/// it is ended as soon as the work is done; this bounds a token whose end
/// was lost (the operator stopped, the server did not answer).
pub const USER_SESSION_LIFETIME: Duration = Duration::from_secs(300);

/// A short-lived token of a user, made by the operator to do what only the
/// user can (leave a room), and ended right after
/// ([`RoomBackend::end_user_session`]). It is never written anywhere.
#[derive(Debug)]
pub struct UserSession {
    pub token: crate::secret::SecretString,
    /// MAS's ID of the personal session that holds the token.
    mas_session: Option<String>,
}

/// Where room memberships live: in Synapse, on both backends (Synapse's
/// admin join API works when it delegates to MAS too). Only the way to
/// act as the user differs: Synapse's admin login API, or a MAS personal
/// session (the same calls `MatrixAccessToken` issues and revokes with).
pub trait RoomBackend: Sync {
    /// Synapse's admin client.
    fn rooms(&self) -> &SynapseClient;

    /// A token of `user_id` (MAS's `account_id`, when known), valid
    /// [`USER_SESSION_LIFETIME`] at most. `purpose` names the session
    /// where the server shows it (MAS).
    fn start_user_session(
        &self,
        user_id: &UserId,
        account_id: Option<&str>,
        purpose: &str,
    ) -> impl Future<Output = Result<UserSession, BackendError>> + Send;

    /// Ends a token of [`start_user_session`](Self::start_user_session).
    fn end_user_session(&self, session: UserSession) -> impl Future<Output = Result<(), BackendError>> + Send;
}

impl RoomBackend for SynapseClient {
    fn rooms(&self) -> &SynapseClient {
        self
    }

    async fn start_user_session(
        &self,
        user_id: &UserId,
        _: Option<&str>,
        _: &str,
    ) -> Result<UserSession, BackendError> {
        let until = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_add(USER_SESSION_LIFETIME);
        let token = self.admin_login(user_id, Some(until.as_millis() as i64)).await?;
        Ok(UserSession {
            token,
            mas_session: None,
        })
    }

    async fn end_user_session(&self, session: UserSession) -> Result<(), BackendError> {
        self.logout(&session.token).await?;
        Ok(())
    }
}

impl RoomBackend for MasBackend {
    fn rooms(&self) -> &SynapseClient {
        self.synapse()
    }

    async fn start_user_session(
        &self,
        user_id: &UserId,
        account_id: Option<&str>,
        purpose: &str,
    ) -> Result<UserSession, BackendError> {
        let actor = match account_id {
            Some(id) => id.to_string(),
            None => self
                .mas()
                .user_by_username(user_id.localpart())
                .await?
                .map(|u| u.id)
                .ok_or_else(|| MasError::NotProvisioned {
                    user_id: user_id.to_string(),
                })?,
        };
        let lifetime = USER_SESSION_LIFETIME.as_secs() as u32;
        let issued = self
            .mas()
            .create_personal_session(&actor, purpose, mas::SCOPE_CLIENT_API, Some(lifetime))
            .await?;
        Ok(UserSession {
            token: issued.access_token,
            mas_session: Some(issued.id),
        })
    }

    async fn end_user_session(&self, session: UserSession) -> Result<(), BackendError> {
        if let Some(id) = &session.mas_session {
            self.mas().revoke_personal_session(id).await?;
        }
        Ok(())
    }
}

impl RoomBackend for Backend {
    fn rooms(&self) -> &SynapseClient {
        self.synapse()
    }

    async fn start_user_session(
        &self,
        user_id: &UserId,
        account_id: Option<&str>,
        purpose: &str,
    ) -> Result<UserSession, BackendError> {
        match self {
            Backend::Synapse(c) => c.start_user_session(user_id, account_id, purpose).await,
            Backend::Mas(m) => m.start_user_session(user_id, account_id, purpose).await,
        }
    }

    async fn end_user_session(&self, session: UserSession) -> Result<(), BackendError> {
        match self {
            Backend::Synapse(c) => c.end_user_session(session).await,
            Backend::Mas(m) => m.end_user_session(session).await,
        }
    }
}

/// The backend of one Homeserver.
#[derive(Clone, Debug)]
pub enum Backend {
    Synapse(SynapseClient),
    Mas(MasBackend),
}

impl Backend {
    /// Synapse's admin client: every Homeserver has one (in MAS mode it
    /// keeps the profile).
    pub fn synapse(&self) -> &SynapseClient {
        match self {
            Backend::Synapse(c) => c,
            Backend::Mas(m) => m.synapse(),
        }
    }
}

impl AccountBackend for Backend {
    async fn prepare(&self, desired: &mut Desired) -> Result<Result<(), Unsupported>, BackendError> {
        match self {
            Backend::Synapse(c) => c.prepare(desired).await,
            Backend::Mas(m) => m.prepare(desired).await,
        }
    }

    async fn read(&self, user_id: &UserId, parts: Parts) -> Result<Option<Account>, BackendError> {
        match self {
            Backend::Synapse(c) => c.read(user_id, parts).await,
            Backend::Mas(m) => m.read(user_id, parts).await,
        }
    }

    async fn owners(&self, account: Option<&Account>, lookups: Lookups) -> Result<Owners, BackendError> {
        match self {
            Backend::Synapse(c) => c.owners(account, lookups).await,
            Backend::Mas(m) => m.owners(account, lookups).await,
        }
    }

    async fn create(&self, desired: &Desired) -> Result<Created, BackendError> {
        match self {
            Backend::Synapse(c) => c.create(desired).await,
            Backend::Mas(m) => m.create(desired).await,
        }
    }

    fn creates_before_reading(&self, desired: &Desired) -> bool {
        match self {
            Backend::Synapse(c) => c.creates_before_reading(desired),
            Backend::Mas(m) => m.creates_before_reading(desired),
        }
    }

    async fn apply(&self, user_id: &UserId, account: &Account, changes: &Changes, created_now: bool) -> Applied {
        match self {
            Backend::Synapse(c) => c.apply(user_id, account, changes, created_now).await,
            Backend::Mas(m) => m.apply(user_id, account, changes, created_now).await,
        }
    }

    async fn deactivate(&self, user_id: &UserId, account: &Account, erase: bool) -> Result<(), BackendError> {
        match self {
            Backend::Synapse(c) => AccountBackend::deactivate(c, user_id, account, erase).await,
            Backend::Mas(m) => m.deactivate(user_id, account, erase).await,
        }
    }
}

#[cfg(test)]
mod tests;
