//! The MatrixUsers of the cache by what other objects find them by: their
//! localparts, the password Secret they name, their uid (a generated
//! credentials Secret's owner), their Homeserver. Kept up by the watch
//! that fills the cache, in the same step, so that finding the users a
//! watch event concerns costs what the answer holds, not a scan of every
//! cached MatrixUser: at 10,000 users, a scan per new account (several per
//! account: its own check, its Secret's events, its status writes' events)
//! made the CPU per account grow with N.
//!
//! The index only narrows: callers still check each object it names, as
//! the cache holds it now, with the rule they had.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::{Arc, RwLock};

use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::api::MatrixUser;

type Ref = Arc<ObjectRef<MatrixUser>>;

/// What a MatrixUser is found by, as a hash of it: the index keeps no copy
/// of any name (at 10,000 users, the copies in four maps and a set per key
/// cost more than the users' own cached objects). Two keys with one hash
/// only widen a lookup, which callers narrow anyway.
type Key = u64;

/// What one MatrixUser is found by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Keys {
    /// Its effective localpart, and the localpart of the account its status
    /// records if another.
    localparts: [Option<Key>; 2],
    password_secret: Option<Key>,
    homeserver: Key,
    uid: Option<Key>,
}

/// The localpart of `@localpart:server`.
pub fn localpart_of(user_id: &str) -> &str {
    let id = user_id.strip_prefix('@').unwrap_or(user_id);
    id.split_once(':').map_or(id, |(localpart, _)| localpart)
}

#[derive(Default)]
struct Maps {
    /// Per index, so that names chosen to collide in one process do not in
    /// another.
    hasher: RandomState,
    keys: HashMap<Ref, Keys>,
    by_localpart: HashMap<Key, Vec<Ref>>,
    by_password_secret: HashMap<Key, Vec<Ref>>,
    by_homeserver: HashMap<Key, Vec<Ref>>,
    by_uid: HashMap<Key, Ref>,
}

fn add(map: &mut HashMap<Key, Vec<Ref>>, key: Key, r: &Ref) {
    let refs = map.entry(key).or_default();
    if !refs.contains(r) {
        refs.push(r.clone());
    }
}

fn take(map: &mut HashMap<Key, Vec<Ref>>, key: Key, r: &Ref) {
    if let Some(refs) = map.get_mut(&key) {
        refs.retain(|other| other != r);
        if refs.is_empty() {
            map.remove(&key);
        }
    }
}

impl Maps {
    fn key(&self, what: impl Hash) -> Key {
        self.hasher.hash_one(what)
    }

    fn keys_of(&self, user: &MatrixUser) -> Keys {
        let ns = user.meta().namespace.as_deref().unwrap_or_default();
        let localpart = user.effective_localpart();
        let recorded = user
            .status
            .as_ref()
            .and_then(|s| s.user_id.as_deref())
            .map(localpart_of)
            .filter(|recorded| *recorded != localpart);
        Keys {
            localparts: [Some(self.key(localpart)), recorded.map(|l| self.key(l))],
            password_secret: user
                .spec
                .password
                .as_ref()
                .and_then(|p| p.secret_ref.as_ref())
                .map(|r| self.key((ns, r.name.as_str()))),
            homeserver: self.key((ns, user.spec.homeserver_ref.name.as_str())),
            uid: user.meta().uid.as_deref().map(|uid| self.key(uid)),
        }
    }

    fn insert(&mut self, user: &MatrixUser) {
        let r: Ref = Arc::new(ObjectRef::new(&user.name_any()).within(&user.namespace().unwrap_or_default()));
        let keys = self.keys_of(user);
        if self.keys.get(&r) == Some(&keys) {
            return;
        }
        self.remove(&r);
        for localpart in keys.localparts.into_iter().flatten() {
            add(&mut self.by_localpart, localpart, &r);
        }
        if let Some(secret) = keys.password_secret {
            add(&mut self.by_password_secret, secret, &r);
        }
        add(&mut self.by_homeserver, keys.homeserver, &r);
        if let Some(uid) = keys.uid {
            self.by_uid.insert(uid, r.clone());
        }
        self.keys.insert(r, keys);
    }

    fn remove(&mut self, r: &Ref) {
        let Some(keys) = self.keys.remove(r) else { return };
        for localpart in keys.localparts.into_iter().flatten() {
            take(&mut self.by_localpart, localpart, r);
        }
        if let Some(secret) = keys.password_secret {
            take(&mut self.by_password_secret, secret, r);
        }
        take(&mut self.by_homeserver, keys.homeserver, r);
        if let Some(uid) = keys.uid
            && self.by_uid.get(&uid) == Some(r)
        {
            self.by_uid.remove(&uid);
        }
    }
}

#[derive(Default)]
struct Index {
    current: Maps,
    /// While the watch lists again: what the list brought so far. The
    /// current maps serve until the list is complete, as the cache does.
    relisting: Option<Maps>,
}

/// The index of one scope's MatrixUser cache. Cheap to clone; clones
/// share it.
#[derive(Clone, Default)]
pub struct UserIndex(Arc<RwLock<Index>>);

