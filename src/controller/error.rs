use crate::api::{Ready, Standing};
use crate::backend::mas::MasError;
use crate::backend::{BackendError, ErrorClass};
use crate::plan::Refusal;
use crate::synapse::{Endpoint, InvalidUserId, SynapseError};
use kube::runtime::finalizer;

/// Why a reconcile did not bring its resource in line. Each variant is one
/// failure site; [`Error::reason`] is the condition reason and Event reason,
/// [`Error::is_transient`] decides retry-with-backoff against wait-for-change.
///
/// Messages name the resources involved, never a secret value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Homeserver {name:?} not found in this namespace")]
    HomeserverNotFound { name: String },
    #[error("Homeserver {name:?} is not ready: {message}")]
    HomeserverNotReady {
        name: String,
        message: String,
        /// The Homeserver is being checked or retried, as opposed to
        /// stalled on an error of its own.
        waiting: bool,
    },
    #[error("Secret {name:?} not found")]
    SecretNotFound { name: String, key: String },
    #[error("Secret {name:?} has no key {key:?}")]
    SecretKeyMissing { name: String, key: String },
    #[error("{0}")]
    InvalidSpec(String),
    #[error("the CA bundle in key {key:?} of Secret {name:?} cannot be used: {problem}")]
    InvalidCaBundle {
        name: String,
        key: String,
        #[source]
        problem: crate::tls::CaBundleError,
    },
    #[error(transparent)]
    InvalidUserId(#[from] InvalidUserId),
    #[error("{0}")]
    Refused(Refusal),
    #[error("MatrixUser {other:?} already manages {user_id}")]
    DuplicateUser { user_id: String, other: String },
    #[error("Secret {name:?} exists and is not owned by this MatrixUser; it is left alone")]
    CredentialsSecretNotOwned { name: String },
    /// A call to Synapse or MAS failed; the message says which.
    #[error("{server}: {0}", server = .0.server())]
    Backend(#[from] BackendError),
    #[error("the account does not settle: {0}")]
    NotSettling(String),
    #[error("the homeserver says its server name is {actual:?}, but spec.serverName is {expected:?}")]
    ServerNameMismatch { expected: String, actual: String },
    #[error("the admin token belongs to {user_id}, who is not a server admin")]
    NotAdmin { user_id: String },
    /// `answer` describes what came instead (see [`SynapseError`]'s
    /// messages); it never quotes the answer.
    #[error("spec.url does not answer like a Synapse homeserver ({answer})")]
    NotSynapse { answer: String },
    #[error("Kubernetes API: {}", kube_message(.0))]
    Kube(#[from] kube::Error),
    #[error("the MatrixUser kept changing while it was reconciled; trying again")]
    Stale,
    #[error("{users} MatrixUser(s) or MatrixAccessToken(s) still use this Homeserver; its deletion waits for them")]
    HomeserverInUse { users: usize },
    #[error(
        "Synapse delegates authentication to the Matrix Authentication Service (MAS) at {issuer}: accounts live there; set spec.mas to manage them"
    )]
    DelegatesToMas { issuer: String },
    #[error(
        "spec.mas is set, but Synapse does not delegate authentication to MAS (/_matrix/client/v1/auth_metadata answers 404): remove spec.mas or enable MAS in Synapse"
    )]
    NotDelegatingToMas,
    /// A bug: the reconcile panicked. Contained to this one object and
    /// retried with backoff; the panic's message is in the log.
    #[error("the reconcile failed on an internal error (a panic); it is retried with backoff")]
    Panicked,
    /// A pass's work with the homeserver hit `--reconcile-timeout`.
    #[error(
        "the homeserver answered too slowly: the pass did not finish within its deadline of {} (--reconcile-timeout); retrying with backoff",
        seconds(*.deadline)
    )]
    TooSlow { deadline: std::time::Duration },
    // ---- MatrixAccessToken ----
    #[error("MatrixUser {name:?} not found in this namespace")]
    UserNotFound { name: String },
    #[error("MatrixUser {name:?} is not ready: {state}")]
    UserNotReady {
        name: String,
        state: String,
        /// The MatrixUser is being reconciled (as opposed to stalled).
        waiting: bool,
    },
    #[error("MatrixUser {name:?} is deactivated: its tokens are revoked and none is issued")]
    UserDeactivated { name: String },
    #[error("MatrixUser {name:?} is locked: the server refuses its tokens until it is unlocked")]
    UserLocked { name: String },
    #[error("Secret {name:?} exists and is not owned by this MatrixAccessToken; it is left alone")]
    TokenSecretNotOwned { name: String },
    /// The server refuses to issue tokens (its answer, without any value).
    #[error("the server does not issue the token: {0}")]
    TokenRefused(String),
    #[error("{0}")]
    RotationUnsupported(String),
    // ---- MatrixUser rooms ----
    /// Some rooms of `spec.rooms` are not in line; the others are.
    #[error("{message}")]
    Rooms {
        /// `RoomNotJoinable` (a room cannot be joined, or its alias looked
        /// up), `RoomNotLeft` (only leaves failed).
        reason: &'static str,
        message: String,
        /// Some failure is worth retrying soon (a network error, a 5xx, a
        /// rate limit); otherwise the rooms wait for a change.
        transient: bool,
    },
    #[error(
        "device {device:?} is MatrixAccessToken {other:?}'s: on Synapse, revoking a device's token deletes the device, so two MatrixAccessTokens of one device would end each other's tokens (give this one another deviceId)"
    )]
    DeviceTaken { device: String, other: String },
    /// The server refuses (or would renew) a token it issued moments ago.
    #[error(
        "the token in the Secret was issued {}s ago and is already {why}; no other is issued before it is {}s old (the server would likely do the same to it), retrying with backoff",
        .age.as_secs(),
        super::accesstoken::MIN_TOKEN_AGE.as_secs()
    )]
    TokenRejected { age: std::time::Duration, why: String },
    // ---- MatrixUser, managementPolicy: Observe ----
    /// The account differs from the spec in these fields (their names
    /// only: a value may be an email or a name nobody should read here).
    #[error("{user_id} differs from the spec in {} (managementPolicy is Observe: nothing was changed)", .fields.join(", "))]
    Drifted { user_id: String, fields: Vec<&'static str> },
    #[error("{user_id} does not exist (managementPolicy is Observe: it is not created)")]
    NotFound { user_id: String },
}

