//! The kube-runtime wiring: one controller for Homeservers, one for
//! MatrixUsers, Secrets watched by metadata only.

mod accesstoken;
mod accounts;
mod cache;
pub mod digest_key;
mod error;
mod events;
mod fairness;
mod homeserver;
mod index;
mod matrixuser;
mod ownership;
mod secrets;
mod transport;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use tracing::{debug, info, warn};

pub use accesstoken::{
    DEFAULT_GRACE_PERIOD, ROTATE_ANNOTATION, TOKEN_FINALIZER, TOKEN_SECRET_FINALIZER, reconcile_token,
};
pub use cache::{CacheSizes, WatchedScope};
pub use error::Error;
pub use homeserver::{HOMESERVER_FINALIZER, reconcile_homeserver};
pub use index::UserIndex;
pub use matrixuser::{FINALIZER, SKIP_CLEANUP, reconcile_user};
pub use secrets::ADMIN_TOKEN_FINALIZER;

use crate::api::{Homeserver, MatrixUser};
use crate::backend::Backend;
use crate::backend::mas::{MasBackend, MasClient, MasConfig};
use crate::metrics::Metrics;
use crate::secret::{DigestKey, SecretString};
use crate::synapse::{ClientConfig, RequestObserver, SynapseClient};

/// The field manager of every write, and the Events' reporting controller.
pub const MANAGER: &str = "matrix-user-operator";

/// How the controllers behave.
#[derive(Clone, Debug)]
pub struct Config {
    /// How often an in-sync resource is checked against Synapse, each at a
    /// phase of the interval of its own: Synapse changes produce no watch
    /// events.
    pub resync_interval: Duration,
    /// Limit on each admin API request.
    pub request_timeout: Duration,
    /// Watch these namespaces only; all when empty.
    pub namespaces: Vec<String>,
    /// Reconciles in flight at once, per kind.
    pub concurrency: u16,
    /// The key of the password digests in status: the same for every
    /// replica and across restarts (see [`digest_key::load_or_create`]), or
    /// every password would be sent again after a restart.
    pub digest_key: DigestKey,
    /// Limit on a MatrixUser pass's work with the homeserver, all its
    /// requests together (see `fairness` for the other half of what keeps
    /// a slow homeserver from stalling the others).
    pub reconcile_timeout: Duration,
    /// How often each Homeserver's accounts are counted (see `accounts`).
    pub account_count_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            resync_interval: Duration::from_secs(600),
            request_timeout: Duration::from_secs(30),
            namespaces: Vec::new(),
            concurrency: 8,
            digest_key: process_digest_key(),
            reconcile_timeout: Duration::from_secs(120),
            account_count_interval: accounts::DEFAULT_INTERVAL,
        }
    }
}

/// One key for every default [`Config`] of this process, so that two
/// contexts made in one process (tests, tools) agree on digests; the
/// operator itself reads its key from its Secret.
fn process_digest_key() -> DigestKey {
    static KEY: std::sync::OnceLock<DigestKey> = std::sync::OnceLock::new();
    KEY.get_or_init(DigestKey::generate).clone()
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Metrics,
    events: events::Publisher,
    /// The MatrixUsers of every watched scope, to find two that claim one
    /// Matrix ID wherever they live.
    users: Vec<Store<MatrixUser>>,
    /// The index of each of `users` (by position), where a watch keeps one:
    /// a store without one is scanned.
    user_indexes: Vec<UserIndex>,
    synapse_clients: Mutex<HashMap<(String, String), CachedClient>>,
    mas_clients: Mutex<HashMap<(String, String), CachedMasClient>>,
    /// Per MatrixUser, a status digest known to match a password (by the
    /// password's SHA-256): PBKDF2 costs milliseconds of CPU, and every
    /// reconcile of an in-sync user would pay it again.
    digests: Mutex<HashMap<(String, String), KnownDigest>>,
    /// Failed attempts in a row, per object, for exponential backoff.
    failures: Mutex<HashMap<(String, String, String), u32>>,
    /// The caches of the controllers' watches, per scope: Homeservers and
    /// Secret metadata are read there rather than from the API server.
    /// Empty: every read goes to the API server.
    watched: Vec<WatchedScope>,
    secret_values: cache::SecretValues,
    /// Each Homeserver's share of the MatrixUser controller's slots.
    slots: fairness::Slots,
    /// When each Homeserver's accounts were last counted.
    account_counts: accounts::Counts,
}

