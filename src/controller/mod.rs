//! The kube-runtime wiring: one controller for Homeservers, one for
//! MatrixUsers, Secrets watched by metadata only.

mod accesstoken;
mod accounts;
mod cache;
mod clients;
mod context;
pub mod digest_key;
mod digests;
mod error;
mod events;
mod fairness;
mod homeserver;
mod index;
mod matrixuser;
mod ownership;
pub mod plan_cmd;
mod requeue;
mod resync;
mod secret_cache;
mod secrets;
mod transport;
mod triggers;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::Serialize;
use tracing::{debug, info, warn};

pub use accesstoken::{
    DEFAULT_GRACE_PERIOD, ROTATE_ANNOTATION, TOKEN_FINALIZER, TOKEN_SECRET_FINALIZER, reconcile_token,
};
pub use cache::{CacheSizes, WatchedScope};
pub use context::Context;
pub use error::Error;
pub use homeserver::{HOMESERVER_FINALIZER, reconcile_homeserver};
pub use index::UserIndex;
pub use matrixuser::{FINALIZER, SKIP_CLEANUP, reconcile_user};
pub use secret_cache::SecretCache;
pub use secrets::ADMIN_TOKEN_FINALIZER;

use context::Need;
use triggers::{
    UserCache, acted_on, acted_on_user, deleting_homeserver_of, homeservers_of_secret, read_by_users, rivals_of,
    users_of_homeserver, users_of_secret,
};