/// `90s`, `2m`, `1.5s`: a duration as the flags take it.
fn seconds(d: std::time::Duration) -> String {
    match (d.as_secs(), d.subsec_millis()) {
        (s, 0) if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        (s, 0) => format!("{s}s"),
        (s, ms) => format!("{s}.{ms:03}s"),
    }
}

impl From<SynapseError> for Error {
    fn from(e: SynapseError) -> Self {
        Error::Backend(e.into())
    }
}

impl From<MasError> for Error {
    fn from(e: MasError) -> Self {
        Error::Backend(e.into())
    }
}

/// What went wrong around kube's finalizer helper: the reconcile's own
/// error, or the finalizer's patch.
impl From<finalizer::Error<Error>> for Error {
    fn from(e: finalizer::Error<Error>) -> Self {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
            other => Error::InvalidSpec(other.to_string()),
        }
    }
}

/// What a read-only use of the executor's steps (Observe, `plan`) fails
/// with: no guard there, so nothing halts it.
impl From<crate::apply::SyncError<std::convert::Infallible>> for Error {
    fn from(e: crate::apply::SyncError<std::convert::Infallible>) -> Self {
        use crate::apply::SyncError;
        match e {
            SyncError::Refused(r) => Error::Refused(r),
            SyncError::Backend(e) => Error::Backend(e),
            SyncError::Unsupported(message) => Error::InvalidSpec(message),
            e @ SyncError::NotSettling { .. } => Error::NotSettling(e.to_string()),
            SyncError::Halted(never) => match never {},
        }
    }
}

