//! The pure core: from the account a MatrixUser describes and the account as
//! its backend reports it, the changes to make next. No I/O, and no backend's
//! terms: each backend turns [`Changes`] into its own calls.
//!
//! The executor runs a plan, reads the account again and plans again until
//! the plan is empty: neither Synapse's PUT nor a series of MAS calls is
//! atomic, so what a failed or partly applied change left behind is always
//! planned from what the backend reports, never assumed.

use std::collections::BTreeSet;

use crate::account::{Account, ExternalId, Threepid, UserId, normalize_address};
use crate::api::{DeletionPolicy, ManagedRoom, MatrixUserSpec, RoomName, ThreepidMedium};
use crate::secret::SecretString;

pub mod fields;
pub mod ownership;

pub use fields::{Changes, Desired, FIELD_NAMES, Part};
use fields::{Situation, dedup, set_of, threepid_set};

/// The password the account should have.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredPassword {
    pub value: SecretString,
    /// Whether this very password was applied before (its digest is in status).
    pub applied: bool,
    pub logout_devices: bool,
}

/// What the operator may do with an account that already exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Authority {
    /// The account was created for this resource or adopted by it (status.userId).
    pub owned: bool,
    /// The spec asks to adopt an existing account (`spec.adopt`).
    pub adopt_requested: bool,
    /// The Homeserver allows adoption (`policy.allowAdoption`).
    pub adoption_allowed: bool,
    /// The Homeserver allows admins (`policy.allowAdminUsers`).
    pub admin_allowed: bool,
    /// When the owned account was created, as Synapse said then
    /// (`status.accountCreationTs`). An account of the same ID created at
    /// another time — on another server behind a repointed Homeserver, say —
    /// is not the one this resource owns.
    pub owned_creation_ts: Option<i64>,
    /// A creation this resource asked for whose outcome was never recorded
    /// (`status.pendingCreation` for this Matrix ID), and that no other
    /// resource claims or owns.
    pub pending_creation: Option<PendingCreation>,
}

impl Authority {
    /// Whether `account` is the one this resource created or adopted.
    pub fn owns(&self, account: &Account) -> bool {
        self.owned
            && match (self.owned_creation_ts, account.creation_ts) {
                (Some(recorded), Some(reported)) => recorded == reported,
                // Created, but not yet told when: under the pending record.
                (None, Some(reported)) => self.pending_creation.is_none_or(|p| p.covers(reported)),
                _ => true,
            }
    }

    /// Whether `account` was created by this resource's pending creation:
    /// the operator stopped after asking Synapse and before recording the
    /// answer.
    pub fn created_by_pending(&self, account: &Account) -> bool {
        self.pending_creation
            .zip(account.creation_ts)
            .is_some_and(|(p, ts)| p.covers(ts))
    }
}

/// How long after recording a pending creation Synapse may still see the
/// create (the request waits for a free slot, then for Synapse).
pub const PENDING_CREATION_LIFETIME_SECS: i64 = 30;

/// How far Synapse's clock may be off the operator's.
pub const CLOCK_SKEW_SECS: i64 = 60;

/// Creates asked for, the first at `requested_at` and the last at
/// `last_requested_at` (the operator's clock, seconds), none of them
/// answered: any of them may have created the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingCreation {
    pub requested_at: i64,
    pub last_requested_at: i64,
}

impl PendingCreation {
    /// One create, asked for at `t`.
    pub fn at(t: i64) -> Self {
        Self {
            requested_at: t,
            last_requested_at: t,
        }
    }

    /// Whether an account created at `creation_ts` (Synapse's clock) can be
    /// one asked for: created no earlier than the first request and no later
    /// than the last one's lifetime, give or take the clock skew.
    ///
    /// The times come from status, which anyone allowed to write it can
    /// set to anything: the window saturates at the ends of `i64`.
    pub fn covers(self, creation_ts: i64) -> bool {
        let earliest = self.requested_at.saturating_sub(CLOCK_SKEW_SECS);
        let latest = self
            .last_requested_at
            .saturating_add(PENDING_CREATION_LIFETIME_SECS + CLOCK_SKEW_SECS);
        (earliest..=latest).contains(&creation_ts)
    }
}

/// Who holds each threepid and external id the plan would add (from
/// Synapse's lookups; `None` = nobody).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    pub threepids: Vec<(Threepid, Option<String>)>,
    pub external_ids: Vec<(ExternalId, Option<String>)>,
}

/// The lookups to make before planning: every threepid and external id the
/// plan would bind to the account that it does not hold yet. Synapse would
/// silently move an email from another account; this is how we notice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lookups {
    pub threepids: Vec<Threepid>,
    pub external_ids: Vec<ExternalId>,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the account and nothing else: a create that finds the account
    /// there (it appeared meanwhile) changes nothing, so a lost race never
    /// touches another account. Fields follow in the next round.
    Create,
    /// Change these fields of the account.
    Update(Changes),
}

