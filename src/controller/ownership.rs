//! One Matrix ID, one owner: which MatrixUser may manage an account.
//!
//! Two checks, for two moments. Every pass checks the caches of every
//! watched scope ([`check_unique`]): cheap, and enough to settle duplicates
//! that already recorded their status. Before the operator takes an
//! existing account as a resource's own (adoption, or the account of a
//! pending creation), it asks the API server ([`other_claimant`]), since a
//! rival's status may not have reached the cache yet.

use kube::api::ListParams;
use kube::{Api, Resource, ResourceExt};

use super::{Context, Error};
use crate::api::MatrixUser;
use crate::synapse::UserId;

/// The order in which duplicates win when neither owns the account: the
/// older resource, then namespace and name (creation times have a
/// resolution of one second).
fn seniority(u: &MatrixUser) -> (Option<k8s_openapi::jiff::Timestamp>, String, String) {
    (
        u.meta().creation_timestamp.as_ref().map(|t| t.0),
        u.namespace().unwrap_or_default(),
        u.name_any(),
    )
}

fn same_resource(a: &MatrixUser, b: &MatrixUser) -> bool {
    match (a.uid(), b.uid()) {
        (Some(x), Some(y)) => x == y,
        _ => a.namespace() == b.namespace() && a.name_any() == b.name_any(),
    }
}

/// Whether `other` records `user_id` as its own account.
fn records(other: &MatrixUser, user_id: &UserId) -> bool {
    other.status.as_ref().and_then(|s| s.user_id.as_deref()) == Some(user_id.as_str())
}

/// Whether `other` asked for the creation of `user_id` and has not
/// recorded the outcome yet.
fn is_creating(other: &MatrixUser, user_id: &UserId) -> bool {
    other.pending_creation().is_some_and(|p| p.user_id == user_id.as_str())
}

/// Two MatrixUsers naming one Matrix ID: the one that owns the account
/// keeps it; when neither does, the senior one of the same namespace and
/// Homeserver does. The other gets a Conflict and writes nothing.
pub fn check_unique(ctx: &Context, user: &MatrixUser, user_id: &UserId, owned: bool) -> Result<(), Error> {
    let localpart = user.effective_localpart();
    let mine = seniority(user);
    // Only resources of the same localpart, or recording this very ID, can
    // hold it: a cheap filter over the whole cache, then the rules.
    let candidates = ctx.cached_users_of_localparts(&[localpart, user_id.localpart()], |o| {
        o.effective_localpart() == localpart || records(o, user_id)
    });
    let winner = candidates.into_iter().find(|other| {
        if same_resource(other, user) {
            return false;
        }
        let same_name = other.metadata.namespace == user.metadata.namespace
            && other.spec.homeserver_ref == user.spec.homeserver_ref
            && other.effective_localpart() == localpart;
        let senior = seniority(other) < mine;
        match (records(other, user_id), owned) {
            (true, false) => true,
            // Both record it (an adoption raced): the senior keeps it.
            (true, true) => senior,
            (false, true) => false,
            (false, false) => same_name && senior,
        }
    });
    match winner {
        Some(other) => Err(duplicate(user_id, &other)),
        None => Ok(()),
    }
}

fn duplicate(user_id: &UserId, other: &MatrixUser) -> Error {
    Error::DuplicateUser {
        user_id: user_id.to_string(),
        other: format!("{}/{}", other.namespace().unwrap_or_default(), other.name_any()),
    }
}

/// The field selector term `field=value`, the value escaped as the API
/// server's grammar demands (apimachinery's `fields.EscapeValue`): a `\`,
/// `,` or `=` in a value is data only behind a backslash. A localpart may
/// hold `=` (Synapse's SSO mapping makes such), and an unescaped one gets a
/// 400 that would stop deletion and adoption for good.
fn field_equals(field: &str, value: &str) -> String {
    let mut term = String::with_capacity(field.len() + 1 + 2 * value.len());
    term.push_str(field);
    term.push('=');
    for c in value.chars() {
        if matches!(c, '\\' | ',' | '=') {
            term.push('\\');
        }
        term.push(c);
    }
    term
}

/// The MatrixUsers of every watched namespace, read from the API server,
/// that could hold `user_id`: only resources naming the same localpart can,
/// so two field-selected lists per scope find them all.
async fn candidates(ctx: &Context, user_id: &UserId) -> Result<Vec<MatrixUser>, Error> {
    let localpart = user_id.localpart();
    let scopes: Vec<Api<MatrixUser>> = if ctx.config.namespaces.is_empty() {
        vec![Api::all(ctx.client.clone())]
    } else {
        ctx.config
            .namespaces
            .iter()
            .map(|ns| Api::namespaced(ctx.client.clone(), ns))
            .collect()
    };
    let mut found = Vec::new();
    for api in scopes {
        for selector in [
            field_equals("metadata.name", localpart),
            field_equals("spec.localpart", localpart),
        ] {
            found.extend(api.list(&ListParams::default().fields(&selector)).await?.items);
        }
    }
    Ok(found)
}

/// Fails with a Conflict if another MatrixUser, in any watched namespace,
/// owns `user_id` or is creating it, as the API server says now.
pub async fn other_claimant(ctx: &Context, user: &MatrixUser, user_id: &UserId) -> Result<(), Error> {
    match candidates(ctx, user_id)
        .await?
        .iter()
        .find(|o| !same_resource(o, user) && (records(o, user_id) || is_creating(o, user_id)))
    {
        Some(other) => Err(duplicate(user_id, other)),
        None => Ok(()),
    }
}

/// Another MatrixUser, in any watched namespace and not being deleted
/// itself, that records the very account `user_id` created at
/// `creation_ts` as its own, or is creating it, as the API server says now:
/// the deletion policy of `user` must not touch that account.
pub async fn live_other_owner(
    ctx: &Context,
    user: &MatrixUser,
    user_id: &UserId,
    creation_ts: Option<i64>,
) -> Result<Option<String>, Error> {
    let holds = |other: &MatrixUser| {
        is_creating(other, user_id)
            || (records(other, user_id)
                && match (other.status.as_ref().and_then(|s| s.account_creation_ts), creation_ts) {
                    (Some(theirs), Some(mine)) => theirs == mine,
                    _ => true,
                })
    };
    Ok(candidates(ctx, user_id)
        .await?
        .iter()
        .find(|other| !same_resource(other, user) && other.meta().deletion_timestamp.is_none() && holds(other))
        .map(|other| format!("{}/{}", other.namespace().unwrap_or_default(), other.name_any())))
}

#[cfg(test)]
mod tests {
    use super::field_equals;

    #[test]
    fn field_selector_values_escape_backslash_comma_and_equals() {
        assert_eq!(field_equals("spec.localpart", "alice"), "spec.localpart=alice");
        assert_eq!(field_equals("spec.localpart", "a=b"), r"spec.localpart=a\=b");
        assert_eq!(
            field_equals("spec.localpart", r"a,b\c=="),
            r"spec.localpart=a\,b\\c\=\="
        );
        assert_eq!(field_equals("metadata.name", "x./+-_"), "metadata.name=x./+-_");
    }
}
