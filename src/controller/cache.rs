//! What a reconcile reads of Kubernetes, served from the watches the
//! controllers already run: Homeservers from a reflector store per scope,
//! Secret values read once per resourceVersion of a Secret (the Secret
//! watch is metadata-only; only the values a reconcile asked for are kept,
//! never a store of every Secret's data: see [`SecretCache`]).

use std::sync::Arc;

use futures::FutureExt;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};

use super::{Context, Error, SecretCache, secrets};
use crate::api::{Homeserver, MatrixUser, SecretKeyRef};
use crate::secret::SecretString;

/// The caches of one watched scope (a namespace, or all of them), filled by
/// the controllers' watches of that scope.
#[derive(Clone)]
pub struct WatchedScope {
    /// `None`: every namespace.
    pub namespace: Option<String>,
    pub users: Store<MatrixUser>,
    pub homeservers: Store<Homeserver>,
    /// Of each Secret its resourceVersion (which says when a value read
    /// before is out of date), its owners, and the values read of it.
    pub secrets: SecretCache,
}

impl WatchedScope {
    fn covers(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }
}

/// Whether a store has its initial list (without waiting for it).
fn ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    matches!(store.wait_until_ready().now_or_never(), Some(Ok(())))
}

/// How many entries the per-object maps of a [`Context`] hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSizes {
    pub failures: usize,
    pub synapse_clients: usize,
    pub secret_values: usize,
    pub user_metrics: usize,
    /// Password digests known to match.
    pub digests: usize,
}

impl Context {
    /// The scope that watches `namespace`, once its caches listed
    /// everything: before that, a missing object may only not be there yet.
    fn ready_scope(&self, namespace: &str) -> Option<&WatchedScope> {
        self.watched
            .iter()
            .find(|s| s.covers(namespace))
            .filter(|s| ready(&s.homeservers) && s.secrets.is_ready())
    }

    /// The Homeserver `name` of `namespace`: from the watch's cache, else
    /// (a cache not listed yet, or one that lacks it: it may be new) from
    /// the API server.
    pub async fn homeserver(&self, namespace: &str, name: &str) -> Result<Arc<Homeserver>, Error> {
        if let Some(scope) = self.ready_scope(namespace)
            && let Some(hs) = scope.homeservers.get(&ObjectRef::new(name).within(namespace))
        {
            return Ok(hs);
        }
        let api: Api<Homeserver> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await?
            .map(Arc::new)
            .ok_or_else(|| Error::HomeserverNotFound { name: name.to_string() })
    }

    /// The Secret cache of the ready scope that watches `namespace`.
    pub(super) fn secret_cache(&self, namespace: &str) -> Option<&SecretCache> {
        self.ready_scope(namespace).map(|s| &s.secrets)
    }

    /// The value of key `r.key` of the Secret `r.name` in `namespace`: read
    /// from the API server once per resourceVersion of the Secret, which
    /// the metadata watch keeps current.
    pub async fn secret_value(&self, namespace: &str, r: &SecretKeyRef) -> Result<SecretString, Error> {
        if let Some(value) = self
            .secret_cache(namespace)
            .and_then(|c| c.value(namespace, &r.name, &r.key, None))
        {
            return Ok(value);
        }
        let (value, rv) = secrets::read_key_at(&self.client, namespace, r).await?;
        // Kept only where a watch says when it changes.
        if let (Some(cache), Some(rv)) = (self.secret_cache(namespace), rv) {
            cache.remember(namespace, &r.name, &rv, &r.key, value.clone());
        }
        Ok(value)
    }

    /// The password of the generated credentials Secret of `user`, and
    /// whether it was created just now: from the cache while the Secret
    /// the watch sees is the one read before and owned by `user`.
    pub(super) async fn generated_password(
        &self,
        user: &MatrixUser,
        user_id: &str,
        homeserver_url: &str,
    ) -> Result<(SecretString, bool), Error> {
        let ns = user.namespace().unwrap_or_default();
        let name = secrets::credentials_secret_name(user);
        if let Some(uid) = user.uid()
            && let Some(value) = self
                .secret_cache(&ns)
                .and_then(|c| c.value(&ns, &name, "password", Some(&uid)))
        {
            return Ok((value, false));
        }
        let (value, created, rv) = secrets::generated_password(&self.client, user, user_id, homeserver_url).await?;
        if let (Some(cache), Some(rv)) = (self.secret_cache(&ns), rv) {
            cache.remember(&ns, &name, &rv, "password", value.clone());
        }
        Ok((value, created))
    }

    /// Drops what is kept of objects that are gone: failure counts,
    /// admin clients (with their tokens), Secret values and per-user
    /// metrics entries of objects no longer in a ready cache of their
    /// scope. Objects of a scope not listed yet are kept.
    pub fn sweep(&self) {
        let users_ready: Vec<bool> = self.watched.iter().map(|s| ready(&s.users)).collect();
        let homeservers_ready: Vec<bool> = self.watched.iter().map(|s| ready(&s.homeservers)).collect();
        let gone = |ready: &[bool], ns: &str, present: &dyn Fn(&WatchedScope) -> bool| {
            self.watched
                .iter()
                .zip(ready)
                .find(|(s, _)| s.covers(ns))
                .is_some_and(|(s, ready)| *ready && !present(s))
        };
        let user_gone = |ns: &str, name: &str| {
            gone(&users_ready, ns, &|s| {
                s.users.get(&ObjectRef::new(name).within(ns)).is_some()
            })
        };
        let homeserver_gone = |ns: &str, name: &str| {
            gone(&homeservers_ready, ns, &|s| {
                s.homeservers.get(&ObjectRef::new(name).within(ns)).is_some()
            })
        };
        self.failures.retain(|kind, ns, name| match kind {
            "MatrixUser" => !user_gone(ns, name),
            "Homeserver" => !homeserver_gone(ns, name),
            _ => true,
        });
        self.synapse_clients.retain(|ns, name| !homeserver_gone(ns, name));
        self.mas_clients.retain(|ns, name| !homeserver_gone(ns, name));
        for scope in &self.watched {
            scope.secrets.forget_unwatched();
        }
        self.metrics.retain_users(|ns, name| !user_gone(ns, name));
        // The memo keeps hashes, not names: swept against every user cached,
        // once every scope listed them.
        if !users_ready.is_empty() && users_ready.iter().all(|ready| *ready) {
            let users: Vec<_> = self.watched.iter().flat_map(|s| s.users.state()).collect();
            self.digests.retain_users(users.iter().map(|u| {
                let meta = &u.metadata;
                (
                    meta.namespace.as_deref().unwrap_or_default(),
                    meta.name.as_deref().unwrap_or_default(),
                )
            }));
        }
    }

    /// Forgets what is kept for the Homeserver `name` of `namespace` (its
    /// deletion finished).
    pub(super) fn forget_homeserver(&self, namespace: &str, name: &str) {
        self.synapse_clients.remove(namespace, name);
        self.mas_clients.remove(namespace, name);
        self.failures
            .reset(&("Homeserver".to_string(), namespace.to_string(), name.to_string()));
    }

    /// The sizes of the per-object maps, to see that they do not grow.
    pub fn cache_sizes(&self) -> CacheSizes {
        CacheSizes {
            failures: self.failures.len(),
            synapse_clients: self.synapse_clients.len(),
            secret_values: self.watched.iter().map(|s| s.secrets.values_kept()).sum(),
            user_metrics: self.metrics.tracked_users(),
            digests: self.digests.len(),
        }
    }
}
