//! Watch streams that recover quickly and on their own.
//!
//! kube-runtime's `Controller` merges its trigger streams and pauses the
//! merged stream on any stream's error, with one backoff that resets only
//! after 120 s without errors: after an outage of the API server, each
//! watch's `410 Expired` in turn held every other watch back for up to 30 s.
//! Here each watch backs off on its own, briefly, and hands the controller
//! only objects, so one stream's errors never delay another's events.

use std::collections::HashMap;
use std::fmt::Debug;
use std::time::Duration;

use futures::{Stream, StreamExt, future};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tracing::warn;

/// The first and the longest wait before a failed watch is tried again.
const FIRST_RETRY: Duration = Duration::from_millis(250);
const LONGEST_RETRY: Duration = Duration::from_secs(5);

/// Doubling waits from [`FIRST_RETRY`] to [`LONGEST_RETRY`], back to the
/// first as soon as the stream yields something (`StreamBackoff` resets it
/// on every `Ok`).
#[derive(Clone, Debug)]
pub struct WatchBackoff {
    next: Duration,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: FIRST_RETRY }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let wait = self.next;
        self.next = (self.next * 2).min(LONGEST_RETRY);
        Some(wait)
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }
}

/// Whether a watch could not start because its resourceVersion is gone
/// from the API server (restarted, or compacted): kube's watcher would try
/// the same version again and again, so the stream starts over with a list.
fn expired_at_start(event: &Result<watcher::Event<impl Sized>, watcher::Error>) -> bool {
    matches!(
        event,
        Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))) if status.code == 410
    )
}

/// The annotations the operator reads (`matrix-operator.io/skip-cleanup`,
/// and any it may add): every other one is dropped from watched objects.
const OWN_ANNOTATIONS: &str = "matrix-operator.io/";

/// Keeps of an object's metadata only what the operator reads: no
/// `managedFields` (on every object a real API server returns, several
/// KiB each once kubectl, Argo CD or Flux applied it), no labels (the
/// operator selects nothing by label; Flux, Argo CD and Helm put several on
/// every object they apply, and the operator on every Secret it makes: a
/// map of them costs ≈0.6 KiB however few they are), and of the
/// annotations only the operator's own (`kubectl.kubernetes.io/last-applied-configuration`
/// alone holds a copy of the whole object, a Secret's data included).
pub fn keep_what_is_read(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    meta.labels = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.retain(|key, _| key.starts_with(OWN_ANNOTATIONS));
        if annotations.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A watched kind, and what of its objects the operator keeps in its
/// caches: the metadata it reads (see [`keep_what_is_read`]) and, for some
/// kinds, less.
pub trait Kept: Resource {
    fn keep_what_is_read(&mut self) {
        keep_what_is_read(self.meta_mut());
    }
}

impl Kept for crate::api::Homeserver {}
impl Kept for crate::api::MatrixAccessToken {}
impl Kept for kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Secret> {}

impl Kept for crate::api::MatrixUser {
    /// A settled pending-creation record stays on the object (removing it
    /// would cost a write per account) but says nothing any more: it is
    /// not kept.
    fn keep_what_is_read(&mut self) {
        keep_what_is_read(self.meta_mut());
        self.forget_settled_record();
    }
}

/// The objects of a watch as the operator keeps them (see [`Kept`]),
/// before any cache or trigger sees them.
pub fn as_kept<K, S>(stream: S) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Kept,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    stream.modify(|obj: &mut K| obj.keep_what_is_read())
}

/// The watch events of `api`, relisting when the resourceVersion expired,
/// with a backoff of their own, each object as the operator keeps it.
pub fn events<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Kept + Clone + DeserializeOwned + Debug + Send + 'static,
{
    as_kept(
        futures::stream::repeat(())
            .flat_map(move |()| {
                watcher(api.clone(), config.clone()).take_while(|event| {
                    if expired_at_start(event) {
                        warn!("the watch's resourceVersion expired; listing again");
                    }
                    future::ready(!expired_at_start(event))
                })
            })
            .backoff(WatchBackoff::default()),
    )
}

/// The objects of `api` that changed or went, keeping `writer`'s cache of
/// them (updated before the object is handed on, so what it triggers sees
/// it), handing on an object only when `fingerprint` of it changed since
/// the last copy handed on (or it went, or the watch listed again, but not
/// at its first listing: see [`touched_after_first_listing`]): the cache
/// still sees every change.
pub fn touched_into_when<K>(
    api: Api<K>,
    writer: kube::runtime::reflector::store::Writer<K>,
    what: &'static str,
    fingerprint: fn(&K) -> u64,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Kept + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    objects_only(
        changed_only(events(api, watcher::Config::default()).reflect(writer), fingerprint),
        what,
    )
}

