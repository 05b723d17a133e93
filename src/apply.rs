//! Runs plans against a backend: read the account, plan, make the changes,
//! and again, until the plan is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::future::BoxFuture;
use tracing::{debug, info, warn};

use crate::account::{Account, UserId};
use crate::api::{DeletionPolicy, ManagedRoom, RoomName};
use crate::backend::{AccountBackend, BackendError, ErrorClass, Parts, RoomBackend};
pub use crate::plan::ownership::PendingOutcome;
use crate::plan::ownership::{Claim, CreateAnswer, Ownership};
use crate::plan::{self, Action, Authority, DeletionAction, Desired, PendingCreation, Refusal, Untouched};
use crate::synapse::SynapseClient;

/// Rounds of read-plan-act before giving up on an account that does not
/// settle: create, update, one repair of a partly applied update, verify.
const MAX_ROUNDS: usize = 5;

/// A server may ask for a short pause (M_LIMIT_EXCEEDED); waits happen in
/// place up to this long in all per sync, longer ones are left to the
/// caller's requeue (a wait in place holds one of the controller's slots).
const MAX_INLINE_WAIT: Duration = Duration::from_secs(5);

/// What a sync did, kept even when it failed halfway: a created account must
/// still be recorded as this resource's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// This sync created the account (the backend said so), or recognised
    /// it as the one a pending creation made.
    pub created: bool,
    /// This sync adopted an existing account.
    pub adopted: bool,
    /// What became of the pending creation record.
    pub pending_creation: PendingOutcome,
    /// The desired password was sent and accepted.
    pub password_applied: bool,
    pub deactivated: bool,
    pub reactivated: bool,
    /// Re-activated with no password to give: password login will fail.
    pub reactivated_without_password: bool,
    /// The names of the fields of each update sent (never their values).
    pub updates: Vec<Vec<&'static str>>,
    /// The backend's creation time of the account, once known: recorded with the
    /// ownership so that it names this very account.
    pub creation_ts: Option<i64>,
    /// The backend's own ID of the account (MAS's), once known.
    pub account_id: Option<String>,
    /// Write calls sent to the backend, including ones that failed: the
    /// server may have applied part of those.
    pub writes: usize,
}

/// A write the executor is about to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The create (of the account, with whatever the backend sets in the
    /// same create-only call).
    Create,
    /// Any other write to an existing account.
    Update,
    /// Not a write to the homeserver: taking an existing account as the
    /// resource's own (adoption, or the account of a pending creation).
    Claim,
}

/// A stop of a [`WriteGuard`] that says no more than that it stopped: the
/// stop of guards with no reason to give (tests, tools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Halt;

/// The caller's checks before the executor writes to the homeserver: that
/// what the sync is based on is current, and for a create, a pending
/// creation record made durable first. `S` is why a guard stops a sync:
/// it comes back to the caller in [`SyncError::Halted`].
pub trait WriteGuard<S = Halt>: Send {
    /// Called before the first write of a sync, before every create and
    /// before an existing account is taken as the resource's own.
    /// For a create it returns the pending creation it recorded. An error
    /// stops the sync before the write.
    fn before_write(&mut self, write: Write) -> BoxFuture<'_, Result<Option<PendingCreation>, S>>;
}

/// A guard that checks nothing and records no pending creation: for callers
/// with no durable record of their own (tests, benchmarks, tools).
pub struct Unguarded;

impl WriteGuard for Unguarded {
    fn before_write(&mut self, _: Write) -> BoxFuture<'_, Result<Option<PendingCreation>, Halt>> {
        Box::pin(async { Ok(None) })
    }
}