use crate::api::{Homeserver, MatrixAccessToken, MatrixUser};
use crate::metrics::Metrics;
use crate::secret::DigestKey;

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
    // Each scope's watches fill its caches: the readers go to the Context
    // and to the other scopes, the writers to the scope's own controllers.
    let mut watched = Vec::new();
    let mut all_scopes = Vec::new();
    let mut own = Vec::new();
    for namespace in &scopes {
        let (users, users_writer) = reflector::store();
        let (homeservers, homeservers_writer) = reflector::store();
        let secrets = SecretCache::default();
        let index = UserIndex::default();
        // A MatrixUser's rivals may live in another scope: each scope's
        // controller also takes the rivals the others find for it.
        let (rival_sender, rivals) = tokio::sync::mpsc::unbounded_channel();
        all_scopes.push((
            UserCache {
                store: users.clone(),
                index,
            },
            rival_sender,
        ));
        watched.push(WatchedScope {
            namespace: namespace.clone(),
            users,
            homeservers,
            secrets: secrets.clone(),
        });
        own.push((users_writer, (homeservers_writer, secrets), rivals));
    }
    let readers: Vec<_> = watched.iter().map(|w| w.users.clone()).collect();
    let indexes = all_scopes.iter().map(|(cache, _)| cache.index.clone()).collect();
    let ctx = Arc::new(
        Context::with_scopes(client.clone(), config.clone(), readers.clone(), metrics)
            .with_watches(watched)
            .with_user_indexes(indexes),
    );
    let all_scopes = Arc::new(all_scopes);
    let controllers: Vec<_> = scopes
        .iter()
        .zip(own)
        .enumerate()
        .map(|(index, (namespace, (writer, caches, rivals)))| {
            let scope = Scope {
                namespace: namespace.as_deref(),
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
type ScopeCaches = (reflector::store::Writer<Homeserver>, SecretCache);

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
    let fan_out = FanOut {
        all_scopes: scope.all.clone(),
        homeservers: hs_store.clone(),
        tokens: token_store.clone(),
        homeserver_triggers,
        token_triggers,
    };
    let users_stream = users_stream(users_api, users, index, fan_out.clone());
    let by_homeserver = cache.clone();
    let by_secret = cache;
    let looks = resync::LastLooks::default();
    let resyncs = resync::due_in(store.clone(), ctx.config.resync_interval, looks.clone());
    let users = Controller::for_stream(users_stream, store)
        .with_config(controller_config.clone())
        // Each MatrixUser once per resync interval, at its own phase.
        .reconcile_on(resyncs)
        .watches_stream(
            watch::touched_into_when(homeservers_api.clone(), homeserver_cache, "Homeserver", read_by_users),
            move |hs: Homeserver| users_of_homeserver(&by_homeserver, &hs),
        )
        // The rivals of a MatrixUser that changed or went, found in every
        // scope by the fan-out of the MatrixUser watch.
        .reconcile_on(futures::stream::unfold(scope.rivals, |mut rivals| async move {
            rivals.recv().await.map(|rival| (rival, rivals))
        }))
        .watches_stream(secrets_stream(secrets_api, secret_cache, fan_out), move |secret| {
            users_of_secret(&by_secret, &homeservers_for_secrets, &secret)
        })
        .graceful_shutdown_on(shutdown.clone())
        .run(
            move |user, ctx| {
                let looks = looks.clone();
                async move {
                    let outcome = contained(reconcile_user(user.clone(), ctx), "MatrixUser", user.clone()).await;
                    // Looked at and settled: the resync clock skips it for
                    // half an interval.
                    if matches!(&outcome, Ok(action) if *action == Action::await_change()) {
                        looks.looked_at(user.as_ref());
                    }
                    outcome
                }
            },
            matrixuser::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move { log_outcome("MatrixUser", result) });

    let homeservers = homeservers_controller(
        homeservers_api,
        (hs_store, hs_writer),
        triggered_homeservers,
        controller_config,
        ctx,
        shutdown.clone(),
    );
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

/// The scope's MatrixUsers as the controller takes them: each event fills
/// `cache` and `index` and goes through `fan_out`; the operator's own
/// writes (status, finalizer, pending-creation record) change nothing it
/// acts on and set off nothing (without that, every one would cost another
/// reconcile and admin GET).
fn users_stream(
    api: Api<MatrixUser>,
    cache: reflector::store::Writer<MatrixUser>,
    index: UserIndex,
    fan_out: FanOut,
) -> impl futures::Stream<Item = Result<MatrixUser, watcher::Error>> + Send + 'static {
    // A consistent list (not any_semantic): after a failover the new
    // leader must not start from an older copy than its predecessor wrote.
    let events = watch::events(api, watcher::Config::default())
        // The index follows the cache in the same step: what a reconcile
        // triggered by this event looks up, both have.
        .inspect(move |event| {
            if let Ok(event) = event {
                index.apply(event);
            }
        })
        .reflect(cache)
        .inspect(move |event| fan_out.user_event(event));
    watch::objects_only(watch::changed_by(events, acted_on_user).applied_objects(), "MatrixUser")
}

/// The scope's Secrets (metadata) that changed after the first listing,
/// for the MatrixUsers that read them; each event fills `cache` and goes
/// through `fan_out`.
fn secrets_stream(
    api: Api<PartialObjectMeta<Secret>>,
    cache: SecretCache,
    fan_out: FanOut,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<Secret>, watcher::Error>> + Send + 'static {
    watch::objects_only(
        watch::touched_after_first_listing(
            watch::events(api, watcher::Config::default())
                .inspect(move |event| {
                    if let Ok(event) = event {
                        cache.apply_watcher_event(event);
                    }
                })
                .inspect(move |event| fan_out.secret_event(event)),
        ),
        "Secret",
    )
}

/// The Homeserver controller of one scope: its watch fills `store`.
fn homeservers_controller<S>(
    api: Api<Homeserver>,
    (store, writer): (reflector::Store<Homeserver>, reflector::store::Writer<Homeserver>),
    triggered: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<Homeserver>>,
    config: kube::runtime::controller::Config,
    ctx: &Arc<Context>,
    shutdown: S,
) -> impl std::future::Future<Output = ()> + Send + 'static
where
    S: std::future::Future<Output = ()> + Clone + Send + Sync + 'static,
{
    let homeservers_stream = watch::objects_only(
        watch::events(api, watcher::Config::default())
            .reflect(writer)
            .applied_objects(),
        "Homeserver",
    );
    // Its own status writes set off no check: the next one comes at the
    // resync, or after the backoff of an error.
    let homeservers_stream = homeservers_stream.predicate_filter(acted_on, kube::runtime::PredicateConfig::default());
    Controller::for_stream(homeservers_stream, store)
        .with_config(config)
        // Secrets it reads, and a Homeserver being deleted waits for its
        // MatrixUsers to go (see the fan-outs of the MatrixUser and Secret
        // watches).
        .reconcile_on(futures::stream::unfold(triggered, |mut triggered| async move {
            triggered.recv().await.map(|hs| (hs, triggered))
        }))
        .graceful_shutdown_on(shutdown)
        .run(
            |hs, ctx| contained(reconcile_homeserver(hs.clone(), ctx), "Homeserver", hs),
            homeserver::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move { log_outcome("Homeserver", result) })
}

/// What a change of a watched MatrixUser or Secret sets off beyond the
/// controller of its own kind. One watch of the scope's MatrixUsers serves
/// every trigger that reads them (a second and third watch cost the API
/// server a fan-out each and the operator a decoding of each object each);
/// likewise one watch of the scope's Secrets (metadata).
#[derive(Clone)]
struct FanOut {
    /// Every scope's cache and the channel its controller listens on.
    all_scopes: Arc<Vec<(UserCache, RivalSender)>>,
    /// The MatrixAccessTokens of this scope.
    tokens: reflector::Store<MatrixAccessToken>,
    homeservers: reflector::Store<Homeserver>,
    homeserver_triggers: tokio::sync::mpsc::UnboundedSender<ObjectRef<Homeserver>>,
    token_triggers: tokio::sync::mpsc::UnboundedSender<ObjectRef<MatrixAccessToken>>,
}

impl FanOut {
    /// A MatrixUser that changed or went sets off the others naming its
    /// Matrix ID, held off with a Conflict, in every scope; its
    /// Homeserver, if that is being deleted and waits for its MatrixUsers
    /// to go; and its MatrixAccessTokens.
    fn user_event(&self, event: &Result<watcher::Event<MatrixUser>, watcher::Error>) {
        let user = match event {
            Ok(watcher::Event::Apply(u) | watcher::Event::InitApply(u) | watcher::Event::Delete(u)) => u,
            _ => return,
        };
        for (cache, rivals) in self.all_scopes.iter() {
            for rival in rivals_of(cache, user) {
                // A closed channel: that scope's controller stopped.
                let _ = rivals.send(rival);
            }
        }
        if let Some(hs) = deleting_homeserver_of(&self.homeservers, user) {
            let _ = self.homeserver_triggers.send(hs);
        }
        for token in accesstoken::tokens_of_user(&self.tokens, user) {
            let _ = self.token_triggers.send(token);
        }
    }

    /// A Secret sets off the Homeservers that read one and the
    /// MatrixAccessTokens that own one.
    fn secret_event(&self, event: &Result<watcher::Event<PartialObjectMeta<Secret>>, watcher::Error>) {
        let secret = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s)) => s,
            _ => return,
        };
        for hs in homeservers_of_secret(&self.homeservers, secret) {
            let _ = self.homeserver_triggers.send(hs);
        }
        for token in accesstoken::token_of_secret(secret) {
            let _ = self.token_triggers.send(token);
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_reconcile_fails_alone_and_is_retried() {
        let obj: Arc<MatrixUser> = Arc::new(
            serde_json::from_value(serde_json::json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": "alice", "namespace": "a", "uid": "u1"}, "spec": {"homeserverRef": {"name": "hs"}}}))
            .unwrap(),
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
}
