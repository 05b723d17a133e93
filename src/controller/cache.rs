//! What a reconcile reads of Kubernetes, served from the watches the
//! controllers already run: Homeservers from a reflector store per scope,
//! Secret values read once per resourceVersion of a Secret (the Secret
//! watch is metadata-only; only the values a reconcile asked for are kept,
//! never a store of every Secret's data).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};

use super::{Context, Error, secrets};
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
    /// Secrets by metadata only: their resourceVersion says when a value
    /// read before is out of date.
    pub secrets: Store<PartialObjectMeta<Secret>>,
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

/// The values read of one Secret, at one resourceVersion.
struct CachedSecret {
    resource_version: String,
    values: HashMap<String, SecretString>,
}

/// Secret values by `(namespace, name)`, each valid for one resourceVersion.
#[derive(Default)]
pub(super) struct SecretValues(Mutex<HashMap<(String, String), CachedSecret>>);

impl SecretValues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), CachedSecret>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, namespace: &str, name: &str, resource_version: &str, key: &str) -> Option<SecretString> {
        let cache = self.lock();
        let cached = cache.get(&(namespace.to_string(), name.to_string()))?;
        (cached.resource_version == resource_version)
            .then(|| cached.values.get(key).cloned())
            .flatten()
    }

    fn insert(&self, namespace: &str, name: &str, resource_version: String, key: &str, value: SecretString) {
        let mut cache = self.lock();
        let entry = cache
            .entry((namespace.to_string(), name.to_string()))
            .or_insert_with(|| CachedSecret {
                resource_version: resource_version.clone(),
                values: HashMap::new(),
            });
        if entry.resource_version != resource_version {
            entry.resource_version = resource_version;
            entry.values.clear();
        }
        entry.values.insert(key.to_string(), value);
    }

    pub(super) fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.lock().retain(|(ns, name), _| keep(ns, name));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
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
            .filter(|s| ready(&s.homeservers) && ready(&s.secrets))
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

    /// The metadata of the Secret `name` as the watch last saw it, when a
    /// ready cache covers `namespace`.
    pub(super) fn secret_meta(&self, namespace: &str, name: &str) -> Option<Arc<PartialObjectMeta<Secret>>> {
        self.ready_scope(namespace)?
            .secrets
            .get(&ObjectRef::new(name).within(namespace))
    }

    /// The value of key `r.key` of the Secret `r.name` in `namespace`: read
    /// from the API server once per resourceVersion of the Secret, which
    /// the metadata watch keeps current.
    pub async fn secret_value(&self, namespace: &str, r: &SecretKeyRef) -> Result<SecretString, Error> {
        if let Some(rv) = self.secret_meta(namespace, &r.name).and_then(|m| m.resource_version())
            && let Some(value) = self.secret_values.get(namespace, &r.name, &rv, &r.key)
        {
            return Ok(value);
        }
        let (value, rv) = secrets::read_key_at(&self.client, namespace, r).await?;
        // Kept only where a watch says when it changes.
        if self.ready_scope(namespace).is_some()
            && let Some(rv) = rv
        {
            self.secret_values.insert(namespace, &r.name, rv, &r.key, value.clone());
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
        if let Some(meta) = self.secret_meta(&ns, &name)
            && let Some(rv) = meta.resource_version()
            && user
                .uid()
                .is_some_and(|uid| meta.owner_references().iter().any(|o| o.uid == uid))
            && let Some(value) = self.secret_values.get(&ns, &name, &rv, "password")
        {
            return Ok((value, false));
        }
        let (value, created, rv) = secrets::generated_password(&self.client, user, user_id, homeserver_url).await?;
        if self.ready_scope(&ns).is_some()
            && let Some(rv) = rv
        {
            self.secret_values.insert(&ns, &name, rv, "password", value.clone());
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
        let secrets_ready: Vec<bool> = self.watched.iter().map(|s| ready(&s.secrets)).collect();
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
        self.secret_values.retain(|ns, name| {
            !gone(&secrets_ready, ns, &|s| {
                s.secrets.get(&ObjectRef::new(name).within(ns)).is_some()
            })
        });
        self.metrics.retain_users(|ns, name| !user_gone(ns, name));
        self.digests.retain(|ns, name| !user_gone(ns, name));
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
            secret_values: self.secret_values.len(),
            user_metrics: self.metrics.tracked_users(),
            digests: self.digests.len(),
        }
    }
}
