//! Homeserver reconcile: can the admin token reach and administer Synapse?

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, instrument, warn};

use super::{Context, Error, Need, SKIP_CLEANUP, patch_status, secrets};
use crate::api::{Homeserver, HomeserverStatus, MatrixUser, Ready, set_condition};
use crate::backend::ErrorClass;
use crate::synapse::SynapseError;

struct Checked {
    server_name: String,
    server_version: String,
    admin_user_id: String,
    /// MAS's version, with `spec.mas`.
    mas_version: Option<String>,
}

/// Put on every Homeserver: it stays until the MatrixUsers that use it are
/// gone, so their deletion policies can still reach Synapse when the whole
/// namespace is deleted.
pub const HOMESERVER_FINALIZER: &str = "matrix-operator.io/cleanup";

#[instrument(skip_all, fields(homeserver = %hs.name_any(), namespace = hs.namespace().unwrap_or_default()))]
pub async fn reconcile_homeserver(hs: Arc<Homeserver>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let api: Api<Homeserver> = Api::namespaced(ctx.client.clone(), &hs.namespace().unwrap_or_default());
    let result = finalizer(&api, HOMESERVER_FINALIZER, hs, |event| async {
        match event {
            Finalizer::Apply(hs) => reconcile_inner(&hs, &ctx).await,
            Finalizer::Cleanup(hs) => cleanup(&hs, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    let outcome = if result.is_ok() { "success" } else { "error" };
    ctx.metrics.reconciled("Homeserver", outcome, started.elapsed());
    result
}

async fn reconcile_inner(hs: &Arc<Homeserver>, ctx: &Context) -> Result<Action, Error> {
    super::transport::warn_of_plain_http(ctx, hs).await;
    let (result, status) = check_and_record(hs, ctx, true).await?;
    match result {
        Ok(()) => {
            super::accounts::refresh(ctx, hs, &status).await;
            ctx.reset_backoff(hs.as_ref());
            Ok(ctx.resync(hs.as_ref()))
        }
        Err(e) if e.is_transient() => Err(e),
        // A bad token or URL waits for a change of the spec or the Secret
        // (both watched), and is looked at again at the next resync.
        Err(_) => Ok(ctx.resync(hs.as_ref())),
    }
}

/// Checks the token against Synapse and records the outcome in status;
/// with `hold`, also holds the admin token Secret. The outer error is the
/// recording's, the inner one the check's; with it, the status as written.
async fn check_and_record(
    hs: &Homeserver,
    ctx: &Context,
    hold: bool,
) -> Result<(Result<(), Error>, HomeserverStatus), Error> {
    let result = check(hs, ctx).await;
    let old = hs.status.clone().unwrap_or_default();
    let mut status = old.clone();
    status.observed_generation = hs.metadata.generation;
    let ready = match &result {
        Ok(c) => {
            status.server_name = Some(c.server_name.clone());
            status.server_version = Some(c.server_version.clone());
            status.admin_user_id = Some(c.admin_user_id.clone());
            status.backend = Some(if c.mas_version.is_some() { "MAS" } else { "Synapse" }.into());
            status.mas_version = c.mas_version.clone();
            let mas = c.mas_version.as_ref().map(|v| format!(", accounts in MAS {v}"));
            Ready::ok(
                "Connected",
                format!(
                    "connected to {} ({}){}",
                    c.server_name,
                    c.server_version,
                    mas.unwrap_or_default()
                ),
            )
        }
        Err(e) => e.condition(e.to_string()),
    };
    // The token Secret is held only once it is known to exist.
    if hold
        && !matches!(
            result,
            Err(Error::SecretNotFound { .. } | Error::SecretKeyMissing { .. })
        )
    {
        let admin_token = hs.spec.admin_token_secret_ref.name.clone();
        status.held_secret = Some(hold_secret(ctx, hs, admin_token, old.held_secret.as_deref()).await?);
        let mas_secret = hs.spec.mas.as_ref().map(|m| m.client_secret_ref.name.clone());
        status.held_mas_secret = match mas_secret {
            Some(name) => Some(hold_secret(ctx, hs, name, old.held_mas_secret.as_deref()).await?),
            None => {
                if let Some(before) = old.held_mas_secret.as_deref() {
                    release_secret(ctx, hs, before).await?;
                }
                None
            }
        };
    }
    let status = record(ctx, hs, &old, status, &ready).await?;
    Ok((result.map(|_| ()), status))
}

/// Writes the status when it changed; returns it.
async fn record(
    ctx: &Context,
    hs: &Homeserver,
    old: &HomeserverStatus,
    mut status: HomeserverStatus,
    ready: &Ready,
) -> Result<HomeserverStatus, Error> {
    set_condition(&mut status.conditions, ready, hs.metadata.generation, now());
    if status != *old {
        let api: Api<Homeserver> = Api::namespaced(ctx.client.clone(), &hs.namespace().unwrap_or_default());
        patch_status(&api, &hs.name_any(), &status).await?;
        if ready.is_ready() {
            info!("homeserver ready");
        } else {
            warn!(reason = ready.reason, message = %ready.message, "homeserver not ready");
        }
    }
    Ok(status)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Puts the finalizer on a Secret the Homeserver reads (its admin token,
/// its MAS client's secret), so that deleting the namespace leaves it
/// readable until the MatrixUsers' deletion policies ran, and releases the
/// one held before in its place if the spec now names another. Returns the
/// name of the Secret held.
async fn hold_secret(ctx: &Context, hs: &Homeserver, name: String, held_before: Option<&str>) -> Result<String, Error> {
    let ns = hs.namespace().unwrap_or_default();
    // The watch's copy already carrying the finalizer: nothing to ask.
    let held = ctx.secret_cache(&ns).is_some_and(|c| c.is_held(&ns, &name));
    if !held {
        secrets::hold(&ctx.client, &ns, &name).await?;
    }
    // Still read by this Homeserver in its other role: kept.
    if let Some(before) = held_before.filter(|b| *b != name && !hs.spec.uses_secret(b)) {
        release_secret(ctx, hs, before).await?;
    }
    Ok(name)
}

/// Releases the Secret `name` unless another Homeserver of the namespace
/// that is not being deleted still uses it.
async fn release_secret(ctx: &Context, hs: &Homeserver, name: &str) -> Result<(), Error> {
    let ns = hs.namespace().unwrap_or_default();
    let api: Api<Homeserver> = Api::namespaced(ctx.client.clone(), &ns);
    let still_used = api.list(&ListParams::default()).await?.items.iter().any(|other| {
        other.uid() != hs.uid() && other.meta().deletion_timestamp.is_none() && other.spec.uses_secret(name)
    });
    if !still_used {
        secrets::release(&ctx.client, &ns, name).await?;
    }
    Ok(())
}

/// A Homeserver being deleted: it goes once no MatrixUser uses it, or at
/// once with `skip-cleanup: "true"` (its MatrixUsers then let go without
/// their deletion policy).
async fn cleanup(hs: &Arc<Homeserver>, ctx: &Context) -> Result<Action, Error> {
    let ns = hs.namespace().unwrap_or_default();
    if hs.annotations().get(SKIP_CLEANUP).map(String::as_str) != Some("true") {
        let users: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &ns);
        let waiting = users
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|u| u.spec.homeserver_ref.name == hs.name_any())
            .count()
            + tokens_of(ctx, &ns, &hs.name_any()).await?;
        if waiting > 0 {
            // Marking it for deletion moved its generation; a status of an
            // older spec would hold its MatrixUsers off for good.
            if ready_status(hs).is_err() {
                check_and_record(hs, ctx, false).await?.0.ok();
            }
            // An error keeps the finalizer (kube's helper removes it on any
            // Ok); the status stays as it is, since the MatrixUsers' cleanup
            // reads its Ready. Each MatrixUser that goes triggers a recheck.
            info!(
                waiting,
                "deletion waits for the MatrixUsers that use this Homeserver (annotate it with {SKIP_CLEANUP}: \"true\" to let them go without their deletion policy)"
            );
            return Err(Error::HomeserverInUse { users: waiting });
        }
    }
    // The Secret the status names, and the one the spec names (held, maybe,
    // by a pass whose status write failed).
    let mut held: Vec<String> = hs
        .status
        .iter()
        .flat_map(|s| [s.held_secret.clone(), s.held_mas_secret.clone()])
        .flatten()
        .collect();
    held.push(hs.spec.admin_token_secret_ref.name.clone());
    held.extend(hs.spec.mas.iter().map(|m| m.client_secret_ref.name.clone()));
    held.sort();
    held.dedup();
    for name in held {
        release_secret(ctx, hs, &name).await?;
    }
    ctx.forget_homeserver(&ns, &hs.name_any());
    ctx.account_counts.forget(&ns, &hs.name_any());
    ctx.metrics.homeserver_accounts(&ns, &hs.name_any(), None);
    info!("homeserver deleted");
    Ok(Action::await_change())
}

async fn check(hs: &Homeserver, ctx: &Context) -> Result<Checked, Error> {
    let client = ctx.synapse_client(hs, Need::Registration).await?;
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
    // A Synapse that delegates to MAS takes its admin API's writes of
    // accounts it cannot own (or refuses them): managing them through it
    // would half-work.
    let issuer = client.auth_metadata_issuer().await.map_err(checked)?;
    let mas_version = match (ctx.mas_client(hs).await?, issuer) {
        (None, Some(issuer)) => return Err(Error::DelegatesToMas { issuer }),
        (Some(_), None) => return Err(Error::NotDelegatingToMas),
        (Some(mas), Some(_)) => Some(mas.version().await?),
        (None, None) => None,
    };
    Ok(Checked {
        server_name,
        server_version,
        admin_user_id: admin,
        mas_version,
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

/// What MatrixUsers need of a ready Homeserver.
pub struct ReadyStatus {
    pub server_name: String,
    /// The admin token's user, which MatrixUsers may not manage.
    pub admin_user_id: Option<String>,
}

/// Why a Homeserver is not ready for its MatrixUsers.
pub struct NotReady {
    pub message: String,
    /// It is being checked, or retried after a transient error: wait for
    /// it rather than report a failure.
    pub waiting: bool,
}

/// Ready reasons of Homeservers written before the `Stalled` condition
/// existed that mean "retrying".
const RETRIED_REASONS: [&str; 3] = ["Unreachable", "SynapseError", "KubernetesError"];

/// The Homeserver's status, if it says the current spec was checked and
/// works. A status of an older spec (say, another URL) does not count: it
/// describes another server, maybe with other accounts of the same names.
pub fn ready_status(hs: &Homeserver) -> Result<ReadyStatus, NotReady> {
    let waiting = |message: &str| NotReady {
        message: message.into(),
        waiting: true,
    };
    let Some(status) = hs.status.as_ref() else {
        return Err(waiting("not checked yet"));
    };
    // Marking an object with finalizers for deletion bumps its generation
    // (the apiserver's markAsDeleting): a Homeserver being deleted whose
    // status is of the generation just before still describes its spec.
    let deletion_bump = i64::from(hs.meta().deletion_timestamp.is_some());
    let checked = status
        .observed_generation
        .zip(hs.metadata.generation)
        .is_some_and(|(observed, generation)| observed == generation || observed + deletion_bump == generation);
    if !checked {
        return Err(waiting("not checked since its spec changed"));
    }
    match crate::api::ready_condition(&status.conditions) {
        Some(c) if c.status == "True" => Ok(ReadyStatus {
            server_name: status
                .server_name
                .clone()
                .ok_or_else(|| waiting("no server name yet"))?,
            admin_user_id: status.admin_user_id.clone(),
        }),
        Some(c) => Err(NotReady {
            message: format!("{}: {}", c.reason, c.message),
            waiting: match crate::api::condition(&status.conditions, crate::api::STALLED) {
                Some(stalled) => stalled.status != "True",
                None => RETRIED_REASONS.contains(&c.reason.as_str()),
            },
        }),
        None => Err(waiting("not checked yet")),
    }
}

/// The MatrixAccessTokens of the namespace whose tokens this Homeserver
/// issued: revoking them (MAS's personal sessions above all) needs it.
async fn tokens_of(ctx: &Context, namespace: &str, name: &str) -> Result<usize, Error> {
    let tokens: Api<crate::api::MatrixAccessToken> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(tokens
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|t| t.status.as_ref().and_then(|s| s.homeserver.as_deref()) == Some(name))
        .count())
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