/// What a caller of [`Context::synapse_client`] needs of the Homeserver's
/// credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// The admin token.
    Admin,
    /// The admin token and, when the spec names one, the registration
    /// shared secret.
    Registration,
}

struct CachedClient {
    /// URL, token, registration shared secret, request limit, CA bundle.
    config: (String, SecretString, Option<SecretString>, usize, Option<SecretString>),
    client: SynapseClient,
}

/// A status digest and the SHA-256 of the password it was found to match.
type KnownDigest = (String, [u8; 32]);

struct CachedMasClient {
    /// URL, client ID, client secret, request limit, CA bundle.
    config: (String, String, SecretString, usize, Option<SecretString>),
    client: MasClient,
}

impl Context {
    pub fn new(client: Client, config: Config, users: Store<MatrixUser>, metrics: Metrics) -> Self {
        Self::with_scopes(client, config, vec![users], metrics)
    }

    /// A context shared by the controllers of several scopes, each with
    /// its cache of MatrixUsers.
    pub fn with_scopes(client: Client, config: Config, users: Vec<Store<MatrixUser>>, metrics: Metrics) -> Self {
        let events = events::Publisher::new(client.clone(), MANAGER);
        let slots = fairness::Slots::new(config.concurrency);
        Self {
            client,
            config,
            metrics,
            events,
            users,
            user_indexes: Vec::new(),
            synapse_clients: Mutex::default(),
            mas_clients: Mutex::default(),
            digests: Mutex::default(),
            failures: Mutex::default(),
            watched: Vec::new(),
            secret_values: cache::SecretValues::default(),
            slots,
            account_counts: accounts::Counts::default(),
        }
    }

    /// Reads Homeservers and Secrets through the caches of these scopes'
    /// watches (and keeps Secret values per resourceVersion), instead of
    /// asking the API server on every reconcile.
    pub fn with_watches(mut self, scopes: Vec<WatchedScope>) -> Self {
        self.watched = scopes;
        self
    }

    /// Finds MatrixUsers through the indexes the watches keep of `users`
    /// (one per store, in order), instead of scanning the stores.
    pub fn with_user_indexes(mut self, indexes: Vec<UserIndex>) -> Self {
        self.user_indexes = indexes;
        self
    }

    /// The cached MatrixUsers, of every watched scope, that name one of
    /// `localparts` or record an account of one, and that `keep` selects:
    /// from the index where the store has one (`keep` then sees only
    /// those), else by a scan (`keep` sees every cached object: it must be
    /// cheap).
    fn cached_users_of_localparts(
        &self,
        localparts: &[&str],
        keep: impl Fn(&MatrixUser) -> bool + Copy,
    ) -> Vec<Arc<MatrixUser>> {
        let mut found: Vec<Arc<MatrixUser>> = Vec::new();
        for (i, store) in self.users.iter().enumerate() {
            match self.user_indexes.get(i) {
                Some(index) => {
                    let mut refs: Vec<_> = localparts.iter().flat_map(|l| index.by_localpart(l)).collect();
                    refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                    refs.dedup();
                    found.extend(refs.iter().filter_map(|r| store.get(r)).filter(|u| keep(u)));
                }
                None => found.extend(store.state_filter(keep)),
            }
        }
        found
    }

