//! What the operator keeps of the Secrets of a watched scope: of each, the
//! resourceVersion its watch saw last, the uids of its owners, and the
//! values a reconcile read of it (with the resourceVersion they were read
//! at) — nothing else.
//!
//! A reflector store of the Secrets' metadata held a whole `ObjectMeta` per
//! Secret (≈0.4 KiB before any of its strings, plus its key's copies), and a
//! second map held the values read: at 10,000 MatrixUsers with a password
//! Secret each, ≈1.3 KiB per user, the largest part of the operator's
//! memory after the MatrixUsers themselves. The watch still sees every
//! Secret whole (by metadata); the triggers read the events, not this.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher;

use super::secrets::ADMIN_TOKEN_FINALIZER;
use crate::secret::SecretString;

/// The Secrets of a scope, by namespace and name.
type Secrets = HashMap<Box<str>, HashMap<Box<str>, Kept>>;

/// What is kept of one Secret.
#[derive(Default)]
struct Kept {
    /// The resourceVersion the watch saw last; `None`: not seen by the watch
    /// (yet): only read.
    watched: Option<Box<str>>,
    /// The uids of its owners (a generated credentials Secret's MatrixUser).
    owners: Box<[Box<str>]>,
    /// It carries the admin-token finalizer and is not being deleted.
    held: bool,
    /// The values read, and the resourceVersion they were read at.
    values: Option<Box<Values>>,
}

struct Values {
    resource_version: Box<str>,
    by_key: Vec<(Box<str>, SecretString)>,
}

#[derive(Default)]
struct State {
    /// The watch listed everything once.
    ready: bool,
    secrets: Secrets,
    /// While the watch lists again: what it listed so far, which replaces
    /// `secrets` when the listing is done (a Secret deleted meanwhile is
    /// not listed).
    listing: Option<Secrets>,
}

/// The cache of one scope's Secrets, filled by its metadata watch
/// ([`Self::apply_watcher_event`]) and by the values reconciles read
/// ([`Self::remember`]). Clones share it.
#[derive(Clone, Default)]
pub struct SecretCache(Arc<RwLock<State>>);

fn watched(secret: &PartialObjectMeta<Secret>) -> Option<(Box<str>, Box<str>, Kept)> {
    let meta = &secret.metadata;
    let owners = meta
        .owner_references
        .iter()
        .flatten()
        .map(|o| Box::from(o.uid.as_str()))
        .collect();
    Some((
        meta.namespace.as_deref().unwrap_or_default().into(),
        meta.name.as_deref()?.into(),
        Kept {
            watched: Some(meta.resource_version.as_deref().unwrap_or_default().into()),
            owners,
            held: meta.deletion_timestamp.is_none()
                && meta.finalizers.iter().flatten().any(|f| f == ADMIN_TOKEN_FINALIZER),
            values: None,
        },
    ))
}

impl SecretCache {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the Secret watch, as a reflector store would.
    pub fn apply_watcher_event(&self, event: &watcher::Event<PartialObjectMeta<Secret>>) {
        let mut state = self.write();
        let state = &mut *state;
        match event {
            watcher::Event::Apply(secret) => {
                if let Some((ns, name, new)) = watched(secret) {
                    let kept = state.secrets.entry(ns).or_default().entry(name).or_default();
                    kept.watched = new.watched;
                    kept.owners = new.owners;
                    kept.held = new.held;
                }
            }
            watcher::Event::Delete(secret) => {
                let meta = &secret.metadata;
                let ns = meta.namespace.as_deref().unwrap_or_default();
                if let (Some(names), Some(name)) = (state.secrets.get_mut(ns), meta.name.as_deref()) {
                    names.remove(name);
                    if names.is_empty() {
                        state.secrets.remove(ns);
                    }
                }
            }
            watcher::Event::Init => state.listing = Some(Secrets::new()),
            watcher::Event::InitApply(secret) => {
                if let Some((ns, name, new)) = watched(secret) {
                    state
                        .listing
                        .get_or_insert_default()
                        .entry(ns)
                        .or_default()
                        .insert(name, new);
                }
            }
            watcher::Event::InitDone => {
                let mut listed = state.listing.take().unwrap_or_default();
                // Values read before stay with the Secrets listed again (each
                // is checked against its resourceVersion when read).
                for (ns, names) in &mut listed {
                    for (name, kept) in names.iter_mut() {
                        kept.values = state
                            .secrets
                            .get_mut(ns)
                            .and_then(|old| old.get_mut(name))
                            .and_then(|old| old.values.take());
                    }
                }
                state.secrets = listed;
                state.ready = true;
            }
        }
    }

