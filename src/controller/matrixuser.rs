//! MatrixUser reconcile: resolve → desired state → sync with Synapse →
//! status and Events; and the finalizer that applies the deletion policy.

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, Event as Finalizer, finalizer};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, instrument, warn};

use super::homeserver::ready_status;
use super::{Context, Error, patch_status, secrets};
use crate::api::{DeletionPolicy, Homeserver, HomeserverPolicy, MatrixUser, MatrixUserStatus, Ready, set_condition};
use crate::apply::{Progress, delete_account, sync_account};
use crate::plan::{Authority, DeletionAction, DesiredPassword, desired_from_spec, validate_threepid};
use crate::secret::{SecretString, digest_matches, password_digest};
use crate::synapse::{SynapseClient, UserId};

/// Put on every MatrixUser so its deletion policy runs before it goes.
pub const FINALIZER: &str = "matrix-operator.io/cleanup";

/// An annotation that lets a MatrixUser go without applying its deletion
/// policy: the way out when the homeserver can never be reached again.
pub const SKIP_CLEANUP: &str = "matrix-operator.io/skip-cleanup";

/// Synapse refuses longer passwords ("Invalid password").
const MAX_PASSWORD_LEN: usize = 512;

#[instrument(skip_all, fields(user = %user.name_any(), namespace = user.namespace().unwrap_or_default()))]
pub async fn reconcile_user(user: Arc<MatrixUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_user_inner(user, &ctx).await;
    let outcome = if result.is_ok() { "success" } else { "error" };
    ctx.metrics.reconciled("MatrixUser", outcome, started.elapsed());
    result
}

async fn reconcile_user_inner(user: Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, user, |event| async {
        match event {
            Finalizer::Apply(user) => apply(user, ctx).await,
            Finalizer::Cleanup(user) => cleanup(user, ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => Error::Kube(e),
        other => Error::InvalidSpec(other.to_string()),
    })
}

pub fn error_policy(user: Arc<MatrixUser>, error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff(user.as_ref(), error))
}

/// A Homeserver that is ready, with its admin client.
struct ReadyHomeserver {
    server_name: String,
    admin_user_id: Option<String>,
    url: String,
    policy: HomeserverPolicy,
    client: SynapseClient,
}

async fn ready_homeserver(ctx: &Context, user: &MatrixUser) -> Result<ReadyHomeserver, Error> {
    let ns = user.namespace().unwrap_or_default();
    let name = &user.spec.homeserver_ref.name;
    let api: Api<Homeserver> = Api::namespaced(ctx.client.clone(), &ns);
    let hs = api
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::HomeserverNotFound { name: name.clone() })?;
    let ready = ready_status(&hs).map_err(|message| Error::HomeserverNotReady {
        name: name.clone(),
        message,
    })?;
    let client = ctx.synapse_client(&hs).await?;
    Ok(ReadyHomeserver {
        server_name: ready.server_name,
        admin_user_id: ready.admin_user_id,
        url: hs.spec.url.clone(),
        policy: hs.spec.policy.clone(),
        client,
    })
}

/// What a sync found out, kept whether it succeeded or not.
#[derive(Default)]
struct Outcome {
    user_id: Option<UserId>,
    owned: bool,
    progress: Progress,
    password_digest: Option<String>,
    generated_secret: Option<String>,
}