impl Error {
    /// The condition and Event reason: a closed set, documented in the README.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::HomeserverNotFound { .. } => "HomeserverNotFound",
            Error::HomeserverNotReady { .. } => "HomeserverNotReady",
            Error::SecretNotFound { .. } | Error::SecretKeyMissing { .. } => "SecretNotFound",
            Error::InvalidSpec(_) | Error::InvalidUserId(_) => "InvalidSpec",
            Error::InvalidCaBundle { .. } => "InvalidCABundle",
            Error::Refused(
                Refusal::AdminNotAllowed | Refusal::AdoptingAdmin { .. } | Refusal::ChangingAdmin { .. },
            ) => "AdminNotAllowed",
            Error::Refused(Refusal::AdoptionNotRequested { .. } | Refusal::AdoptionNotAllowed { .. }) => {
                "AdoptionRefused"
            }
            Error::Refused(Refusal::ThreepidInUse { .. } | Refusal::ExternalIdInUse { .. }) => "Conflict",
            Error::DuplicateUser { .. } | Error::CredentialsSecretNotOwned { .. } => "Conflict",
            // A wrong registration shared secret (403 "HMAC incorrect"), or a
            // Synapse with shared-secret registration off.
            Error::Backend(BackendError::Synapse(SynapseError::Api {
                endpoint: Endpoint::Register | Endpoint::RegisterNonce,
                status: 400 | 403,
                ..
            })) => "RegistrationRefused",
            Error::Backend(BackendError::Mas(e)) if e.is_password_refused() => "PasswordRejected",
            Error::Backend(e) => backend_reason(e),
            Error::DelegatesToMas { .. } => "DelegatesToMAS",
            Error::NotDelegatingToMas => "NotDelegatingToMAS",
            Error::NotSettling(_) => "SynapseError",
            Error::ServerNameMismatch { .. } => "ServerNameMismatch",
            Error::NotAdmin { .. } => "NotAdmin",
            Error::NotSynapse { .. } => "NotSynapse",
            Error::Kube(e) if is_refused(e) => "KubernetesRefused",
            Error::Kube(_) | Error::Stale => "KubernetesError",
            Error::HomeserverInUse { .. } => "Deleting",
            Error::Panicked => "InternalError",
            Error::TooSlow { .. } => "TooSlow",
            Error::UserNotFound { .. } => "UserNotFound",
            Error::UserNotReady { .. } => "UserNotReady",
            Error::UserDeactivated { .. } => "UserDeactivated",
            Error::UserLocked { .. } => "UserLocked",
            Error::TokenSecretNotOwned { .. } => "Conflict",
            Error::TokenRefused(_) => "TokenRefused",
            Error::RotationUnsupported(_) => "RotationUnsupported",
            Error::Rooms { reason, .. } => reason,
            Error::TokenRejected { .. } => "TokenRejected",
            Error::DeviceTaken { .. } => "Conflict",
            Error::Drifted { .. } => "Drifted",
            Error::NotFound { .. } => "NotFound",
        }
    }

    /// The conditions the error makes, with `message` (its own text, or
    /// that text in a context).
    pub fn condition(&self, message: String) -> Ready {
        match self.standing() {
            Standing::Stalled => Ready::stalled(self.reason(), message),
            _ => Ready::reconciling(self.reason(), message),
        }
    }

    /// What the error makes of the resource: `Reconciling` while the
    /// operator keeps at it, `Stalled` when it waits for a change.
    pub fn standing(&self) -> Standing {
        match self {
            Error::HomeserverNotReady { waiting: true, .. } | Error::UserNotReady { waiting: true, .. } => {
                Standing::Reconciling
            }
            e if e.is_transient() => Standing::Reconciling,
            _ => Standing::Stalled,
        }
    }

    /// Worth retrying with backoff, as opposed to waiting for a change of
    /// the spec, a Secret or the Homeserver.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Backend(e) => e.is_transient(),
            Error::Kube(e) => !is_refused(e),
            Error::NotSettling(_)
            | Error::Stale
            | Error::HomeserverInUse { .. }
            | Error::Panicked
            | Error::TooSlow { .. }
            | Error::TokenRejected { .. } => true,
            Error::Rooms { transient, .. } => *transient,
            _ => false,
        }
    }

    /// How long Synapse asked to wait, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Backend(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// The reason of a failed call by its class; the names of the server's
/// own failures say which server it was.
fn backend_reason(e: &BackendError) -> &'static str {
    let mas = matches!(e, BackendError::Mas(_));
    match e.class() {
        ErrorClass::Unauthorized => "Unauthorized",
        ErrorClass::Forbidden => "NotAdmin",
        ErrorClass::Conflict => "Conflict",
        ErrorClass::Transient if e.is_transport() => "Unreachable",
        ErrorClass::NotSynapse if mas => "NotMAS",
        ErrorClass::NotSynapse => "NotSynapse",
        // MAS checks what it is sent (an email, a username) itself.
        ErrorClass::Invalid if mas => "InvalidSpec",
        _ if mas => "MASError",
        _ => "SynapseError",
    }
}