/// The objects of watch events whose `fingerprint` changed since the last
/// one handed on; deletions and (re)listings always pass.
fn changed_only<K, E>(
    events: impl Stream<Item = Result<watcher::Event<K>, E>> + Send + 'static,
    fingerprint: fn(&K) -> u64,
) -> impl Stream<Item = Result<K, E>> + Send + 'static
where
    K: Resource + Send + 'static,
    E: Send + 'static,
{
    let mut seen: HashMap<(Option<String>, Option<String>), u64> = HashMap::new();
    let mut listed = false;
    events.filter_map(move |event| {
        let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
        future::ready(match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Apply(o)) => {
                let print = fingerprint(&o);
                (seen.insert(key(&o), print) != Some(print)).then_some(Ok(o))
            }
            Ok(watcher::Event::InitApply(o)) => {
                seen.insert(key(&o), fingerprint(&o));
                listed.then_some(Ok(o))
            }
            Ok(watcher::Event::Delete(o)) => {
                seen.remove(&key(&o));
                Some(Ok(o))
            }
            Ok(watcher::Event::InitDone) => {
                listed = true;
                None
            }
            Ok(watcher::Event::Init) => None,
        })
    })
}

/// The objects of watch events that changed or went, but not those of the
/// watch's first listing: a secondary watch's first listing would set off
/// every MatrixUser a second time at start-up, after the MatrixUser watch's
/// own listing set off each (at 10,000 users, 10,000 more passes and admin
/// GETs). A later listing (the watch started over) hands on everything: a
/// change may have been missed meanwhile.
pub fn touched_after_first_listing<K, E>(
    events: impl Stream<Item = Result<watcher::Event<K>, E>> + Send + 'static,
) -> impl Stream<Item = Result<K, E>> + Send + 'static
where
    K: Send + 'static,
    E: Send + 'static,
{
    let mut listed = false;
    events.filter_map(move |event| {
        future::ready(match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => Some(Ok(o)),
            Ok(watcher::Event::InitApply(o)) => listed.then_some(Ok(o)),
            Ok(watcher::Event::InitDone) => {
                listed = true;
                None
            }
            Ok(watcher::Event::Init) => None,
        })
    })
}

/// The watch events, but of an object applied again with the same
/// `fingerprint` as when it last passed (the operator's own writes, say),
/// none: what kube's `predicate_filter` does, keyed by the object's uid
/// alone, and forgetting an object when it is deleted rather than an hour
/// after it was last seen (its cache held a copy of each object's name,
/// namespace and uid, ≈0.2 KiB per MatrixUser at 10,000). Place it after
/// whatever must see every event (the cache, the fan-outs).
pub fn changed_by<K, E>(
    events: impl Stream<Item = Result<watcher::Event<K>, E>> + Send + 'static,
    fingerprint: fn(&K) -> Option<u64>,
) -> impl Stream<Item = Result<watcher::Event<K>, E>> + Send + 'static
where
    K: Resource + Send + 'static,
    E: Send + 'static,
{
    let mut passed: HashMap<Box<str>, u64> = HashMap::new();
    // An object without a uid (never one from an API server) by its name.
    let key = |o: &K| -> Box<str> {
        let meta = o.meta();
        match &meta.uid {
            Some(uid) => uid.as_str().into(),
            None => format!(
                "{}/{}",
                meta.namespace.as_deref().unwrap_or_default(),
                meta.name.as_deref().unwrap_or_default()
            )
            .into(),
        }
    };
    events.filter(move |event| {
        future::ready(match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => match fingerprint(o) {
                Some(print) => passed.insert(key(o), print) != Some(print),
                None => true,
            },
            Ok(watcher::Event::Delete(o)) => {
                passed.remove(&key(o));
                true
            }
            _ => true,
        })
    })
}

