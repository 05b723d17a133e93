//! What sets off a reconcile: which changes of an object count (its own
//! status writes do not), and which MatrixUsers and Homeservers a change of
//! another object concerns. Pure functions over the watches' caches.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use super::{FINALIZER, UserIndex};
use crate::api::{Homeserver, MatrixUser};

/// What a reconcile acts on: the spec (its generation), the finalizers,
/// the deletion mark and the annotations (`skip-cleanup`). Not the status,
/// which the operator writes itself: a status write must not set off the
/// next reconcile (one whose status changes at every pass, such as a
/// Homeserver behind two Synapse versions, would loop without backoff).
pub(super) fn acted_on<K: Resource>(obj: &K) -> Option<u64> {
    Some(metadata_fingerprint(obj.meta(), |_| true, |_| true))
}

/// [`acted_on`] for a MatrixUser, but for what a pass writes itself: its
/// finalizer and its pending-creation record, added by the pass's first
/// write (which must not set off another pass, and its admin GET).
pub(super) fn acted_on_user(user: &MatrixUser) -> Option<u64> {
    Some(metadata_fingerprint(
        user.meta(),
        |finalizer| finalizer != FINALIZER,
        |annotation| annotation != crate::api::PENDING_CREATION,
    ))
}

/// A hash of the generation, the deletion mark, and the finalizers and
/// annotations that `finalizer` and `annotation` keep.
pub(super) fn metadata_fingerprint(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    finalizer: impl Fn(&str) -> bool,
    annotation: impl Fn(&str) -> bool,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    for f in meta.finalizers.iter().flatten().filter(|f| finalizer(f)) {
        f.hash(&mut h);
    }
    for (k, v) in meta.annotations.iter().flatten().filter(|(k, _)| annotation(k)) {
        (k, v).hash(&mut h);
    }
    h.finish()
}

/// What the MatrixUsers of a Homeserver read of it (see
/// [`homeserver::ready_status`] and the spec): a change of anything else —
/// its server version, a condition's message or time — sets off no
/// reconcile of its MatrixUsers, which costs an admin GET each.
pub(super) fn read_by_users(hs: &Homeserver) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    acted_on(hs).hash(&mut h);
    if let Some(status) = &hs.status {
        status.observed_generation.hash(&mut h);
        status.server_name.hash(&mut h);
        status.admin_user_id.hash(&mut h);
        for c in &status.conditions {
            (&c.type_, &c.status, &c.reason).hash(&mut h);
        }
    }
    h.finish()
}

/// A scope's cache of MatrixUsers and the index the same watch keeps of it.
#[derive(Clone)]
pub(super) struct UserCache {
    pub(super) store: Store<MatrixUser>,
    pub(super) index: UserIndex,
}

impl UserCache {
    /// References to the cached MatrixUsers among `candidates` (from the
    /// index) that `keep` selects, as the cache holds them now.
    fn refs_among(
        &self,
        candidates: impl IntoIterator<Item = Arc<ObjectRef<MatrixUser>>>,
        keep: impl Fn(&MatrixUser) -> bool,
    ) -> Vec<ObjectRef<MatrixUser>> {
        let mut refs: Vec<ObjectRef<MatrixUser>> = candidates
            .into_iter()
            .filter_map(|r| self.store.get(&r))
            .filter(|u| keep(u))
            .map(|u| ObjectRef::from_obj(u.as_ref()))
            .collect();
        refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        refs.dedup();
        refs
    }
}

/// References to the cached objects that `keep` selects. `keep` sees every
/// cached object on every call (every watch event of a Secret, say): it
/// must not allocate, or 10,000 users cost 10,000² allocations.
pub(super) fn refs_where<K>(store: &Store<K>, keep: impl Fn(&K) -> bool) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state_filter(keep)
        .iter()
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// The namespace and name of an object, borrowed.
pub(super) fn ns_name<K: Resource>(o: &K) -> (Option<&str>, &str) {
    (
        o.meta().namespace.as_deref(),
        o.meta().name.as_deref().unwrap_or_default(),
    )
}

/// The other MatrixUsers of the cache with `user`'s localpart, in any
/// namespace: one of them may be held off with a Conflict by `user`.
pub(super) fn rivals_of(cache: &UserCache, user: &MatrixUser) -> Vec<ObjectRef<MatrixUser>> {
    let localpart = user.effective_localpart();
    cache.refs_among(cache.index.by_localpart(localpart), |u| {
        ns_name(u) != ns_name(user) && u.effective_localpart() == localpart
    })
}

pub(super) fn users_of_homeserver(cache: &UserCache, hs: &Homeserver) -> Vec<ObjectRef<MatrixUser>> {
    let (ns, name) = ns_name(hs);
    let candidates = cache.index.by_homeserver(ns.unwrap_or_default(), name);
    cache.refs_among(candidates, |u| ns_name(u).0 == ns && u.spec.homeserver_ref.name == name)
}

