//! The kube-runtime wiring: one controller for Homeservers, one for
//! MatrixUsers, Secrets watched by metadata only.

mod error;
mod homeserver;
mod matrixuser;
mod secrets;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::{debug, info, warn};

pub use error::Error;
pub use homeserver::reconcile_homeserver;
pub use matrixuser::{FINALIZER, SKIP_CLEANUP, reconcile_user};

use crate::api::{Homeserver, MatrixUser};
use crate::metrics::Metrics;
use crate::synapse::{ClientConfig, RequestObserver, SynapseClient};

/// The field manager of every write, and the Events' reporting controller.
pub const MANAGER: &str = "matrix-user-operator";

/// How the controllers behave.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often an in-sync resource is checked against Synapse (with
    /// ±10% jitter): Synapse changes produce no watch events.
    pub resync_interval: Duration,
    /// Limit on each admin API request.
    pub request_timeout: Duration,
    /// Watch these namespaces only; all when empty.
    pub namespaces: Vec<String>,
    /// Reconciles in flight at once, per kind.
    pub concurrency: u16,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            namespaces: Vec::new(),
            concurrency: 4,
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Metrics,
    recorder: Recorder,
    /// All MatrixUsers, to find two that claim one Matrix ID.
    users: Store<MatrixUser>,
    synapse_clients: Mutex<HashMap<(String, String), CachedClient>>,
    /// Failed attempts in a row, per object, for exponential backoff.
    failures: Mutex<HashMap<(String, String, String), u32>>,
}

struct CachedClient {
    config: (String, String, usize),
    client: SynapseClient,
}

impl Context {
    pub fn new(client: Client, config: Config, users: Store<MatrixUser>, metrics: Metrics) -> Self {
        let recorder = Recorder::new(client.clone(), Reporter::from(MANAGER));
        Self {
            client,
            config,
            metrics,
            recorder,
            users,
            synapse_clients: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// The admin client of a Homeserver, made anew when its URL, token or
    /// request limit changed.
    async fn synapse_client(&self, hs: &Homeserver) -> Result<SynapseClient, Error> {
        let ns = hs.namespace().unwrap_or_default();
        let token = secrets::read_key(&self.client, &ns, &hs.spec.admin_token_secret_ref).await?;
        let limit = hs.spec.max_concurrent_requests.max(1) as usize;
        let fingerprint = (hs.spec.url.clone(), token.expose().to_string(), limit);
        let key = (ns, hs.name_any());
        let mut cache = self.synapse_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = cache.get(&key)
            && cached.config == fingerprint
        {
            return Ok(cached.client.clone());
        }
        let client = SynapseClient::new(ClientConfig {
            base_url: hs.spec.url.clone(),
            admin_token: token,
            max_concurrent_requests: limit,
            timeout: self.config.request_timeout,
            observer: Some(RequestObserver({
                let metrics = self.metrics.clone();
                Arc::new(move |endpoint, status, took| metrics.admin_request(endpoint, status, took))
            })),
        })
        .map_err(|e| Error::InvalidSpec(e.to_string()))?;
        cache.insert(
            key,
            CachedClient {
                config: fingerprint,
                client: client.clone(),
            },
        );
        Ok(client)
    }

    /// The requeue after a success: the resync interval, ±10%.
    fn resync(&self) -> Action {
        let base = self.config.resync_interval.as_secs_f64();
        Action::requeue(Duration::from_secs_f64(base * (0.9 + 0.2 * random_fraction())))
    }

    fn failure_key<K: Resource<DynamicType = ()>>(obj: &K) -> (String, String, String) {
        (
            K::kind(&()).into_owned(),
            obj.meta().namespace.clone().unwrap_or_default(),
            obj.meta().name.clone().unwrap_or_default(),
        )
    }

    fn reset_backoff<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&Self::failure_key(obj));
    }

    /// The wait before retrying a failed reconcile: Synapse's retry_after
    /// when it sent one, else 1 s doubling per failure in a row, up to 5 min.
    pub fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K, error: &Error) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(Self::failure_key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        if let Some(wait) = error.retry_after() {
            return wait;
        }
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}