/// Why a sync did not bring the account in line. `S`: why the caller's
/// guard stopped it (see [`WriteGuard`]).
#[derive(Debug, thiserror::Error)]
pub enum SyncError<S = Halt> {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The backend cannot manage the spec as it is.
    #[error("{0}")]
    Unsupported(String),
    #[error("the account does not settle: after {MAX_ROUNDS} rounds it still differs in {fields:?}")]
    NotSettling { fields: Vec<&'static str> },
    /// The caller's guard stopped the sync before a write, for the reason
    /// it gives.
    #[error("stopped before writing")]
    Halted(S),
}

/// Brings the account in line with `desired`. On success, returns the
/// account as the backend reports it, matching the spec.
///
/// Each round reads the account, plans, asks the guard, and acts; the
/// ownership transitions are [`Ownership`]'s, recorded in `progress` as
/// they happen (a sync cut off by its caller keeps what it found out).
pub async fn sync_account<B: AccountBackend, S>(
    backend: &B,
    desired: &Desired,
    authority: Authority,
    guard: &mut dyn WriteGuard<S>,
    progress: &mut Progress,
) -> Result<Account, SyncError<S>> {
    let mut desired = desired.clone();
    if let Err(unsupported) = backend.prepare(&mut desired).await? {
        return Err(SyncError::Unsupported(unsupported.0));
    }
    // A resource that never had an account may go straight to the create,
    // when that changes nothing of one that exists.
    let fresh = !authority.owned
        && authority.pending_creation.is_none()
        && !authority.adopt_requested
        && backend.creates_before_reading(&desired);
    // Only what the plan compares is read (MAS: no emails or upstream
    // links for a spec without threepids or externalIds).
    let parts = Parts::managed_by(&desired);
    let mut sync = Syncing {
        backend,
        guard,
        progress,
        desired,
        own: Ownership::new(authority),
        waited: Duration::ZERO,
        guarded: false,
        created_now: false,
        last_fields: Vec::new(),
    };
    // The account as the last answer reported it, when it did: no need to
    // read it again.
    let mut answered: Option<Option<Account>> = fresh.then_some(None);
    for _ in 0..MAX_ROUNDS {
        let from_answer = answered.is_some();
        let account = match answered.take() {
            Some(account) => account,
            None => sync.backend.read(&sync.desired.user_id, parts).await?,
        };
        if let Some(account) = &account {
            sync.own.observed(account);
            sync.progress.record(&sync.own.claim);
        }
        let owners = sync
            .backend
            .owners(account.as_ref(), plan::lookups(&sync.desired, account.as_ref()))
            .await?;
        let plan = plan::plan(&sync.desired, account.as_ref(), sync.own.authority, &owners)?;
        if Ownership::claims(&plan) {
            sync.claim(&plan, account.as_ref()).await?;
        }
        answered = match (plan.action, account) {
            // A create whose answer did not say when the account was made
            // (shared-secret registration): one read does, which settles
            // the pending-creation record in the status written next
            // instead of leaving it, on the object and in every cached copy
            // of it, until the next sync.
            (None, Some(account)) if from_answer && sync.own.awaits_creation_time(&account) => None,
            (None, Some(account)) => {
                sync.own.in_line(&account);
                sync.progress.record(&sync.own.claim);
                return Ok(account);
            }
            (Some(Action::Update(changes)), Some(account)) => {
                sync.update(&account, &changes, plan.reactivates_without_password)
                    .await?
            }
            (Some(Action::Create), _) => sync.create().await?,
            (_, None) => unreachable!("plan() creates a missing account"),
        };
    }
    Err(SyncError::NotSettling {
        fields: sync.last_fields,
    })
}

/// A sync under way: what its rounds share. Each step returns the account
/// as the backend's answer reported it, if it did (`None`: read it again).
struct Syncing<'a, B, S> {
    backend: &'a B,
    guard: &'a mut dyn WriteGuard<S>,
    progress: &'a mut Progress,
    desired: Desired,
    own: Ownership,
    /// Spent waiting out rate limits in place (see [`MAX_INLINE_WAIT`]).
    waited: Duration,
    /// The guard allowed a write this sync: an update needs no other check.
    guarded: bool,
    /// This sync created the account: it has no sessions yet.
    created_now: bool,
    /// The fields of the last update, for a sync that does not settle.
    last_fields: Vec<&'static str>,
}