    /// The admin client of a Homeserver, made anew when its URL, token,
    /// registration shared secret, request limit or CA bundle changed.
    ///
    /// `Need::Registration`: a registration shared secret that cannot be
    /// read is an error (the Homeserver's check, so that it shows there).
    /// `Need::Admin`: the client goes without it and creates accounts the
    /// slower way; so a deletion policy never waits for that Secret (a
    /// namespace being deleted may have deleted it already).
    async fn synapse_client(&self, hs: &Homeserver, need: Need) -> Result<SynapseClient, Error> {
        let ns = hs.namespace().unwrap_or_default();
        let token = self.secret_value(&ns, &hs.spec.admin_token_secret_ref).await?;
        let registration_shared_secret = match &hs.spec.registration_shared_secret_ref {
            Some(r) => match self.secret_value(&ns, r).await {
                Ok(secret) => Some(secret),
                Err(e) if need == Need::Admin => {
                    debug!(homeserver = %hs.name_any(), error = %e, "creating without the registration shared secret");
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let limit = hs.spec.max_concurrent_requests.max(1) as usize;
        let ca_bundle = self.ca_bundle(hs).await?;
        let fingerprint = (
            hs.spec.url.clone(),
            token.clone(),
            registration_shared_secret.clone(),
            limit,
            ca_bundle.clone(),
        );
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
            registration_shared_secret,
            max_concurrent_requests: limit,
            timeout: self.config.request_timeout,
            observer: Some(self.request_observer()),
            extra_roots: transport::extra_roots(hs, ca_bundle.as_ref())?,
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

    /// Whether `digest` (from the status of `user`) is one of `password`.
    fn digest_matches(&self, user: &MatrixUser, digest: &str, password: &SecretString) -> bool {
        let key = (user.namespace().unwrap_or_default(), user.name_any());
        let fingerprint = sha256(password);
        let known =
            |cache: &HashMap<_, KnownDigest>| cache.get(&key).is_some_and(|(d, f)| d == digest && *f == fingerprint);
        if known(&self.digests.lock().unwrap_or_else(|p| p.into_inner())) {
            return true;
        }
        let matches = crate::secret::digest_matches(digest, password, &self.config.digest_key);
        if matches {
            self.remember_digest(user, digest.to_string(), password);
        }
        matches
    }

    /// Remembers that `digest` is one of `password`, for [`Self::digest_matches`].
    fn remember_digest(&self, user: &MatrixUser, digest: String, password: &SecretString) {
        let key = (user.namespace().unwrap_or_default(), user.name_any());
        self.digests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, (digest, sha256(password)));
    }

    /// Counts every backend request in the metrics.
    fn request_observer(&self) -> RequestObserver {
        let metrics = self.metrics.clone();
        RequestObserver(Arc::new(move |endpoint, status, took| {
            metrics.admin_request(endpoint, status, took)
        }))
    }

    /// The MAS admin client of a Homeserver with `spec.mas`, made anew when
    /// its URL, client, request limit or CA bundle changed; `None` without
    /// `spec.mas`.
    /// Clones share the OAuth token, so it lives as long as the config.
    async fn mas_client(&self, hs: &Homeserver) -> Result<Option<MasClient>, Error> {
        let Some(mas) = &hs.spec.mas else {
            return Ok(None);
        };
        let ns = hs.namespace().unwrap_or_default();
        let secret = self.secret_value(&ns, &mas.client_secret_ref).await?;
        let limit = hs.spec.max_concurrent_requests.max(1) as usize;
        let ca_bundle = self.ca_bundle(hs).await?;
        let fingerprint = (
            mas.url.clone(),
            mas.client_id.clone(),
            secret.clone(),
            limit,
            ca_bundle.clone(),
        );
        let key = (ns, hs.name_any());
        let mut cache = self.mas_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = cache.get(&key)
            && cached.config == fingerprint
        {
            return Ok(Some(cached.client.clone()));
        }
        let client = MasClient::new(MasConfig {
            base_url: mas.url.clone(),
            client_id: mas.client_id.clone(),
            client_secret: secret,
            max_concurrent_requests: limit,
            timeout: self.config.request_timeout,
            observer: Some(self.request_observer()),
            extra_roots: transport::extra_roots(hs, ca_bundle.as_ref())?,
        })?;
        cache.insert(
            key,
            CachedMasClient {
                config: fingerprint,
                client: client.clone(),
            },
        );
        Ok(Some(client))
    }

    /// Where a Homeserver's accounts live, with the clients to reach it.
    pub async fn backend(&self, hs: &Homeserver) -> Result<Backend, Error> {
        let synapse = self.synapse_client(hs, Need::Admin).await?;
        Ok(match self.mas_client(hs).await? {
            Some(mas) => Backend::Mas(MasBackend::new(mas, synapse)),
            None => Backend::Synapse(synapse),
        })
    }

    /// The requeue after a success of `obj`: at the object's own phase of
    /// the resync interval, at least half an interval from now (see
    /// [`next_resync`]), so objects created together still resync spread
    /// over the whole interval.
    fn resync<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Action {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let phase = phase_of(obj.meta().uid.as_deref(), &Self::failure_key(obj));
        Action::requeue(next_resync(now, self.config.resync_interval, phase))
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
    /// when it sent one (at least 1 s), else 1 s doubling per failure in a
    /// row, up to 5 min.
    pub fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K, error: &Error) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(Self::failure_key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        if let Some(wait) = error.retry_after() {
            return wait.max(MIN_RETRY);
        }
        (MIN_RETRY * (1u32 << (*n - 1).min(9))).min(MAX_RETRY)
    }

    async fn publish<K: Resource<DynamicType = ()>>(&self, obj: &K, type_: EventType, reason: &str, note: String) {
        if let Err(e) = self.events.publish(&obj.object_ref(&()), type_, reason, note).await {
            warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}

fn sha256(password: &SecretString) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, password.expose().as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// What a reconcile acts on: the spec (its generation), the finalizers,
/// the deletion mark and the annotations (`skip-cleanup`). Not the status,
/// which the operator writes itself: a status write must not set off the
/// next reconcile (one whose status changes at every pass, such as a
/// Homeserver behind two Synapse versions, would loop without backoff).
fn acted_on<K: Resource>(obj: &K) -> Option<u64> {
    Some(metadata_fingerprint(obj.meta(), |_| true, |_| true))
}

/// [`acted_on`] for a MatrixUser, but for what a pass writes itself: its
/// finalizer and its pending-creation record, added by the pass's first
/// write (which must not set off another pass, and its admin GET).
fn acted_on_user(user: &MatrixUser) -> Option<u64> {
    Some(metadata_fingerprint(
        user.meta(),
        |finalizer| finalizer != FINALIZER,
        |annotation| annotation != crate::api::PENDING_CREATION,
    ))
}

/// A hash of the generation, the deletion mark, and the finalizers and
/// annotations that `finalizer` and `annotation` keep.
fn metadata_fingerprint(
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
fn read_by_users(hs: &Homeserver) -> u64 {
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

/// The shortest and the longest wait before a failed reconcile is retried.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// An object's fixed place in the resync interval, a fraction in [0, 1):
/// from its uid (random, so uniform), else from its kind, namespace and
/// name.
fn phase_of(uid: Option<&str>, key: &(String, String, String)) -> f64 {
    let text = match uid {
        Some(uid) => uid.to_string(),
        None => format!("{}/{}/{}", key.0, key.1, key.2),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest.as_ref()[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The wait from `now` (time since the Unix epoch) to the next resync of an
/// object at `phase` of `interval`: the first instant at that phase of the
/// wall clock's intervals that is at least half an interval away. In steady
/// state an object is looked at once per interval, always at the same phase;
/// after a change (or its creation) the next look comes 0.5 to 1.5 intervals
/// later. Objects created or changed together, even all in one second, so
/// resync spread over a whole interval, as their phases are.
fn next_resync(now: Duration, interval: Duration, phase: f64) -> Duration {
    let interval = interval.as_secs_f64().max(0.001);
    let now = now.as_secs_f64();
    let offset = phase.clamp(0.0, 1.0) * interval;
    // The first instant at `offset` in an interval at or after now + interval/2.
    let earliest = now + interval / 2.0;
    let mut at = (earliest / interval).floor() * interval + offset;
    if at < earliest {
        at += interval;
    }
    Duration::from_secs_f64(at - now)
}

/// Writes `status` with server-side apply on the status subresource.
async fn patch_status<K, S>(api: &Api<K>, name: &str, status: &S) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    patch_status_at(api, name, status, None).await
}

/// [`patch_status`] on the copy of the object at `resource_version`: the
/// API server answers 409 if the object changed since.
async fn patch_status_at<K, S>(
    api: &Api<K>,
    name: &str,
    status: &S,
    resource_version: Option<&str>,
) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize,
{
    let mut patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(rv) = resource_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
    }
    api.patch_status(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&patch))
        .await
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
    mut config: Config,
    metrics: Metrics,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send + 'static,
) {
    let shutdown = shutdown.shared();
    // `--namespace a,a` names one scope, not two controllers on the same objects.
    config.namespaces.sort();
    config.namespaces.dedup();
    let scopes: Vec<Option<String>> = if config.namespaces.is_empty() {
        vec![None]
    } else {
        config.namespaces.iter().cloned().map(Some).collect()
    };
    let (readers, writers): (Vec<_>, Vec<_>) = scopes.iter().map(|_| reflector::store()).unzip();
    let indexes: Vec<UserIndex> = scopes.iter().map(|_| UserIndex::default()).collect();
    let (homeserver_readers, homeserver_writers): (Vec<_>, Vec<_>) = scopes.iter().map(|_| reflector::store()).unzip();
    let (secret_readers, secret_writers): (Vec<_>, Vec<_>) = scopes.iter().map(|_| reflector::store()).unzip();
    let watched = scopes
        .iter()
        .zip(&readers)
        .zip(homeserver_readers.iter().zip(&secret_readers))
        .map(|((namespace, users), (homeservers, secrets))| WatchedScope {
            namespace: namespace.clone(),
            users: users.clone(),
            homeservers: homeservers.clone(),
            secrets: secrets.clone(),
        })
        .collect();
    let ctx = Arc::new(
        Context::with_scopes(client.clone(), config.clone(), readers.clone(), metrics)
            .with_watches(watched)
            .with_user_indexes(indexes.clone()),
    );
    // A MatrixUser's rivals may live in another scope: each scope's
    // controller also takes the rivals the others find for it.
    let (senders, receivers): (Vec<_>, Vec<_>) = scopes.iter().map(|_| tokio::sync::mpsc::unbounded_channel()).unzip();
    let caches: Vec<UserCache> = readers
        .iter()
        .zip(&indexes)
        .map(|(store, index)| UserCache {
            store: store.clone(),
            index: index.clone(),
        })
        .collect();
    let all_scopes = Arc::new(caches.into_iter().zip(senders).collect::<Vec<_>>());
    let controllers: Vec<_> = scopes
        .iter()
        .zip(writers)
        .zip(homeserver_writers.into_iter().zip(secret_writers))
        .zip(receivers)
        .enumerate()
        .map(|(index, (((scope, writer), caches), rivals))| {
            let scope = Scope {
                namespace: scope.as_deref(),
                index,
                all: all_scopes.clone(),
                rivals,
            };
            controllers_for(&client, &ctx, scope, writer, caches, shutdown.clone())
        })
        .collect();
    let readiness = async move {
        for store in readers {
            if store.wait_until_ready().await.is_err() {
                return;
            }
        }
        info!("caches synced");
        ready();
    };
    // What is kept per object goes with the object.
    let sweeping = {
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        async move {
            let mut every = tokio::time::interval(SWEEP_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let sweep = async {
                loop {
                    every.tick().await;
                    ctx.sweep();
                }
            };
            tokio::select! {
                _ = sweep => {}
                _ = shutdown => {}
            }
        }
    };
    futures::join!(futures::future::join_all(controllers), readiness, sweeping);
    info!("controllers stopped");
}

/// How often what is kept of objects that are gone is dropped.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Where MatrixUsers to reconcile are sent, per scope.
type RivalSender = tokio::sync::mpsc::UnboundedSender<ObjectRef<MatrixUser>>;

/// One watched namespace (`None`: all) among the others.
struct Scope<'a> {
    namespace: Option<&'a str>,
    index: usize,
    /// Every scope's cache and the channel its controller listens on.
    all: Arc<Vec<(UserCache, RivalSender)>>,
    /// What the other scopes find for this one.
    rivals: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<MatrixUser>>,
}

/// The caches the MatrixUser controller's trigger watches of one scope fill
/// for [`Context`]: Homeservers, and Secrets by metadata.
type ScopeCaches = (
    reflector::store::Writer<Homeserver>,
    reflector::store::Writer<PartialObjectMeta<Secret>>,
);

/// The MatrixUser and Homeserver controllers of one scope, filling `users`
/// with the scope's MatrixUsers and `caches` with its Homeservers and
/// Secrets' metadata.
fn controllers_for<S>(
    client: &Client,
    ctx: &Arc<Context>,
    scope: Scope<'_>,
    users: reflector::store::Writer<MatrixUser>,
    (homeserver_cache, secret_cache): ScopeCaches,
    shutdown: S,
) -> futures::future::BoxFuture<'static, ()>
where
    S: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let namespace = scope.namespace;
    let users_api: Api<MatrixUser> = api_for(client, namespace);
    let homeservers_api: Api<Homeserver> = api_for(client, namespace);
    // Secrets are watched by metadata only: their values never reach the
    // operator except the few it reads by name.
    let secrets_api: Api<PartialObjectMeta<Secret>> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let controller_config = kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency);

    let store = users.as_reader();
    let cache = scope.all[scope.index].0.clone();
    let index = cache.index.clone();
    let (hs_store, hs_writer) = reflector::store();
    let homeservers_for_secrets = hs_store.clone();
    let (homeserver_triggers, triggered_homeservers) = tokio::sync::mpsc::unbounded_channel();
    let (token_triggers, triggered_tokens) = tokio::sync::mpsc::unbounded_channel();
    let (token_store, token_writer) = reflector::store();
    // One watch of the scope's MatrixUsers serves every trigger that reads
    // them (a second and third watch cost the API server a fan-out each and
    // the operator a decoding of each object each): a MatrixUser that
    // changed or went sets off the others naming its Matrix ID, held off
    // with a Conflict, in every scope; and its Homeserver, if that is being
    // deleted and waits for its MatrixUsers to go.
    let fan_out = {
        let (all_scopes, homeservers) = (scope.all.clone(), hs_store.clone());
        let (homeserver_triggers, token_triggers) = (homeserver_triggers.clone(), token_triggers.clone());
        let tokens = token_store.clone();
        move |event: &Result<watcher::Event<MatrixUser>, watcher::Error>| {
            let user = match event {
                Ok(watcher::Event::Apply(u) | watcher::Event::InitApply(u) | watcher::Event::Delete(u)) => u,
                _ => return,
            };
            for (cache, rivals) in all_scopes.iter() {
                for rival in rivals_of(cache, user) {
                    // A closed channel: that scope's controller stopped.
                    let _ = rivals.send(rival);
                }
            }
            if let Some(hs) = deleting_homeserver_of(&homeservers, user) {
                let _ = homeserver_triggers.send(hs);
            }
            // And the MatrixAccessTokens of the MatrixUser.
            for token in accesstoken::tokens_of_user(&tokens, user) {
                let _ = token_triggers.send(token);
            }
        }
    };
    // Likewise one watch of the scope's Secrets (metadata) serves the
    // Homeservers that read one and the MatrixAccessTokens that own one.
    let fan_out_secret = {
        let homeservers = hs_store.clone();
        let (homeserver_triggers, token_triggers) = (homeserver_triggers, token_triggers);
        move |event: &Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>| {
            let secret = match event {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s)) => s,
                _ => return,
            };
            for hs in homeservers_of_secret(&homeservers, secret) {
                let _ = homeserver_triggers.send(hs);
            }
            for token in accesstoken::token_of_secret(secret) {
                let _ = token_triggers.send(token);
            }
        }
    };
    // A consistent list (not any_semantic): after a failover the new
    // leader must not start from an older copy than its predecessor wrote.
    let users_stream = watch::objects_only(
        watch::events(users_api.clone(), watcher::Config::default())
            // The index follows the cache in the same step: what a
            // reconcile triggered by this event looks up, both have.
            .inspect(move |event| {
                if let Ok(event) = event {
                    index.apply(event);
                }
            })
            .reflect(users)
            .inspect(fan_out)
            .applied_objects(),
        "MatrixUser",
    )
    // The operator's own writes (status, finalizer, pending-creation
    // record) change nothing it acts on: without this, every one costs
    // another reconcile and admin GET. The cache above still sees every
    // change.
    .predicate_filter(acted_on_user, kube::runtime::PredicateConfig::default());
    let by_homeserver = cache.clone();
    let by_secret = cache;
    let users = Controller::for_stream(users_stream, store)
        .with_config(controller_config.clone())
        .watches_stream(
            watch::touched_into_when(homeservers_api.clone(), homeserver_cache, "Homeserver", read_by_users),
            move |hs: Homeserver| users_of_homeserver(&by_homeserver, &hs),
        )
        // The rivals of a MatrixUser that changed or went, found in every
        // scope by the fan-out of the MatrixUser watch.
        .reconcile_on(futures::stream::unfold(scope.rivals, |mut rivals| async move {
            rivals.recv().await.map(|rival| (rival, rivals))
        }))
        .watches_stream(
            watch::objects_only(
                watch::touched_after_first_listing(
                    watch::events(secrets_api, watcher::Config::default())
                        .reflect(secret_cache)
                        .inspect(fan_out_secret),
                ),
                "Secret",
            ),
            move |secret| users_of_secret(&by_secret, &homeservers_for_secrets, &secret),
        )
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |user, ctx| contained(reconcile_user(user.clone(), ctx), "MatrixUser", user),
            matrixuser::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move { log_outcome("MatrixUser", result) });

    let homeservers_stream = watch::objects_only(
        watch::events(homeservers_api, watcher::Config::default())
            .reflect(hs_writer)
            .applied_objects(),
        "Homeserver",
    );
    // Its own status writes set off no check: the next one comes at the
    // resync, or after the backoff of an error.
    let homeservers_stream = homeservers_stream.predicate_filter(acted_on, kube::runtime::PredicateConfig::default());
    let homeservers = Controller::for_stream(homeservers_stream, hs_store)
        .with_config(controller_config)
        // Secrets it reads, and a Homeserver being deleted waits for its
        // MatrixUsers to go (see the fan-outs of the MatrixUser and Secret
        // watches).
        .reconcile_on(futures::stream::unfold(
            triggered_homeservers,
            |mut triggered| async move { triggered.recv().await.map(|hs| (hs, triggered)) },
        ))
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |hs, ctx| contained(reconcile_homeserver(hs.clone(), ctx), "Homeserver", hs),
            homeserver::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move { log_outcome("Homeserver", result) });

    // MatrixAccessTokens: a controller of their own (see accesstoken).
    let tokens = accesstoken::controller(
        client,
        ctx,
        namespace,
        (token_store, token_writer),
        triggered_tokens,
        shutdown,
    );

    async move {
        futures::join!(users, homeservers, tokens);
    }
    .boxed()
}

/// Runs one reconcile so that a panic in it fails that reconcile alone
/// (retried with backoff, like a transient error) instead of unwinding
/// through the controller: a panic there stops the process, and with it
/// every tenant's reconciles, again at each restart if the same server
/// answer caused it.
async fn contained<K: Resource<DynamicType = ()>>(
    reconcile: impl std::future::Future<Output = Result<Action, Error>>,
    kind: &'static str,
    obj: Arc<K>,
) -> Result<Action, Error> {
    match std::panic::AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result,
        Err(_) => {
            // The panic hook has printed the message and location already.
            tracing::error!(
                kind,
                namespace = obj.meta().namespace.as_deref().unwrap_or_default(),
                name = obj.meta().name.as_deref().unwrap_or_default(),
                "the reconcile panicked; retrying with backoff"
            );
            Err(Error::Panicked)
        }
    }
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

/// A scope's cache of MatrixUsers and the index the same watch keeps of it.
#[derive(Clone)]
struct UserCache {
    store: Store<MatrixUser>,
    index: UserIndex,
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
fn refs_where<K>(store: &Store<K>, keep: impl Fn(&K) -> bool) -> Vec<ObjectRef<K>>
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
fn ns_name<K: Resource>(o: &K) -> (Option<&str>, &str) {
    (
        o.meta().namespace.as_deref(),
        o.meta().name.as_deref().unwrap_or_default(),
    )
}

/// The other MatrixUsers of the cache with `user`'s localpart, in any
/// namespace: one of them may be held off with a Conflict by `user`.
fn rivals_of(cache: &UserCache, user: &MatrixUser) -> Vec<ObjectRef<MatrixUser>> {
    let localpart = user.effective_localpart();
    cache.refs_among(cache.index.by_localpart(localpart), |u| {
        ns_name(u) != ns_name(user) && u.effective_localpart() == localpart
    })
}

fn users_of_homeserver(cache: &UserCache, hs: &Homeserver) -> Vec<ObjectRef<MatrixUser>> {
    let (ns, name) = ns_name(hs);
    let candidates = cache.index.by_homeserver(ns.unwrap_or_default(), name);
    cache.refs_among(candidates, |u| ns_name(u).0 == ns && u.spec.homeserver_ref.name == name)
}

/// MatrixUsers that read a Secret: their password Secret, the Secret they
/// own (generated credentials), or their Homeserver's admin token (a new
/// token resumes the MatrixUsers an old one left Unauthorized).
fn users_of_secret(
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
fn deleting_homeserver_of(store: &Store<Homeserver>, user: &MatrixUser) -> Option<ObjectRef<Homeserver>> {
    let key = ObjectRef::new(&user.spec.homeserver_ref.name).within(&user.namespace().unwrap_or_default());
    store
        .get(&key)
        .filter(|hs| hs.meta().deletion_timestamp.is_some())
        .map(|_| key)
}

fn homeservers_of_secret(store: &Store<Homeserver>, secret: &PartialObjectMeta<Secret>) -> Vec<ObjectRef<Homeserver>> {
    let (ns, name) = ns_name(secret);
    refs_where(store, |h| ns_name(h).0 == ns && h.spec.uses_secret(name))
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

    #[tokio::test]
    async fn a_panicking_reconcile_fails_alone_and_is_retried() {
        let obj: Arc<MatrixUser> = Arc::new(
            serde_json::from_value(user("a", "alice", "u1", json!({"homeserverRef": {"name": "hs"}}))).unwrap(),
        );
        let overflow = |secs: u64| async move {
            let _ = std::time::Instant::now() + Duration::from_secs(secs);
            Ok(Action::await_change())
        };
        let outcome = tokio::spawn(contained(overflow(u64::MAX), "MatrixUser", obj.clone())).await;
        let error = outcome.expect("the panic stays inside the reconcile").unwrap_err();
        assert!(matches!(error, Error::Panicked), "{error}");
        assert!(error.is_transient());
        assert_eq!(error.reason(), "InternalError");
        let fine = contained(overflow(1), "MatrixUser", obj).await;
        assert!(fine.is_ok());
    }

    #[test]
    fn resyncs_keep_each_object_at_its_phase_and_spread_objects_made_together() {
        let interval = Duration::from_secs(600);
        let now = Duration::from_secs(1_800_000_123);
        for phase in [0.0, 0.1, 0.5, 0.77, 0.999] {
            let wait = next_resync(now, interval, phase);
            assert!(wait >= interval / 2 && wait < interval * 3 / 2, "{phase}: {wait:?}");
            // Once at its phase, an object is looked at once per interval.
            let again = next_resync(now + wait, interval, phase);
            assert!((again.as_secs_f64() - 600.0).abs() < 1e-3, "{phase}: {again:?}");
        }
        // 10,000 objects made in one second resync over the whole interval,
        // none of its seconds holding more than a few times the mean.
        let mut per_second = vec![0u32; 1200];
        for i in 0..10_000 {
            let key = ("MatrixUser".to_string(), "chat".to_string(), format!("u{i}"));
            let wait = next_resync(now, interval, phase_of(None, &key));
            per_second[wait.as_secs() as usize] += 1;
        }
        let busy: Vec<usize> = (0..per_second.len()).filter(|s| per_second[*s] > 0).collect();
        assert!(busy.len() > 550, "{} busy seconds", busy.len());
        assert!(*per_second.iter().max().unwrap() < 60);
        assert_eq!(
            phase_of(Some("a-uid"), &Default::default()),
            phase_of(Some("a-uid"), &Default::default())
        );
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