/// A password to set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswordChange {
    pub value: SecretString,
    /// End the account's other sessions (the spec's `logoutDevices`).
    pub logout_devices: bool,
}

/// A plan for the next round.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The account exists, is not yet recorded as this resource's, and may be
    /// adopted: record it before acting.
    pub adopt: bool,
    /// The account exists and is the one this resource's pending creation
    /// made: record it as created.
    pub created_by_pending: bool,
    pub action: Option<Action>,
    /// The update re-activates the account with no password to give it: it
    /// will not be able to log in with a password.
    pub reactivates_without_password: bool,
}

impl Plan {
    /// Nothing to do: the account matches the spec.
    pub fn is_empty(&self) -> bool {
        !self.adopt && !self.created_by_pending && self.action.is_none()
    }

    /// Whether the action sets the password.
    pub fn sends_password(&self) -> bool {
        matches!(&self.action, Some(Action::Update(u)) if u.password.is_some())
    }
}

/// Why the operator will not act on the spec as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("admin: true is not allowed by the Homeserver's policy (policy.allowAdminUsers is false)")]
    AdminNotAllowed,
    #[error("{user_id} already exists and was not created for this MatrixUser; set spec.adopt: true to take it over")]
    AdoptionNotRequested { user_id: String },
    #[error(
        "{user_id} already exists and was not created for this MatrixUser; the Homeserver's policy.allowAdoption is false"
    )]
    AdoptionNotAllowed { user_id: String },
    #[error("{user_id} is a server admin; adopting it needs the Homeserver's policy.allowAdminUsers")]
    AdoptingAdmin { user_id: String },
    /// A write to a server admin's account, owned or not: ownership is
    /// recorded in status, which whoever may patch `matrixusers/status`
    /// can forge, and an admin's password or emails are the server's keys.
    #[error(
        "{user_id} is a server admin; changing it needs the Homeserver's policy.allowAdminUsers (nothing was written)"
    )]
    ChangingAdmin { user_id: String },
    // The owner stays out of the message: it would tell anyone who may create
    // a MatrixUser which account holds an address.
    #[error("the {medium} address {address} is bound to another account")]
    ThreepidInUse {
        medium: String,
        address: String,
        owner: String,
    },
    #[error("the external id {external_id} of {auth_provider} is linked to another account")]
    ExternalIdInUse {
        auth_provider: String,
        external_id: String,
        owner: String,
    },
}

/// The form Synapse stores a threepid in: trimmed, emails lower-cased.
/// Sending another form makes Synapse delete and re-add the address.
///
/// Synapse case-folds the local part of an email (Python's `casefold`),
/// which differs from lower-casing outside ASCII (`ß` folds to `ss`): such
/// an address would be looked up in one form and stored in another, past
/// the ownership check. [`validate_threepid`] therefore admits ASCII emails
/// only, for which the two agree.
pub fn normalize_threepid(medium: ThreepidMedium, address: &str) -> Threepid {
    let medium = medium.as_str();
    Threepid {
        medium: medium.to_string(),
        address: normalize_address(medium, address),
    }
}

/// Why a threepid of a spec cannot be managed, if it cannot.
pub fn validate_threepid(medium: ThreepidMedium, address: &str) -> Result<(), String> {
    let address = address.trim();
    match medium {
        ThreepidMedium::Email => {
            let printable = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'@');
            match address.split_once('@') {
                Some((local, domain)) if printable(local) && printable(domain) => Ok(()),
                _ => Err(format!(
                    "the email address {address:?} is not ASCII with exactly one '@'"
                )),
            }
        }
        ThreepidMedium::Msisdn if address.is_empty() => Err("an msisdn is empty".into()),
        ThreepidMedium::Msisdn => Ok(()),
    }
}

/// The desired account from a spec, its Matrix ID and its password (read
/// from the Secret by the caller).
pub fn desired_from_spec(spec: &MatrixUserSpec, user_id: UserId, password: Option<DesiredPassword>) -> Desired {
    Desired {
        password,
        ..Desired::of_spec(spec, user_id)
    }
}

/// Whether the account will be deactivated once the plan ran: the spec asks
/// for it, or it is deactivated and the spec does not ask to re-activate.
fn ends_deactivated(desired: &Desired, account: Option<&Account>) -> bool {
    match desired.deactivated {
        Some(d) => d,
        None => account.is_some_and(|a| a.deactivated),
    }
}

