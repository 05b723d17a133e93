//! The test kit of the operator's integration tests and benches.
//!
//! Use from a test file with `use matrix_user_operator_testkit as common;` and then `common::synapse()`.

pub mod appservice;
pub mod deploy_checks;
pub mod fake_kube;
pub mod fixtures;
pub mod helm;
pub mod mas;
pub mod mas_scenarios;
pub mod proxy;
pub mod synapse;
pub mod token_scenarios;
pub mod venv;

pub use synapse::{SERVER_NAME, SYNAPSE_VERSION, SynapseServer, synapse};