impl<B: AccountBackend, S> Syncing<'_, B, S> {
    async fn before_write(&mut self, write: Write) -> Result<Option<PendingCreation>, SyncError<S>> {
        let pending = self.guard.before_write(write).await.map_err(SyncError::Halted)?;
        self.guarded = true;
        Ok(pending)
    }

    /// Takes the account as this resource's: adopted, or made by its
    /// pending creation.
    async fn claim(&mut self, plan: &plan::Plan, account: Option<&Account>) -> Result<(), SyncError<S>> {
        self.before_write(Write::Claim).await?;
        self.own.claimed(plan, account);
        self.progress.record(&self.own.claim);
        if plan.created_by_pending {
            info!(user_id = %self.desired.user_id, "recognised the account a pending creation made");
        } else {
            info!(user_id = %self.desired.user_id, "adopting an existing account");
        }
        Ok(())
    }

    async fn create(&mut self) -> Result<Option<Option<Account>>, SyncError<S>> {
        let pending = self.before_write(Write::Create).await?;
        self.own.create_asked(pending);
        self.progress.writes += 1;
        let created = match self.backend.create(&self.desired).await {
            Ok(created) => created,
            Err(e) => {
                // A refusal (M_USER_IN_USE to the loser of two creates,
                // say) created nothing.
                self.own.create_failed(e.is_refusal());
                self.progress.record(&self.own.claim);
                wait_if_rate_limited(e, &mut self.waited).await?;
                return Ok(None);
            }
        };
        self.own.create_answered(CreateAnswer {
            created: created.created,
            creation_ts: created.creation_ts,
            account_id: created.account_id.clone(),
        });
        self.progress.record(&self.own.claim);
        if created.created {
            info!(user_id = %self.desired.user_id, "created the account");
            self.created_now = true;
            if !created.fields.is_empty() {
                self.progress.updates.push(created.fields);
            }
            if created.password {
                password_applied(&mut self.desired, self.progress);
            }
        }
        Ok(created.account.map(Some))
    }

    async fn update(
        &mut self,
        account: &Account,
        changes: &plan::Changes,
        reactivates_without_password: bool,
    ) -> Result<Option<Option<Account>>, SyncError<S>> {
        if !self.guarded {
            self.before_write(Write::Update).await?;
        }
        self.last_fields = changes.field_names();
        debug!(user_id = %self.desired.user_id, fields = ?self.last_fields, "updating the account");
        let applied = self
            .backend
            .apply(&self.desired.user_id, account, changes, self.created_now)
            .await;
        self.progress.writes += applied.writes;
        self.progress.updates.extend(applied.fields);
        if applied.password {
            password_applied(&mut self.desired, self.progress);
        }
        match applied.deactivated {
            Some(true) => self.progress.deactivated = true,
            Some(false) => {
                self.progress.reactivated = true;
                self.progress.reactivated_without_password = reactivates_without_password;
            }
            None => {}
        }
        if let Some(e) = applied.error {
            // The changes may have been applied in part (a rate-limited PUT
            // sets the displayname before it fails): plan again from what
            // the backend reports, after a short wait if it asked for one.
            wait_if_rate_limited(e, &mut self.waited).await?;
            return Ok(None);
        }
        Ok(applied.account.map(Some))
    }
}

/// The desired password was set: the next round does not send it again.
fn password_applied(desired: &mut Desired, progress: &mut Progress) {
    if let Some(p) = desired.password.as_mut() {
        p.applied = true;
        progress.password_applied = true;
    }
}

impl Progress {
    /// Records what the sync found out about the account's ownership.
    fn record(&mut self, claim: &Claim) {
        self.created = claim.created;
        self.adopted = claim.adopted;
        self.pending_creation = claim.pending_creation;
        self.creation_ts = claim.creation_ts;
        self.account_id = claim.account_id.clone();
    }
}

/// Returns the error unless it is a rate limit short enough to wait out
/// here within what is left of [`MAX_INLINE_WAIT`], in which case it waits
/// and returns `Ok`.
async fn wait_if_rate_limited(e: BackendError, waited: &mut Duration) -> Result<(), BackendError> {
    match e.retry_after() {
        // Saturating: the wait is a server's number (bounded by the
        // backends, but this must not panic whatever it is).
        Some(wait) if waited.saturating_add(wait) <= MAX_INLINE_WAIT => {
            debug!(?wait, "rate limited; waiting");
            tokio::time::sleep(wait).await;
            *waited = waited.saturating_add(wait);
            Ok(())
        }
        _ => Err(e),
    }
}

