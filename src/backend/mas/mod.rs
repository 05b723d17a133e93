//! The MAS backend: Synapse delegates authentication to the Matrix
//! Authentication Service. The account, its password, emails, upstream
//! links, lock, admin attribute and deactivation live in MAS's admin API;
//! displayname, avatar and user type stay in Synapse's (MAS never changes
//! them after it provisioned the account).

mod client;
mod error;
mod personal;

use std::collections::BTreeSet;

pub use client::{CreateOutcome, MasClient, MasConfig, MasEmail, MasLink, MasProvider, MasUser, Resource};
pub use error::{MasEndpoint, MasError};
pub use personal::{IssuedSession, PersonalSession, Revoked, SCOPE_CLIENT_API, SCOPE_DEVICE_PREFIX, bot_scope, is_id};

use crate::account::{Account, ExternalId, Threepid, UserId, normalize_address};
use crate::backend::{AccountBackend, Applied, BackendError, Created, Parts, Unsupported};
use crate::plan::{Changes, Desired, Lookups, Owners, Part};
use crate::synapse::{SynapseClient, UserUpdate};

/// A Homeserver whose accounts live in MAS.
#[derive(Clone, Debug)]
pub struct MasBackend {
    mas: MasClient,
    /// Synapse's admin API, for the profile.
    synapse: SynapseClient,
}

/// One call of MAS's (or, for the profile, Synapse's) API, as planned from
/// changes: the order is the order they are made in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MasCall {
    Reactivate,
    SetPassword,
    /// End the account's sessions (the spec's `logoutDevicesOnChange`, after
    /// a new password): MAS's `set-password` ends none.
    EndSessions,
    Lock,
    Unlock,
    SetAdmin(bool),
    AddEmail(String),
    DeleteEmail(String),
    AddLink(ExternalId),
    DeleteLink(ExternalId),
    /// Synapse's user PUT with the profile's changes (the fields read with
    /// [`Part::Profile`]: MAS keeps no profile).
    Profile(Changes),
    /// Deactivate without erasing (`skip_erase`): the spec's
    /// `deactivated: true` keeps the account's messages and profile.
    Deactivate,
}

impl MasCall {
    /// The names of the fields the call changes (never their values).
    fn fields(&self) -> Vec<&'static str> {
        let field = match self {
            MasCall::Reactivate | MasCall::Deactivate => "deactivated",
            MasCall::SetPassword | MasCall::EndSessions => "password",
            MasCall::Lock | MasCall::Unlock => "locked",
            MasCall::SetAdmin(_) => "admin",
            MasCall::AddEmail(_) | MasCall::DeleteEmail(_) => "threepids",
            MasCall::AddLink(_) | MasCall::DeleteLink(_) => "external_ids",
            MasCall::Profile(profile) => return profile.field_names(),
        };
        vec![field]
    }
}

/// The calls that make `changes` on `account`, in order: re-activation
/// first (nothing else may be changed on a deactivated account in a way
/// that lasts: deactivation deleted its emails), deactivation last.
pub fn calls(account: &Account, changes: &Changes) -> Vec<MasCall> {
    // Destructured whole, so a field added to the plan must be placed here.
    let Changes {
        password,
        displayname: _,
        avatar_url: _,
        threepids,
        external_ids,
        admin,
        deactivated,
        locked,
        user_type: _,
    } = changes;
    let mut out = Vec::new();
    if *deactivated == Some(false) {
        out.push(MasCall::Reactivate);
    }
    if let Some(p) = password {
        out.push(MasCall::SetPassword);
        if p.logout_devices {
            out.push(MasCall::EndSessions);
        }
    }
    match locked {
        Some(true) => out.push(MasCall::Lock),
        Some(false) => out.push(MasCall::Unlock),
        None => {}
    }
    if let Some(admin) = *admin {
        out.push(MasCall::SetAdmin(admin));
    }
    if let Some(wanted) = threepids {
        let emails = |ts: &[Threepid]| -> BTreeSet<String> {
            ts.iter().map(|t| normalize_address("email", &t.address)).collect()
        };
        let (wanted, held) = (emails(wanted), emails(&account.threepids));
        out.extend(wanted.difference(&held).cloned().map(MasCall::AddEmail));
        out.extend(held.difference(&wanted).cloned().map(MasCall::DeleteEmail));
    }
    if let Some(wanted) = external_ids {
        let wanted: BTreeSet<&ExternalId> = wanted.iter().collect();
        let held: BTreeSet<&ExternalId> = account.external_ids.iter().collect();
        out.extend(wanted.difference(&held).map(|e| MasCall::AddLink((*e).clone())));
        out.extend(held.difference(&wanted).map(|e| MasCall::DeleteLink((*e).clone())));
    }
    let profile = changes.of_part(Part::Profile);
    if !profile.is_empty() {
        out.push(MasCall::Profile(profile));
    }
    if *deactivated == Some(true) {
        out.push(MasCall::Deactivate);
    }
    out
}

