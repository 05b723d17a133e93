//! A typed client of Synapse's admin API.

mod client;
mod error;
mod scrub;
mod types;

pub use client::{ClientConfig, PutOutcome, RequestObserver, SynapseClient};
pub use error::{BodySummary, DecodeProblem, ErrCode, ErrorClass, SynapseError};
pub use types::{Endpoint, ExternalId, InvalidUserId, SynapseUser, Threepid, UserId, UserUpdate, validate_localpart};