/// Carries out a deletion policy. Returns what was done, or why nothing was.
pub async fn delete_account<B: AccountBackend>(
    backend: &B,
    user_id: &UserId,
    policy: DeletionPolicy,
    authority: Authority,
) -> Result<Result<DeletionAction, Untouched>, BackendError> {
    if policy == DeletionPolicy::Retain {
        return Ok(Err(Untouched::Retained));
    }
    // The deletion plan looks at the account's state and, for `Erase`,
    // whether it is erased (the profile): never at its threepids or links.
    let parts = Parts {
        threepids: false,
        external_ids: false,
        ..Parts::ALL
    };
    let account = backend.read(user_id, parts).await?;
    let action = plan::plan_deletion(policy, authority, account.as_ref());
    if let (Ok(DeletionAction::Deactivate { erase }), Some(account)) = (action, &account) {
        backend.deactivate(user_id, account, erase).await?;
        info!(%user_id, erase, "deactivated the account");
    }
    Ok(action)
}

/// What was being done with a room when it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoomStep {
    /// Looking its alias up in the directory.
    Resolve,
    Join,
    Leave,
}

/// A room that could not be brought in line this pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomProblem {
    /// As listed in the spec, or the room ID of a membership to leave.
    pub room: String,
    pub step: RoomStep,
    /// What the server said: scrubbed of secrets and cut short by the
    /// client (never a token).
    pub error: String,
    /// Worth retrying soon (a network error, a 5xx, a rate limit), as
    /// opposed to waiting for a change (the admin not in the room, a ban,
    /// an unknown room or alias).
    pub transient: bool,
}

/// What a rooms pass did.
#[derive(Debug, Default)]
pub struct RoomsReport {
    /// The memberships the operator made for the account, after the pass.
    pub records: Vec<ManagedRoom>,
    /// Rooms joined and left this pass, as listed (or by ID).
    pub joined: Vec<String>,
    pub left: Vec<String>,
    pub problems: Vec<RoomProblem>,
    /// How many listed rooms the account is in after the pass.
    pub joined_listed: usize,
    /// Write calls sent (joins, leaves), including failed ones.
    pub writes: usize,
    /// A failure of the whole pass (the account's rooms could not be
    /// read, the admin token was refused): `records` are then as they were
    /// but for what was done before it.
    pub failed: Option<BackendError>,
}

/// Whether a failed room call concerns every room, not just this one: the
/// admin token refused, or no Synapse answering.
pub(crate) fn fails_every_room(e: &BackendError) -> bool {
    matches!(e.class(), ErrorClass::Unauthorized | ErrorClass::NotSynapse)
}

fn room_problem(room: &str, step: RoomStep, e: &BackendError) -> RoomProblem {
    RoomProblem {
        room: room.to_string(),
        step,
        error: e.to_string(),
        transient: matches!(e.class(), ErrorClass::Transient | ErrorClass::RateLimited(_)),
    }
}

/// Brings the account's room memberships in line with `listed`: one read
/// of the rooms it is in, a directory lookup per alias that needs one
/// (once per pass), a join per missing room, and the leaves, made as the
/// user with a short-lived token made and ended here. A room that fails
/// does not stop the others.
pub async fn sync_rooms<B: RoomBackend>(
    backend: &B,
    account: &Account,
    user_id: &UserId,
    listed: &[RoomName],
    recorded: &[ManagedRoom],
    purpose: &str,
) -> RoomsReport {
    let mut report = RoomsReport {
        records: recorded.to_vec(),
        ..RoomsReport::default()
    };
    let synapse = backend.rooms();
    let joined: BTreeSet<String> = match synapse.joined_rooms(user_id).await {
        Ok(rooms) => rooms.into_iter().collect(),
        Err(e) => {
            report.failed = Some(e.into());
            return report;
        }
    };
    let active = !account.deactivated;
    let aliases = plan::aliases_to_resolve(listed, recorded, &joined, active);
    let (resolved, lookup_errors) = match resolve_aliases(synapse, aliases).await {
        Ok(looked_up) => looked_up,
        Err(e) => {
            report.failed = Some(e);
            return report;
        }
    };
    let plan = plan::plan_rooms(listed, recorded, &joined, &resolved, active);
    report.problems.extend(
        lookup_errors
            .into_iter()
            .filter(|p| plan.unresolved.iter().any(|u| u.as_str() == p.room)),
    );
    report.joined_listed = plan.joined_listed;
    report.records = plan.kept.clone();
    // Until left, a membership to leave stays recorded.
    report.records.extend(plan.leave.iter().cloned());
    if let Err(e) = join_rooms(synapse, user_id, &plan.join, &mut report).await {
        report.failed = Some(e);
        return report;
    }
    if !plan.leave.is_empty() {
        leave_rooms(backend, account, user_id, &plan.leave, purpose, &mut report).await;
    }
    report
}

