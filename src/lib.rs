//! matrix-user-operator: keeps Matrix accounts on a homeserver in line with
//! `MatrixUser` resources. Accounts live in Synapse, or in the Matrix
//! Authentication Service (MAS) when the homeserver delegates to it: the
//! plan is neutral, [`backend`] holds one module per kind.

pub mod account;
pub mod api;
pub mod apply;
pub mod backend;
pub mod controller;
pub mod health;
pub mod import;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod preview;
pub mod secret;
pub mod tls;

pub use backend::synapse;
