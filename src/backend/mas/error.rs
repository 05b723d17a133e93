use std::fmt;

use crate::backend::ErrorClass;
use crate::synapse::{BodySummary, DecodeProblem};

/// The MAS calls the operator makes: a closed set, for errors and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MasEndpoint {
    Token,
    Version,
    GetUser,
    ListUsers,
    CreateUser,
    SetPassword,
    Lock,
    Unlock,
    Deactivate,
    Reactivate,
    SetAdmin,
    ListEmails,
    AddEmail,
    DeleteEmail,
    ListLinks,
    AddLink,
    DeleteLink,
    ListProviders,
    ListSessions,
    FinishSession,
    CreatePersonalSession,
    GetPersonalSession,
    RevokePersonalSession,
}

impl MasEndpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            MasEndpoint::Token => "mas_token",
            MasEndpoint::Version => "mas_version",
            MasEndpoint::GetUser => "mas_get_user",
            MasEndpoint::ListUsers => "mas_list_users",
            MasEndpoint::CreateUser => "mas_create_user",
            MasEndpoint::SetPassword => "mas_set_password",
            MasEndpoint::Lock => "mas_lock",
            MasEndpoint::Unlock => "mas_unlock",
            MasEndpoint::Deactivate => "mas_deactivate",
            MasEndpoint::Reactivate => "mas_reactivate",
            MasEndpoint::SetAdmin => "mas_set_admin",
            MasEndpoint::ListEmails => "mas_list_emails",
            MasEndpoint::AddEmail => "mas_add_email",
            MasEndpoint::DeleteEmail => "mas_delete_email",
            MasEndpoint::ListLinks => "mas_list_links",
            MasEndpoint::AddLink => "mas_add_link",
            MasEndpoint::DeleteLink => "mas_delete_link",
            MasEndpoint::ListProviders => "mas_list_providers",
            MasEndpoint::ListSessions => "mas_list_sessions",
            MasEndpoint::FinishSession => "mas_finish_session",
            MasEndpoint::CreatePersonalSession => "mas_create_personal_session",
            MasEndpoint::GetPersonalSession => "mas_get_personal_session",
            MasEndpoint::RevokePersonalSession => "mas_revoke_personal_session",
        }
    }
}

impl fmt::Display for MasEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed MAS call. Like Synapse's errors, it keeps no more of an answer
/// than MAS's own error title (scrubbed of the request's secrets and cut
/// short), or the answer's status, media type and length.
#[derive(Debug, thiserror::Error)]
pub enum MasError {
    #[error("the MAS URL cannot be used: {reason}")]
    InvalidUrl { reason: String },
    #[error("{endpoint}: cannot reach MAS: {}", crate::tls::describe_transport(source))]
    Transport {
        endpoint: MasEndpoint,
        #[source]
        source: reqwest::Error,
    },
    /// An error of the admin API (`{errors: [{title}]}`).
    #[error("{endpoint}: HTTP {status}: {title}")]
    Api {
        endpoint: MasEndpoint,
        status: u16,
        title: String,
    },
    /// An OAuth 2.0 error of the token endpoint (`{error}`).
    #[error("{endpoint}: HTTP {status}: {error}")]
    OAuth {
        endpoint: MasEndpoint,
        status: u16,
        error: String,
    },
    #[error("{endpoint}: HTTP {status}, a redirect, which is not followed")]
    Redirected { endpoint: MasEndpoint, status: u16 },
    #[error("{endpoint}: HTTP {status} without a MAS error: {body}")]
    UnexpectedResponse {
        endpoint: MasEndpoint,
        status: u16,
        body: BodySummary,
    },
    /// An answer longer than the operator reads.
    #[error(
        "{endpoint}: HTTP {status}: the server's answer exceeds {limit} MiB, the most the operator reads",
        limit = crate::backend::MAX_BODY_BYTES / (1024 * 1024)
    )]
    TooLarge { endpoint: MasEndpoint, status: u16 },
    /// A listing whose pages do not end: its cursor does not move, or it
    /// goes on past what the operator pages through.
    #[error("{endpoint}: {problem}")]
    EndlessListing {
        endpoint: MasEndpoint,
        problem: &'static str,
    },
    #[error("{endpoint}: HTTP {status}, {problem}: {body}")]
    Undecodable {
        endpoint: MasEndpoint,
        status: u16,
        problem: DecodeProblem,
        body: BodySummary,
    },
    /// MAS has the account and Synapse does not (yet): MAS provisions
    /// Synapse after its own write.
    #[error("{user_id} exists in MAS but not (yet) in Synapse")]
    NotProvisioned { user_id: String },
}

impl MasError {
    pub fn class(&self) -> ErrorClass {
        match self {
            MasError::InvalidUrl { .. } => ErrorClass::Invalid,
            MasError::Transport { .. }
            | MasError::NotProvisioned { .. }
            | MasError::TooLarge { .. }
            | MasError::EndlessListing { .. } => ErrorClass::Transient,
            MasError::Redirected { .. } => ErrorClass::NotSynapse,
            MasError::UnexpectedResponse { status, .. } if *status >= 500 => ErrorClass::Transient,
            MasError::UnexpectedResponse { status: 429, .. } => ErrorClass::RateLimited(None),
            // A malformed body is answered in plain text with 422.
            MasError::UnexpectedResponse { status: 422, .. } => ErrorClass::Invalid,
            MasError::UnexpectedResponse { .. } | MasError::Undecodable { .. } => ErrorClass::NotSynapse,
            MasError::OAuth { error, status, .. } => match error.as_str() {
                "invalid_client" | "unauthorized_client" => ErrorClass::Unauthorized,
                "invalid_scope" | "access_denied" => ErrorClass::Forbidden,
                _ if *status >= 500 => ErrorClass::Transient,
                _ => ErrorClass::Invalid,
            },
            MasError::Api { status, .. } => match *status {
                401 => ErrorClass::Unauthorized,
                403 => ErrorClass::Forbidden,
                404 => ErrorClass::NotFound,
                409 => ErrorClass::Conflict,
                429 => ErrorClass::RateLimited(None),
                s if s >= 500 => ErrorClass::Transient,
                _ => ErrorClass::Invalid,
            },
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self.class(), ErrorClass::Transient | ErrorClass::RateLimited(_))
    }

    /// MAS answered with an error of its own of the 4xx kind.
    pub fn is_refusal(&self) -> bool {
        matches!(self, MasError::Api { status: 400..=499, .. })
    }

    /// MAS's password policy refused the password.
    pub fn is_password_refused(&self) -> bool {
        matches!(
            self,
            MasError::Api {
                endpoint: MasEndpoint::SetPassword,
                status: 400,
                ..
            }
        )
    }
}