/// The room IDs of `aliases`, and the lookups that failed; an error that
/// concerns every room ends the lookups (see [`fails_every_room`]).
async fn resolve_aliases(
    synapse: &SynapseClient,
    aliases: Vec<RoomName>,
) -> Result<(BTreeMap<RoomName, String>, Vec<RoomProblem>), BackendError> {
    let mut resolved = BTreeMap::new();
    let mut problems = Vec::new();
    for alias in aliases {
        match synapse.resolve_alias(alias.as_str()).await {
            Ok(room_id) => {
                resolved.insert(alias, room_id);
            }
            Err(e) => {
                let e = BackendError::from(e);
                if fails_every_room(&e) {
                    return Err(e);
                }
                problems.push(room_problem(alias.as_str(), RoomStep::Resolve, &e));
            }
        }
    }
    Ok((resolved, problems))
}

/// Joins the rooms, recording each membership made; an error that
/// concerns every room ends the joins.
async fn join_rooms(
    synapse: &SynapseClient,
    user_id: &UserId,
    joins: &[plan::RoomJoin],
    report: &mut RoomsReport,
) -> Result<(), BackendError> {
    for join in joins {
        report.writes += 1;
        match synapse.join_room(&join.room_id, user_id).await {
            Ok(()) => {
                info!(%user_id, room = %join.listed_as, "joined the room");
                report.records.push(ManagedRoom {
                    room_id: join.room_id.clone(),
                    alias: join.listed_as.is_alias().then(|| join.listed_as.to_string()),
                    joined: true,
                });
                report.joined.push(join.listed_as.to_string());
                report.joined_listed += 1;
            }
            Err(e) => {
                let e = BackendError::from(e);
                if fails_every_room(&e) {
                    return Err(e);
                }
                report
                    .problems
                    .push(room_problem(join.listed_as.as_str(), RoomStep::Join, &e));
            }
        }
    }
    Ok(())
}

/// Leaves the rooms as the user, with a short-lived token made and ended
/// here; the memberships left are no longer recorded.
async fn leave_rooms<B: RoomBackend>(
    backend: &B,
    account: &Account,
    user_id: &UserId,
    leaves: &[ManagedRoom],
    purpose: &str,
    report: &mut RoomsReport,
) {
    let session = match backend
        .start_user_session(user_id, account.account_id.as_deref(), purpose)
        .await
    {
        Ok(session) => session,
        Err(e) => {
            for leave in leaves {
                report
                    .problems
                    .push(room_problem(&leave_name(leave), RoomStep::Leave, &e));
            }
            return;
        }
    };
    for leave in leaves {
        report.writes += 1;
        match backend.rooms().leave_room(&session.token, &leave.room_id).await {
            Ok(()) => {
                info!(%user_id, room = %leave_name(leave), "left the room");
                report.records.retain(|r| r.room_id != leave.room_id);
                report.left.push(leave_name(leave));
            }
            Err(e) => report
                .problems
                .push(room_problem(&leave_name(leave), RoomStep::Leave, &e.into())),
        }
    }
    // The token expires on its own soon: a failed end is no failure of
    // the pass.
    if let Err(e) = backend.end_user_session(session).await {
        warn!(%user_id, error = %e, "cannot end the token made to leave rooms; it expires on its own");
    }
}

/// A membership to leave as Events and messages name it: its alias as
/// listed, or its ID.
fn leave_name(r: &ManagedRoom) -> String {
    r.alias.clone().unwrap_or_else(|| r.room_id.clone())
}
