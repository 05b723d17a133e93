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
    Halt, PendingOutcome, Progress, RoomStep, RoomsReport, Write, WriteGuard, delete_account, sync_account, sync_rooms,
};
use crate::backend::Backend;
use crate::plan::{self, Authority, DeletionAction, DesiredPassword, Untouched, desired_from_spec, validate_threepid};
use crate::preview::{OBSERVER, Observation, observation, preview_account, preview_rooms};
use crate::secret::{SecretString, is_keyed, password_digest};
use crate::synapse::UserId;

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
    let result = sync(&user, ctx, &old, &mut outcome, &mut guard).await;
    let result = match (result, guard.stop.take()) {
        (_, Some(Stop::Stale(fresh))) => return Pass::Restart(fresh),
        (_, Some(Stop::Failed(e))) => Err(e),
        (result, None) => result,
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

/// Publishes the Warning Event of a failure that is new: a reason or
/// standing not shown before (a new message alone is not news). Waiting
/// for a Homeserver that is being checked is no failure.
async fn publish_failure(ctx: &Context, user: &MatrixUser, old: &MatrixUserStatus, ready: &Ready) {
    if ready.is_ready() || (ready.standing == Standing::Reconciling && ready.reason == "HomeserverNotReady") {
        return;
    }
    let before = crate::api::ready_condition(&old.conditions).map(|c| (c.status.as_str(), c.reason.as_str()));
    let shown = before == Some(("False", ready.reason))
        && crate::api::is_true(&old.conditions, STALLED) == (ready.standing == Standing::Stalled);
    if !shown {
        warn!(reason = ready.reason, message = %ready.message, "not in sync");
        ctx.publish(user, EventType::Warning, ready.reason, ready.message.clone())
            .await;
    }
}

/// The requeue after a pass.
fn settle(ctx: &Context, user: &MatrixUser, result: Result<(), Error>) -> Result<Action, Error> {
    match result {
        Ok(()) => {
            ctx.reset_backoff(user);
            Ok(ctx.resync(user))
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
            Ok(ctx.resync(user))
        }
    }
}

/// The status a pass leaves, built on `base` (the status as last read or
/// written). Ownership, once recorded, is never dropped: only a new
/// creation or adoption replaces it.
fn status_after(
    base: &MatrixUserStatus,
    outcome: &Outcome,
    ready: &Ready,
    generation: Option<i64>,
) -> MatrixUserStatus {
    let mut status = base.clone();
    status.observed_generation = generation;
    if outcome.owned
        && let Some(id) = &outcome.user_id
    {
        if status.user_id.as_deref() != Some(id.as_str()) {
            status.account_creation_ts = None;
            status.mas_user_id = None;
        }
        status.user_id = Some(id.to_string());
        if let Some(ts) = outcome.progress.creation_ts {
            status.account_creation_ts = Some(ts);
        }
        if let Some(mas_id) = &outcome.progress.account_id {
            status.mas_user_id = Some(mas_id.clone());
        }
    }
    if outcome.progress.password_applied || outcome.digest_rekeyed {
        status.password_digest = outcome.password_digest.clone();
    }
    // The record is kept in an annotation (see `PENDING_CREATION`); what
    // an older release kept in status goes once the pass settled it or
    // recorded a newer one.
    if outcome.progress.pending_creation != PendingOutcome::Unchanged {
        status.pending_creation = None;
    }
    if let Some(rooms) = &outcome.rooms {
        status.rooms = rooms.records.clone();
        // Counted only when the rooms were read (not after a failure that
        // left them unknown, nor once `rooms` is gone from the spec).
        if rooms.failed.is_none() || rooms.writes > 0 {
            status.joined_rooms = outcome
                .rooms_listed
                .then(|| i32::try_from(rooms.joined_listed).unwrap_or(i32::MAX));
        }
    }
    set_condition(&mut status.conditions, ready, generation, now());
    status
}

/// Writes the status of a pass, on the copy of the MatrixUser it was based
/// on (a resourceVersion precondition): a copy older than the last status
/// write is never written over. On a conflict, a pass that wrote nothing
/// starts again on the newer copy (returned); one that wrote records what
/// it did on the newer copy's status.
async fn record_status(
    user: &MatrixUser,
    guard: &mut Guard<'_>,
    outcome: &Outcome,
    ready: &Ready,
) -> Result<Option<MatrixUser>, Error> {
    let generation = user.metadata.generation;
    let wrote = outcome.progress.writes > 0 || guard.wrote_status;
    let mut status = status_after(&guard.base, outcome, ready, generation);
    let mut attempt = 1;
    loop {
        let settled_without_account = outcome.progress.pending_creation == PendingOutcome::Settled
            && outcome.user_id.as_ref().is_some_and(|id| {
                status.user_id.as_deref() != Some(id.as_str()) || status.account_creation_ts.is_none()
            });
        let metadata = match (&outcome.user_id, settled_without_account) {
            (Some(id), true) => guard.drop_record(id.as_str()).await,
            _ => Ok(()),
        };
        let written = match metadata.and(guard.ensure_finalizer().await) {
            Ok(()) if status == guard.base => return Ok(None),
            Ok(()) => guard.write(&status).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => return Ok(None),
            Err(e) if is_conflict(&e) => {
                let fresh = guard.fetch().await?;
                if !wrote {
                    return Ok(Some(fresh));
                }
                guard.rebase(&fresh);
                status = status_after(&guard.base, outcome, ready, generation);
            }
            // A new account is the resource's own only once status.userId
            // says so: try harder before giving up on recording it.
            Err(e) if status.user_id != guard.base.user_id && attempt < OWNERSHIP_WRITE_ATTEMPTS => {
                warn!(error = %e, attempt, "cannot record the status; retrying");
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
        attempt += 1;
        if attempt > OWNERSHIP_WRITE_ATTEMPTS + MAX_RESTARTS as u64 {
            return Err(Error::Stale);
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Why a guard stopped a sync.
enum Stop {
    /// The copy of the MatrixUser is older than the API server's: nothing
    /// was written.
    Stale(Box<MatrixUser>),
    Failed(Error),
}

/// The MatrixUser side of [`WriteGuard`]: before the first write to the
/// homeserver, the copy of the MatrixUser is checked against the API
/// server; before a create, the pending creation is recorded in status;
/// before an existing account is taken as the resource's own, no other
/// MatrixUser may own or be creating it.
struct Guard<'a> {
    ctx: &'a Context,
    user: &'a MatrixUser,
    api: Api<MatrixUser>,
    /// The status as last read or written, and the resourceVersion it has.
    base: MatrixUserStatus,
    resource_version: Option<String>,
    /// Known once the Homeserver is: the server part of the Matrix ID.
    server_name: Option<String>,
    confirmed: bool,
    wrote_status: bool,
    stop: Option<Stop>,
    /// Whether the copy as last written has the finalizer.
    has_finalizer: bool,
    /// The pending-creation record as last written.
    record: Option<PendingCreation>,
}

impl<'a> Guard<'a> {
    fn new(ctx: &'a Context, user: &'a MatrixUser) -> Self {
        Self {
            ctx,
            user,
            api: Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default()),
            base: user.status.clone().unwrap_or_default(),
            resource_version: user.resource_version(),
            server_name: None,
            confirmed: false,
            wrote_status: false,
            stop: None,
            has_finalizer: has_finalizer(user),
            record: user.pending_creation(),
        }
    }

    /// Writes the MatrixUser's metadata on the copy the sync is based on
    /// (a resourceVersion precondition): the finalizer where it is missing,
    /// and, when `record` is given, the pending-creation record (`None`:
    /// removed). One write, which also confirms the copy is current.
    async fn write_metadata(&mut self, record: Option<Option<&PendingCreation>>) -> Result<(), kube::Error> {
        let mut meta = serde_json::json!({ "resourceVersion": self.resource_version });
        if !self.has_finalizer {
            let mut finalizers = self.user.finalizers().to_vec();
            finalizers.push(FINALIZER.to_string());
            meta["finalizers"] = serde_json::json!(finalizers);
        }
        if let Some(record) = record {
            let value = record
                .map(serde_json::to_string)
                .transpose()
                .map_err(kube::Error::SerdeError)?;
            let mut annotations = serde_json::Map::new();
            annotations.insert(PENDING_CREATION.to_string(), serde_json::json!(value));
            meta["annotations"] = serde_json::Value::Object(annotations);
        }
        let patch = serde_json::json!({ "metadata": meta });
        let written = self
            .api
            .patch(&self.user.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.resource_version = written.resource_version();
        self.has_finalizer = true;
        if let Some(record) = record {
            self.record = record.cloned();
        }
        Ok(())
    }

    /// Adds the finalizer where the pass wrote nothing that carried it:
    /// every MatrixUser a pass looked at goes through its deletion policy.
    async fn ensure_finalizer(&mut self) -> Result<(), kube::Error> {
        if self.has_finalizer {
            return Ok(());
        }
        self.write_metadata(None).await
    }

    /// Drops a pending-creation record that the pass settled without an
    /// account of its own (a create refused outright), so that no later
    /// pass takes an account of that ID as one it made.
    async fn drop_record(&mut self, user_id: &str) -> Result<(), kube::Error> {
        if self.record.as_ref().is_some_and(|r| r.user_id == user_id) {
            self.write_metadata(Some(None)).await?;
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<MatrixUser, kube::Error> {
        self.api.get(&self.user.name_any()).await
    }

    fn rebase(&mut self, fresh: &MatrixUser) {
        self.base = fresh.status.clone().unwrap_or_default();
        self.resource_version = fresh.resource_version();
        self.has_finalizer = has_finalizer(fresh);
        self.record = fresh.pending_creation();
    }

    async fn write(&mut self, status: &MatrixUserStatus) -> Result<(), kube::Error> {
        let written = patch_status_at(
            &self.api,
            &self.user.name_any(),
            status,
            self.resource_version.as_deref(),
        )
        .await?;
        self.base = status.clone();
        self.resource_version = written.resource_version();
        self.wrote_status = true;
        Ok(())
    }

    /// Stops the sync: the copy is stale, or the check itself failed.
    fn halt(&mut self, stop: Stop) -> Halt {
        self.stop = Some(stop);
        Halt
    }

    /// Whether the copy the sync is based on is still the API server's.
    async fn confirm(&mut self) -> Result<(), Halt> {
        if self.confirmed {
            return Ok(());
        }
        if !self.has_finalizer {
            // Adding the finalizer at the resourceVersion read confirms it.
            return match self.write_metadata(None).await {
                Ok(()) => {
                    self.confirmed = true;
                    Ok(())
                }
                Err(e) => Err(self.stale_or_failed(e).await),
            };
        }
        match self.fetch().await {
            Ok(fresh) if fresh.resource_version() == self.resource_version => {
                self.confirmed = true;
                Ok(())
            }
            Ok(fresh) => Err(self.halt(Stop::Stale(Box::new(fresh)))),
            Err(e) => Err(self.halt(Stop::Failed(e.into()))),
        }
    }

    /// Stops the sync after a refused write: on a conflict, with the newer
    /// copy to start again on.
    async fn stale_or_failed(&mut self, e: kube::Error) -> Halt {
        if is_conflict(&e) {
            match self.fetch().await {
                Ok(fresh) => self.halt(Stop::Stale(Box::new(fresh))),
                Err(e) => self.halt(Stop::Failed(e.into())),
            }
        } else {
            self.halt(Stop::Failed(e.into()))
        }
    }

    async fn record_pending_creation(&mut self) -> Result<Option<plan::PendingCreation>, Halt> {
        let Some(user_id) = self.user_id() else {
            return Ok(None);
        };
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        // An earlier create of this ID that went unanswered may still have
        // made the account: the record covers it too.
        let earlier = self
            .record
            .as_ref()
            .filter(|p| p.user_id == user_id.as_str())
            .map(|p| plan::PendingCreation {
                requested_at: p.requested_at,
                last_requested_at: p.last_requested_at.unwrap_or(p.requested_at),
            });
        let pending = match earlier {
            Some(earlier) => plan::PendingCreation {
                last_requested_at: now,
                ..earlier
            },
            None => plan::PendingCreation::at(now),
        };
        let record = PendingCreation {
            user_id: user_id.to_string(),
            requested_at: pending.requested_at,
            last_requested_at: (pending.last_requested_at != pending.requested_at).then_some(pending.last_requested_at),
        };
        match self.write_metadata(Some(Some(&record))).await {
            Ok(()) => {
                self.confirmed = true;
                Ok(Some(pending))
            }
            Err(e) => Err(self.stale_or_failed(e).await),
        }
    }

    fn user_id(&self) -> Option<UserId> {
        let name = self.user.name_any();
        let server = self.server_name.as_deref()?;
        UserId::new(self.user.spec.effective_localpart(&name), server).ok()
    }
}

impl WriteGuard for Guard<'_> {
    fn before_write(&mut self, write: Write) -> BoxFuture<'_, Result<Option<plan::PendingCreation>, Halt>> {
        Box::pin(async move {
            match write {
                Write::Update => self.confirm().await.map(|()| None),
                Write::Create => self.record_pending_creation().await,
                Write::Claim => {
                    self.confirm().await?;
                    let Some(user_id) = self.user_id() else {
                        return Ok(None);
                    };
                    match ownership::other_claimant(self.ctx, self.user, &user_id).await {
                        Ok(()) => Ok(None),
                        Err(e) => Err(self.halt(Stop::Failed(e))),
                    }
                }
            }
        })
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

async fn sync(
    user: &MatrixUser,
    ctx: &Context,
    old: &MatrixUserStatus,
    out: &mut Outcome,
    guard: &mut Guard<'_>,
) -> Result<(), Error> {
    let hs = ready_homeserver(ctx, homeserver_of(ctx, user).await?.as_ref()).await?;
    guard.server_name = Some(hs.server_name.clone());
    let name = user.name_any();
    let user_id = UserId::new(user.spec.effective_localpart(&name), &hs.server_name)?;
    out.user_id = Some(user_id.clone());
    out.owned = old.user_id.as_deref() == Some(user_id.as_str());
    if hs.admin_user_id.as_deref() == Some(user_id.as_str()) {
        return Err(Error::InvalidSpec(format!(
            "{user_id} is the account of the Homeserver's admin token, which the operator does not manage"
        )));
    }
    ownership::check_unique(ctx, user, &user_id, out.owned)?;
    for t in user.spec.threepids.iter().flatten() {
        validate_threepid(t.medium, &t.address).map_err(Error::InvalidSpec)?;
    }
    if user.spec.management_policy == ManagementPolicy::Observe {
        return observe(user, ctx, &hs, &user_id, old, out).await;
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
                    return Err(Error::InvalidSpec("password needs secretRef or generate: true".into()));
                }
            };
            check_password(&value, p.secret_ref.as_ref().map(|r| (r.name.as_str(), r.key.as_str())))?;
            let applied = old
                .password_digest
                .as_deref()
                .is_some_and(|d| ctx.digest_matches(user, d, &value));
            if applied && old.password_digest.as_deref().is_some_and(|d| !is_keyed(d)) {
                let digest = password_digest(&value, &ctx.config.digest_key);
                ctx.remember_digest(user, digest.clone(), &value);
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
        Ok::<_, crate::apply::SyncError>(())
    };
    let result = match tokio::time::timeout(deadline, synced).await {
        Ok(result) => result.map_err(Error::from).and_then(|()| rooms_result(&mut out.rooms)),
        Err(_) => {
            cut_short(&mut out.progress);
            Err(Error::TooSlow { deadline })
        }
    };
    out.owned |= out.progress.created || out.progress.adopted;
    if out.progress.password_applied
        && let Some(p) = &desired.password
    {
        let digest = password_digest(&p.value, &ctx.config.digest_key);
        ctx.remember_digest(user, digest.clone(), &p.value);
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
        Ok::<_, crate::apply::SyncError>((preview, rooms))
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

/// The rooms of an account in sync (`spec.rooms`): the membership diff
/// against the rooms it is in, then the joins and leaves. A MatrixUser
/// without `rooms` costs no call; its records, if it had any, are dropped
/// (the memberships stay as they are, the account's own from then on).
async fn sync_user_rooms(
    user: &MatrixUser,
    backend: &Backend,
    account: &crate::account::Account,
    user_id: &UserId,
    old: &MatrixUserStatus,
    out: &mut Option<RoomsReport>,
) {
    let Some(listed) = &user.spec.rooms else {
        // Forgotten, not left.
        if !old.rooms.is_empty() || old.joined_rooms.is_some() {
            *out = Some(RoomsReport::default());
        }
        return;
    };
    let purpose = format!(
        "matrix-user-operator: leaving rooms for MatrixUser {}/{}",
        user.namespace().unwrap_or_default(),
        user.name_any()
    );
    *out = Some(sync_rooms(backend, account, user_id, listed, &old.rooms, &purpose).await);
}

/// The most rooms a condition message names one by one.
const MAX_ROOMS_NAMED: usize = 5;

/// A pass's rooms as an error: the pass failed as a whole, or some rooms
/// are not in line (each named, with what the server said).
fn rooms_result(report: &mut Option<RoomsReport>) -> Result<(), Error> {
    let Some(report) = report else {
        return Ok(());
    };
    if let Some(e) = report.failed.take() {
        return Err(e.into());
    }
    if report.problems.is_empty() {
        return Ok(());
    }
    let joining = report.problems.iter().any(|p| p.step != RoomStep::Leave);
    let mut parts: Vec<String> = report
        .problems
        .iter()
        .take(MAX_ROOMS_NAMED)
        .map(|p| {
            let step = match p.step {
                RoomStep::Resolve => "cannot look the alias up",
                RoomStep::Join => "cannot join",
                RoomStep::Leave => "cannot leave",
            };
            format!("{} ({step}: {})", p.room, p.error)
        })
        .collect();
    if report.problems.len() > MAX_ROOMS_NAMED {
        parts.push(format!("and {} more", report.problems.len() - MAX_ROOMS_NAMED));
    }
    let done = if joining {
        "the others are joined"
    } else {
        "the others are in line"
    };
    Err(Error::Rooms {
        reason: if joining { "RoomNotJoinable" } else { "RoomNotLeft" },
        message: format!(
            "{} of the rooms not in line ({done}): {}",
            report.problems.len(),
            parts.join("; ")
        ),
        transient: report.problems.iter().any(|p| p.transient),
    })
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
    user.pending_creation()
        .filter(|p| p.user_id == user_id.as_str())
        .map(|p| plan::PendingCreation {
            requested_at: p.requested_at,
            last_requested_at: p.last_requested_at.unwrap_or(p.requested_at),
        })
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
    // A field re-sent after a partly applied call counts once.
    let mut fields: Vec<&str> = Vec::new();
    for f in p.updates.iter().flatten().copied() {
        if !matches!(f, "password" | "deactivated") && !fields.contains(&f) {
            fields.push(f);
        }
    }
    if p.created {
        // One Event for a new account, with what was set: at a thousand new
        // accounts an Event per field is thousands of API calls for nothing.
        let mut set = fields.clone();
        if p.password_applied {
            set.push("password");
        }
        let note = match set.is_empty() {
            true => format!("created {id}"),
            false => format!("created {id} with {}", set.join(", ")),
        };
        ctx.publish(user, EventType::Normal, "Created", note).await;
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
    if !fields.is_empty() && !p.created {
        ctx.publish(
            user,
            EventType::Normal,
            "Updated",
            format!("updated {} of {id}", fields.join(", ")),
        )
        .await;
    }
    if p.password_applied && !p.created {
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
    // One Event per pass for the rooms joined and one for those left: at a
    // thousand new accounts an Event per room is thousands of API calls.
    if let Some(rooms) = &out.rooms {
        if !rooms.joined.is_empty() {
            let note = format!("joined {id} to {}", rooms.joined.join(", "));
            ctx.publish(user, EventType::Normal, "JoinedRoom", note).await;
        }
        if !rooms.left.is_empty() {
            let note = format!("{id} left {}", rooms.left.join(", "));
            ctx.publish(user, EventType::Normal, "LeftRoom", note).await;
        }
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
    let skip = |note: String| async move {
        ctx.publish(user.as_ref(), EventType::Warning, "CleanupSkipped", note)
            .await;
        Ok(Action::await_change())
    };
    if skip_cleanup(user.as_ref()) {
        return skip(format!("{SKIP_CLEANUP} is \"true\": the account is left as it is")).await;
    }
    // The cached copy may predate the status write of a pass that ran
    // while the deletion came (an adoption recorded just now, say).
    let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
    let Some(fresh) = api.get_opt(&user.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let user = &Arc::new(fresh);
    if user.spec.management_policy == ManagementPolicy::Observe {
        // An observer never writes to the homeserver, deletion included:
        // it only lets go, whatever deletionPolicy says.
        let note = "managementPolicy is Observe: the account is left as it is".to_string();
        ctx.publish(user.as_ref(), EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    }
    let policy = user.spec.deletion_policy;
    let status = user.status.clone().unwrap_or_default();
    let recorded = status
        .user_id
        .clone()
        .or_else(|| user.pending_creation().map(|p| p.user_id));
    let Some(recorded) = recorded.filter(|_| policy != DeletionPolicy::Retain) else {
        let note = match policy {
            DeletionPolicy::Retain => "deletionPolicy is Retain: the account is left as it is".to_string(),
            _ => "no account was created or adopted for this MatrixUser: nothing to clean up".to_string(),
        };
        ctx.publish(user.as_ref(), EventType::Normal, "Retained", note).await;
        return Ok(Action::await_change());
    };
    let hs = match homeserver_of(ctx, user).await {
        Ok(hs) => hs,
        Err(Error::HomeserverNotFound { name }) => {
            // The Homeserver is gone for good: nothing can reach the
            // account, and holding on would wedge the deletion. (A
            // Homeserver that is being deleted waits for its MatrixUsers.)
            let note = format!("Homeserver {name:?} is gone: {recorded} was left as it is ({policy:?} not applied)");
            ctx.publish(user.as_ref(), EventType::Warning, "HomeserverGone", note)
                .await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(record_cleanup_failure(ctx, user, e).await),
    };
    if skip_cleanup(hs.as_ref()) {
        return skip(format!(
            "the Homeserver's {SKIP_CLEANUP} is \"true\": {recorded} is left as it is"
        ))
        .await;
    }
    let hs = match ready_homeserver(ctx, &hs).await {
        Ok(hs) => hs,
        Err(e) => return Err(record_cleanup_failure(ctx, user, e).await),
    };
    let name = user.name_any();
    let user_id = UserId::new(user.spec.effective_localpart(&name), &hs.server_name)?;
    if hs.admin_user_id.as_deref() == Some(user_id.as_str()) {
        let note = format!(
            "{user_id} is the account of the Homeserver's admin token, which the operator does not manage: it was left as it is"
        );
        ctx.publish(user.as_ref(), EventType::Warning, "Retained", note).await;
        return Ok(Action::await_change());
    }
    let other = match ownership::live_other_owner(ctx, user, &user_id, status.account_creation_ts).await {
        Ok(other) => other,
        Err(e) => return Err(record_cleanup_failure(ctx, user, e).await),
    };
    if let Some(other) = other {
        let note = format!("MatrixUser {other} records {user_id} as its own: it was left as it is");
        ctx.publish(user.as_ref(), EventType::Warning, "Retained", note).await;
        return Ok(Action::await_change());
    }
    let authority = Authority {
        owned: status.user_id.as_deref() == Some(user_id.as_str()),
        owned_creation_ts: status.account_creation_ts,
        pending_creation: pending_creation_of(user, &user_id),
        admin_allowed: hs.policy.allow_admin_users,
        ..Authority::default()
    };
    let deadline = ctx.config.reconcile_timeout;
    let deleted = match tokio::time::timeout(deadline, delete_account(&hs.backend, &user_id, policy, authority)).await {
        Ok(deleted) => deleted.map_err(Error::from),
        Err(_) => Err(Error::TooSlow { deadline }),
    };
    match deleted {
        Ok(outcome) => {
            let (reason, note) = match outcome {
                Ok(DeletionAction::Deactivate { erase: true }) => {
                    ("Erased", format!("deactivated and erased {user_id}"))
                }
                Ok(DeletionAction::Deactivate { erase: false }) => ("Deactivated", format!("deactivated {user_id}")),
                Err(Untouched::AlreadyDone) => ("Deleted", format!("{user_id} was {policy:?}d already")),
                Err(Untouched::AccountGone) => ("Deleted", format!("{user_id} does not exist: nothing to do")),
                Err(Untouched::NotOwned) => (
                    "Retained",
                    format!("{user_id} is not the account created for this MatrixUser: it was left as it is"),
                ),
                Err(Untouched::Retained) => (
                    "Retained",
                    "deletionPolicy is Retain: the account is left as it is".to_string(),
                ),
                Err(Untouched::ServerAdmin) => (
                    "Retained",
                    format!(
                        "{user_id} is a server admin and the Homeserver's policy.allowAdminUsers is false: it was left as it is"
                    ),
                ),
            };
            let type_ = match outcome {
                Err(Untouched::ServerAdmin) => EventType::Warning,
                _ => EventType::Normal,
            };
            ctx.publish(user.as_ref(), type_, reason, note).await;
            Ok(Action::await_change())
        }
        Err(e) => Err(record_cleanup_failure(ctx, user, e).await),
    }
}

/// Whether a MatrixUser or Homeserver carries `skip-cleanup: "true"`.
fn skip_cleanup(obj: &impl ResourceExt) -> bool {
    obj.annotations().get(SKIP_CLEANUP).map(String::as_str) == Some("true")
}

/// The finalizer stays until the deletion policy ran: say why in status.
async fn record_cleanup_failure(ctx: &Context, user: &MatrixUser, e: Error) -> Error {
    let old = user.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let message = format!("deletion waits: {e}");
    let ready = e.condition(message.clone());
    set_condition(&mut status.conditions, &ready, user.metadata.generation, now());
    if status != old {
        let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default());
        if let Err(patch_error) =
            patch_status_at(&api, &user.name_any(), &status, user.resource_version().as_deref()).await
        {
            warn!(error = %patch_error, "cannot record the failed deletion");
        }
        ctx.publish(user, EventType::Warning, e.reason(), message).await;
    }
    e
}

#[cfg(test)]
mod tests {
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
        Error::Synapse(SynapseError::Api {
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
