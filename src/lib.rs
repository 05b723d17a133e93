//! matrix-user-operator: keeps Matrix accounts on a Synapse homeserver in line
//! with `MatrixUser` resources.

pub mod api;
pub mod apply;
pub mod controller;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod secret;
pub mod synapse;
pub mod tls;