    /// Whether the watch listed every Secret once.
    pub fn is_ready(&self) -> bool {
        self.read().ready
    }

    /// Whether the watch saw the Secret `name` (and it was not deleted since).
    pub fn is_watched(&self, namespace: &str, name: &str) -> bool {
        self.read()
            .secrets
            .get(namespace)
            .and_then(|names| names.get(name))
            .is_some_and(|kept| kept.watched.is_some())
    }

    /// Whether the watch saw the Secret `name` carry the admin-token
    /// finalizer, and not being deleted.
    pub fn is_held(&self, namespace: &str, name: &str) -> bool {
        self.read()
            .secrets
            .get(namespace)
            .and_then(|names| names.get(name))
            .is_some_and(|kept| kept.watched.is_some() && kept.held)
    }

    /// The value of `key` of the Secret `name`, when it was read at the
    /// resourceVersion the watch saw last (and, with `owner`, the Secret is
    /// owned by the object of that uid).
    pub fn value(&self, namespace: &str, name: &str, key: &str, owner: Option<&str>) -> Option<SecretString> {
        let state = self.read();
        let kept = state.secrets.get(namespace)?.get(name)?;
        let values = kept.values.as_deref()?;
        if kept.watched.as_deref() != Some(&*values.resource_version)
            || owner.is_some_and(|uid| !kept.owners.iter().any(|o| **o == *uid))
        {
            return None;
        }
        values.by_key.iter().find(|(k, _)| **k == *key).map(|(_, v)| v.clone())
    }

    /// Keeps `value`, read of key `key` of the Secret `name` at
    /// `resource_version`, for [`Self::value`].
    pub fn remember(&self, namespace: &str, name: &str, resource_version: &str, key: &str, value: SecretString) {
        let mut state = self.write();
        let kept = state
            .secrets
            .entry(namespace.into())
            .or_default()
            .entry(name.into())
            .or_default();
        let values = kept.values.get_or_insert_with(|| {
            Box::new(Values {
                resource_version: resource_version.into(),
                by_key: Vec::new(),
            })
        });
        if *values.resource_version != *resource_version {
            values.resource_version = resource_version.into();
            values.by_key.clear();
        }
        match values.by_key.iter_mut().find(|(k, _)| **k == *key) {
            Some((_, v)) => *v = value,
            None => values.by_key.push((key.into(), value)),
        }
    }

    /// Forgets the values of Secrets the watch does not see (read before it
    /// saw them, or since deleted), once it listed everything.
    pub fn forget_unwatched(&self) {
        let mut state = self.write();
        if !state.ready {
            return;
        }
        state.secrets.retain(|_, names| {
            names.retain(|_, kept| kept.watched.is_some());
            !names.is_empty()
        });
    }