/// Keeps the objects of a stream and logs its errors instead of passing
/// them on, so the controller never pauses for them.
pub fn objects_only<K, E: std::fmt::Display>(
    stream: impl Stream<Item = Result<K, E>> + Send + 'static,
    what: &'static str,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
{
    stream.filter_map(move |item| {
        future::ready(match item {
            Ok(obj) => Some(Ok(obj)),
            Err(e) => {
                warn!(watch = what, error = %e, "watch error; retrying");
                None
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{MatrixUser, PENDING_CREATION};
    use kube::runtime::reflector::{self, ObjectRef};
    use serde_json::json;

    #[tokio::test]
    async fn only_objects_whose_fingerprint_changed_pass_and_a_deleted_one_is_forgotten() {
        let user = |uid: &str, generation: i64| -> MatrixUser {
            serde_json::from_value(json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": "alice", "namespace": "chat", "uid": uid, "generation": generation},
                "spec": {"homeserverRef": {"name": "hs"}},
            }))
            .unwrap()
        };
        let events = futures::stream::iter([
            Ok::<_, ()>(watcher::Event::Init),
            Ok(watcher::Event::InitApply(user("u1", 1))),
            Ok(watcher::Event::InitDone),
            // The operator's own write: the same fingerprint.
            Ok(watcher::Event::Apply(user("u1", 1))),
            Ok(watcher::Event::Apply(user("u1", 2))),
            Ok(watcher::Event::Delete(user("u1", 2))),
            // Made again under the same name: a new object.
            Ok(watcher::Event::Apply(user("u2", 1))),
            Ok(watcher::Event::Apply(user("u2", 1))),
            // Deleted and its uid seen again (a relisting): passes.
            Ok(watcher::Event::Delete(user("u2", 1))),
            Ok(watcher::Event::InitApply(user("u2", 1))),
        ]);
        let generation = |u: &MatrixUser| u.metadata.generation.map(|g| g as u64);
        let passed: Vec<String> = changed_by(events, generation)
            .map(|e| match e.unwrap() {
                watcher::Event::Apply(u) => format!("apply {} {:?}", u.metadata.uid.unwrap(), u.metadata.generation),
                watcher::Event::InitApply(u) => format!("init {} {:?}", u.metadata.uid.unwrap(), u.metadata.generation),
                watcher::Event::Delete(u) => format!("delete {}", u.metadata.uid.unwrap()),
                watcher::Event::Init => "init".into(),
                watcher::Event::InitDone => "done".into(),
            })
            .collect()
            .await;
        assert_eq!(
            passed,
            [
                "init",
                "init u1 Some(1)",
                "done",
                "apply u1 Some(2)",
                "delete u1",
                "apply u2 Some(1)",
                "delete u2",
                "init u2 Some(1)",
            ]
        );
    }

    #[tokio::test]
    async fn cached_objects_keep_no_managed_fields_and_only_the_operators_annotations() {
        let applied = |name: &str, annotations: serde_json::Value| -> MatrixUser {
            serde_json::from_value(json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": name, "namespace": "chat", "annotations": annotations,
                    "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "matrix-operator.io/v1alpha1",
                        "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                        "fieldsV1": {"f:spec": {"f:homeserverRef": {"f:name": {}}}}}]},
                "spec": {"homeserverRef": {"name": "hs"}},
            }))
            .unwrap()
        };
        let kept = applied(
            "a",
            json!({"matrix-operator.io/skip-cleanup": "true", "kubectl.kubernetes.io/last-applied-configuration": "{}"}),
        );
        let dropped = applied("b", json!({"argocd.argoproj.io/tracking-id": "x"}));
        let events = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(kept)),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(dropped)),
        ]);
        let (store, writer) = reflector::store::<MatrixUser>();
        let passed: Vec<MatrixUser> = as_kept(events)
            .reflect(writer)
            .applied_objects()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(passed.len(), 2);
        for name in ["a", "b"] {
            let cached = store.get(&ObjectRef::new(name).within("chat")).unwrap();
            assert!(
                cached.metadata.managed_fields.is_none(),
                "{name}: {:?}",
                cached.metadata
            );
        }
        let a = store.get(&ObjectRef::new("a").within("chat")).unwrap();
        assert_eq!(
            a.metadata.annotations,
            Some([("matrix-operator.io/skip-cleanup".to_string(), "true".to_string())].into())
        );
        assert_eq!(
            store
                .get(&ObjectRef::new("b").within("chat"))
                .unwrap()
                .metadata
                .annotations,
            None
        );
        // What the triggers see is what the cache holds.
        assert!(passed.iter().all(|u| u.metadata.managed_fields.is_none()));
    }

    #[tokio::test]
    async fn cached_objects_keep_no_labels_and_no_settled_pending_creation_record() {
        let user = |name: &str, record_of: &str, status: serde_json::Value| -> MatrixUser {
            let record = json!({"userId": record_of, "requestedAt": 1_000}).to_string();
            serde_json::from_value(json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": name, "namespace": "chat",
                    "labels": {"kustomize.toolkit.fluxcd.io/name": "users", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"},
                    "annotations": {PENDING_CREATION: record, "matrix-operator.io/skip-cleanup": "true"}},
                "spec": {"homeserverRef": {"name": "hs"}},
                "status": status,
            }))
            .unwrap()
        };
        let settled = user(
            "settled",
            "@settled:example.org",
            json!({"userId": "@settled:example.org", "accountCreationTs": 1_000}),
        );
        let pending = user("pending", "@pending:example.org", json!({}));
        let other_account = user(
            "other",
            "@other:example.org",
            json!({"userId": "@someone-else:example.org", "accountCreationTs": 1_000}),
        );
        let expected: Vec<_> = [&settled, &pending, &other_account]
            .map(|u| u.pending_creation())
            .into();
        let events = futures::stream::iter([settled, pending, other_account].map(|u| Ok(watcher::Event::Apply(u))));
        let (store, writer) = reflector::store::<MatrixUser>();
        let passed: Vec<MatrixUser> = as_kept(events)
            .reflect(writer)
            .applied_objects()
            .map(Result::unwrap)
            .collect()
            .await;
        let cached = |name: &str| store.get(&ObjectRef::new(name).within("chat")).unwrap();
        for (name, pending_creation) in ["settled", "pending", "other"].into_iter().zip(expected) {
            assert_eq!(cached(name).metadata.labels, None, "{name}");
            // What the operator reads of the record is the same.
            assert_eq!(cached(name).pending_creation(), pending_creation, "{name}");
        }
        let annotations = |name: &str| cached(name).metadata.annotations.clone().unwrap_or_default();
        assert!(!annotations("settled").contains_key(PENDING_CREATION));
        assert!(annotations("settled").contains_key("matrix-operator.io/skip-cleanup"));
        assert!(annotations("pending").contains_key(PENDING_CREATION));
        assert!(annotations("other").contains_key(PENDING_CREATION));
        assert!(passed.iter().all(|u| u.metadata.labels.is_none()));
    }

    #[tokio::test]
    async fn only_changes_of_the_fingerprint_deletions_and_relistings_pass() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let map = |name: &str, value: &str| -> ConfigMap {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns"},
                "data": {"watched": value, "ignored": "x"}
            }))
            .unwrap()
        };
        let watched = |c: &ConfigMap| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            c.data.as_ref().and_then(|d| d.get("watched")).hash(&mut h);
            h.finish()
        };
        let mut ignored_changed = map("a", "1");
        ignored_changed
            .data
            .as_mut()
            .unwrap()
            .insert("ignored".into(), "y".into());
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(map("a", "1")),
            watcher::Event::InitDone,
            watcher::Event::Apply(ignored_changed),
            watcher::Event::Apply(map("a", "2")),
            watcher::Event::Apply(map("b", "1")),
            watcher::Event::Apply(map("b", "1")),
            watcher::Event::Delete(map("a", "2")),
            watcher::Event::Apply(map("a", "2")),
        ];
        let passed: Vec<String> = changed_only(futures::stream::iter(events.into_iter().map(Ok::<_, ()>)), watched)
            .map(|o| {
                let o = o.unwrap();
                format!("{}={}", o.metadata.name.unwrap(), o.data.unwrap()["watched"])
            })
            .collect()
            .await;
        assert_eq!(
            passed,
            ["a=2", "b=1", "a=2", "a=2"],
            "the first listing sets off nothing"
        );
    }

    #[tokio::test]
    async fn a_first_listing_sets_off_nothing_and_a_later_one_everything() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let map = |name: &str, value: &str| -> ConfigMap {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name, "namespace": "ns"}, "data": {"v": value}
            }))
            .unwrap()
        };
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(map("a", "1")),
            watcher::Event::InitDone,
            watcher::Event::Apply(map("b", "1")),
            watcher::Event::Delete(map("b", "1")),
            // The watch started over.
            watcher::Event::Init,
            watcher::Event::InitApply(map("a", "2")),
            watcher::Event::InitDone,
        ];
        let touched: Vec<String> =
            touched_after_first_listing(futures::stream::iter(events.into_iter().map(Ok::<_, ()>)))
                .map(|o| o.unwrap().metadata.name.unwrap())
                .collect()
                .await;
        assert_eq!(touched, ["b", "b", "a"]);
        // A fingerprinted watch does the same.
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(map("a", "1")),
            watcher::Event::InitDone,
            watcher::Event::Init,
            watcher::Event::InitApply(map("a", "1")),
            watcher::Event::InitDone,
        ];
        let print = |_: &ConfigMap| 0;
        let passed = changed_only(futures::stream::iter(events.into_iter().map(Ok::<_, ()>)), print)
            .collect::<Vec<_>>()
            .await;
        assert_eq!(passed.len(), 1, "only the relist's");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = WatchBackoff::default();
        let waits: Vec<Duration> = (&mut b).take(7).collect();
        assert_eq!(waits[0], FIRST_RETRY);
        assert_eq!(waits[1], FIRST_RETRY * 2);
        assert_eq!(*waits.last().unwrap(), LONGEST_RETRY);
        b.reset();
        assert_eq!(b.next(), Some(FIRST_RETRY));
    }
}
