//! Objects the controller tests seed the fake API server with, and ways to
//! read back what the operator made of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use matrix_user_operator::api::MatrixUser;
use matrix_user_operator::controller::{self, Config, Context, FINALIZER, HOMESERVER_FINALIZER};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};

use super::fake_kube::{FakeApiServer, path_of};
use super::synapse;

/// A Homeserver `name` in `ns` for the test Synapse, its finalizer on and
/// its status as the Homeserver controller writes it once connected.
pub fn homeserver_in(ns: &str, name: &str, policy: Value) -> Value {
    let s = synapse();
    json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": name, "namespace": ns, "generation": 1, "finalizers": [HOMESERVER_FINALIZER]},
        "spec": {"url": s.base_url, "adminTokenSecretRef": {"name": "admin", "key": "token"}, "policy": policy},
        "status": {
            "serverName": s.server_name, "serverVersion": super::SYNAPSE_VERSION, "observedGeneration": 1,
            "adminUserId": s.admin_user_id,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Connected", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}]
        }
    })
}

/// A Secret with one key.
pub fn secret_in(ns: &str, name: &str, key: &str, value: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "stringData": {key: value}
    })
}

/// A MatrixUser with its finalizer on.
pub fn matrix_user_in(ns: &str, name: &str, spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
        "metadata": {"name": name, "namespace": ns, "generation": 1, "finalizers": [FINALIZER]},
        "spec": spec,
        "status": status,
    })
}

/// The fake server, with a ready Homeserver `hs` and its admin token in
/// each of `namespaces`.
pub fn cluster_in(namespaces: &[&str], policy: Value) -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    for ns in namespaces {
        fake.put(homeserver_in(ns, "hs", policy.clone()));
        fake.put(secret_in(ns, "admin", "token", &synapse().admin_token));
    }
    (client, fake)
}

/// A context whose cache holds `users`.
pub fn context_with(client: kube::Client, config: Config, users: &[&MatrixUser]) -> Arc<Context> {
    let mut writer = Writer::<MatrixUser>::default();
    for u in users {
        writer.apply_watcher_event(&watcher::Event::Apply((*u).clone()));
    }
    Arc::new(Context::new(client, config, writer.as_reader(), Metrics::new()))
}

/// The MatrixUser `obj` names, as the fake server now holds it.
pub fn stored_user(fake: &FakeApiServer, obj: &Value) -> MatrixUser {
    serde_json::from_value(fake.get(&path_of(obj)).expect("object stored")).unwrap()
}

/// The `(status, reason, message)` of a condition.
pub fn condition_of(u: &MatrixUser, type_: &str) -> Option<(String, String, String)> {
    let c = u
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The reason of the Ready condition, `""` without one.
pub fn reason_of(u: &MatrixUser) -> String {
    condition_of(u, "Ready").map(|c| c.1).unwrap_or_default()
}

/// The account as Synapse's admin API reports it: `(status, body)`.
pub async fn account(user_id: &str) -> (u16, Value) {
    synapse()
        .admin_get(&format!("/_synapse/admin/v2/users/{user_id}"))
        .await
}

/// The operator's controllers against `fake`, running until the returned
/// sender is dropped or fired.
pub fn run_operator(fake: &FakeApiServer, config: Config) -> tokio::sync::oneshot::Sender<()> {
    run_operator_with(fake, config, Metrics::new())
}

/// [`run_operator`], counting into `metrics`.
pub fn run_operator_with(fake: &FakeApiServer, config: Config, metrics: Metrics) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let client = fake.client();
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        controller::run(client, config, metrics, shutdown, || {}).await;
    });
    stop
}

/// Waits until `check` holds, polling; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
