use std::fmt;
use std::time::Duration;

use super::Endpoint;

/// A Matrix error code (`errcode`) the operator tells apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ErrCode {
    NotFound,
    LimitExceeded,
    UnknownToken,
    MissingToken,
    Forbidden,
    UserLocked,
    InvalidParam,
    MissingParam,
    BadJson,
    NotJson,
    InvalidUsername,
    UserInUse,
    ThreepidInUse,
    Unknown,
    /// Any other code, as Synapse sent it.
    Other(String),
    /// The response carried no Matrix error body.
    None,
}

impl ErrCode {
    pub fn parse(code: &str) -> Self {
        match code {
            "M_NOT_FOUND" => ErrCode::NotFound,
            "M_LIMIT_EXCEEDED" => ErrCode::LimitExceeded,
            "M_UNKNOWN_TOKEN" => ErrCode::UnknownToken,
            "M_MISSING_TOKEN" => ErrCode::MissingToken,
            "M_FORBIDDEN" => ErrCode::Forbidden,
            "M_USER_LOCKED" => ErrCode::UserLocked,
            "M_INVALID_PARAM" => ErrCode::InvalidParam,
            "M_MISSING_PARAM" => ErrCode::MissingParam,
            "M_BAD_JSON" => ErrCode::BadJson,
            "M_NOT_JSON" => ErrCode::NotJson,
            "M_INVALID_USERNAME" => ErrCode::InvalidUsername,
            "M_USER_IN_USE" => ErrCode::UserInUse,
            "M_THREEPID_IN_USE" => ErrCode::ThreepidInUse,
            "M_UNKNOWN" => ErrCode::Unknown,
            other => ErrCode::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ErrCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            ErrCode::NotFound => "M_NOT_FOUND",
            ErrCode::LimitExceeded => "M_LIMIT_EXCEEDED",
            ErrCode::UnknownToken => "M_UNKNOWN_TOKEN",
            ErrCode::MissingToken => "M_MISSING_TOKEN",
            ErrCode::Forbidden => "M_FORBIDDEN",
            ErrCode::UserLocked => "M_USER_LOCKED",
            ErrCode::InvalidParam => "M_INVALID_PARAM",
            ErrCode::MissingParam => "M_MISSING_PARAM",
            ErrCode::BadJson => "M_BAD_JSON",
            ErrCode::NotJson => "M_NOT_JSON",
            ErrCode::InvalidUsername => "M_INVALID_USERNAME",
            ErrCode::UserInUse => "M_USER_IN_USE",
            ErrCode::ThreepidInUse => "M_THREEPID_IN_USE",
            ErrCode::Unknown => "M_UNKNOWN",
            ErrCode::Other(s) => s,
            ErrCode::None => "no errcode",
        };
        f.write_str(s)
    }
}

/// What a failed admin call means for whoever made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Try again later: the network, a timeout, a 5xx, a race.
    Transient,
    /// Try again after the given wait (M_LIMIT_EXCEEDED).
    RateLimited(Option<Duration>),
    /// The admin token is missing or not valid: wait for a new Secret.
    Unauthorized,
    /// The token is valid but may not do this (not a server admin).
    Forbidden,
    /// Something belongs to another account (an external id, a threepid).
    Conflict,
    /// Synapse rejected the request as it is: wait for a spec change.
    Invalid,
    /// The account (or the looked-up thing) does not exist.
    NotFound,
}

