//! The plan's changes as Synapse's user PUTs.

use super::client::Registration;
use super::{SynapseClient, SynapseError, UserUpdate};
use crate::account::{Account, UserId};
use crate::backend::{AccountBackend, Applied, BackendError, Created, Parts, Unsupported};
use crate::plan::{self, Changes, Desired, Lookups, Owners};
use crate::secret::SecretString;

/// The body of the next PUT for `changes`. Synapse applies the profile
/// fields before a deactivation in the same body (measured), so one call
/// does most of it; the password is the exception.
///
/// A password goes in a call of its own: Synapse can fail a PUT after
/// applying part of it, and a password applied without our knowing is sent
/// again (logging devices out again). Two exceptions:
/// - re-activation must carry the password, or the account is left without
///   one; the other fields then wait a round;
/// - an account this sync created has no devices, so the password goes with
///   the rest and logs nothing out: sending it again after a failure ends
///   no session either.
pub fn user_update(c: &Changes, created_now: bool) -> UserUpdate {
    let u = UserUpdate {
        password: c.password.as_ref().map(|p| p.value.clone()),
        logout_devices: c.password.as_ref().map(|p| p.logout_devices && !created_now),
        displayname: c.displayname.clone(),
        avatar_url: c.avatar_url.clone(),
        threepids: c.threepids.clone(),
        external_ids: c.external_ids.clone(),
        admin: c.admin,
        deactivated: c.deactivated,
        locked: c.locked,
        user_type: c.user_type.clone(),
    };
    if u.password.is_none() || created_now {
        return u;
    }
    if c.deactivated == Some(false) {
        return UserUpdate {
            deactivated: Some(false),
            password: u.password,
            logout_devices: u.logout_devices,
            ..UserUpdate::default()
        };
    }
    let rest = UserUpdate {
        password: None,
        logout_devices: None,
        ..u.clone()
    };
    if rest == UserUpdate::default() { u } else { rest }
}

impl SynapseClient {
    /// Creates the account by shared-secret registration (see
    /// [`SynapseClient::register`]). Its answer holds no account: the one
    /// returned is what the registration made, which is known exactly, but
    /// without its creation time.
    async fn register_account(&self, desired: &Desired, password: &SecretString) -> Result<Created, SynapseError> {
        let localpart = desired.user_id.localpart();
        // "" asks for no displayname: the update after clears Synapse's default.
        let displayname = desired.displayname.as_deref().filter(|d| !d.is_empty());
        let admin = desired.admin == Some(true);
        let user_type = desired.user_type.map(|t| t.as_str());
        let registration = Registration {
            localpart,
            password,
            displayname,
            admin,
            user_type,
        };
        if !self.register(&registration).await? {
            return Ok(Created::existing());
        }
        let mut fields: Vec<&'static str> = displayname.map(|_| "displayname").into_iter().collect();
        fields.extend(admin.then_some("admin"));
        fields.extend(user_type.map(|_| "user_type"));
        Ok(Created {
            created: true,
            account: Some(Account {
                name: desired.user_id.to_string(),
                admin,
                user_type: user_type.map(str::to_string),
                displayname: Some(displayname.unwrap_or(localpart).to_string()),
                ..Account::default()
            }),
            creation_ts: None,
            account_id: None,
            fields,
            password: true,
        })
    }
}

/// The names of the fields a body sends (never their values).
pub fn body_fields(u: &UserUpdate) -> Vec<&'static str> {
    plan::changed_fields(&Changes {
        password: u.password.as_ref().map(|value| plan::PasswordChange {
            value: value.clone(),
            logout_devices: false,
        }),
        displayname: u.displayname.clone(),
        avatar_url: u.avatar_url.clone(),
        threepids: u.threepids.clone(),
        external_ids: u.external_ids.clone(),
        admin: u.admin,
        deactivated: u.deactivated,
        locked: u.locked,
        user_type: u.user_type.clone(),
    })
}

impl AccountBackend for SynapseClient {
    async fn prepare(&self, _: &mut Desired) -> Result<Result<(), Unsupported>, BackendError> {
        Ok(Ok(()))
    }

    /// One GET answers every part.
    async fn read(&self, user_id: &UserId, _: Parts) -> Result<Option<Account>, BackendError> {
        Ok(self.get_user(user_id).await?.map(Account::from))
    }

    async fn owners(&self, _: Option<&Account>, wanted: Lookups) -> Result<Owners, BackendError> {
        let mut owners = Owners::default();
        for t in wanted.threepids {
            let owner = self.threepid_owner(&t.medium, &t.address).await?;
            owners.threepids.push((t, owner));
        }
        for e in wanted.external_ids {
            let owner = self.external_id_owner(&e.auth_provider, &e.external_id).await?;
            // Synapse caches this lookup, and a PUT that removes an external
            // id does not invalidate it (1.163.2): believe it only if the
            // account named still holds the id.
            let owner = match owner {
                Some(other)
                    if !self
                        .get_user_raw(&other)
                        .await?
                        .is_some_and(|u| u.external_ids.contains(&e)) =>
                {
                    None
                }
                owner => owner,
            };
            owners.external_ids.push((e, owner));
        }
        Ok(owners)
    }

    /// With the registration shared secret and a password to give: the
    /// shared-secret registration, which creates only, with the password,
    /// displayname, admin flag and user type (Synapse spends about as much on
    /// it as on a bare create, and far less than on a displayname change
    /// afterwards). Otherwise `PUT` an empty body: creates the account (201)
    /// and changes nothing if it appeared meanwhile (200).
    async fn create(&self, desired: &Desired) -> Result<Created, BackendError> {
        if let Some(password) = desired.password.as_ref().filter(|_| self.can_register()) {
            return Ok(self.register_account(desired, &password.value).await?);
        }
        let outcome = self.put_user(&desired.user_id, &UserUpdate::default()).await?;
        Ok(Created {
            created: outcome.created,
            creation_ts: outcome.user.creation_ts,
            account_id: None,
            account: Some(outcome.user.into()),
            fields: Vec::new(),
            password: false,
        })
    }

    /// Registration creates only; the empty `PUT` of the other way would
    /// be a write to an account that exists.
    fn creates_before_reading(&self, desired: &Desired) -> bool {
        self.can_register() && desired.password.is_some()
    }

    async fn apply(&self, user_id: &UserId, _: &Account, changes: &Changes, created_now: bool) -> Applied {
        let update = user_update(changes, created_now);
        let mut applied = Applied {
            writes: 1,
            ..Applied::default()
        };
        match self.put_user(user_id, &update).await {
            // Synapse answers with the account as it is after the PUT: the
            // next round plans from it without reading again.
            Ok(outcome) => {
                applied.fields.push(body_fields(&update));
                applied.password = update.password.is_some();
                applied.deactivated = update.deactivated;
                applied.account = Some(outcome.user.into());
            }
            Err(e) => applied.error = Some(e.into()),
        }
        applied
    }

    async fn deactivate(&self, user_id: &UserId, _: &Account, erase: bool) -> Result<(), BackendError> {
        Ok(SynapseClient::deactivate(self, user_id, erase).await?)
    }
}
