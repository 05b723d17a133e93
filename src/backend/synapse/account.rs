//! The plan's changes as Synapse's user PUTs.

use super::client::Registration;
use super::{SynapseClient, SynapseError, UserUpdate};
use crate::account::{Account, UserId};
use crate::backend::{AccountBackend, Applied, BackendError, Created, Parts, Unsupported};
use crate::plan::{Changes, Desired, Lookups, Owners};
use crate::secret::SecretString;

/// The part of `changes` the next PUT sends. Synapse applies the profile
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
pub fn next_put(c: &Changes, created_now: bool) -> Changes {
    let mut all = c.clone();
    if let Some(p) = all.password.as_mut() {
        p.logout_devices &= !created_now;
    }
    if all.password.is_none() || created_now {
        return all;
    }
    if c.deactivated == Some(false) {
        return Changes {
            deactivated: Some(false),
            password: all.password,
            ..Changes::default()
        };
    }
    let rest = Changes {
        password: None,
        ..all.clone()
    };
    if rest.is_empty() { all } else { rest }
}

/// The body of the next PUT for `changes` (see [`next_put`]).
pub fn user_update(c: &Changes, created_now: bool) -> UserUpdate {
    UserUpdate::from(&next_put(c, created_now))
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
        let sent = next_put(changes, created_now);
        let mut applied = Applied {
            writes: 1,
            ..Applied::default()
        };
        match self.put_user(user_id, &UserUpdate::from(&sent)).await {
            // Synapse answers with the account as it is after the PUT: the
            // next round plans from it without reading again.
            Ok(outcome) => {
                applied.fields.push(sent.field_names());
                applied.password = sent.password.is_some();
                applied.deactivated = sent.deactivated;
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
