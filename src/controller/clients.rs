//! Admin clients kept per Homeserver: a client holds its connection pool
//! (and MAS's OAuth token), so it lives as long as what it was made from —
//! the URL, the credentials, the request limit, the CA bundle — and is
//! made anew when any of that changed.

use std::collections::HashMap;
use std::sync::Mutex;

/// A Homeserver, by namespace and name.
pub(super) type HomeserverName = (String, String);

/// Clients of type `C`, one per Homeserver, each with the fingerprint `F`
/// of what it was made from.
pub(super) struct ClientCache<F, C>(Mutex<HashMap<HomeserverName, (F, C)>>);

impl<F, C> Default for ClientCache<F, C> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<F: PartialEq, C: Clone> ClientCache<F, C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<HomeserverName, (F, C)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client of `homeserver` made from `fingerprint`: the one kept,
    /// or one `make` makes (and that is kept in its place).
    pub(super) fn get_or_make<E>(
        &self,
        homeserver: HomeserverName,
        fingerprint: F,
        make: impl FnOnce() -> Result<C, E>,
    ) -> Result<C, E> {
        let mut cache = self.lock();
        if let Some((kept, client)) = cache.get(&homeserver)
            && *kept == fingerprint
        {
            return Ok(client.clone());
        }
        let client = make()?;
        cache.insert(homeserver, (fingerprint, client.clone()));
        Ok(client)
    }

    /// Keeps the clients of the Homeservers `keep` selects.
    pub(super) fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.lock().retain(|(ns, name), _| keep(ns, name));
    }

    pub(super) fn remove(&self, namespace: &str, name: &str) {
        self.lock().remove(&(namespace.to_string(), name.to_string()));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(name: &str) -> HomeserverName {
        ("chat".into(), name.into())
    }

    #[test]
    fn a_client_is_kept_until_what_it_was_made_from_changes() {
        let cache: ClientCache<&str, u32> = ClientCache::default();
        let mut made = 0;
        let mut get = |name, fingerprint| {
            cache
                .get_or_make(hs(name), fingerprint, || {
                    made += 1;
                    Ok::<_, ()>(made)
                })
                .unwrap()
        };
        assert_eq!(get("a", "token-1"), 1);
        assert_eq!(get("a", "token-1"), 1, "kept");
        assert_eq!(get("b", "token-1"), 2, "one per Homeserver");
        assert_eq!(get("a", "token-2"), 3, "a new token makes a new client");
        assert_eq!(get("a", "token-2"), 3);
        assert_eq!(cache.len(), 2);
        cache.retain(|_, name| name != "b");
        assert_eq!(cache.len(), 1);
        cache.remove("chat", "a");
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_client_that_cannot_be_made_leaves_the_kept_one_alone() {
        let cache: ClientCache<&str, u32> = ClientCache::default();
        assert_eq!(cache.get_or_make(hs("a"), "old", || Ok::<_, &str>(1)), Ok(1));
        assert_eq!(cache.get_or_make(hs("a"), "new", || Err("bad URL")), Err("bad URL"));
        assert_eq!(cache.get_or_make(hs("a"), "old", || Ok::<_, &str>(2)), Ok(1));
    }
}