/// Seconds since the epoch of an RFC 3339 time.
fn epoch_seconds(time: &str) -> Option<i64> {
    time.parse::<k8s_openapi::jiff::Timestamp>().ok().map(|t| t.as_second())
}

impl MasBackend {
    pub fn new(mas: MasClient, synapse: SynapseClient) -> Self {
        Self { mas, synapse }
    }

    /// MAS's admin API.
    pub fn mas(&self) -> &MasClient {
        &self.mas
    }

    pub fn synapse(&self) -> &SynapseClient {
        &self.synapse
    }

    /// The MAS ID of the account, which the executor read.
    fn mas_id(account: &Account) -> Result<&str, MasError> {
        account.account_id.as_deref().ok_or_else(|| MasError::NotProvisioned {
            user_id: account.name.clone(),
        })
    }

    async fn call(&self, user_id: &UserId, id: &str, call: &MasCall, changes: &Changes) -> Result<(), BackendError> {
        match call {
            MasCall::Reactivate => self.mas.user_action(MasEndpoint::Reactivate, id, "reactivate").await?,
            MasCall::SetPassword => {
                if let Some(p) = &changes.password {
                    self.mas.set_password(id, &p.value).await?;
                }
            }
            MasCall::EndSessions => {
                self.mas.end_sessions(id).await?;
            }
            MasCall::Lock => self.mas.user_action(MasEndpoint::Lock, id, "lock").await?,
            MasCall::Unlock => self.mas.user_action(MasEndpoint::Unlock, id, "unlock").await?,
            MasCall::SetAdmin(admin) => self.mas.set_admin(id, *admin).await?,
            MasCall::AddEmail(email) => self.mas.add_email(id, email).await?,
            MasCall::DeleteEmail(email) => {
                for held in self.mas.emails_of(id).await? {
                    if held.attributes.email.eq_ignore_ascii_case(email) {
                        self.mas.delete_email(&held.id).await?;
                    }
                }
            }
            MasCall::AddLink(link) => self.mas.add_link(id, &link.auth_provider, &link.external_id).await?,
            MasCall::DeleteLink(link) => {
                for held in self.mas.links_of(id).await? {
                    if held.attributes.provider_id == link.auth_provider && held.attributes.subject == link.external_id
                    {
                        self.mas.delete_link(&held.id).await?;
                    }
                }
            }
            MasCall::Profile(profile) => {
                self.synapse.put_user(user_id, &UserUpdate::from(profile)).await?;
            }
            MasCall::Deactivate => self.mas.deactivate(id, true).await?,
        }
        Ok(())
    }
}

impl AccountBackend for MasBackend {
    /// MAS keeps emails only, and links SSO identities to its upstream
    /// providers by their IDs: each `authProvider` is a provider's ID or
    /// its human name as MAS reports it.
    async fn prepare(&self, desired: &mut Desired) -> Result<Result<(), Unsupported>, BackendError> {
        if let Some(threepids) = &desired.threepids
            && threepids.iter().any(|t| t.medium != "email")
        {
            return Ok(Err(Unsupported(
                "MAS keeps email addresses only: spec.threepids may not hold an msisdn when the Homeserver has spec.mas"
                    .into(),
            )));
        }
        let Some(ids) = desired.external_ids.as_mut().filter(|ids| !ids.is_empty()) else {
            return Ok(Ok(()));
        };
        let providers = self.mas.providers().await?;
        for id in ids.iter_mut() {
            let by_id = providers.iter().find(|p| p.id == id.auth_provider);
            let by_name: Vec<_> = providers
                .iter()
                .filter(|p| p.attributes.human_name.as_deref() == Some(id.auth_provider.as_str()))
                .collect();
            let provider = match (by_id, by_name.as_slice()) {
                (Some(p), _) => p,
                (None, [p]) => *p,
                (None, []) => {
                    return Ok(Err(Unsupported(format!(
                        "MAS has no upstream OAuth provider with the ID or name {:?} (spec.externalIds)",
                        id.auth_provider
                    ))));
                }
                (None, _) => {
                    return Ok(Err(Unsupported(format!(
                        "MAS has several upstream OAuth providers named {:?}: give the provider's ID in spec.externalIds",
                        id.auth_provider
                    ))));
                }
            };
            id.auth_provider = provider.id.clone();
        }
        let mut seen = BTreeSet::new();
        ids.retain(|e| seen.insert(e.clone()));
        Ok(Ok(()))
    }

