//! The Synapse backend: a typed client of Synapse's admin API, and the
//! account changes made as its user PUTs.

mod account;
mod client;
mod error;
mod listing;
mod rooms;
mod tokens;
mod types;

pub use crate::backend::RequestObserver;
pub use account::user_update;
pub use client::{ClientConfig, PutOutcome, Registration, SynapseClient};
pub(crate) use client::{MAX_CODE_BYTES, MAX_MESSAGE_BYTES, summary};
pub use error::{BodySummary, DecodeProblem, ErrCode, ErrorClass, SynapseError};
pub use listing::{ListedUser, UsersPage};
pub use tokens::{DeviceLogin, Logout, TokenOwner};
pub use types::{Endpoint, ExternalId, InvalidUserId, SynapseUser, Threepid, UserId, UserUpdate, validate_localpart};
