//! A typed client of Synapse's admin API.

mod client;
mod error;
mod types;

pub use client::{ClientConfig, PutOutcome, RequestObserver, SynapseClient};
pub use error::{ErrCode, ErrorClass, SynapseError};
pub use types::{Endpoint, ExternalId, InvalidUserId, SynapseUser, Threepid, UserId, UserUpdate, validate_localpart};
