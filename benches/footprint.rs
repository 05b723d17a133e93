//! Footprint and steady-state cost of the operator, measured against the
//! fake API server and a real Synapse:
//!   cargo bench --bench footprint            (FOOTPRINT_USERS=500 by default)
//!
//! Prints ratios against baselines measured in the same run: memory against
//! the idle process, and the time of a resync pass over in-sync users against
//! the bare minimum a drift check needs (one admin GET per user).

use matrix_user_operator_testkit as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_kube::FakeApiServer;
use common::synapse;
use futures::StreamExt;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use matrix_user_operator::api::{Homeserver, MatrixUser};
use matrix_user_operator::controller::{Config, Context, FINALIZER, reconcile_homeserver, reconcile_user};
use matrix_user_operator::metrics::Metrics;
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::synapse::{ClientConfig, SynapseClient, UserId};
use serde_json::json;

/// Resident and peak resident memory of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn pass(users: &[MatrixUser], ctx: &Arc<Context>, fake: &FakeApiServer, concurrency: usize) -> Duration {
    let started = Instant::now();
    futures::stream::iter(users.iter().map(|u| {
        let path = format!(
            "/apis/matrix-operator.io/v1alpha1/namespaces/chat/matrixusers/{}",
            u.metadata.name.as_deref().unwrap()
        );
        let current: MatrixUser = serde_json::from_value(fake.get(&path).unwrap()).unwrap();
        let ctx = ctx.clone();
        async move { reconcile_user(Arc::new(current), ctx).await.expect("reconcile") }
    }))
    .buffer_unordered(concurrency)
    .collect::<Vec<_>>()
    .await;
    started.elapsed()
}

fn main() {
    let n: usize = std::env::var("FOOTPRINT_USERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let s = synapse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, fake) = FakeApiServer::start();
        fake.put(json!({
            "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
            "metadata": {"name": "hs", "namespace": "chat", "generation": 1},
            "spec": {"url": s.base_url, "adminTokenSecretRef": {"name": "admin", "key": "token"}},
        }));
        fake.put(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin", "namespace": "chat"},
                        "stringData": {"token": s.admin_token}}),
        );
        let prefix = s.unique_localpart("fp");
        let mut writer = Writer::<MatrixUser>::default();
        let mut users = Vec::new();
        for i in 0..n {
            let obj = json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": format!("u{i}"), "namespace": "chat", "generation": 1, "finalizers": [FINALIZER]},
                "spec": {"homeserverRef": {"name": "hs"}, "localpart": format!("{prefix}-{i}"),
                         "displayName": format!("User {i}"),
                         "threepids": [{"medium": "email", "address": format!("{prefix}-{i}@example.org")}]},
            });
            fake.put(obj.clone());
            let u: MatrixUser = serde_json::from_value(obj).unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(u.clone()));
            users.push(u);
        }
        let ctx = Arc::new(Context::new(
            client,
            Config::default(),
            writer.as_reader(),
            Metrics::new(),
        ));
        let hs: Homeserver = serde_json::from_value(
            fake.get("/apis/matrix-operator.io/v1alpha1/namespaces/chat/homeservers/hs")
                .unwrap(),
        )
        .unwrap();
        reconcile_homeserver(Arc::new(hs), ctx.clone()).await.unwrap();
        let (idle_rss, _) = memory_kib();

        let create = pass(&users, &ctx, &fake, 4).await;
        let resync = pass(&users, &ctx, &fake, 4).await;
        let (_, peak) = memory_kib();

        // Baseline: the least a drift check can do, one admin GET per user.
        let bare = SynapseClient::new(ClientConfig::new(&s.base_url, SecretString::new(&s.admin_token))).unwrap();
        let started = Instant::now();
        futures::stream::iter((0..n).map(|i| {
            let bare = bare.clone();
            let id = UserId::new(&format!("{prefix}-{i}"), &s.server_name).unwrap();
            async move { bare.get_user(&id).await.unwrap().expect("created") }
        }))
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
        let gets = started.elapsed();

        println!(
            "footprint: {n} MatrixUsers, Synapse {}, 2 workers, concurrency 4",
            common::SYNAPSE_VERSION
        );
        println!(
            "create pass:  {:>8.1} ms ({:.2} ms/user)",
            create.as_secs_f64() * 1e3,
            create.as_secs_f64() * 1e3 / n as f64
        );
        println!(
            "resync pass:  {:>8.1} ms ({:.2} ms/user)",
            resync.as_secs_f64() * 1e3,
            resync.as_secs_f64() * 1e3 / n as f64
        );
        println!("bare GETs:    {:>8.1} ms (baseline)", gets.as_secs_f64() * 1e3);
        println!("resync / bare GETs: {:.2}x", resync.as_secs_f64() / gets.as_secs_f64());
        println!(
            "memory: idle {} KiB, peak {} KiB, peak / idle {:.2}x, {:.1} KiB per user",
            idle_rss,
            peak,
            peak as f64 / idle_rss.max(1) as f64,
            (peak.saturating_sub(idle_rss)) as f64 / n as f64
        );
    });
}
