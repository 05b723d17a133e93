//! The finalizer's work: the deletion policy applied to the account, or
//! the reason it is left alone.

use super::*;

pub(super) async fn cleanup(user: Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
    let result = cleanup_account(&user, ctx).await;
    if result.is_ok() {
        ctx.metrics
            .user_reason(&user.namespace().unwrap_or_default(), &user.name_any(), None);
        ctx.reset_backoff(user.as_ref());
    }
    result
}

pub(super) async fn cleanup_account(user: &Arc<MatrixUser>, ctx: &Context) -> Result<Action, Error> {
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
            let (type_, reason, note) = deletion_event(&user_id, policy, outcome);
            ctx.publish(user.as_ref(), type_, reason, note).await;
            Ok(Action::await_change())
        }
        Err(e) => Err(record_cleanup_failure(ctx, user, e).await),
    }
}

/// The Event that tells what the deletion policy did to the account, or
/// why it left it alone: only a server admin left alone is a warning.
fn deletion_event(
    user_id: &UserId,
    policy: DeletionPolicy,
    outcome: Result<DeletionAction, Untouched>,
) -> (EventType, &'static str, String) {
    let (reason, note) = match outcome {
        Ok(DeletionAction::Deactivate { erase: true }) => ("Erased", format!("deactivated and erased {user_id}")),
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
    (type_, reason, note)
}

/// Whether a MatrixUser or Homeserver carries `skip-cleanup: "true"`.
pub(super) fn skip_cleanup(obj: &impl ResourceExt) -> bool {
    obj.annotations().get(SKIP_CLEANUP).map(String::as_str) == Some("true")
}

/// The finalizer stays until the deletion policy ran: say why in status.
pub(super) async fn record_cleanup_failure(ctx: &Context, user: &MatrixUser, e: Error) -> Error {
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

    #[test]
    fn each_deletion_outcome_has_its_event() {
        let id = UserId::new("alice", "example.org").unwrap();
        let cases = [
            (
                Ok(DeletionAction::Deactivate { erase: true }),
                EventType::Normal,
                "Erased",
            ),
            (
                Ok(DeletionAction::Deactivate { erase: false }),
                EventType::Normal,
                "Deactivated",
            ),
            (Err(Untouched::AlreadyDone), EventType::Normal, "Deleted"),
            (Err(Untouched::AccountGone), EventType::Normal, "Deleted"),
            (Err(Untouched::NotOwned), EventType::Normal, "Retained"),
            (Err(Untouched::Retained), EventType::Normal, "Retained"),
            (Err(Untouched::ServerAdmin), EventType::Warning, "Retained"),
        ];
        for (outcome, type_, reason) in cases {
            let (got_type, got_reason, note) = deletion_event(&id, DeletionPolicy::Erase, outcome);
            assert_eq!((got_type, got_reason), (type_, reason), "{outcome:?}");
            assert!(
                note.contains("@alice:example.org") || outcome == Err(Untouched::Retained),
                "{note}"
            );
        }
        let (_, _, note) = deletion_event(&id, DeletionPolicy::Erase, Err(Untouched::AlreadyDone));
        assert_eq!(note, "@alice:example.org was Erased already");
    }
}
