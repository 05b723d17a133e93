//! MatrixUser reconcile: resolve → desired state → sync with Synapse →
//! status and Events; and the finalizer that applies the deletion policy.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use tracing::{debug, info, instrument, warn};

use super::fairness::HomeserverKey;
use super::homeserver::ready_status;
use super::{Context, Error, ownership, patch_status_at, secrets};
use crate::api::{
    DeletionPolicy, Homeserver, HomeserverPolicy, ManagementPolicy, MatrixUser, MatrixUserStatus, PENDING_CREATION,
    PendingCreation, Ready, STALLED, Standing, set_condition,
};
use crate::apply::{
    PendingOutcome, Progress, RoomStep, RoomsReport, SyncError, Write, WriteGuard, delete_account, sync_account,
    sync_rooms,
};
use crate::backend::Backend;
use crate::plan::{self, Authority, DeletionAction, DesiredPassword, Untouched, desired_from_spec, validate_threepid};
use crate::preview::{OBSERVER, Observation, observation, preview_account, preview_rooms};
use crate::secret::{SecretString, is_keyed, password_digest};
use crate::synapse::UserId;

mod cleanup;
mod guard;
mod rooms;
mod status;

use cleanup::cleanup;
use guard::{Guard, Stop, is_conflict};
use rooms::{rooms_result, sync_user_rooms};
use status::{display_id, now, publish_failure, publish_progress, record_status};

/// Put on every MatrixUser so its deletion policy runs before it goes.
pub const FINALIZER: &str = "matrix-operator.io/cleanup";

/// An annotation that lets a MatrixUser go without applying its deletion
/// policy: the way out when the homeserver can never be reached again.
pub const SKIP_CLEANUP: &str = "matrix-operator.io/skip-cleanup";

/// Synapse refuses longer passwords ("Invalid password").
const MAX_PASSWORD_LEN: usize = 512;

#[instrument(skip_all, fields(user = %user.name_any(), namespace = user.namespace().unwrap_or_default()))]
pub async fn reconcile_user(user: Arc<MatrixUser>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Over its Homeserver's share of the slots, a MatrixUser waits its turn
    // in the queue rather than in a slot another Homeserver could use.
    let homeserver = HomeserverKey::of(&user, !ctx.config.namespaces.is_empty());
    let _slot = match ctx.slots.take(homeserver) {
        Ok(slot) => slot,
        Err(wait) => {
            debug!(
                ?wait,
                "the Homeserver has its share of the reconcile slots in flight; later"
            );
            return Ok(Action::requeue(wait));
        }
    };
    let started = std::time::Instant::now();
    let result = reconcile_user_inner(user, &ctx).await;
    let outcome = if result.is_ok() { "success" } else { "error" };
    ctx.metrics.reconciled("MatrixUser", outcome, started.elapsed());
    result
}

async fn reconcile_user_inner(user: Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    if user.meta().deletion_timestamp.is_none() {
        // The finalizer is added by the pass's first write (with the
        // pending-creation record, for a new account), or at its end.
        return apply(user, ctx).await;
    }
    if !has_finalizer(&user) {
        return Ok(Action::await_change());
    }
    let action = cleanup(user.clone(), ctx).await?;
    // The entry is tested before it goes: a list changed meanwhile fails
    // the patch, and the next pass looks again.
    let index = user
        .finalizers()
        .iter()
        .position(|f| f == FINALIZER)
        .unwrap_or_default();
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{index}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{index}")},
    ]))
    .map_err(kube::Error::SerdeError)?;
    let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
    api.patch::<MatrixUser>(&user.name_any(), &PatchParams::default(), &Patch::Json(patch))
        .await?;
    Ok(action)
}

fn has_finalizer(user: &MatrixUser) -> bool {
    user.finalizers().iter().any(|f| f == FINALIZER)
}

pub fn error_policy(user: Arc<MatrixUser>, error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff(user.as_ref(), error))
}

/// A Homeserver that is ready, with the backend its accounts live in.
struct ReadyHomeserver {
    server_name: String,
    admin_user_id: Option<String>,
    url: String,
    policy: HomeserverPolicy,
    backend: Backend,
}

/// The MatrixUser's Homeserver, as the watch last saw it.
async fn homeserver_of(ctx: &Context, user: &MatrixUser) -> Result<Arc<Homeserver>, Error> {
    ctx.homeserver(&user.namespace().unwrap_or_default(), &user.spec.homeserver_ref.name)
        .await
}