/// A fraction in [0, 1) from the OS's randomness (0.5 if it has none).
fn random_fraction() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b) as f64 / (u32::MAX as f64 + 1.0),
        Err(_) => 0.5,
    }
}

/// Writes `status` with server-side apply on the status subresource.
async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

fn api_for<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs both controllers, for each watched namespace (or once for all),
/// until `shutdown` resolves. `ready` is told once every cache has synced.
pub async fn run(
    client: Client,
    config: Config,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send + 'static,
) {
    let shutdown = shutdown.shared();
    let scopes: Vec<Option<&str>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().map(|ns| Some(ns.as_str())).collect()
    };
    let mut controllers = Vec::new();
    let mut stores = Vec::new();
    for scope in scopes {
        let (running, store) = controllers_for(&client, &config, scope, &metrics, shutdown.clone());
        controllers.push(running);
        stores.push(store);
    }
    let readiness = async move {
        for store in stores {
            if store.wait_until_ready().await.is_err() {
                return;
            }
        }
        info!("caches synced");
        ready();
    };
    futures::join!(futures::future::join_all(controllers), readiness);
    info!("controllers stopped");
}

/// The MatrixUser and Homeserver controllers of one namespace (`None`: all),
/// and the MatrixUser cache whose sync tells readiness.
fn controllers_for<S>(
    client: &Client,
    config: &Config,
    namespace: Option<&str>,
    metrics: &Metrics,
    shutdown: S,
) -> (futures::future::BoxFuture<'static, ()>, Store<MatrixUser>)
where
    S: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let users_api: Api<MatrixUser> = api_for(client, namespace);
    let users_api_for_rivals = users_api.clone();
    let homeservers_api: Api<Homeserver> = api_for(client, namespace);
    // Secrets are watched by metadata only: their values never reach the
    // operator except the few it reads by name.
    let secrets_api: Api<PartialObjectMeta<Secret>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let controller_config = kube::runtime::controller::Config::default().concurrency(config.concurrency);

    let users =
        Controller::new(users_api, watcher::Config::default().any_semantic()).with_config(controller_config.clone());
    let store = users.store();
    let ctx = Arc::new(Context::new(
        client.clone(),
        config.clone(),
        store.clone(),
        metrics.clone(),
    ));

    let by_homeserver = store.clone();
    let by_secret = store.clone();
    let by_rival = store.clone();
    let users = users
        .watches(
            homeservers_api.clone(),
            watcher::Config::default(),
            move |hs: Homeserver| users_of_homeserver(&by_homeserver, &hs),
        )
        // When a MatrixUser changes or goes, the others naming the same
        // Matrix ID (held off with a Conflict) look again.
        .watches(
            users_api_for_rivals,
            watcher::Config::default(),
            move |u: MatrixUser| rivals_of(&by_rival, &u),
        )
        .watches_stream(
            watcher(secrets_api.clone(), watcher::Config::default())
                .default_backoff()
                .touched_objects(),
            move |secret| users_of_secret(&by_secret, &secret),
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(reconcile_user, matrixuser::error_policy, ctx.clone())
        .for_each(|result| async move { log_outcome("MatrixUser", result) });

    let homeservers =
        Controller::new(homeservers_api, watcher::Config::default().any_semantic()).with_config(controller_config);
    let hs_store = homeservers.store();
    let homeservers = homeservers
        .watches_stream(
            watcher(secrets_api, watcher::Config::default())
                .default_backoff()
                .touched_objects(),
            move |secret| homeservers_of_secret(&hs_store, &secret),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile_homeserver, homeserver::error_policy, ctx)
        .for_each(|result| async move { log_outcome("Homeserver", result) });

    let running = async move {
        futures::join!(users, homeservers);
    };
    (running.boxed(), store)
}

/// Reconcile failures are logged where they happen, with their context;
/// here only what the runtime itself reports.
fn log_outcome<K: Resource, E: std::error::Error>(
    kind: &str,
    result: Result<(ObjectRef<K>, Action), kube::runtime::controller::Error<E, watcher::Error>>,
) {
    use kube::runtime::controller::Error as RuntimeError;
    match result {
        Ok(_) | Err(RuntimeError::ReconcilerFailed(..)) => {}
        // A requeue still scheduled for an object deleted since.
        Err(RuntimeError::ObjectNotFound(obj)) => debug!(kind, %obj, "requeued object is gone"),
        Err(e) => warn!(kind, error = %e, "controller error"),
    }
}

/// References to the cached objects that `keep` selects.
fn refs_where<K>(store: &Store<K>, keep: impl Fn(&K) -> bool) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()> + Clone,
{
    store
        .state()
        .iter()
        .filter(|o| keep(o))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// The other MatrixUsers of `user`'s namespace and Homeserver with its localpart.
fn rivals_of(store: &Store<MatrixUser>, user: &MatrixUser) -> Vec<ObjectRef<MatrixUser>> {
    let name = user.name_any();
    let localpart = user.spec.effective_localpart(&name);
    refs_where(store, |u| {
        let other = u.name_any();
        u.namespace() == user.namespace()
            && other != name
            && u.spec.homeserver_ref == user.spec.homeserver_ref
            && u.spec.effective_localpart(&other) == localpart
    })
}

fn users_of_homeserver(store: &Store<MatrixUser>, hs: &Homeserver) -> Vec<ObjectRef<MatrixUser>> {
    let (ns, name) = (hs.namespace(), hs.name_any());
    refs_where(store, |u| u.namespace() == ns && u.spec.homeserver_ref.name == name)
}

/// MatrixUsers that read a Secret: their password Secret, or the Secret they
/// own (generated credentials).
fn users_of_secret(store: &Store<MatrixUser>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<MatrixUser>> {
    let (ns, name) = (secret.namespace(), secret.name_any());
    let owners: Vec<&str> = secret
        .owner_references()
        .iter()
        .filter(|o| o.kind == "MatrixUser")
        .map(|o| o.uid.as_str())
        .collect();
    refs_where(store, |u| {
        let by_name = u
            .spec
            .password
            .as_ref()
            .and_then(|p| p.secret_ref.as_ref())
            .is_some_and(|r| r.name == name);
        let owner = u.uid().is_some_and(|uid| owners.contains(&uid.as_str()));
        u.namespace() == ns && (by_name || owner)
    })
}

fn homeservers_of_secret(store: &Store<Homeserver>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<Homeserver>> {
    let (ns, name) = (secret.namespace(), secret.name_any());
    refs_where(store, |h| {
        h.namespace() == ns && h.spec.admin_token_secret_ref.name == name
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;
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
    fn a_secret_triggers_the_users_that_read_or_own_it_in_its_namespace() {
        let users = store::<MatrixUser>(vec![
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
            names(users_of_secret(&users, &secret_meta("chat", "pw", None))),
            ["chat/a"]
        );
        assert_eq!(
            names(users_of_secret(
                &users,
                &secret_meta("chat", "b-credentials", Some("uid-b"))
            )),
            ["chat/b"]
        );
        assert!(users_of_secret(&users, &secret_meta("chat", "unrelated", None)).is_empty());
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
        let elsewhere: MatrixUser = serde_json::from_value(user(
            "chat",
            "y",
            "uid-y",
            json!({"homeserverRef": {"name": "hs2"}, "localpart": "a"}),
        ))
        .unwrap();
        assert!(rivals_of(&users, &elsewhere).is_empty());
        let homeservers = store::<Homeserver>(vec![serde_json::to_value(&hs).unwrap()]);
        assert_eq!(
            names(homeservers_of_secret(&homeservers, &secret_meta("chat", "admin", None))),
            ["chat/hs"]
        );
        assert!(homeservers_of_secret(&homeservers, &secret_meta("other", "admin", None)).is_empty());
    }
}
