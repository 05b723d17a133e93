//! The Homeserver's account counts: how many accounts of its server a
//! MatrixUser manages, how many none does (what `import` would turn into
//! manifests), and how many of those are deactivated.
//!
//! A count pages through the server's whole user list (Synapse's, or MAS's
//! when Synapse delegates to it), so it runs on an interval of its own
//! (`Config::account_count_interval`, an hour by default), in the
//! Homeserver's reconcile, and so only on the leader (the controllers run
//! only there). What it costs at 10,000 accounts, measured on Synapse
//! 1.163 (SQLite): the listing is 20 pages of 500; Synapse's list does not
//! say which accounts an appservice registered, so an unmanaged account is
//! looked up once (a user GET) and remembered, since an account's
//! appservice never changes: the first count of 10,000 unmanaged accounts
//! costs 10,000 GETs, the later ones the listing and the new accounts'
//! GETs. In MAS mode MAS has no appservice users: its list (pages of 100)
//! is all.
//!
//! The status is written only when a number changed.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::{Api, ResourceExt};
use tracing::{debug, warn};

use super::{Context, patch_status};
use crate::api::{AccountCounts, Homeserver, HomeserverStatus};
use crate::backend::Backend;
use crate::backend::listing::AccountListing;
use crate::synapse::UserId;

/// See the module's documentation and README, "Account counts".
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);

/// User GETs in flight at once while telling appservice users apart.
const LOOKUPS_IN_FLIGHT: usize = 8;

/// Per Homeserver: when its accounts were last counted, and which of the
/// accounts looked up are an appservice's.
#[derive(Default)]
pub(super) struct Counts {
    last: Mutex<HashMap<(String, String), Instant>>,
    appservice: Mutex<HashMap<(String, String), HashMap<String, bool>>>,
}

impl Counts {
    pub(super) fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        self.last.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        self.appservice.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
    }
}

/// Whether a count is due: never with an interval of zero (counting is
/// off); else when the status has no counts yet, this process has not
/// counted, or `interval` passed since it last did.
fn due(interval: Duration, last: Option<Instant>, counted: bool) -> bool {
    !interval.is_zero() && (!counted || last.is_none_or(|at| at.elapsed() >= interval))
}

/// Counts the accounts of `hs` if its interval has passed since the last
/// count (or there is none), and writes them into the status if they
/// changed. `status` is the status as last written. A failed count is
/// logged and tried again after the interval: the counts are a report,
/// never a reason for the Homeserver not to be ready.
pub(super) async fn refresh(ctx: &Context, hs: &Homeserver, status: &HomeserverStatus) {
    let ns = hs.namespace().unwrap_or_default();
    let key = (ns.clone(), hs.name_any());
    {
        let mut last = ctx.account_counts.last.lock().unwrap_or_else(|p| p.into_inner());
        if !due(
            ctx.config.account_count_interval,
            last.get(&key).copied(),
            status.accounts.is_some(),
        ) {
            return;
        }
        last.insert(key.clone(), Instant::now());
    }
    let (Some(server_name), Some(admin)) = (status.server_name.as_deref(), status.admin_user_id.as_deref()) else {
        return;
    };
    let counts = match count(ctx, hs, &key, server_name, admin).await {
        Ok(counts) => counts,
        Err(e) => {
            warn!(error = %e, "cannot count the homeserver's accounts");
            return;
        }
    };
    ctx.metrics.homeserver_accounts(
        &key.0,
        &key.1,
        Some([counts.managed, counts.unmanaged, counts.deactivated]),
    );
    if status.accounts == Some(counts) {
        return;
    }
    let mut new = status.clone();
    new.accounts = Some(counts);
    let api: Api<Homeserver> = Api::namespaced(ctx.client.clone(), &ns);
    match patch_status(&api, &key.1, &new).await {
        Ok(_) => debug!(?counts, "accounts counted"),
        Err(e) => {
            // Counted again at the next pass.
            ctx.account_counts
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            warn!(error = %e, "cannot write the account counts");
        }
    }
}

async fn count(
    ctx: &Context,
    hs: &Homeserver,
    key: &(String, String),
    server_name: &str,
    admin: &str,
) -> Result<AccountCounts, String> {
    // Any MatrixUser that records one of this server's Matrix IDs, in any
    // watched namespace (another Homeserver object may point at the same
    // server), as `import` counts them.
    let suffix = format!(":{server_name}");
    let recorded: HashSet<String> = ctx
        .users
        .iter()
        .flat_map(|store| store.state())
        .filter_map(|u| u.status.as_ref().and_then(|s| s.user_id.clone()))
        .filter(|id| id.ends_with(&suffix))
        .collect();
    let backend = ctx.backend(hs).await.map_err(|e| e.to_string())?;
    let known = ctx
        .account_counts
        .appservice
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(key)
        .cloned()
        .unwrap_or_default();
    let mut looked_up: HashMap<String, bool> = HashMap::new();
    let mut counts = AccountCounts::default();
    let mut listing = AccountListing::new(&backend, server_name, false);
    while let Some(page) = listing.next_page().await.map_err(|e| e.to_string())? {
        let mut unknown = Vec::new();
        for account in page {
            if account.user_id == admin || account.guest {
                continue;
            }
            if recorded.contains(&account.user_id) {
                counts.managed += 1;
            } else if account.deactivated {
                counts.deactivated += 1;
            } else if let Backend::Synapse(_) = backend {
                match known.get(&account.user_id) {
                    Some(&appservice) => {
                        looked_up.insert(account.user_id, appservice);
                    }
                    None => unknown.push(account.localpart),
                }
            } else {
                counts.unmanaged += 1;
            }
        }
        if let Backend::Synapse(client) = &backend {
            let answers: Vec<_> = futures::stream::iter(unknown)
                .map(|localpart| async move {
                    let Ok(id) = UserId::new(&localpart, server_name) else {
                        // No MatrixUser can name it: not an appservice's
                        // as far as the count goes.
                        return Ok((format!("@{localpart}:{server_name}"), Some(false)));
                    };
                    let user = client.get_user(&id).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>((id.to_string(), user.map(|u| u.appservice_id.is_some())))
                })
                .buffer_unordered(LOOKUPS_IN_FLIGHT)
                .collect()
                .await;
            for answer in answers {
                // Gone since the listing: not counted.
                if let (user_id, Some(appservice)) = answer? {
                    looked_up.insert(user_id, appservice);
                }
            }
        }
    }
    if let Backend::Synapse(_) = backend {
        counts.unmanaged = looked_up.values().filter(|appservice| !**appservice).count() as u64;
    }
    // What was listed this time only: accounts that went are forgotten.
    ctx.account_counts
        .appservice
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key.clone(), looked_up);
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_due_at_its_interval_and_never_with_an_interval_of_zero() {
        let hour = Duration::from_secs(3600);
        let now = Instant::now();
        let long_ago = now.checked_sub(Duration::from_secs(7200));
        assert!(due(hour, None, false));
        assert!(due(hour, None, true), "not counted by this process yet");
        assert!(due(hour, Some(now), false), "no counts in the status");
        assert!(!due(hour, Some(now), true));
        if let Some(long_ago) = long_ago {
            assert!(due(hour, Some(long_ago), true));
        }
        for (last, counted) in [(None, false), (None, true), (Some(now), false)] {
            assert!(!due(Duration::ZERO, last, counted), "{last:?} {counted}");
        }
    }
}