/// See [`Lookups`].
pub fn lookups(desired: &Desired, account: Option<&Account>) -> Lookups {
    let mut out = Lookups::default();
    if let Some(wanted) = &desired.threepids
        && !ends_deactivated(desired, account)
    {
        let held = account.map(|a| threepid_set(&a.threepids)).unwrap_or_default();
        out.threepids = wanted
            .iter()
            .filter(|t| !held.contains(&(t.medium.clone(), t.address.clone())))
            .cloned()
            .collect();
    }
    if let Some(wanted) = &desired.external_ids {
        let held: BTreeSet<&ExternalId> = account.map(|a| set_of(&a.external_ids)).unwrap_or_default();
        out.external_ids = wanted.iter().filter(|e| !held.contains(e)).cloned().collect();
    }
    out
}

/// The next admin call, or a refusal.
pub fn plan(
    desired: &Desired,
    account: Option<&Account>,
    authority: Authority,
    owners: &Owners,
) -> Result<Plan, Refusal> {
    if desired.admin == Some(true) && !authority.admin_allowed {
        return Err(Refusal::AdminNotAllowed);
    }
    let mut adopt = false;
    let created_by_pending = account.is_some_and(|a| !authority.owns(a) && authority.created_by_pending(a));
    if account.is_some_and(|a| !authority.owns(a)) && !created_by_pending {
        let user_id = desired.user_id.to_string();
        if !authority.adopt_requested {
            return Err(Refusal::AdoptionNotRequested { user_id });
        }
        if !authority.adoption_allowed {
            return Err(Refusal::AdoptionNotAllowed { user_id });
        }
        // Taking over an admin would hand out admin rights the policy denies.
        if account.is_some_and(|a| a.admin) && !authority.admin_allowed {
            return Err(Refusal::AdoptingAdmin { user_id });
        }
        adopt = true;
    }
    check_owners(desired, owners)?;
    let Some(account) = account else {
        return Ok(Plan {
            action: Some(Action::Create),
            ..Plan::default()
        });
    };
    let (changes, reactivates_without_password) = diff(desired, account);
    if account.admin && !authority.admin_allowed && !changes.is_empty() {
        return Err(Refusal::ChangingAdmin {
            user_id: desired.user_id.to_string(),
        });
    }
    let action = (!changes.is_empty()).then_some(Action::Update(changes));
    Ok(Plan {
        adopt,
        created_by_pending,
        action,
        reactivates_without_password,
    })
}

fn check_owners(desired: &Desired, owners: &Owners) -> Result<(), Refusal> {
    let me = desired.user_id.as_str();
    for (t, owner) in &owners.threepids {
        if let Some(owner) = owner.as_deref().filter(|o| *o != me) {
            return Err(Refusal::ThreepidInUse {
                medium: t.medium.clone(),
                address: t.address.clone(),
                owner: owner.to_string(),
            });
        }
    }
    for (e, owner) in &owners.external_ids {
        if let Some(owner) = owner.as_deref().filter(|o| *o != me) {
            return Err(Refusal::ExternalIdInUse {
                auth_provider: e.auth_provider.clone(),
                external_id: e.external_id.clone(),
                owner: owner.to_string(),
            });
        }
    }
    Ok(())
}

/// The fields that differ (see [`fields`]), and whether the changes
/// re-activate the account without a password to give it.
fn diff(desired: &Desired, a: &Account) -> (Changes, bool) {
    let reactivating = desired.deactivated == Some(false) && a.deactivated;
    let ends_deactivated = ends_deactivated(desired, Some(a));
    let situation = Situation {
        reactivating,
        ends_deactivated,
        keep_erased: a.erased && ends_deactivated,
    };
    // Deactivation removed the password hash: re-activating without a
    // password leaves an account no one can log in to.
    let reactivates_without_password = reactivating && desired.password.is_none();
    (fields::changes(desired, a, &situation), reactivates_without_password)
}

/// What deleting a MatrixUser does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeletionAction {
    /// Deactivate the account, erasing it when `erase` (Synapse's deactivate
    /// with `erase`; MAS's deactivate without `skip_erase`).
    Deactivate { erase: bool },
}

/// Why deleting a MatrixUser needs no call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Untouched {
    /// `deletionPolicy: Retain`.
    Retained,
    /// The backend has no such account (any more).
    AccountGone,
    /// The policy holds already (deactivated; erased too for `Erase`).
    AlreadyDone,
    /// The account is not the one this resource created or adopted.
    NotOwned,
    /// The account is a server admin and the Homeserver does not allow
    /// admin users: deactivating it is a write like any other.
    ServerAdmin,
}