    /// One GET of the MAS user (its state, admin attribute and creation
    /// time: the ownership check needs it every time), then one more for
    /// each part asked for: MAS's user object holds neither emails nor
    /// upstream links (each a list filtered by `filter[user]`), and the
    /// profile is Synapse's. Parts not asked for are reported empty.
    async fn read(&self, user_id: &UserId, parts: Parts) -> Result<Option<Account>, BackendError> {
        let Some(user) = self.mas.user_by_username(user_id.localpart()).await? else {
            return Ok(None);
        };
        let emails = if parts.threepids {
            self.mas.emails_of(&user.id).await?
        } else {
            Vec::new()
        };
        let links = if parts.external_ids {
            self.mas.links_of(&user.id).await?
        } else {
            Vec::new()
        };
        // Synapse's GET also tells that MAS provisioned the account there,
        // which a profile write needs; without profile fields to manage,
        // nothing is written to Synapse.
        let profile = if parts.profile {
            let Some(profile) = self.synapse.get_user(user_id).await? else {
                return Err(MasError::NotProvisioned {
                    user_id: user_id.to_string(),
                }
                .into());
            };
            Some(profile)
        } else {
            None
        };
        let (erased, user_type, displayname, avatar_url) = profile
            .map(|p| (p.erased, p.user_type, p.displayname, p.avatar_url))
            .unwrap_or_default();
        Ok(Some(Account {
            name: user_id.to_string(),
            account_id: Some(user.id),
            admin: user.attributes.admin,
            deactivated: user.attributes.deactivated_at.is_some(),
            locked: user.attributes.locked_at.is_some(),
            erased,
            user_type,
            displayname,
            avatar_url,
            threepids: emails
                .into_iter()
                .map(|e| Threepid {
                    medium: "email".into(),
                    address: e.attributes.email,
                })
                .collect(),
            external_ids: links
                .into_iter()
                .map(|l| ExternalId {
                    auth_provider: l.attributes.provider_id,
                    external_id: l.attributes.subject,
                })
                .collect(),
            creation_ts: epoch_seconds(&user.attributes.created_at),
        }))
    }

    async fn owners(&self, account: Option<&Account>, wanted: Lookups) -> Result<Owners, BackendError> {
        let me = account.and_then(|a| a.account_id.as_deref());
        let other = |holder: Option<String>| holder.filter(|h| Some(h.as_str()) != me);
        let mut owners = Owners::default();
        for t in wanted.threepids {
            let holders = self.mas.email_holders(&t.address).await?;
            let holder = holders
                .into_iter()
                .map(|h| h.attributes.user_id)
                .find(|h| Some(h.as_str()) != me);
            owners.threepids.push((t, other(holder)));
        }
        for e in wanted.external_ids {
            let holders = self.mas.link_holders(&e.auth_provider, &e.external_id).await?;
            let holder = holders
                .into_iter()
                .filter_map(|h| h.attributes.user_id)
                .find(|h| Some(h.as_str()) != me);
            owners.external_ids.push((e, other(holder)));
        }
        Ok(owners)
    }

    async fn create(&self, desired: &Desired) -> Result<Created, BackendError> {
        // The account is read again: its emails, links and Synapse profile
        // are not in MAS's answer.
        Ok(match self.mas.create_user(desired.user_id.localpart()).await? {
            CreateOutcome::Created(user) => Created {
                created: true,
                account: None,
                creation_ts: epoch_seconds(&user.attributes.created_at),
                account_id: Some(user.id),
                fields: Vec::new(),
                password: false,
            },
            CreateOutcome::Exists => Created::existing(),
        })
    }

    /// `POST /users` creates only (409 for a taken username), but MAS's
    /// answer lacks the emails, links and profile: the account is read
    /// after it anyway, and a read first costs one GET when it is missing.
    fn creates_before_reading(&self, _: &Desired) -> bool {
        false
    }

    async fn apply(&self, user_id: &UserId, account: &Account, changes: &Changes, created_now: bool) -> Applied {
        let mut applied = Applied::default();
        let id = match Self::mas_id(account) {
            Ok(id) => id,
            Err(e) => {
                applied.error = Some(e.into());
                return applied;
            }
        };
        for call in calls(account, changes) {
            // An account this sync created has no session to end.
            if call == MasCall::EndSessions && created_now {
                continue;
            }
            applied.writes += 1;
            if let Err(e) = self.call(user_id, id, &call, changes).await {
                applied.error = Some(e);
                return applied;
            }
            match &call {
                MasCall::EndSessions => continue,
                MasCall::SetPassword => applied.password = true,
                MasCall::Reactivate => applied.deactivated = Some(false),
                MasCall::Deactivate => applied.deactivated = Some(true),
                _ => {}
            }
            applied.fields.push(call.fields());
        }
        applied
    }

    async fn deactivate(&self, _: &UserId, account: &Account, erase: bool) -> Result<(), BackendError> {
        Ok(self.mas.deactivate(Self::mas_id(account)?, !erase).await?)
    }
}