async fn ready_homeserver(ctx: &Context, hs: &Homeserver) -> Result<ReadyHomeserver, Error> {
    let ready = ready_status(hs).map_err(|not_ready| Error::HomeserverNotReady {
        name: hs.name_any(),
        message: not_ready.message,
        waiting: not_ready.waiting,
    })?;
    let backend = ctx.backend(hs).await?;
    Ok(ReadyHomeserver {
        server_name: ready.server_name,
        admin_user_id: ready.admin_user_id,
        url: hs.spec.url.clone(),
        policy: hs.spec.policy.clone(),
        backend,
    })
}

/// What a sync found out, kept whether it succeeded or not.
#[derive(Default)]
struct Outcome {
    user_id: Option<UserId>,
    owned: bool,
    progress: Progress,
    password_digest: Option<String>,
    /// The digest in status, of an earlier release, matched: replace it
    /// with a keyed one.
    digest_rekeyed: bool,
    generated_secret: Option<String>,
    /// What the pass did with the account's rooms, when it got to them.
    rooms: Option<RoomsReport>,
    /// The spec lists rooms (`rooms` is set).
    rooms_listed: bool,
}

/// How many times a pass starts again on a newer copy of the MatrixUser
/// before it gives up until the next trigger.
const MAX_RESTARTS: usize = 3;

/// Tries to record a new account's ownership this often before giving up.
const OWNERSHIP_WRITE_ATTEMPTS: u64 = 3;

/// The end of one pass over one copy of the MatrixUser.
enum Pass {
    Done(Result<Action, Error>),
    /// The copy was stale and nothing was written: start again on this one.
    Restart(Box<MatrixUser>),
}

async fn apply(user: Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    let mut current = user;
    for _ in 0..MAX_RESTARTS {
        match apply_once(current, ctx).await {
            Pass::Done(result) => return result,
            // A copy being deleted goes through the finalizer's cleanup.
            Pass::Restart(fresh) if fresh.meta().deletion_timestamp.is_some() => {
                return Ok(Action::requeue(Duration::ZERO));
            }
            Pass::Restart(fresh) => current = Arc::new(*fresh),
        }
    }
    Err(Error::Stale)
}