async fn apply(user: Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    let old = user.status.clone().unwrap_or_default();
    let mut outcome = Outcome {
        password_digest: old.password_digest.clone(),
        ..Outcome::default()
    };
    let result = sync(&user, ctx, &old, &mut outcome).await;

    let mut status = old.clone();
    status.observed_generation = user.metadata.generation;
    if outcome.owned
        && let Some(id) = &outcome.user_id
    {
        status.user_id = Some(id.to_string());
        if let Some(ts) = outcome.progress.creation_ts {
            status.account_creation_ts = Some(ts);
        }
    }
    status.password_digest = outcome.password_digest.clone();
    let ready = match &result {
        Ok(()) => Ready::ok("InSync", format!("{} is in line with the spec", display_id(&outcome))),
        Err(e) => Ready::not_ready(e.reason(), e.to_string()),
    };
    set_condition(&mut status.conditions, &ready, user.metadata.generation, now());
    ctx.metrics.user_reason(
        &user.namespace().unwrap_or_default(),
        &user.name_any(),
        Some(ready.reason),
    );
    let condition_changed = status.conditions != old.conditions;
    if status != old {
        let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
        // A new account is the resource's own only once status.userId says
        // so: try harder before giving up on recording it.
        let attempts = if status.user_id != old.user_id { 3 } else { 1 };
        let mut attempt = 1;
        while let Err(e) = patch_status(&api, &user.name_any(), &status).await {
            if attempt == attempts {
                return Err(e.into());
            }
            warn!(error = %e, attempt, "cannot record the status; retrying");
            tokio::time::sleep(std::time::Duration::from_millis(200 * attempt)).await;
            attempt += 1;
        }
    }
    publish_progress(ctx, &user, &outcome).await;
    match result {
        Ok(()) => {
            ctx.reset_backoff(user.as_ref());
            Ok(ctx.resync())
        }
        Err(e) => {
            if condition_changed {
                warn!(reason = e.reason(), error = %e, "not in sync");
                ctx.publish(user.as_ref(), EventType::Warning, e.reason(), e.to_string())
                    .await;
            }
            if e.is_transient() {
                Err(e)
            } else {
                // Waits for a change of the spec, a Secret or the Homeserver
                // (all watched), and is looked at again at the next resync.
                ctx.reset_backoff(user.as_ref());
                Ok(ctx.resync())
            }
        }
    }
}

