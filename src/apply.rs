//! Runs plans against Synapse: read the account, plan, make the one call,
//! and again, until the plan is empty.

use std::time::Duration;

use futures::future::BoxFuture;
use tracing::{debug, info};

use crate::api::DeletionPolicy;
use crate::plan::{self, Action, Authority, DeletionAction, Desired, Owners, PendingCreation, Refusal, Untouched};
use crate::synapse::{SynapseClient, SynapseError, SynapseUser};

/// Rounds of read-plan-act before giving up on an account that does not
/// settle: create, update, one repair of a partly applied update, verify.
const MAX_ROUNDS: usize = 5;

/// Synapse may ask for a short pause (M_LIMIT_EXCEEDED); waits happen in
/// place up to this long in all per sync, longer ones are left to the
/// caller's requeue (a wait in place holds one of the controller's slots).
const MAX_INLINE_WAIT: Duration = Duration::from_secs(5);

/// What a sync did, kept even when it failed halfway: a created account must
/// still be recorded as this resource's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// This sync created the account (Synapse answered 201), or recognised
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
    /// Synapse's `creation_ts` of the account, once known: recorded with the
    /// ownership so that it names this very account.
    pub creation_ts: Option<i64>,
    /// Write calls (PUT) sent to the admin API, including ones that failed:
    /// Synapse may have applied part of those.
    pub writes: usize,
}

/// What became of the pending creation record during a sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PendingOutcome {
    /// No create was asked for: the record is as it was.
    #[default]
    Unchanged,
    /// A create was asked for under this record and its answer never came
    /// (a timeout, say): keep the record, the account may be this one's.
    Unanswered(PendingCreation),
    /// Settled: the account was created (and is owned now), or it existed
    /// already and is not this resource's creation.
    Settled,
}

/// A write the executor is about to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The empty-body create.
    Create,
    /// Any other write to an existing account.
    Update,
    /// Not a write to the homeserver: taking an existing account as the
    /// resource's own (adoption, or the account of a pending creation).
    Claim,
}

/// Why a [`WriteGuard`] stopped a sync; the guard keeps the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Halt;

/// The caller's checks before the executor writes to the homeserver: that
/// what the sync is based on is current, and for a create, a pending
/// creation record made durable first.
pub trait WriteGuard: Send {
    /// Called before the first write of a sync, before every create and
    /// before an existing account is taken as the resource's own.
    /// For a create it returns the pending creation it recorded. An error
    /// stops the sync before the write.
    fn before_write(&mut self, write: Write) -> BoxFuture<'_, Result<Option<PendingCreation>, Halt>>;
}

/// A guard that checks nothing and records no pending creation: for callers
/// with no durable record of their own (tests, benchmarks, tools).
pub struct Unguarded;