impl UserIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows one watch event, as the cache's writer does.
    pub fn apply(&self, event: &watcher::Event<MatrixUser>) {
        let mut index = self.0.write().unwrap_or_else(|p| p.into_inner());
        match event {
            watcher::Event::Apply(user) => index.current.insert(user),
            watcher::Event::Delete(user) => {
                let r = Arc::new(ObjectRef::new(&user.name_any()).within(&user.namespace().unwrap_or_default()));
                index.current.remove(&r);
            }
            watcher::Event::Init => index.relisting = Some(Maps::default()),
            watcher::Event::InitApply(user) => index.relisting.get_or_insert_with(Maps::default).insert(user),
            watcher::Event::InitDone => {
                if let Some(listed) = index.relisting.take() {
                    index.current = listed;
                }
            }
        }
    }

    fn refs(map: impl Fn(&Maps) -> &HashMap<Key, Vec<Ref>>, what: impl Hash, index: &Index) -> Vec<Ref> {
        let maps = &index.current;
        map(maps).get(&maps.key(what)).cloned().unwrap_or_default()
    }

    /// The MatrixUsers that name `localpart`, or record an account of it.
    pub fn by_localpart(&self, localpart: &str) -> Vec<Ref> {
        Self::refs(|m| &m.by_localpart, localpart, &self.read())
    }

    /// The MatrixUsers whose password is in the Secret `name` of `namespace`.
    pub fn by_password_secret(&self, namespace: &str, name: &str) -> Vec<Ref> {
        Self::refs(|m| &m.by_password_secret, (namespace, name), &self.read())
    }

    /// The MatrixUsers of the Homeserver `name` of `namespace`.
    pub fn by_homeserver(&self, namespace: &str, name: &str) -> Vec<Ref> {
        Self::refs(|m| &m.by_homeserver, (namespace, name), &self.read())
    }

    /// The MatrixUser of this uid.
    pub fn by_uid(&self, uid: &str) -> Option<Ref> {
        let index = self.read();
        let maps = &index.current;
        maps.by_uid.get(&maps.key(uid)).cloned()
    }

    /// How many MatrixUsers it holds.
    pub fn count(&self) -> usize {
        self.read().current.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(name: &str, spec: serde_json::Value, status: serde_json::Value) -> MatrixUser {
        serde_json::from_value(
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
            "metadata": {"name": name, "namespace": "chat", "uid": format!("uid-{name}")},
            "spec": spec, "status": status}),
        )
        .unwrap()
    }

    fn names(refs: Vec<Ref>) -> Vec<String> {
        let mut names: Vec<String> = refs.iter().map(|r| r.name.clone()).collect();
        names.sort();
        names
    }

    #[test]
    fn the_index_follows_the_watch_changes_deletions_and_relists() {
        let index = UserIndex::default();
        let a = user(
            "a",
            json!({"homeserverRef": {"name": "hs"}, "password": {"secretRef": {"name": "pw", "key": "k"}}}),
            json!({}),
        );
        let b = user(
            "b",
            json!({"homeserverRef": {"name": "hs"}, "localpart": "x"}),
            json!({}),
        );
        index.apply(&watcher::Event::Apply(a.clone()));
        index.apply(&watcher::Event::Apply(b.clone()));
        assert_eq!(names(index.by_localpart("a")), ["a"]);
        assert_eq!(names(index.by_localpart("x")), ["b"]);
        assert!(index.by_localpart("b").is_empty(), "b names localpart x");
        assert_eq!(names(index.by_password_secret("chat", "pw")), ["a"]);
        assert!(index.by_password_secret("other", "pw").is_empty());
        assert_eq!(names(index.by_homeserver("chat", "hs")), ["a", "b"]);
        assert_eq!(index.by_uid("uid-b").map(|r| r.name.clone()), Some("b".into()));

        // b names another localpart, and records the account of the old one.
        let b2 = user(
            "b",
            json!({"homeserverRef": {"name": "hs2"}, "localpart": "y"}),
            json!({"userId": "@x:example.org"}),
        );
        index.apply(&watcher::Event::Apply(b2));
        assert_eq!(names(index.by_localpart("y")), ["b"]);
        assert_eq!(names(index.by_localpart("x")), ["b"], "the account it records");
        assert_eq!(names(index.by_homeserver("chat", "hs")), ["a"]);
        assert_eq!(names(index.by_homeserver("chat", "hs2")), ["b"]);

        index.apply(&watcher::Event::Delete(a));
        assert!(index.by_localpart("a").is_empty());
        assert!(index.by_password_secret("chat", "pw").is_empty());
        assert!(index.by_uid("uid-a").is_none());
        assert_eq!(index.count(), 1);

        // A relist: the old entries serve until it is complete, then only
        // what it listed is there.
        let c = user("c", json!({"homeserverRef": {"name": "hs"}}), json!({}));
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(c));
        assert_eq!(names(index.by_localpart("y")), ["b"]);
        assert!(index.by_localpart("c").is_empty());
        index.apply(&watcher::Event::InitDone);
        assert!(index.by_localpart("y").is_empty());
        assert_eq!(names(index.by_localpart("c")), ["c"]);
        assert_eq!(index.count(), 1);
    }
}