/// The call that carries out `policy` on the account, or why none is needed.
/// An account this resource does not own is never touched.
pub fn plan_deletion(
    policy: DeletionPolicy,
    authority: Authority,
    account: Option<&Account>,
) -> Result<DeletionAction, Untouched> {
    if policy == DeletionPolicy::Retain {
        return Err(Untouched::Retained);
    }
    let account = account.ok_or(Untouched::AccountGone)?;
    if !authority.owns(account) && !authority.created_by_pending(account) {
        return Err(Untouched::NotOwned);
    }
    if account.admin && !authority.admin_allowed {
        return Err(Untouched::ServerAdmin);
    }
    match policy {
        DeletionPolicy::Deactivate if account.deactivated => Err(Untouched::AlreadyDone),
        DeletionPolicy::Erase if account.deactivated && account.erased => Err(Untouched::AlreadyDone),
        DeletionPolicy::Erase => Ok(DeletionAction::Deactivate { erase: true }),
        _ => Ok(DeletionAction::Deactivate { erase: false }),
    }
}

/// A room to join: its ID and the name it is listed by in the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomJoin {
    pub room_id: String,
    pub listed_as: RoomName,
}

/// What to do with the rooms of an account (`spec.rooms`), from the rooms
/// it is in and the memberships the operator made for it before
/// (`status.rooms`). Only those memberships are ever left: a room the
/// account joined on its own is never touched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoomPlan {
    pub join: Vec<RoomJoin>,
    /// Memberships the operator made, no longer listed, the account is in.
    pub leave: Vec<ManagedRoom>,
    /// The memberships recorded after the plan, but for the joins and
    /// leaves (the executor adds and drops those as they succeed).
    pub kept: Vec<ManagedRoom>,
    /// Listed aliases no room ID is known for: their lookup failed (the
    /// caller reports why).
    pub unresolved: Vec<RoomName>,
    /// How many of the listed rooms the account is in before the plan.
    pub joined_listed: usize,
}

/// The aliases of `listed` to look up in the directory this pass: those
/// the records do not name a room for, and those whose recorded room the
/// account is not in (the alias may point elsewhere by now). An account
/// that is in every listed room costs no lookup; a deactivated one none
/// (nothing is joined for it).
pub fn aliases_to_resolve(
    listed: &[RoomName],
    recorded: &[ManagedRoom],
    joined: &BTreeSet<String>,
    active: bool,
) -> Vec<RoomName> {
    if !active {
        return Vec::new();
    }
    dedup(listed.iter().filter(|name| name.is_alias()).cloned())
        .into_iter()
        .filter(|alias| {
            !recorded
                .iter()
                .any(|r| r.alias.as_deref() == Some(alias.as_str()) && joined.contains(&r.room_id))
        })
        .collect()
}

/// The membership diff. `resolved` holds the aliases looked up this pass
/// (see [`aliases_to_resolve`]); an alias not looked up names the room
/// recorded for it. `active`: the account is not deactivated (Synapse
/// leaves every room of a deactivated account, and would join one: the
/// plan joins nothing for it and keeps its records for re-activation).
pub fn plan_rooms(
    listed: &[RoomName],
    recorded: &[ManagedRoom],
    joined: &BTreeSet<String>,
    resolved: &std::collections::BTreeMap<RoomName, String>,
    active: bool,
) -> RoomPlan {
    let mut out = RoomPlan::default();
    let mut wanted = BTreeSet::new();
    for name in listed {
        let room_id = if name.is_alias() {
            match resolved.get(name).cloned().or_else(|| {
                recorded
                    .iter()
                    .find(|r| r.alias.as_deref() == Some(name.as_str()))
                    .map(|r| r.room_id.clone())
            }) {
                Some(id) => id,
                None => {
                    if !out.unresolved.contains(name) {
                        out.unresolved.push(name.clone());
                    }
                    continue;
                }
            }
        } else {
            name.as_str().to_string()
        };
        // A room listed twice (by ID and by alias) is one membership.
        if !wanted.insert(room_id.clone()) {
            continue;
        }
        let record = recorded.iter().find(|r| r.room_id == room_id);
        let alias = name.is_alias().then(|| name.as_str().to_string());
        let is_in = joined.contains(&room_id);
        if is_in {
            out.joined_listed += 1;
        }
        match (is_in, active, record) {
            // In it: a membership of the operator's stays recorded; the
            // account's own stays its own.
            (true, _, Some(_)) => out.kept.push(ManagedRoom {
                room_id,
                alias,
                joined: true,
            }),
            (true, _, None) => {}
            (false, true, _) => out.join.push(RoomJoin {
                room_id,
                listed_as: name.clone(),
            }),
            // Deactivated: joined again on re-activation.
            (false, false, Some(_)) => out.kept.push(ManagedRoom {
                room_id,
                alias,
                joined: false,
            }),
            (false, false, None) => {}
        }
    }
    for r in recorded.iter().filter(|r| !wanted.contains(&r.room_id)) {
        // No longer listed. Not in it (left on its own, or deactivated,
        // which left it): the record goes.
        if active && joined.contains(&r.room_id) {
            out.leave.push(r.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests;