/// Whether the API server refused a request as such: the same request
/// gets the same answer, so a retry cannot help and the resource waits for
/// a change (`Stalled`). 400 (a malformed request: a selector, a patch),
/// 405 (a verb the resource lacks), 413 (too large), 415 (a patch type it
/// does not take) and 422 (an invalid object: a label value, a name too
/// long). Everything else stays transient: 409 (a conflict, read again),
/// 429 and 5xx (load, outages), a lost connection; and also 401 (a token
/// being renewed), 403 (RBAC, an admission policy or a namespace being
/// deleted: changed or gone outside the resource, which the operator does
/// not watch) and 404 (an object or a CRD not there yet, or gone).
fn is_refused(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if matches!(s.code, 400 | 405 | 413 | 415 | 422))
}

/// The API server's own message, with its code and reason; any other
/// error as it tells itself.
fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        e => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, reason: &str, message: &str) -> Error {
        Error::Kube(kube::Error::Api(
            kube::core::Status::failure(message, reason).with_code(code).boxed(),
        ))
    }

    #[test]
    fn api_server_refusals_stall_and_everything_else_is_retried() {
        let label = r#"Secret "x-credentials" is invalid: metadata.labels: Invalid value: "x": must be no more than 63 characters"#;
        for (code, reason) in [
            (400, "BadRequest"),
            (405, "MethodNotAllowed"),
            (413, "RequestEntityTooLarge"),
            (415, "UnsupportedMediaType"),
            (422, "Invalid"),
        ] {
            let e = api(code, reason, label);
            assert!(!e.is_transient(), "{code}");
            assert_eq!(e.standing(), Standing::Stalled, "{code}");
            assert_eq!(e.reason(), "KubernetesRefused", "{code}");
            assert_eq!(e.to_string(), format!("Kubernetes API: {label} ({code} {reason})"));
        }
        for (code, reason) in [
            (401, "Unauthorized"),
            (403, "Forbidden"),
            (404, "NotFound"),
            (409, "Conflict"),
            (410, "Expired"),
            (429, "TooManyRequests"),
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
            (504, "Timeout"),
        ] {
            let e = api(code, reason, "m");
            assert!(e.is_transient(), "{code}");
            assert_eq!(e.standing(), Standing::Reconciling, "{code}");
            assert_eq!(e.reason(), "KubernetesError", "{code}");
        }
        let lost = Error::Kube(kube::Error::Service("connection refused".into()));
        assert!(lost.is_transient());
        assert_eq!(lost.reason(), "KubernetesError");
    }
    use crate::synapse::{BodySummary, Endpoint, ErrCode};

    fn page(status: u16) -> SynapseError {
        SynapseError::UnexpectedResponse {
            endpoint: Endpoint::GetUser,
            status,
            body: BodySummary {
                content_type: Some("text/html".into()),
                len: 512,
            },
        }
    }

    #[test]
    fn answers_that_are_not_synapse_wait_for_another_url() {
        let redirected = SynapseError::Redirected {
            endpoint: Endpoint::PutUser,
            status: 308,
        };
        for e in [Error::from(page(404)), Error::from(redirected)] {
            assert_eq!(e.reason(), "NotSynapse", "{e}");
            assert!(!e.is_transient(), "{e}");
        }
        let e = Error::NotSynapse {
            answer: page(404).to_string(),
        };
        assert_eq!(e.reason(), "NotSynapse");
        assert!(!e.is_transient());
        assert_eq!(
            e.to_string(),
            "spec.url does not answer like a Synapse homeserver (get_user: HTTP 404 without a Matrix error: text/html, 512 bytes)"
        );
    }

    #[test]
    fn a_pass_over_its_deadline_is_transient_and_names_the_deadline() {
        let e = Error::TooSlow {
            deadline: std::time::Duration::from_secs(120),
        };
        assert_eq!(e.reason(), "TooSlow");
        assert!(e.is_transient());
        assert_eq!(e.standing(), Standing::Reconciling);
        assert_eq!(
            e.to_string(),
            "the homeserver answered too slowly: the pass did not finish within its deadline of 2m (--reconcile-timeout); retrying with backoff"
        );
        let odd = |ms| seconds(std::time::Duration::from_millis(ms));
        assert_eq!(
            (odd(90_000), odd(1_500), odd(3_000)),
            ("90s".into(), "1.500s".into(), "3s".into())
        );
    }

    #[test]
    fn each_backends_failures_have_their_reasons_messages_and_waits() {
        use crate::backend::mas::MasEndpoint;
        let synapse = |status, errcode: &str, endpoint| SynapseError::Api {
            endpoint,
            status,
            errcode: ErrCode::parse(errcode),
            message: "m".into(),
            retry_after: (status == 429).then(|| std::time::Duration::from_secs(7)),
        };
        let mas = |status, endpoint| MasError::Api {
            endpoint,
            status,
            title: "t".into(),
        };
        let mas_page = |status| MasError::UnexpectedResponse {
            endpoint: MasEndpoint::GetUser,
            status,
            body: BodySummary {
                content_type: None,
                len: 1,
            },
        };
        let wait = Some(std::time::Duration::from_secs(7));
        let cases: Vec<(Error, &str, bool, Option<std::time::Duration>)> = vec![
            (
                synapse(401, "M_UNKNOWN_TOKEN", Endpoint::GetUser).into(),
                "Unauthorized",
                false,
                None,
            ),
            (
                synapse(403, "M_FORBIDDEN", Endpoint::GetUser).into(),
                "NotAdmin",
                false,
                None,
            ),
            (
                synapse(409, "M_UNKNOWN", Endpoint::PutUser).into(),
                "Conflict",
                false,
                None,
            ),
            (
                synapse(400, "M_INVALID_PARAM", Endpoint::PutUser).into(),
                "SynapseError",
                false,
                None,
            ),
            (
                synapse(429, "M_LIMIT_EXCEEDED", Endpoint::PutUser).into(),
                "SynapseError",
                true,
                wait,
            ),
            (
                synapse(403, "M_FORBIDDEN", Endpoint::Register).into(),
                "RegistrationRefused",
                false,
                None,
            ),
            (
                synapse(400, "M_UNKNOWN", Endpoint::RegisterNonce).into(),
                "RegistrationRefused",
                false,
                None,
            ),
            (page(404).into(), "NotSynapse", false, None),
            (SynapseError::NoRegistrationSecret.into(), "SynapseError", false, None),
            (mas(401, MasEndpoint::GetUser).into(), "Unauthorized", false, None),
            (mas(403, MasEndpoint::GetUser).into(), "NotAdmin", false, None),
            (mas(409, MasEndpoint::AddEmail).into(), "Conflict", false, None),
            (mas(400, MasEndpoint::AddEmail).into(), "InvalidSpec", false, None),
            (
                mas(400, MasEndpoint::SetPassword).into(),
                "PasswordRejected",
                false,
                None,
            ),
            (mas(404, MasEndpoint::GetUser).into(), "MASError", false, None),
            (mas(503, MasEndpoint::GetUser).into(), "MASError", true, None),
            (mas(429, MasEndpoint::GetUser).into(), "MASError", true, None),
            (mas_page(200).into(), "NotMAS", false, None),
            (
                MasError::NotProvisioned {
                    user_id: "@a:example.org".into(),
                }
                .into(),
                "MASError",
                true,
                None,
            ),
        ];
        for (e, reason, transient, retry_after) in cases {
            assert_eq!(e.reason(), reason, "{e}");
            assert_eq!(e.is_transient(), transient, "{e}");
            assert_eq!(e.retry_after(), retry_after, "{e}");
        }
        let e = Error::from(synapse(400, "M_INVALID_PARAM", Endpoint::PutUser));
        assert_eq!(e.to_string(), "Synapse: put_user: HTTP 400 M_INVALID_PARAM: m");
        let e = Error::from(mas(400, MasEndpoint::AddEmail));
        assert_eq!(e.to_string(), "MAS: mas_add_email: HTTP 400: t");
    }

    #[test]
    fn a_proxy_error_page_stays_a_transient_synapse_error() {
        let e = Error::from(page(502));
        assert_eq!(e.reason(), "SynapseError");
        assert!(e.is_transient());
    }
}