/// MatrixUsers that read a Secret: their password Secret, the Secret they
/// own (generated credentials), or their Homeserver's admin token (a new
/// token resumes the MatrixUsers an old one left Unauthorized).
pub(super) fn users_of_secret(
    cache: &UserCache,
    homeservers: &Store<Homeserver>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<MatrixUser>> {
    let (ns, name) = ns_name(secret);
    let token_of: Vec<String> = homeservers
        .state_filter(|h| ns_name(h).0 == ns && h.spec.uses_secret(name))
        .iter()
        .map(|h| h.name_any())
        .collect();
    let owners: Vec<&str> = secret
        .owner_references()
        .iter()
        .filter(|o| o.kind == "MatrixUser")
        .map(|o| o.uid.as_str())
        .collect();
    let namespace = ns.unwrap_or_default();
    let candidates = cache
        .index
        .by_password_secret(namespace, name)
        .into_iter()
        .chain(owners.iter().filter_map(|uid| cache.index.by_uid(uid)))
        .chain(token_of.iter().flat_map(|hs| cache.index.by_homeserver(namespace, hs)));
    cache.refs_among(candidates, |u| {
        let by_name = u
            .spec
            .password
            .as_ref()
            .and_then(|p| p.secret_ref.as_ref())
            .is_some_and(|r| r.name == name);
        let owner = u.meta().uid.as_deref().is_some_and(|uid| owners.contains(&uid));
        let token = token_of.contains(&u.spec.homeserver_ref.name);
        ns_name(u).0 == ns && (by_name || owner || token)
    })
}

/// The Homeserver of `user`, if it is being deleted (it waits for its
/// MatrixUsers to go).
pub(super) fn deleting_homeserver_of(store: &Store<Homeserver>, user: &MatrixUser) -> Option<ObjectRef<Homeserver>> {
    let key = ObjectRef::new(&user.spec.homeserver_ref.name).within(&user.namespace().unwrap_or_default());
    store
        .get(&key)
        .filter(|hs| hs.meta().deletion_timestamp.is_some())
        .map(|_| key)
}

pub(super) fn homeservers_of_secret(
    store: &Store<Homeserver>,
    secret: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<Homeserver>> {
    let (ns, name) = ns_name(secret);
    refs_where(store, |h| ns_name(h).0 == ns && h.spec.uses_secret(name))
}

#[cfg(test)]
mod tests {
    use super::super::{SKIP_CLEANUP, watch};
    use super::*;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;
    use serde_json::json;

    fn store<K>(objects: Vec<serde_json::Value>) -> Store<K>
    where
        K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        let mut writer = Writer::<K>::default();
        for o in objects {
            writer.apply_watcher_event(&watcher::Event::Apply(serde_json::from_value(o).unwrap()));
        }
        writer.as_reader()
    }

    /// A cache of MatrixUsers and its index, filled as the watch fills them.
    fn user_cache(objects: Vec<serde_json::Value>) -> UserCache {
        let mut writer = Writer::<MatrixUser>::default();
        let index = UserIndex::default();
        for o in objects {
            let event = watcher::Event::Apply(serde_json::from_value(o).unwrap());
            index.apply(&event);
            writer.apply_watcher_event(&event);
        }
        UserCache {
            store: writer.as_reader(),
            index,
        }
    }

    fn user(ns: &str, name: &str, uid: &str, spec: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
               "metadata": {"name": name, "namespace": ns, "uid": uid}, "spec": spec})
    }

    fn secret_meta(ns: &str, name: &str, owner_uid: Option<&str>) -> PartialObjectMeta<Secret> {
        let owners: Vec<serde_json::Value> = owner_uid
            .map(|uid| json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser", "name": "x", "uid": uid}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": ns, "ownerReferences": owners}}))
        .unwrap()
    }

    fn names<K: Resource>(refs: Vec<ObjectRef<K>>) -> Vec<String> {
        let mut n: Vec<String> = refs
            .into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect();
        n.sort();
        n
    }

    #[test]
    fn status_writes_trigger_no_reconcile_but_spec_finalizers_deletion_and_annotations_do() {
        let base: MatrixUser =
            serde_json::from_value(user("a", "alice", "u1", json!({"homeserverRef": {"name": "hs"}}))).unwrap();
        let mut with_status = base.clone();
        with_status.status = Some(crate::api::MatrixUserStatus {
            user_id: Some("@alice:example.org".into()),
            ..Default::default()
        });
        with_status.metadata.resource_version = Some("99".into());
        assert_eq!(acted_on(&base), acted_on(&with_status), "a status write");
        let mut changes: Vec<MatrixUser> = Vec::new();
        let mut spec = base.clone();
        spec.metadata.generation = Some(2);
        changes.push(spec);
        let mut finalizer = base.clone();
        finalizer.metadata.finalizers = Some(vec![FINALIZER.into()]);
        changes.push(finalizer);
        let mut deleting = base.clone();
        deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        changes.push(deleting);
        let mut annotated = base.clone();
        annotated.metadata.annotations = Some([(SKIP_CLEANUP.to_string(), "true".to_string())].into());
        changes.push(annotated);
        for changed in changes {
            assert_ne!(acted_on(&base), acted_on(&changed), "{:?}", changed.metadata);
        }
        // As the watch keeps them: another tool's annotations (kubectl's
        // last-applied copy, Argo CD's tracking id) are not kept, so their
        // changes trigger nothing; the operator's own still do.
        let as_kept = |annotations: &[(&str, &str)]| {
            let mut u = base.clone();
            u.metadata.annotations = Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            watch::keep_what_is_read(&mut u.metadata);
            u
        };
        let applied_again = as_kept(&[("kubectl.kubernetes.io/last-applied-configuration", "{\"v\":2}")]);
        assert_eq!(acted_on(&base), acted_on(&applied_again));
        let skipped = as_kept(&[(SKIP_CLEANUP, "true"), ("argocd.argoproj.io/tracking-id", "x")]);
        assert_ne!(acted_on(&base), acted_on(&skipped));
        assert_eq!(acted_on(&skipped), acted_on(&annotated_only_skip()));
    }

    #[test]
    fn a_matrixusers_own_finalizer_and_pending_creation_record_trigger_no_reconcile_but_others_do() {
        let base: MatrixUser =
            serde_json::from_value(user("a", "alice", "u1", json!({"homeserverRef": {"name": "hs"}}))).unwrap();
        let mut written = base.clone();
        written.metadata.finalizers = Some(vec![FINALIZER.into()]);
        written.metadata.annotations = Some(
            [(
                crate::api::PENDING_CREATION.to_string(),
                r#"{"userId":"@alice:example.org","requestedAt":1}"#.to_string(),
            )]
            .into(),
        );
        assert_eq!(acted_on_user(&base), acted_on_user(&written), "the pass's own write");
        let mut other_finalizer = written.clone();
        other_finalizer.metadata.finalizers = Some(vec![FINALIZER.into(), "example.org/keep".into()]);
        let mut skipped = written.clone();
        skipped
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(SKIP_CLEANUP.into(), "true".into());
        let mut spec = written.clone();
        spec.metadata.generation = Some(2);
        for changed in [other_finalizer, skipped, spec] {
            assert_ne!(
                acted_on_user(&written),
                acted_on_user(&changed),
                "{:?}",
                changed.metadata
            );
        }
    }

    fn annotated_only_skip() -> MatrixUser {
        let mut u: MatrixUser =
            serde_json::from_value(user("a", "alice", "u1", json!({"homeserverRef": {"name": "hs"}}))).unwrap();
        u.metadata.annotations = Some([(SKIP_CLEANUP.to_string(), "true".to_string())].into());
        u
    }

    #[test]
    fn matrixusers_look_again_only_when_what_they_read_of_their_homeserver_changed() {
        let hs = |version: &str, reason: &str, message: &str| -> Homeserver {
            serde_json::from_value(
                json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
                "metadata": {"name": "hs", "namespace": "chat", "generation": 1},
                "spec": {"url": "http://x", "adminTokenSecretRef": {"name": "admin", "key": "token"}},
                "status": {"serverName": "example.org", "serverVersion": version, "observedGeneration": 1,
                    "conditions": [{"type": "Ready", "status": "True", "reason": reason, "message": message,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}),
            )
            .unwrap()
        };
        let base = read_by_users(&hs("1.163.2", "Connected", "connected to example.org (1.163.2)"));
        assert_eq!(
            base,
            read_by_users(&hs("1.164.0", "Connected", "connected to example.org (1.164.0)"))
        );
        assert_ne!(base, read_by_users(&hs("1.163.2", "Unreachable", "connected")));
        let mut renamed = hs("1.163.2", "Connected", "");
        renamed.status.as_mut().unwrap().server_name = Some("other.org".into());
        assert_ne!(base, read_by_users(&renamed));
        let mut respecced = hs("1.163.2", "Connected", "");
        respecced.metadata.generation = Some(2);
        assert_ne!(base, read_by_users(&respecced));
    }

    #[test]
    fn a_homeservers_ca_bundle_secret_triggers_it_and_its_users() {
        let users = user_cache(vec![
            user("chat", "a", "uid-a", json!({"homeserverRef": {"name": "hs"}})),
            user("chat", "b", "uid-b", json!({"homeserverRef": {"name": "other"}})),
        ]);
        let homeservers = store::<Homeserver>(vec![
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
            "metadata": {"name": "hs", "namespace": "chat"},
            "spec": {"url": "https://synapse.chat.svc", "adminTokenSecretRef": {"name": "admin", "key": "token"},
                     "caBundleSecretRef": {"name": "synapse-ca", "key": "ca.crt"}}}),
        ]);
        let ca = secret_meta("chat", "synapse-ca", None);
        assert_eq!(names(homeservers_of_secret(&homeservers, &ca)), ["chat/hs"]);
        assert_eq!(names(users_of_secret(&users, &homeservers, &ca)), ["chat/a"]);
        let elsewhere = secret_meta("other", "synapse-ca", None);
        assert!(homeservers_of_secret(&homeservers, &elsewhere).is_empty());
    }

    #[test]
    fn a_secret_triggers_the_users_that_read_or_own_it_in_its_namespace() {
        let no_homeservers = store::<Homeserver>(vec![]);
        let users = user_cache(vec![
            user(
                "chat",
                "a",
                "uid-a",
                json!({"homeserverRef": {"name": "hs"}, "password": {"secretRef": {"name": "pw", "key": "k"}}}),
            ),
            user(
                "chat",
                "b",
                "uid-b",
                json!({"homeserverRef": {"name": "hs"}, "password": {"generate": true}}),
            ),
            user(
                "other",
                "c",
                "uid-c",
                json!({"homeserverRef": {"name": "hs"}, "password": {"secretRef": {"name": "pw", "key": "k"}}}),
            ),
            user("chat", "d", "uid-d", json!({"homeserverRef": {"name": "hs2"}})),
        ]);
        assert_eq!(
            names(users_of_secret(
                &users,
                &no_homeservers,
                &secret_meta("chat", "pw", None)
            )),
            ["chat/a"]
        );
        assert_eq!(
            names(users_of_secret(
                &users,
                &no_homeservers,
                &secret_meta("chat", "b-credentials", Some("uid-b"))
            )),
            ["chat/b"]
        );
        assert!(users_of_secret(&users, &no_homeservers, &secret_meta("chat", "unrelated", None)).is_empty());
        // A Homeserver's admin token: every MatrixUser of that Homeserver.
        let with_hs = store::<Homeserver>(vec![
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
            "metadata": {"name": "hs", "namespace": "chat"},
            "spec": {"url": "http://x", "adminTokenSecretRef": {"name": "admin", "key": "token"}}}),
        ]);
        assert_eq!(
            names(users_of_secret(&users, &with_hs, &secret_meta("chat", "admin", None))),
            ["chat/a", "chat/b"]
        );
        assert!(users_of_secret(&users, &with_hs, &secret_meta("other", "admin", None)).is_empty());
        let hs: Homeserver = serde_json::from_value(
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
            "metadata": {"name": "hs", "namespace": "chat"},
            "spec": {"url": "http://x", "adminTokenSecretRef": {"name": "admin", "key": "token"}}}),
        )
        .unwrap();
        assert_eq!(names(users_of_homeserver(&users, &hs)), ["chat/a", "chat/b"]);
        // Another MatrixUser naming a's Matrix ID makes a look again.
        let rival: MatrixUser = serde_json::from_value(user(
            "chat",
            "z",
            "uid-z",
            json!({"homeserverRef": {"name": "hs"}, "localpart": "a"}),
        ))
        .unwrap();
        assert_eq!(names(rivals_of(&users, &rival)), ["chat/a"]);
        // One in another namespace (or of another Homeserver) may hold the
        // account too: it looks again as well.
        let elsewhere: MatrixUser = serde_json::from_value(user(
            "other",
            "y",
            "uid-y",
            json!({"homeserverRef": {"name": "hs2"}, "localpart": "a"}),
        ))
        .unwrap();
        assert_eq!(names(rivals_of(&users, &elsewhere)), ["chat/a"]);
        let unrelated: MatrixUser = serde_json::from_value(user(
            "chat",
            "x",
            "uid-x",
            json!({"homeserverRef": {"name": "hs"}, "localpart": "nobody"}),
        ))
        .unwrap();
        assert!(rivals_of(&users, &unrelated).is_empty());
        let homeservers = store::<Homeserver>(vec![serde_json::to_value(&hs).unwrap()]);
        assert_eq!(
            names(homeservers_of_secret(&homeservers, &secret_meta("chat", "admin", None))),
            ["chat/hs"]
        );
        assert!(homeservers_of_secret(&homeservers, &secret_meta("other", "admin", None)).is_empty());
    }
}
