//! Homeserver reconcile: can the admin token reach and administer Synapse?

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, instrument, warn};

use super::{Context, Error, patch_status};
use crate::api::{Homeserver, Ready, set_condition};
use crate::synapse::{ErrorClass, SynapseError};

struct Checked {
    server_name: String,
    server_version: String,
    admin_user_id: String,
}

#[instrument(skip_all, fields(homeserver = %hs.name_any(), namespace = hs.namespace().unwrap_or_default()))]
pub async fn reconcile_homeserver(hs: Arc<Homeserver>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&hs, &ctx).await;
    let outcome = if result.is_ok() { "success" } else { "error" };
    ctx.metrics.reconciled("Homeserver", outcome, started.elapsed());
    result
}

async fn reconcile_inner(hs: &Arc<Homeserver>, ctx: &Context) -> Result<Action, Error> {
    let result = check(hs, ctx).await;
    let old = hs.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = hs.metadata.generation;
    let ready = match &result {
        Ok(c) => {
            status.server_name = Some(c.server_name.clone());
            status.server_version = Some(c.server_version.clone());
            status.admin_user_id = Some(c.admin_user_id.clone());
            Ready::ok(
                "Connected",
                format!("connected to {} ({})", c.server_name, c.server_version),
            )
        }
        Err(e) => Ready::not_ready(e.reason(), e.to_string()),
    };
    set_condition(
        &mut status.conditions,
        &ready,
        hs.metadata.generation,
        Time(k8s_openapi::jiff::Timestamp::now()),
    );
    if status != old {
        let api: Api<Homeserver> = Api::namespaced(ctx.client.clone(), &hs.namespace().unwrap_or_default());
        patch_status(&api, &hs.name_any(), &status).await?;
        match &result {
            Ok(_) => info!(reason = ready.reason, "homeserver ready"),
            Err(e) => warn!(reason = ready.reason, error = %e, "homeserver not ready"),
        }
    }
    match result {
        Ok(_) => {
            ctx.reset_backoff(hs.as_ref());
            Ok(ctx.resync())
        }
        Err(e) if e.is_transient() => Err(e),
        // A bad token or URL waits for a change of the spec or the Secret
        // (both watched), and is looked at again at the next resync.
        Err(_) => Ok(ctx.resync()),
    }
}

async fn check(hs: &Homeserver, ctx: &Context) -> Result<Checked, Error> {
    let client = ctx.synapse_client(hs).await?;
    let admin = client.whoami().await.map_err(checked)?;
    // The server name goes into status and messages: take it only if it
    // looks like one, never quoting what came instead.
    let server_name = admin
        .split_once(':')
        .map(|(_, s)| s.to_string())
        .filter(|s| is_server_name(s))
        .ok_or_else(|| Error::NotSynapse {
            answer: "whoami: a user ID without a valid server name".into(),
        })?;
    if let Some(expected) = &hs.spec.server_name
        && *expected != server_name
    {
        return Err(Error::ServerNameMismatch {
            expected: expected.clone(),
            actual: server_name,
        });
    }
    let server_version = client.server_version().await.map_err(checked)?;
    // Any admin endpoint tells an admin token from a user's.
    match client.get_user_raw(&admin).await {
        Ok(_) => {}
        Err(e) if e.class() == ErrorClass::Forbidden => {
            return Err(Error::NotAdmin { user_id: admin });
        }
        Err(e) => return Err(checked(e)),
    }
    Ok(Checked {
        server_name,
        server_version,
        admin_user_id: admin,
    })
}

/// An error of the check, saying so when the answer shows that spec.url is
/// not a Synapse at all.
fn checked(e: SynapseError) -> Error {
    match e.class() {
        ErrorClass::NotSynapse => Error::NotSynapse { answer: e.to_string() },
        _ => e.into(),
    }
}

/// A DNS name, IPv4 or bracketed IPv6 address, with an optional port: the
/// characters of a Matrix server name, at most 255 bytes.
fn is_server_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

pub fn error_policy(hs: Arc<Homeserver>, error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff(hs.as_ref(), error))
}

/// The status a Homeserver must show before its MatrixUsers are reconciled.
/// What MatrixUsers need of a ready Homeserver.
pub struct ReadyStatus {
    pub server_name: String,
    /// The admin token's user, which MatrixUsers may not manage.
    pub admin_user_id: Option<String>,
}

/// The Homeserver's status, if it says the current spec was checked and
/// works. A status of an older spec (say, another URL) does not count: it
/// describes another server, maybe with other accounts of the same names.
pub fn ready_status(hs: &Homeserver) -> Result<ReadyStatus, String> {
    let Some(status) = hs.status.as_ref() else {
        return Err("not checked yet".into());
    };
    if status.observed_generation != hs.metadata.generation {
        return Err("not checked since its spec changed".into());
    }
    match crate::api::ready_condition(&status.conditions) {
        Some(c) if c.status == "True" => Ok(ReadyStatus {
            server_name: status.server_name.clone().ok_or("no server name yet")?,
            admin_user_id: status.admin_user_id.clone(),
        }),
        Some(c) => Err(format!("{}: {}", c.reason, c.message)),
        None => Err("not checked yet".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for ok in [
            "example.org",
            "matrix.example.org:8448",
            "127.0.0.1:8008",
            "[::1]:8448",
            "localhost",
        ] {
            assert!(is_server_name(ok), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "exa mple.org",
            "<html>",
            "example.org/path",
            "ex\nample",
            long.as_str(),
        ] {
            assert!(!is_server_name(bad), "{bad:?}");
        }
    }
}
