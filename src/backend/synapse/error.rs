use std::fmt;
use std::time::Duration;

use super::Endpoint;
pub use crate::backend::ErrorClass;

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
    /// Any other code, as Synapse sent it (scrubbed and cut short).
    Other(String),
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
        };
        f.write_str(s)
    }
}

/// What a body was, told without its content: it can echo the request, and
/// the request carries the token and maybe a password.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodySummary {
    /// The media type of the `Content-Type` header (parameters left out),
    /// scrubbed and cut short like any text of the answer.
    pub content_type: Option<String>,
    pub len: usize,
}

impl fmt::Display for BodySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let content_type = self.content_type.as_deref().unwrap_or("no content type");
        write!(f, "{content_type}, {} bytes", self.len)
    }
}

/// Why a 2xx body could not be read, in serde_json's categories: its
/// messages can quote the body ("invalid type: string \"…\"").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeProblem {
    NotJson,
    OtherShape,
    /// A value the operator would keep (the admin's user ID) that is not
    /// one: too long, not printable ASCII, or holding a secret.
    UnfitValue,
}

impl DecodeProblem {
    pub(crate) fn of(e: &serde_json::Error) -> Self {
        match e.classify() {
            serde_json::error::Category::Data => DecodeProblem::OtherShape,
            _ => DecodeProblem::NotJson,
        }
    }
}

impl fmt::Display for DecodeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DecodeProblem::NotJson => "not JSON",
            DecodeProblem::OtherShape => "JSON of another shape",
            DecodeProblem::UnfitValue => "a value that is not one (too long, unprintable or echoing a secret)",
        })
    }
}

/// A failed admin API call. The messages name the endpoint and what Synapse
/// said, scrubbed of the request's secret values and cut short; of any
/// other answer they tell only its status, content type and length (see
/// `scrub`). Request URLs are left out of transport errors.
#[derive(Debug, thiserror::Error)]
pub enum SynapseError {
    // The URL itself stays out: it may carry credentials.
    #[error("the homeserver URL cannot be used: {reason}")]
    InvalidUrl { reason: String },
    /// Shared-secret registration asked of a client given no secret.
    #[error("no registration shared secret was given")]
    NoRegistrationSecret,
    #[error(
        "{endpoint}: cannot reach the homeserver: {}",
        crate::tls::describe_transport(source)
    )]
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
    // Following one would re-send the token, and a 307/308 the body with
    // it, to wherever the Location points; it is left out for the same reason.
    #[error("{endpoint}: HTTP {status}, a redirect, which is not followed")]
    Redirected { endpoint: Endpoint, status: u16 },
    /// A non-2xx answer without a Matrix error body.
    #[error("{endpoint}: HTTP {status} without a Matrix error: {body}")]
    UnexpectedResponse {
        endpoint: Endpoint,
        status: u16,
        body: BodySummary,
    },
    /// An answer longer than the operator reads (a URL streaming without
    /// end, say).
    #[error(
        "{endpoint}: HTTP {status}: the server's answer exceeds {limit} MiB, the most the operator reads",
        limit = crate::backend::MAX_BODY_BYTES / (1024 * 1024)
    )]
    TooLarge { endpoint: Endpoint, status: u16 },
    /// A 2xx answer that does not decode as the endpoint's answer.
    #[error("{endpoint}: HTTP {status}, {problem}: {body}")]
    Undecodable {
        endpoint: Endpoint,
        status: u16,
        problem: DecodeProblem,
        body: BodySummary,
    },
}

impl SynapseError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SynapseError::InvalidUrl { .. } | SynapseError::NoRegistrationSecret => ErrorClass::Invalid,
            // Synapse's answers are far shorter: a proxy's or a server's
            // fault, perhaps passing.
            SynapseError::Transport { .. } | SynapseError::TooLarge { .. } => ErrorClass::Transient,
            SynapseError::Redirected { .. } => ErrorClass::NotSynapse,
            // A proxy's error page while Synapse restarts, or a rate limit
            // of whatever sits in front of it, passes.
            SynapseError::UnexpectedResponse { status, .. } if *status >= 500 => ErrorClass::Transient,
            SynapseError::UnexpectedResponse { status: 429, .. } => ErrorClass::RateLimited(None),
            SynapseError::UnexpectedResponse { .. } | SynapseError::Undecodable { .. } => ErrorClass::NotSynapse,
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

    fn unexpected(status: u16) -> SynapseError {
        SynapseError::UnexpectedResponse {
            endpoint: Endpoint::Whoami,
            status,
            body: BodySummary {
                content_type: Some("text/html".into()),
                len: 1234,
            },
        }
    }

    #[test]
    fn classes_of_answers_that_are_not_synapse_errors() {
        let cases = [
            (unexpected(502), ErrorClass::Transient),
            (unexpected(503), ErrorClass::Transient),
            (unexpected(429), ErrorClass::RateLimited(None)),
            (unexpected(200), ErrorClass::NotSynapse),
            (unexpected(400), ErrorClass::NotSynapse),
            (unexpected(404), ErrorClass::NotSynapse),
            (
                SynapseError::Redirected {
                    endpoint: Endpoint::PutUser,
                    status: 307,
                },
                ErrorClass::NotSynapse,
            ),
            (
                SynapseError::Undecodable {
                    endpoint: Endpoint::Whoami,
                    status: 200,
                    problem: DecodeProblem::NotJson,
                    body: BodySummary {
                        content_type: None,
                        len: 0,
                    },
                },
                ErrorClass::NotSynapse,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(e.class(), class, "{e}");
        }
        assert!(!unexpected(404).is_transient());
    }

    #[test]
    fn answers_are_described_not_quoted() {
        assert_eq!(
            unexpected(502).to_string(),
            "whoami: HTTP 502 without a Matrix error: text/html, 1234 bytes"
        );
        let e = SynapseError::Undecodable {
            endpoint: Endpoint::Whoami,
            status: 200,
            problem: DecodeProblem::OtherShape,
            body: BodySummary {
                content_type: None,
                len: 17,
            },
        };
        assert_eq!(
            e.to_string(),
            "whoami: HTTP 200, JSON of another shape: no content type, 17 bytes"
        );
    }

    #[test]
    fn decode_problems_do_not_quote_the_body() {
        // serde_json's own message would: `invalid type: string "hunter2"`.
        let e = serde_json::from_str::<bool>(r#""hunter2""#).unwrap_err();
        assert!(e.to_string().contains("hunter2"));
        assert_eq!(DecodeProblem::of(&e), DecodeProblem::OtherShape);
        let e = serde_json::from_str::<bool>("<html>hunter2").unwrap_err();
        assert_eq!(DecodeProblem::of(&e), DecodeProblem::NotJson);
        let e = serde_json::from_str::<bool>("").unwrap_err();
        assert_eq!(DecodeProblem::of(&e), DecodeProblem::NotJson);
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