impl WriteGuard for Unguarded {
    fn before_write(&mut self, _: Write) -> BoxFuture<'_, Result<Option<PendingCreation>, Halt>> {
        Box::pin(async { Ok(None) })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Synapse(#[from] SynapseError),
    #[error("the account does not settle: after {MAX_ROUNDS} rounds Synapse still differs in {fields:?}")]
    NotSettling { fields: Vec<&'static str> },
    /// The caller's guard stopped the sync before a write.
    #[error("stopped before writing")]
    Halted,
}

/// Brings the account in line with `desired`. On success, returns the
/// account as Synapse reports it, matching the spec.
pub async fn sync_account(
    client: &SynapseClient,
    desired: &Desired,
    mut authority: Authority,
    guard: &mut dyn WriteGuard,
    progress: &mut Progress,
) -> Result<SynapseUser, SyncError> {
    let mut desired = desired.clone();
    let mut last_fields = Vec::new();
    let mut waited = Duration::ZERO;
    let mut guarded = false;
    for _ in 0..MAX_ROUNDS {
        let account = client.get_user(&desired.user_id).await?;
        let owners = look_up_owners(client, &desired, account.as_ref()).await?;
        let plan = plan::plan(&desired, account.as_ref(), authority, &owners)?;
        if plan.created_by_pending || plan.adopt {
            guard
                .before_write(Write::Claim)
                .await
                .map_err(|Halt| SyncError::Halted)?;
            guarded = true;
            let created_at = account.as_ref().and_then(|a| a.creation_ts);
            authority.owned = true;
            authority.owned_creation_ts = created_at;
            progress.creation_ts = created_at;
            if plan.created_by_pending {
                info!(user_id = %desired.user_id, "recognised the account a pending creation made");
                authority.pending_creation = None;
                progress.pending_creation = PendingOutcome::Settled;
                progress.created = true;
            } else {
                info!(user_id = %desired.user_id, "adopting an existing account");
                progress.adopted = true;
            }
        }
        let update = match (plan.action, account) {
            (None, Some(account)) => {
                progress.creation_ts = account.creation_ts;
                return Ok(account);
            }
            (Some(Action::Update(update)), _) => update,
            (Some(Action::Create), _) => {
                // A create of this ID asked for before, never answered.
                let earlier_unanswered = authority.pending_creation.is_some();
                let pending = guard
                    .before_write(Write::Create)
                    .await
                    .map_err(|Halt| SyncError::Halted)?;
                guarded = true;
                authority.pending_creation = pending;
                let outcome = match client.put_user(&desired.user_id, &Default::default()).await {
                    Ok(o) => o,
                    Err(e) => {
                        progress.writes += 1;
                        if refused_by_synapse(&e) && !earlier_unanswered {
                            // A Matrix error (M_USER_IN_USE to the loser of
                            // two creates, say): this request created nothing,
                            // and no earlier one of ours may have (a refusal
                            // after an unanswered create may be that create's
                            // doing: the record stays).
                            authority.pending_creation = None;
                            progress.pending_creation = PendingOutcome::Settled;
                        } else if let Some(p) = pending {
                            // No answer (or see above): whether Synapse
                            // created the account is unknown; the next
                            // round's read tells, under the record.
                            progress.pending_creation = PendingOutcome::Unanswered(p);
                        }
                        wait_if_rate_limited(e, &mut waited).await?;
                        continue;
                    }
                };
                progress.writes += 1;
                authority.pending_creation = None;
                progress.pending_creation = PendingOutcome::Settled;
                if outcome.created {
                    info!(user_id = %desired.user_id, "created the account");
                    authority.owned = true;
                    authority.owned_creation_ts = outcome.user.creation_ts;
                    progress.creation_ts = outcome.user.creation_ts;
                    progress.created = true;
                }
                // Otherwise it appeared meanwhile, untouched by the empty
                // body; the next round decides whether it may be adopted.
                continue;
            }
            (None, None) => unreachable!("plan() creates a missing account"),
        };
        if !guarded {
            guard
                .before_write(Write::Update)
                .await
                .map_err(|Halt| SyncError::Halted)?;
            guarded = true;
        }
        last_fields = plan::changed_fields(&update);
        debug!(user_id = %desired.user_id, fields = ?last_fields, "updating the account");
        progress.writes += 1;
        if let Err(e) = client.put_user(&desired.user_id, &update).await {
            // The PUT may have been partly applied (a rate-limited one sets
            // the displayname before it fails): plan again from what Synapse
            // reports, after a short wait if it asked for one.
            wait_if_rate_limited(e, &mut waited).await?;
            continue;
        }
        progress.updates.push(last_fields.clone());
        if update.password.is_some()
            && let Some(p) = desired.password.as_mut()
        {
            p.applied = true;
            progress.password_applied = true;
        }
        match update.deactivated {
            Some(true) => progress.deactivated = true,
            Some(false) => {
                progress.reactivated = true;
                progress.reactivated_without_password = plan.reactivates_without_password;
            }
            None => {}
        }
    }
    Err(SyncError::NotSettling { fields: last_fields })
}

/// Whether Synapse answered a call with a Matrix error of the 4xx kind: it
/// refused the request, so the request changed nothing it would report as
/// created.
fn refused_by_synapse(e: &SynapseError) -> bool {
    matches!(e, SynapseError::Api { status: 400..=499, .. })
}

/// Returns the error unless it is a rate limit short enough to wait out
/// here within what is left of [`MAX_INLINE_WAIT`], in which case it waits
/// and returns `Ok`.
async fn wait_if_rate_limited(e: SynapseError, waited: &mut Duration) -> Result<(), SynapseError> {
    match e.retry_after() {
        Some(wait) if *waited + wait <= MAX_INLINE_WAIT => {
            debug!(?wait, "rate limited by Synapse; waiting");
            tokio::time::sleep(wait).await;
            *waited += wait;
            Ok(())
        }
        _ => Err(e),
    }
}

async fn look_up_owners(
    client: &SynapseClient,
    desired: &Desired,
    account: Option<&SynapseUser>,
) -> Result<Owners, SynapseError> {
    let wanted = plan::lookups(desired, account);
    let mut owners = Owners::default();
    for t in wanted.threepids {
        let owner = client.threepid_owner(&t.medium, &t.address).await?;
        owners.threepids.push((t, owner));
    }
    for e in wanted.external_ids {
        let mut owner = client.external_id_owner(&e.auth_provider, &e.external_id).await?;
        // Synapse caches this lookup, and a PUT that removes an external id
        // does not invalidate it (1.163.2): believe it only if the account
        // named still holds the id.
        if let Some(other) = owner.as_deref().filter(|o| *o != desired.user_id.as_str())
            && !client
                .get_user_raw(other)
                .await?
                .is_some_and(|u| u.external_ids.contains(&e))
        {
            owner = None;
        }
        owners.external_ids.push((e, owner));
    }
    Ok(owners)
}

/// Carries out a deletion policy. Returns what was done, or why nothing was.
pub async fn delete_account(
    client: &SynapseClient,
    user_id: &crate::synapse::UserId,
    policy: DeletionPolicy,
    authority: Authority,
) -> Result<Result<DeletionAction, Untouched>, SynapseError> {
    if policy == DeletionPolicy::Retain {
        return Ok(Err(Untouched::Retained));
    }
    let account = client.get_user(user_id).await?;
    let action = plan::plan_deletion(policy, authority, account.as_ref());
    if let Ok(DeletionAction::Deactivate { erase }) = action {
        client.deactivate(user_id, erase).await?;
        info!(%user_id, erase, "deactivated the account");
    }
    Ok(action)
}