fn display_id(outcome: &Outcome) -> String {
    outcome
        .user_id
        .as_ref()
        .map_or_else(|| "the account".to_string(), UserId::to_string)
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

async fn sync(user: &MatrixUser, ctx: &Context, old: &MatrixUserStatus, out: &mut Outcome) -> Result<(), Error> {
    let hs = ready_homeserver(ctx, user).await?;
    let name = user.name_any();
    let user_id = UserId::new(user.spec.effective_localpart(&name), &hs.server_name)?;
    out.user_id = Some(user_id.clone());
    out.owned = old.user_id.as_deref() == Some(user_id.as_str());
    if hs.admin_user_id.as_deref() == Some(user_id.as_str()) {
        return Err(Error::InvalidSpec(format!(
            "{user_id} is the account of the Homeserver's admin token, which the operator does not manage"
        )));
    }
    check_unique(ctx, user, &user_id, out.owned)?;
    for t in user.spec.threepids.iter().flatten() {
        validate_threepid(t.medium, &t.address).map_err(Error::InvalidSpec)?;
    }

    let password = match &user.spec.password {
        None => None,
        Some(p) => {
            let value = match (&p.secret_ref, p.generate) {
                (Some(r), _) => secrets::read_key(&ctx.client, &user.namespace().unwrap_or_default(), r).await?,
                (None, true) => {
                    let (value, created) =
                        secrets::generated_password(&ctx.client, user, user_id.as_str(), &hs.url).await?;
                    if created {
                        out.generated_secret = Some(secrets::credentials_secret_name(user));
                    }
                    value
                }
                (None, false) => {
                    return Err(Error::InvalidSpec("password needs secretRef or generate: true".into()));
                }
            };
            check_password(&value, p.secret_ref.as_ref().map(|r| (r.name.as_str(), r.key.as_str())))?;
            let applied = old
                .password_digest
                .as_deref()
                .is_some_and(|d| digest_matches(d, &value));
            Some(DesiredPassword {
                value,
                applied,
                logout_devices: p.logout_devices_on_change,
            })
        }
    };
    let desired = desired_from_spec(&user.spec, user_id.clone(), password);
    let authority = Authority {
        owned: out.owned,
        adopt_requested: user.spec.adopt,
        adoption_allowed: hs.policy.allow_adoption,
        admin_allowed: hs.policy.allow_admin_users,
        owned_creation_ts: old.account_creation_ts,
    };
    let result = sync_account(&hs.client, &desired, authority, &mut out.progress).await;
    out.owned |= out.progress.created || out.progress.adopted;
    if out.progress.password_applied
        && let Some(p) = &desired.password
    {
        out.password_digest = Some(password_digest(&p.value));
    }
    result.map(|_| ()).map_err(Error::from)
}

fn check_password(value: &SecretString, source: Option<(&str, &str)>) -> Result<(), Error> {
    let source = source.map_or_else(
        || "the generated password".to_string(),
        |(name, key)| format!("key {key:?} of Secret {name:?}"),
    );
    if value.expose().is_empty() {
        return Err(Error::InvalidSpec(format!("{source} is empty")));
    }
    if value.expose().len() > MAX_PASSWORD_LEN {
        return Err(Error::InvalidSpec(format!(
            "{source} is longer than {MAX_PASSWORD_LEN} bytes"
        )));
    }
    Ok(())
}

/// Two MatrixUsers naming one Matrix ID: the older one (by creation time,
/// then name) keeps it, the newer one gets a Conflict and writes nothing.
///
/// Across namespaces and Homeservers, an account recorded as owned by
/// another MatrixUser is that one's: this one may not adopt it.
fn check_unique(ctx: &Context, user: &MatrixUser, user_id: &UserId, owned: bool) -> Result<(), Error> {
    let key = |u: &MatrixUser| (u.meta().creation_timestamp.clone().map(|t| t.0), u.name_any());
    let mine = key(user);
    let name = user.name_any();
    let localpart = user.spec.effective_localpart(&name);
    let older = ctx.users.state().into_iter().find(|other| {
        let other_name = other.name_any();
        let same_resource = other.namespace() == user.namespace() && other_name == name;
        let same_name = other.namespace() == user.namespace()
            && other.spec.homeserver_ref == user.spec.homeserver_ref
            && other.spec.effective_localpart(&other_name) == localpart;
        let owns_it = other.status.as_ref().and_then(|s| s.user_id.as_deref()) == Some(user_id.as_str());
        !same_resource && ((same_name && key(other) < mine) || (owns_it && (!owned || key(other) < mine)))
    });
    match older {
        Some(other) => Err(Error::DuplicateUser {
            user_id: user_id.to_string(),
            other: format!("{}/{}", other.namespace().unwrap_or_default(), other.name_any()),
        }),
        None => Ok(()),
    }
}

async fn publish_progress(ctx: &Context, user: &MatrixUser, out: &Outcome) {
    let id = display_id(out);
    let p = &out.progress;
    if let Some(secret) = &out.generated_secret {
        ctx.publish(
            user,
            EventType::Normal,
            "CredentialsGenerated",
            format!("generated a password into Secret {secret}"),
        )
        .await;
    }
    if p.created {
        ctx.publish(user, EventType::Normal, "Created", format!("created {id}"))
            .await;
    }
    if p.adopted {
        ctx.publish(
            user,
            EventType::Normal,
            "Adopted",
            format!("adopted the existing account {id}"),
        )
        .await;
    }
    // A field re-sent after a partly applied call counts once.
    let mut fields: Vec<&str> = Vec::new();
    for f in p.updates.iter().flatten().copied() {
        if !matches!(f, "password" | "deactivated") && !fields.contains(&f) {
            fields.push(f);
        }
    }
    if !fields.is_empty() {
        ctx.publish(
            user,
            EventType::Normal,
            "Updated",
            format!("updated {} of {id}", fields.join(", ")),
        )
        .await;
    }
    if p.password_applied {
        ctx.publish(
            user,
            EventType::Normal,
            "PasswordChanged",
            format!("set the password of {id}"),
        )
        .await;
    }
    if p.deactivated {
        ctx.publish(user, EventType::Normal, "Deactivated", format!("deactivated {id}"))
            .await;
    }
    if p.reactivated {
        ctx.publish(user, EventType::Normal, "Reactivated", format!("re-activated {id}"))
            .await;
    }
    if p.reactivated_without_password {
        let note =
            format!("re-activated {id} without a password: it cannot log in with one until spec.password is set");
        ctx.publish(user, EventType::Warning, "ReactivatedWithoutPassword", note)
            .await;
    }
    if p.writes > 0 {
        info!(user_id = %id, writes = p.writes, "synced the account");
    }
}

async fn cleanup(user: Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    let result = cleanup_account(&user, ctx).await;
    if result.is_ok() {
        ctx.metrics
            .user_reason(&user.namespace().unwrap_or_default(), &user.name_any(), None);
        ctx.reset_backoff(user.as_ref());
    }
    result
}

async fn cleanup_account(user: &Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    if user.annotations().get(SKIP_CLEANUP).map(String::as_str) == Some("true") {
        let note = format!("{SKIP_CLEANUP} is \"true\": the account is left as it is");
        ctx.publish(user.as_ref(), EventType::Warning, "CleanupSkipped", note)
            .await;
        return Ok(Action::await_change());
    }
    let policy = user.spec.deletion_policy;
    let owned_id = user.status.as_ref().and_then(|s| s.user_id.clone());
    let Some(owned_id) = owned_id.filter(|_| policy != DeletionPolicy::Retain) else {
        let note = match policy {
            DeletionPolicy::Retain => "deletionPolicy is Retain: the account is left as it is".to_string(),
            _ => "no account was created or adopted for this MatrixUser: nothing to clean up".to_string(),
        };
        ctx.publish(user.as_ref(), EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    };
    let hs = match ready_homeserver(ctx, user).await {
        Ok(hs) => hs,
        Err(Error::HomeserverNotFound { name }) => {
            // The Homeserver is gone for good (deleted, or its namespace is
            // going): nothing can reach the account, and holding on would
            // wedge the deletion.
            let note = format!("Homeserver {name:?} is gone: {owned_id} was left as it is ({policy:?} not applied)");
            ctx.publish(user.as_ref(), EventType::Warning, "HomeserverGone", note)
                .await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(record_cleanup_failure(ctx, user, e).await),
    };
    let name = user.name_any();
    let user_id = UserId::new(user.spec.effective_localpart(&name), &hs.server_name)?;
    let authority = Authority {
        owned: user_id.as_str() == owned_id,
        owned_creation_ts: user.status.as_ref().and_then(|s| s.account_creation_ts),
        ..Authority::default()
    };
    match delete_account(&hs.client, &user_id, policy, authority).await {
        Ok(action) => {
            let (reason, note) = match action {
                Some(DeletionAction::Deactivate { erase: true }) => {
                    ("Erased", format!("deactivated and erased {user_id}"))
                }
                Some(DeletionAction::Deactivate { erase: false }) => ("Deactivated", format!("deactivated {user_id}")),
                None => (
                    "Deleted",
                    format!("{user_id} needed no change for deletionPolicy {policy:?}"),
                ),
            };
            ctx.publish(user.as_ref(), EventType::Normal, reason, note).await;
            Ok(Action::await_change())
        }
        Err(e) => Err(record_cleanup_failure(ctx, user, e.into()).await),
    }
}

/// The finalizer stays until the deletion policy ran: say why in status.
async fn record_cleanup_failure(ctx: &Context, user: &MatrixUser, e: Error) -> Error {
    let old = user.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let ready = Ready::not_ready(e.reason(), format!("deletion waits: {e}"));
    set_condition(&mut status.conditions, &ready, user.metadata.generation, now());
    if status != old {
        let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
        if let Err(patch_error) = patch_status(&api, &user.name_any(), &status).await {
            warn!(error = %patch_error, "cannot record the failed deletion");
        }
        ctx.publish(user, EventType::Warning, e.reason(), format!("deletion waits: {e}"))
            .await;
    }
    e
}
