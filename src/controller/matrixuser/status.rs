//! What a pass leaves behind: the status (written on the copy it was
//! based on), and the Events of what it did and of a new failure.

use super::*;

/// Publishes the Warning Event of a failure that is new: a reason or
/// standing not shown before (a new message alone is not news). Waiting
/// for a Homeserver that is being checked is no failure.
pub(super) async fn publish_failure(ctx: &Context, user: &MatrixUser, old: &MatrixUserStatus, ready: &Ready) {
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

/// The status a pass leaves, built on `base` (the status as last read or
/// written). Ownership, once recorded, is never dropped: only a new
/// creation or adoption replaces it.
pub(super) fn status_after(
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
pub(super) async fn record_status(
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

pub(super) fn display_id(outcome: &Outcome) -> String {
    outcome
        .user_id
        .as_ref()
        .map_or_else(|| "the account".to_string(), UserId::to_string)
}

pub(super) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

pub(super) async fn publish_progress(ctx: &Context, user: &MatrixUser, out: &Outcome) {
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