/// A failed admin API call. The messages name the endpoint and what Synapse
/// said; they never hold the token or a password (Synapse does not echo them
/// and request URLs are left out of transport errors).
#[derive(Debug, thiserror::Error)]
pub enum SynapseError {
    // The URL itself stays out: it may carry credentials.
    #[error("the homeserver URL cannot be used: {reason}")]
    InvalidUrl { reason: String },
    #[error("{endpoint}: cannot reach the homeserver: {source}")]
    Transport {
        endpoint: Endpoint,
        #[source]
        source: reqwest::Error,
    },
    #[error("{endpoint}: HTTP {status} {errcode}: {message}")]
    Api {
        endpoint: Endpoint,
        status: u16,
        errcode: ErrCode,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{endpoint}: unexpected response (HTTP {status}): {detail}")]
    UnexpectedResponse {
        endpoint: Endpoint,
        status: u16,
        detail: String,
    },
}

impl SynapseError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SynapseError::InvalidUrl { .. } => ErrorClass::Invalid,
            SynapseError::Transport { .. } => ErrorClass::Transient,
            SynapseError::UnexpectedResponse { status, .. } if *status >= 500 => ErrorClass::Transient,
            SynapseError::UnexpectedResponse { .. } => ErrorClass::Invalid,
            SynapseError::Api {
                status,
                errcode,
                retry_after,
                ..
            } => match (errcode, *status) {
                (ErrCode::LimitExceeded, _) | (_, 429) => ErrorClass::RateLimited(*retry_after),
                (ErrCode::UnknownToken | ErrCode::MissingToken, _) | (_, 401) => ErrorClass::Unauthorized,
                (ErrCode::ThreepidInUse, _) | (_, 409) => ErrorClass::Conflict,
                // Two creates of one user raced; reading the account again settles it.
                (ErrCode::UserInUse, _) => ErrorClass::Transient,
                (ErrCode::Forbidden, _) | (_, 403) => ErrorClass::Forbidden,
                (ErrCode::NotFound, _) | (_, 404) => ErrorClass::NotFound,
                (_, s) if s >= 500 => ErrorClass::Transient,
                _ => ErrorClass::Invalid,
            },
        }
    }

    /// Whether the same call may succeed later with no change on our side.
    pub fn is_transient(&self) -> bool {
        matches!(self.class(), ErrorClass::Transient | ErrorClass::RateLimited(_))
    }

    /// How long Synapse asked us to wait, for a rate-limited call.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.class() {
            ErrorClass::RateLimited(d) => d,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, errcode: &str) -> SynapseError {
        SynapseError::Api {
            endpoint: Endpoint::PutUser,
            status,
            errcode: ErrCode::parse(errcode),
            message: String::new(),
            retry_after: None,
        }
    }

    #[test]
    fn classes_of_the_errors_synapse_sends() {
        let cases = [
            (429, "M_LIMIT_EXCEEDED", ErrorClass::RateLimited(None)),
            (401, "M_UNKNOWN_TOKEN", ErrorClass::Unauthorized),
            (401, "M_MISSING_TOKEN", ErrorClass::Unauthorized),
            (403, "M_FORBIDDEN", ErrorClass::Forbidden),
            (404, "M_NOT_FOUND", ErrorClass::NotFound),
            (409, "M_UNKNOWN", ErrorClass::Conflict),
            (400, "M_THREEPID_IN_USE", ErrorClass::Conflict),
            (400, "M_USER_IN_USE", ErrorClass::Transient),
            (400, "M_INVALID_PARAM", ErrorClass::Invalid),
            (400, "M_BAD_JSON", ErrorClass::Invalid),
            (400, "M_NOT_JSON", ErrorClass::Invalid),
            (400, "M_MISSING_PARAM", ErrorClass::Invalid),
            (400, "M_INVALID_USERNAME", ErrorClass::Invalid),
            (500, "M_UNKNOWN", ErrorClass::Transient),
            (502, "", ErrorClass::Transient),
        ];
        for (status, code, class) in cases {
            assert_eq!(api(status, code).class(), class, "{status} {code}");
        }
    }

    #[test]
    fn only_transient_and_rate_limited_are_retried() {
        assert!(api(429, "M_LIMIT_EXCEEDED").is_transient());
        assert!(api(503, "M_UNKNOWN").is_transient());
        assert!(!api(400, "M_INVALID_PARAM").is_transient());
        assert!(!api(401, "M_UNKNOWN_TOKEN").is_transient());
        assert!(!api(409, "M_UNKNOWN").is_transient());
    }

    #[test]
    fn retry_after_comes_from_rate_limits_only() {
        let e = SynapseError::Api {
            endpoint: Endpoint::PutUser,
            status: 429,
            errcode: ErrCode::LimitExceeded,
            message: "Too Many Requests".into(),
            retry_after: Some(Duration::from_millis(1500)),
        };
        assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
        assert_eq!(api(400, "M_INVALID_PARAM").retry_after(), None);
        assert_eq!(e.to_string(), "put_user: HTTP 429 M_LIMIT_EXCEEDED: Too Many Requests");
    }
}