async fn apply_once(user: Arc<MatrixUser>, ctx: &Context) -> Pass {
    let old = user.status.clone().unwrap_or_default();
    let mut outcome = Outcome {
        password_digest: old.password_digest.clone(),
        ..Outcome::default()
    };
    let mut guard = Guard::new(ctx, &user);
    let result = match sync(&user, ctx, &old, &mut outcome, &mut guard).await {
        Ok(()) => Ok(()),
        Err(Stop::Stale(fresh)) => return Pass::Restart(fresh),
        Err(Stop::Failed(e)) => Err(e),
    };
    let ready = match &result {
        Ok(()) => Ready::ok("InSync", format!("{} is in line with the spec", display_id(&outcome))),
        Err(e) => e.condition(e.to_string()),
    };
    ctx.metrics.user_reason(
        &user.namespace().unwrap_or_default(),
        &user.name_any(),
        Some(ready.reason),
    );
    let recorded = match record_status(&user, &mut guard, &outcome, &ready).await {
        Ok(Some(fresh)) => return Pass::Restart(Box::new(fresh)),
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    publish_progress(ctx, &user, &outcome).await;
    publish_failure(ctx, &user, &old, &ready).await;
    Pass::Done(recorded.and_then(|()| settle(ctx, &user, result)))
}

/// The requeue after a pass.
fn settle(ctx: &Context, user: &MatrixUser, result: Result<(), Error>) -> Result<Action, Error> {
    match result {
        // The resync clock looks at it again (see `resync`): no requeue
        // held per MatrixUser.
        Ok(()) => {
            ctx.reset_backoff(user);
            Ok(Action::await_change())
        }
        // The Homeserver is being checked or retried: its status change
        // triggers this MatrixUser again; the backoff covers a missed one
        // without every MatrixUser polling through an outage.
        Err(e @ Error::HomeserverNotReady { waiting: true, .. }) => Err(e),
        Err(e) if e.is_transient() => Err(e),
        Err(_) => {
            // Waits for a change of the spec, a Secret or the Homeserver
            // (all watched), and is looked at again at the next resync.
            ctx.reset_backoff(user);
            Ok(Action::await_change())
        }
    }
}

async fn sync(
    user: &MatrixUser,
    ctx: &Context,
    old: &MatrixUserStatus,
    out: &mut Outcome,
    guard: &mut Guard<'_>,
) -> Result<(), Stop> {
    let hs = ready_homeserver(ctx, homeserver_of(ctx, user).await?.as_ref()).await?;
    guard.server_name = Some(hs.server_name.clone());
    let name = user.name_any();
    let user_id = UserId::new(user.spec.effective_localpart(&name), &hs.server_name)?;
    out.user_id = Some(user_id.clone());
    out.owned = old.user_id.as_deref() == Some(user_id.as_str());
    if hs.admin_user_id.as_deref() == Some(user_id.as_str()) {
        return Err(Error::InvalidSpec(format!(
            "{user_id} is the account of the Homeserver's admin token, which the operator does not manage"
        ))
        .into());
    }
    ownership::check_unique(ctx, user, &user_id, out.owned)?;
    for t in user.spec.threepids.iter().flatten() {
        validate_threepid(t.medium, &t.address).map_err(Error::InvalidSpec)?;
    }
    if user.spec.management_policy == ManagementPolicy::Observe {
        return Ok(observe(user, ctx, &hs, &user_id, old, out).await?);
    }

    let password = match &user.spec.password {
        None => None,
        Some(p) => {
            let value = match (&p.secret_ref, p.generate) {
                (Some(r), _) => ctx.secret_value(&user.namespace().unwrap_or_default(), r).await?,
                (None, true) => {
                    let (value, created) = ctx.generated_password(user, user_id.as_str(), &hs.url).await?;
                    if created {
                        out.generated_secret = Some(secrets::credentials_secret_name(user));
                    }
                    value
                }
                (None, false) => {
                    return Err(Error::InvalidSpec("password needs secretRef or generate: true".into()).into());
                }
            };
            check_password(&value, p.secret_ref.as_ref().map(|r| (r.name.as_str(), r.key.as_str())))?;
            let applied = old
                .password_digest
                .as_deref()
                .is_some_and(|d| ctx.digest_matches(user, d, &value));
            if applied && old.password_digest.as_deref().is_some_and(|d| !is_keyed(d)) {
                let digest = password_digest(&value, &ctx.config.digest_key);
                ctx.remember_digest(user, &digest, &value);
                out.password_digest = Some(digest);
                out.digest_rekeyed = true;
            }
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
        pending_creation: pending_creation_of(user, &user_id),
    };
    // The deadline bounds the homeserver's work only: what the pass did
    // before it was cut (a create answered, a pending creation recorded)
    // is in `out` and still recorded.
    let deadline = ctx.config.reconcile_timeout;
    let progress = &mut out.progress;
    let rooms_report = &mut out.rooms;
    out.rooms_listed = user.spec.rooms.is_some();
    let synced = async {
        let account = sync_account(&hs.backend, &desired, authority, guard, progress).await?;
        sync_user_rooms(user, &hs.backend, &account, &user_id, old, rooms_report).await;
        Ok::<_, SyncError<Stop>>(())
    };
    let result = match tokio::time::timeout(deadline, synced).await {
        Ok(Ok(())) => rooms_result(&mut out.rooms).map_err(Stop::Failed),
        Ok(Err(e)) => Err(Stop::from(e)),
        Err(_) => {
            cut_short(&mut out.progress);
            Err(Stop::Failed(Error::TooSlow { deadline }))
        }
    };
    out.owned |= out.progress.created || out.progress.adopted;
    if out.progress.password_applied
        && let Some(p) = &desired.password
    {
        let digest = password_digest(&p.value, &ctx.config.digest_key);
        ctx.remember_digest(user, &digest, &p.value);
        out.password_digest = Some(digest);
    }
    result
}

/// `managementPolicy: Observe`: reads the account (and its rooms, when the
/// spec lists some) and reports how it differs from the spec, through the
/// plan the executor would run. Nothing is written to the homeserver, and
/// nothing is claimed: no ownership (`status.userId`) or pending creation
/// is recorded, so a later `Manage` meets the adoption rules as any
/// MatrixUser does. The password is not compared and its Secret not read
/// (nor `<name>-credentials` generated): only the operator's own digest of
/// a password it set could tell, and an observer sets none.
async fn observe(
    user: &MatrixUser,
    ctx: &Context,
    hs: &ReadyHomeserver,
    user_id: &UserId,
    old: &MatrixUserStatus,
    out: &mut Outcome,
) -> Result<(), Error> {
    let desired = desired_from_spec(&user.spec, user_id.clone(), None);
    let observed = async {
        let preview = preview_account(&hs.backend, &desired, OBSERVER, false).await?;
        let rooms = match (&user.spec.rooms, &preview.account) {
            (Some(listed), Some(account)) => {
                Some(preview_rooms(&hs.backend, user_id, listed, &old.rooms, !account.deactivated).await?)
            }
            _ => None,
        };
        Ok::<_, SyncError<std::convert::Infallible>>((preview, rooms))
    };
    let deadline = ctx.config.reconcile_timeout;
    let (preview, rooms) = match tokio::time::timeout(deadline, observed).await {
        Ok(observed) => observed?,
        Err(_) => return Err(Error::TooSlow { deadline }),
    };
    if let Some(rooms) = &rooms {
        // The count only: the memberships the operator made stay recorded
        // as they are, for a later Manage.
        out.rooms_listed = true;
        out.rooms = Some(RoomsReport {
            records: old.rooms.clone(),
            joined_listed: rooms.joined_listed,
            ..RoomsReport::default()
        });
    }
    match observation(&preview, rooms.as_ref()) {
        Observation::InSync => Ok(()),
        Observation::NotFound => Err(Error::NotFound {
            user_id: user_id.to_string(),
        }),
        Observation::Drifted(fields) => Err(Error::Drifted {
            user_id: user_id.to_string(),
            fields,
        }),
    }
}

/// What a pass cut off by its deadline keeps of the pending creation: a
/// create whose answer never came (or was cut off) was sent under the
/// record last written to status, which covers every create of the pass.
fn cut_short(progress: &mut Progress) {
    if matches!(
        progress.pending_creation,
        PendingOutcome::Unanswered(_) | PendingOutcome::Unconfirmed(_)
    ) {
        progress.pending_creation = PendingOutcome::Unchanged;
    }
}

/// The pending creation recorded for `user_id`, if any.
pub(super) fn pending_creation_of(user: &MatrixUser, user_id: &UserId) -> Option<plan::PendingCreation> {
    user.pending_creation()?.of(user_id.as_str())
}

pub(super) fn check_password(value: &SecretString, source: Option<(&str, &str)>) -> Result<(), Error> {
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

#[cfg(test)]
mod tests {
    use super::status::status_after;
    use super::*;
    use crate::plan::Refusal;
    use crate::synapse::{Endpoint, ErrCode, SynapseError};
    use serde_json::{Value, json};

    /// kstatus's verdict on an object (sigs.k8s.io/cli-utils, pkg/kstatus:
    /// the generic rules it applies to custom resources).
    #[derive(Debug, PartialEq, Eq)]
    enum KStatus {
        InProgress,
        Failed,
        Current,
        Terminating,
    }

    fn kstatus(obj: &Value) -> KStatus {
        if !obj["metadata"]["deletionTimestamp"].is_null() {
            return KStatus::Terminating;
        }
        let observed = &obj["status"]["observedGeneration"];
        if !observed.is_null() && *observed != obj["metadata"]["generation"] {
            return KStatus::InProgress;
        }
        let holds = |type_: &str| {
            obj["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        };
        if holds("Reconciling") {
            return KStatus::InProgress;
        }
        if holds("Stalled") {
            return KStatus::Failed;
        }
        KStatus::Current
    }

    fn synapse_error(status: u16, errcode: &str) -> Error {
        Error::from(SynapseError::Api {
            endpoint: Endpoint::PutUser,
            status,
            errcode: ErrCode::parse(errcode),
            message: String::new(),
            retry_after: None,
        })
    }

    /// The MatrixUser with the status a pass writes for `ready`.
    fn written(ready: &Ready, generation: i64) -> Value {
        let status = status_after(
            &MatrixUserStatus::default(),
            &Outcome::default(),
            ready,
            Some(generation),
        );
        json!({"metadata": {"generation": generation}, "status": status})
    }

    #[test]
    fn kstatus_reads_every_reason_as_the_readme_says() {
        let user_id = "@a:example.org".to_string();
        let cases: Vec<(Error, KStatus)> = vec![
            (Error::HomeserverNotFound { name: "hs".into() }, KStatus::Failed),
            (
                Error::HomeserverNotReady {
                    name: "hs".into(),
                    message: "not checked yet".into(),
                    waiting: true,
                },
                KStatus::InProgress,
            ),
            (
                Error::HomeserverNotReady {
                    name: "hs".into(),
                    message: "Unauthorized: …".into(),
                    waiting: false,
                },
                KStatus::Failed,
            ),
            (
                Error::SecretNotFound {
                    name: "s".into(),
                    key: "k".into(),
                },
                KStatus::Failed,
            ),
            (Error::InvalidSpec("x".into()), KStatus::Failed),
            (Error::Refused(Refusal::AdminNotAllowed), KStatus::Failed),
            (
                Error::Refused(Refusal::AdoptionNotRequested {
                    user_id: user_id.clone(),
                }),
                KStatus::Failed,
            ),
            (
                Error::DuplicateUser {
                    user_id,
                    other: "ns/b".into(),
                },
                KStatus::Failed,
            ),
            (Error::CredentialsSecretNotOwned { name: "c".into() }, KStatus::Failed),
            (synapse_error(401, "M_UNKNOWN_TOKEN"), KStatus::Failed),
            (synapse_error(403, "M_FORBIDDEN"), KStatus::Failed),
            (synapse_error(409, "M_UNKNOWN"), KStatus::Failed),
            (synapse_error(400, "M_INVALID_PARAM"), KStatus::Failed),
            (synapse_error(502, ""), KStatus::InProgress),
            (synapse_error(429, "M_LIMIT_EXCEEDED"), KStatus::InProgress),
            (Error::NotSettling("x".into()), KStatus::InProgress),
            (Error::Stale, KStatus::InProgress),
            (
                Error::Rooms {
                    reason: "RoomNotJoinable",
                    message: "!x: not in room".into(),
                    transient: false,
                },
                KStatus::Failed,
            ),
            (
                Error::Rooms {
                    reason: "RoomNotJoinable",
                    message: "!x: HTTP 502".into(),
                    transient: true,
                },
                KStatus::InProgress,
            ),
            (
                Error::TooSlow {
                    deadline: Duration::from_secs(120),
                },
                KStatus::InProgress,
            ),
            (
                Error::Drifted {
                    user_id: "@a:example.org".into(),
                    fields: vec!["displayname"],
                },
                KStatus::Failed,
            ),
            (
                Error::NotFound {
                    user_id: "@a:example.org".into(),
                },
                KStatus::Failed,
            ),
        ];
        for (e, expected) in cases {
            let obj = written(&e.condition(e.to_string()), 3);
            assert_eq!(kstatus(&obj), expected, "{} ({e})", e.reason());
        }
        assert_eq!(kstatus(&written(&Ready::ok("InSync", "in sync"), 3)), KStatus::Current);
        // A status of an older generation is in progress, whatever it says.
        let mut stale = written(&Ready::ok("InSync", "in sync"), 3);
        stale["metadata"]["generation"] = json!(4);
        assert_eq!(kstatus(&stale), KStatus::InProgress);
    }

    #[test]
    fn ownership_once_recorded_is_never_dropped() {
        let base = MatrixUserStatus {
            user_id: Some("@a:example.org".into()),
            account_creation_ts: Some(1_700_000_000),
            password_digest: Some("pbkdf2-sha256$1$00$00".into()),
            ..MatrixUserStatus::default()
        };
        // A pass that found nothing of its own (it failed before it knew the
        // Matrix ID) leaves the record as it is.
        let refused = Ready::stalled("HomeserverNotReady", "…");
        let after = status_after(&base, &Outcome::default(), &refused, Some(2));
        assert_eq!(after.user_id, base.user_id);
        assert_eq!(after.account_creation_ts, base.account_creation_ts);
        assert_eq!(after.password_digest, base.password_digest);
    }

    #[test]
    fn a_pending_creation_an_older_release_left_in_status_is_kept_until_settled_or_recorded_anew() {
        let user_id = UserId::new("a", "example.org").unwrap();
        let base = MatrixUserStatus {
            pending_creation: Some(PendingCreation {
                user_id: user_id.to_string(),
                requested_at: 10,
                last_requested_at: None,
            }),
            ..MatrixUserStatus::default()
        };
        let ready = Ready::reconciling("Unreachable", "…");
        let mut outcome = Outcome {
            user_id: Some(user_id.clone()),
            ..Outcome::default()
        };
        assert_eq!(
            status_after(&base, &outcome, &ready, Some(1)).pending_creation,
            base.pending_creation
        );
        // A newer record went to the annotation: status keeps none.
        outcome.progress.pending_creation = PendingOutcome::Unanswered(plan::PendingCreation::at(20));
        assert_eq!(status_after(&base, &outcome, &ready, Some(1)).pending_creation, None);
        outcome.progress.pending_creation = PendingOutcome::Settled;
        outcome.owned = true;
        outcome.progress.creation_ts = Some(21);
        let after = status_after(&base, &outcome, &Ready::ok("InSync", ""), Some(1));
        assert_eq!(after.pending_creation, None);
        assert_eq!(after.user_id.as_deref(), Some(user_id.as_str()));
        assert_eq!(after.account_creation_ts, Some(21));
    }

    #[test]
    fn the_pending_creation_record_is_read_until_status_records_the_account_it_made() {
        let record = r#"{"userId":"@a:example.org","requestedAt":10}"#;
        let user = |annotation: Option<&str>, status: serde_json::Value| -> MatrixUser {
            let mut meta = serde_json::json!({"name": "a", "namespace": "chat"});
            if let Some(a) = annotation {
                meta["annotations"] = serde_json::json!({ "matrix-operator.io/pending-creation": a });
            }
            serde_json::from_value(serde_json::json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": meta, "spec": {"homeserverRef": {"name": "hs"}}, "status": status,
            }))
            .unwrap()
        };
        let at = |p: Option<PendingCreation>| p.map(|p| (p.user_id, p.requested_at));
        let pending = Some(("@a:example.org".to_string(), 10));
        assert_eq!(
            at(user(Some(record), serde_json::json!({})).pending_creation()),
            pending
        );
        // Created, but not yet told when: still the record that covers it.
        let created = serde_json::json!({"userId": "@a:example.org"});
        assert_eq!(at(user(Some(record), created).pending_creation()), pending);
        // Recorded with its creation time: settled.
        let recorded = serde_json::json!({"userId": "@a:example.org", "accountCreationTs": 11});
        assert_eq!(at(user(Some(record), recorded).pending_creation()), None);
        // Another account recorded (the spec's localpart changed since).
        let other = serde_json::json!({"userId": "@b:example.org", "accountCreationTs": 11});
        assert_eq!(at(user(Some(record), other).pending_creation()), pending);
        // What an older release left in status.
        let legacy = serde_json::json!({"pendingCreation": {"userId": "@a:example.org", "requestedAt": 10}});
        assert_eq!(at(user(None, legacy).pending_creation()), pending);
        // Garbage, or too long to be one: none.
        assert_eq!(at(user(Some("{"), serde_json::json!({})).pending_creation()), None);
        let long = format!(
            r#"{{"userId":"@a:example.org","requestedAt":10,"x":"{}"}}"#,
            "x".repeat(2000)
        );
        assert_eq!(at(user(Some(&long), serde_json::json!({})).pending_creation()), None);
    }

    #[test]
    fn a_pass_cut_off_by_its_deadline_keeps_the_last_pending_record_and_what_it_created() {
        let user_id = UserId::new("a", "example.org").unwrap();
        // Round one's create went unanswered under a record of t=10; round
        // two wrote the record again (last asked at t=20) and was cut off
        // in its create.
        let written = MatrixUserStatus {
            pending_creation: Some(PendingCreation {
                user_id: user_id.to_string(),
                requested_at: 10,
                last_requested_at: Some(20),
            }),
            ..MatrixUserStatus::default()
        };
        let mut outcome = Outcome {
            user_id: Some(user_id.clone()),
            ..Outcome::default()
        };
        outcome.progress.pending_creation = PendingOutcome::Unanswered(plan::PendingCreation::at(10));
        cut_short(&mut outcome.progress);
        let ready = Error::TooSlow {
            deadline: Duration::from_secs(3),
        }
        .condition("slow".into());
        assert_eq!(
            status_after(&written, &outcome, &ready, Some(1)).pending_creation,
            written.pending_creation
        );
        // A create answered before the cut: the account is the resource's,
        // and nothing is pending any more.
        let mut outcome = Outcome {
            user_id: Some(user_id.clone()),
            owned: true,
            ..Outcome::default()
        };
        outcome.progress.created = true;
        outcome.progress.creation_ts = Some(15);
        outcome.progress.pending_creation = PendingOutcome::Settled;
        cut_short(&mut outcome.progress);
        let after = status_after(&written, &outcome, &ready, Some(1));
        assert_eq!(after.user_id.as_deref(), Some(user_id.as_str()));
        assert_eq!((after.account_creation_ts, after.pending_creation), (Some(15), None));
    }
}
