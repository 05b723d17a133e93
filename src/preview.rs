//! What applying a spec would do, found by reading only: the account as
//! the backend reports it, planned by the one pure plan ([`crate::plan`])
//! the executor runs, and the rooms by [`plan::plan_rooms`]. Nothing here
//! writes. `managementPolicy: Observe` reports what it finds; the `plan`
//! subcommand prints it.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;

use crate::account::{Account, UserId};
use crate::api::{ManagedRoom, RoomName};
use crate::apply::SyncError;
use crate::backend::{AccountBackend, BackendError, Parts, RoomBackend};
use crate::plan::{self, Action, Authority, Desired, Owners, Plan, Refusal, RoomPlan};

/// The account and the plan the executor would start from.
#[derive(Clone, Debug)]
pub struct AccountPreview {
    /// The account as the backend reports it (`None`: there is none).
    pub account: Option<Account>,
    /// The first round's plan, or the refusal the operator would report.
    pub plan: Result<Plan, Refusal>,
    /// For a create: the fields the rounds after it would set, the way
    /// they differ from a new account's.
    pub create_fields: Vec<&'static str>,
}

/// Reads the account and plans, as the executor's first round does:
/// `prepare`, one read of the parts the spec manages, and (with
/// `lookup_owners`) the lookups of who holds the addresses and SSO links
/// to add. Only reads are sent.
pub async fn preview_account<B: AccountBackend>(
    backend: &B,
    desired: &Desired,
    authority: Authority,
    lookup_owners: bool,
) -> Result<AccountPreview, SyncError<Infallible>> {
    let mut desired = desired.clone();
    if let Err(unsupported) = backend.prepare(&mut desired).await? {
        return Err(SyncError::Unsupported(unsupported.0));
    }
    let account = backend.read(&desired.user_id, Parts::managed_by(&desired)).await?;
    let owners = match lookup_owners {
        true => {
            backend
                .owners(account.as_ref(), plan::lookups(&desired, account.as_ref()))
                .await?
        }
        false => Owners::default(),
    };
    let planned = plan::plan(&desired, account.as_ref(), authority, &owners);
    let create_fields = match &planned {
        Ok(Plan {
            action: Some(Action::Create),
            ..
        }) => {
            // The create makes the account and nothing else; the next
            // round plans the rest against what it made, which starts out
            // as a blank account.
            let blank = Account {
                name: desired.user_id.to_string(),
                ..Account::default()
            };
            match plan::plan(&desired, Some(&blank), OBSERVER, &Owners::default()) {
                Ok(Plan {
                    action: Some(Action::Update(changes)),
                    ..
                }) => changes.field_names(),
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    Ok(AccountPreview {
        account,
        plan: planned,
        create_fields,
    })
}

/// The authority an observer plans with. It writes nothing, so neither
/// ownership nor the Homeserver's policy limits what it may read and
/// compare: planned with it, an existing account's plan is the plain diff
/// between the spec and the account. It is never recorded anywhere.
pub const OBSERVER: Authority = Authority {
    owned: true,
    adopt_requested: false,
    adoption_allowed: false,
    admin_allowed: true,
    owned_creation_ts: None,
    pending_creation: None,
};

/// How an account compares with its spec, for `managementPolicy: Observe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// There is no account of the Matrix ID.
    NotFound,
    /// The account matches every field the spec manages.
    InSync,
    /// The names of the fields that differ (never their values).
    Drifted(Vec<&'static str>),
}

/// The observation from a preview planned with [`OBSERVER`] and, when the
/// spec lists rooms, their plan (`rooms`): a listed room the account is not
/// in, a membership the operator made that is no longer listed, or an
/// alias that names no room is drift of `rooms`.
pub fn observation(preview: &AccountPreview, rooms: Option<&RoomPlan>) -> Observation {
    if preview.account.is_none() {
        return Observation::NotFound;
    }
    let mut fields = match &preview.plan {
        Ok(Plan {
            action: Some(Action::Update(changes)),
            ..
        }) => changes.field_names(),
        _ => Vec::new(),
    };
    if rooms.is_some_and(|r| !r.join.is_empty() || !r.leave.is_empty() || !r.unresolved.is_empty()) {
        fields.push("rooms");
    }
    match fields.is_empty() {
        true => Observation::InSync,
        false => Observation::Drifted(fields),
    }
}

/// The room plan of an account, from reads only: the rooms it is in and
/// the aliases that need a lookup. An alias whose lookup fails stays
/// unresolved (the plan names it); a failure that concerns every room
/// (the admin token refused, no Synapse answering) is an error.
pub async fn preview_rooms<B: RoomBackend>(
    backend: &B,
    user_id: &UserId,
    listed: &[RoomName],
    recorded: &[ManagedRoom],
    active: bool,
) -> Result<RoomPlan, BackendError> {
    let synapse = backend.rooms();
    let joined: BTreeSet<String> = synapse.joined_rooms(user_id).await?.into_iter().collect();
    let mut resolved = BTreeMap::new();
    for alias in plan::aliases_to_resolve(listed, recorded, &joined, active) {
        match synapse.resolve_alias(alias.as_str()).await {
            Ok(room_id) => {
                resolved.insert(alias, room_id);
            }
            Err(e) => {
                let e = BackendError::from(e);
                if crate::apply::fails_every_room(&e) {
                    return Err(e);
                }
            }
        }
    }
    Ok(plan::plan_rooms(listed, recorded, &joined, &resolved, active))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preview(account: Option<Account>, plan: Result<Plan, Refusal>) -> AccountPreview {
        AccountPreview {
            account,
            plan,
            create_fields: Vec::new(),
        }
    }

    fn planned(desired: &Desired, account: &Account) -> AccountPreview {
        let plan = plan::plan(desired, Some(account), OBSERVER, &Owners::default());
        preview(Some(account.clone()), plan)
    }

    #[test]
    fn an_observer_sees_the_plain_diff_whoever_owns_the_account_and_whatever_the_policy() {
        let user_id = UserId::new("alice", "example.org").unwrap();
        let mut desired = Desired::existing(user_id.clone());
        desired.displayname = Some("Alice".into());
        desired.admin = Some(true);
        // A server admin no MatrixUser owns, on a Homeserver that allows
        // neither adoption nor admins: a manager would be refused; an
        // observer compares.
        let account = Account {
            name: user_id.to_string(),
            admin: true,
            displayname: Some("Alice".into()),
            ..Account::default()
        };
        assert_eq!(observation(&planned(&desired, &account), None), Observation::InSync);
        let renamed = Account {
            displayname: Some("Mallory".into()),
            admin: false,
            ..account.clone()
        };
        assert_eq!(
            observation(&planned(&desired, &renamed), None),
            Observation::Drifted(vec!["displayname", "admin"])
        );
        assert_eq!(
            observation(&preview(None, Ok(Plan::default())), None),
            Observation::NotFound
        );
    }

    #[test]
    fn rooms_not_in_line_are_drift_of_rooms() {
        let user_id = UserId::new("alice", "example.org").unwrap();
        let desired = Desired::existing(user_id.clone());
        let account = Account {
            name: user_id.to_string(),
            ..Account::default()
        };
        let listed = [RoomName("!a:example.org".into())];
        let in_it: BTreeSet<String> = ["!a:example.org".to_string()].into();
        let rooms = plan::plan_rooms(&listed, &[], &in_it, &BTreeMap::new(), true);
        assert_eq!(
            observation(&planned(&desired, &account), Some(&rooms)),
            Observation::InSync
        );
        let rooms = plan::plan_rooms(&listed, &[], &BTreeSet::new(), &BTreeMap::new(), true);
        assert_eq!(
            observation(&planned(&desired, &account), Some(&rooms)),
            Observation::Drifted(vec!["rooms"])
        );
    }
}
