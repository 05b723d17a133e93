use crate::api::{Ready, Standing};
use crate::apply::SyncError;
use crate::backend::mas::MasError;
use crate::backend::{BackendError, ErrorClass};
use crate::plan::Refusal;
use crate::synapse::{Endpoint, InvalidUserId, SynapseError};

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
    #[error("Synapse: {0}")]
    Synapse(#[from] SynapseError),
    #[error("MAS: {0}")]
    Mas(#[from] MasError),
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
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the MatrixUser kept changing while it was reconciled; trying again")]
    Stale,
    #[error("{users} MatrixUser(s) still use this Homeserver; its deletion waits for them")]
    HomeserverInUse { users: usize },
    #[error(
        "Synapse delegates authentication to the Matrix Authentication Service (MAS) at {issuer}: accounts live there; set spec.mas to manage them"
    )]
    DelegatesToMas { issuer: String },
    #[error(
        "spec.mas is set, but Synapse does not delegate authentication to MAS (/_matrix/client/v1/auth_metadata answers 404): remove spec.mas or enable MAS in Synapse"
    )]
    NotDelegatingToMas,
}

impl From<BackendError> for Error {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Synapse(e) => Error::Synapse(e),
            BackendError::Mas(e) => Error::Mas(e),
        }
    }
}

impl From<SyncError> for Error {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Refused(r) => Error::Refused(r),
            SyncError::Synapse(s) => Error::Synapse(s),
            SyncError::Mas(m) => Error::Mas(m),
            SyncError::Unsupported(message) => Error::InvalidSpec(message),
            // The guard that halted keeps the reason; reaching this means
            // it kept none, which is a stale object at worst.
            SyncError::Halted => Error::Stale,
            e @ SyncError::NotSettling { .. } => Error::NotSettling(e.to_string()),
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
            Error::Refused(Refusal::AdminNotAllowed | Refusal::AdoptingAdmin { .. }) => "AdminNotAllowed",
            Error::Refused(Refusal::AdoptionNotRequested { .. } | Refusal::AdoptionNotAllowed { .. }) => {
                "AdoptionRefused"
            }
            Error::Refused(Refusal::ThreepidInUse { .. } | Refusal::ExternalIdInUse { .. }) => "Conflict",
            Error::DuplicateUser { .. } | Error::CredentialsSecretNotOwned { .. } => "Conflict",
            // A wrong registration shared secret (403 "HMAC incorrect"), or a
            // Synapse with shared-secret registration off.
            Error::Synapse(SynapseError::Api {
                endpoint: Endpoint::Register | Endpoint::RegisterNonce,
                status: 400 | 403,
                ..
            }) => "RegistrationRefused",
            Error::Synapse(e) => match e.class() {
                ErrorClass::Unauthorized => "Unauthorized",
                ErrorClass::Forbidden => "NotAdmin",
                ErrorClass::Conflict => "Conflict",
                ErrorClass::Transient if matches!(e, SynapseError::Transport { .. }) => "Unreachable",
                ErrorClass::NotSynapse => "NotSynapse",
                _ => "SynapseError",
            },
            Error::Mas(e) if e.is_password_refused() => "PasswordRejected",
            Error::Mas(e) => match e.class() {
                ErrorClass::Unauthorized => "Unauthorized",
                ErrorClass::Forbidden => "NotAdmin",
                ErrorClass::Conflict => "Conflict",
                ErrorClass::Transient if matches!(e, MasError::Transport { .. }) => "Unreachable",
                ErrorClass::NotSynapse => "NotMAS",
                ErrorClass::Invalid => "InvalidSpec",
                _ => "MASError",
            },
            Error::DelegatesToMas { .. } => "DelegatesToMAS",
            Error::NotDelegatingToMas => "NotDelegatingToMAS",
            Error::NotSettling(_) => "SynapseError",
            Error::ServerNameMismatch { .. } => "ServerNameMismatch",
            Error::NotAdmin { .. } => "NotAdmin",
            Error::NotSynapse { .. } => "NotSynapse",
            Error::Kube(_) | Error::Stale => "KubernetesError",
            Error::HomeserverInUse { .. } => "Deleting",
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
            Error::HomeserverNotReady { waiting: true, .. } => Standing::Reconciling,
            e if e.is_transient() => Standing::Reconciling,
            _ => Standing::Stalled,
        }
    }

    /// Worth retrying with backoff, as opposed to waiting for a change of
    /// the spec, a Secret or the Homeserver.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Synapse(e) => e.is_transient(),
            Error::Mas(e) => e.is_transient(),
            Error::NotSettling(_) | Error::Kube(_) | Error::Stale | Error::HomeserverInUse { .. } => true,
            _ => false,
        }
    }

    /// How long Synapse asked to wait, if it did.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Error::Synapse(e) => e.retry_after(),
            Error::Mas(e) => match e.class() {
                ErrorClass::RateLimited(d) => d,
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synapse::{BodySummary, Endpoint};

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
        for e in [Error::Synapse(page(404)), Error::Synapse(redirected)] {
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
    fn a_proxy_error_page_stays_a_transient_synapse_error() {
        let e = Error::Synapse(page(502));
        assert_eq!(e.reason(), "SynapseError");
        assert!(e.is_transient());
    }
}
