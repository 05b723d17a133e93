//! Shared helpers for the integration tests.
//!
//! Use from a test file with `mod common;` and then `common::synapse()`.
#![allow(dead_code)]

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

#[allow(unused_imports)] // not every test binary uses every item
pub use synapse::{SERVER_NAME, SYNAPSE_VERSION, SynapseServer, synapse};