    /// How many Secrets have values kept.
    pub fn values_kept(&self) -> usize {
        self.read()
            .secrets
            .values()
            .flat_map(HashMap::values)
            .filter(|kept| kept.values.is_some())
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(name: &str, rv: &str, owner: Option<&str>) -> PartialObjectMeta<Secret> {
        let owners: Vec<_> = owner
            .map(|uid| json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser", "name": "u", "uid": uid}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": name, "namespace": "chat", "resourceVersion": rv, "ownerReferences": owners}}))
        .unwrap()
    }

    fn listed(cache: &SecretCache, secrets: &[PartialObjectMeta<Secret>]) {
        cache.apply_watcher_event(&watcher::Event::Init);
        for s in secrets {
            cache.apply_watcher_event(&watcher::Event::InitApply(s.clone()));
        }
        cache.apply_watcher_event(&watcher::Event::InitDone);
    }

    fn value(cache: &SecretCache, name: &str, owner: Option<&str>) -> Option<String> {
        cache
            .value("chat", name, "password", owner)
            .map(|v| v.expose().to_string())
    }

    #[test]
    fn a_value_is_served_only_at_the_resource_version_the_watch_sees() {
        let cache = SecretCache::default();
        assert!(!cache.is_ready());
        listed(&cache, &[secret("a", "1", None)]);
        assert!(cache.is_ready() && cache.is_watched("chat", "a"));
        cache.remember("chat", "a", "1", "password", SecretString::new("one"));
        assert_eq!(value(&cache, "a", None).as_deref(), Some("one"));
        assert_eq!(cache.value("chat", "a", "other", None), None, "a key not read");

        // Changed: the value read before is out of date.
        cache.apply_watcher_event(&watcher::Event::Apply(secret("a", "2", None)));
        assert_eq!(value(&cache, "a", None), None);
        // Read at a version the watch has not seen yet: served once it has.
        cache.remember("chat", "a", "3", "password", SecretString::new("three"));
        assert_eq!(value(&cache, "a", None), None);
        cache.apply_watcher_event(&watcher::Event::Apply(secret("a", "3", None)));
        assert_eq!(value(&cache, "a", None).as_deref(), Some("three"));

        cache.apply_watcher_event(&watcher::Event::Delete(secret("a", "3", None)));
        assert_eq!(value(&cache, "a", None), None);
        assert!(!cache.is_watched("chat", "a"));
        assert_eq!(cache.values_kept(), 0);
    }

    #[test]
    fn an_owned_value_is_served_only_to_its_owner() {
        let cache = SecretCache::default();
        listed(&cache, &[secret("creds", "1", Some("uid-1"))]);
        cache.remember("chat", "creds", "1", "password", SecretString::new("generated"));
        assert_eq!(value(&cache, "creds", Some("uid-1")).as_deref(), Some("generated"));
        assert_eq!(value(&cache, "creds", Some("uid-2")), None);
        // Taken over by another object: no longer the first one's.
        cache.apply_watcher_event(&watcher::Event::Apply(secret("creds", "1", Some("uid-2"))));
        assert_eq!(value(&cache, "creds", Some("uid-1")), None);
        assert_eq!(value(&cache, "creds", Some("uid-2")).as_deref(), Some("generated"));
    }

    #[test]
    fn a_new_listing_keeps_the_values_of_what_it_lists_and_drops_the_rest() {
        let cache = SecretCache::default();
        listed(&cache, &[secret("a", "1", None), secret("b", "1", None)]);
        cache.remember("chat", "a", "1", "password", SecretString::new("a1"));
        cache.remember("chat", "b", "1", "password", SecretString::new("b1"));
        // Relisted after an outage in which `b` was deleted: until the
        // listing is done, the old state serves.
        cache.apply_watcher_event(&watcher::Event::Init);
        cache.apply_watcher_event(&watcher::Event::InitApply(secret("a", "1", None)));
        assert_eq!(value(&cache, "b", None).as_deref(), Some("b1"));
        cache.apply_watcher_event(&watcher::Event::InitDone);
        assert_eq!(value(&cache, "a", None).as_deref(), Some("a1"));
        assert_eq!(value(&cache, "b", None), None);
        assert!(!cache.is_watched("chat", "b"));
        assert_eq!(cache.values_kept(), 1);
    }

    #[test]
    fn a_secret_is_held_while_it_carries_the_finalizer_and_is_not_being_deleted() {
        let cache = SecretCache::default();
        let mut admin = secret("admin", "1", None);
        listed(&cache, &[admin.clone()]);
        assert!(!cache.is_held("chat", "admin"));
        admin.metadata.finalizers = Some(vec![ADMIN_TOKEN_FINALIZER.into()]);
        cache.apply_watcher_event(&watcher::Event::Apply(admin.clone()));
        assert!(cache.is_held("chat", "admin"));
        admin.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        cache.apply_watcher_event(&watcher::Event::Apply(admin.clone()));
        assert!(!cache.is_held("chat", "admin"));
        assert!(!cache.is_held("chat", "unknown"));
    }

    #[test]
    fn values_of_secrets_the_watch_does_not_see_are_forgotten() {
        let cache = SecretCache::default();
        // Before the first listing nothing is dropped: the watch may not
        // have reached the Secret yet.
        cache.remember("chat", "new", "5", "password", SecretString::new("n"));
        cache.forget_unwatched();
        assert_eq!(cache.values_kept(), 1);
        listed(&cache, &[secret("a", "1", None)]);
        cache.remember("chat", "new", "5", "password", SecretString::new("n"));
        cache.remember("chat", "a", "1", "password", SecretString::new("a1"));
        assert_eq!(cache.values_kept(), 2);
        cache.forget_unwatched();
        assert_eq!(cache.values_kept(), 1);
        assert_eq!(value(&cache, "a", None).as_deref(), Some("a1"));
    }
}
