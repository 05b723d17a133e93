//! Leader election: a standby does nothing until the leader is gone, then
//! takes over. Run against the fake API server (Leases) and a real Synapse
//! (the work a leader does).

use matrix_user_operator_testkit as common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::fake_kube::FakeApiServer;
use common::synapse;
use matrix_user_operator::leader::{LeaderElector, LeaseConfig};
use serde_json::json;

/// Expiry comes quickly with this lease duration...
const SHORT: Duration = Duration::from_secs(2);
/// ...and not within the test with this one.
const LONG: Duration = Duration::from_secs(60);

fn lease(identity: &str, lease_duration: Duration) -> LeaseConfig {
    LeaseConfig {
        namespace: "ops".into(),
        name: "matrix-user-operator".into(),
        identity: identity.into(),
        lease_duration,
        renew_every: Duration::from_millis(300),
    }
}

/// Work a leader does: write an account to Synapse, then run until told to stop.
fn write_then_wait(
    localpart: String,
    stop: Arc<tokio::sync::Notify>,
) -> impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    move || {
        Box::pin(async move {
            let s = synapse();
            let (code, _) = s
                .admin_put(
                    &format!("/_synapse/admin/v2/users/{}", s.user_id(&localpart)),
                    json!({}),
                )
                .await;
            assert_eq!(code, 201);
            stop.notified().await;
        })
    }
}

async fn exists(localpart: &str) -> bool {
    let s = synapse();
    s.admin_get(&format!("/_synapse/admin/v2/users/{}", s.user_id(localpart)))
        .await
        .0
        == 200
}

async fn wait_until(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn holder(fake: &FakeApiServer) -> String {
    let lease = fake
        .get("/apis/coordination.k8s.io/v1/namespaces/ops/leases/matrix-user-operator")
        .expect("lease");
    lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string()
}

/// Starts a replica: returns whether it leads, and the handle of its task.
fn replica(
    client: kube::Client,
    identity: &str,
    localpart: String,
    stop: Arc<tokio::sync::Notify>,
    lease_duration: Duration,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<()>) {
    let leading = Arc::new(AtomicBool::new(false));
    let flag = leading.clone();
    let elector = LeaderElector::new(client, lease(identity, lease_duration));
    let task = tokio::spawn(async move {
        let _ = elector
            .run(
                write_then_wait(localpart, stop),
                move || flag.store(true, Ordering::SeqCst),
                std::future::pending(),
            )
            .await;
    });
    (leading, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_writes_nothing_and_takes_over_when_the_leader_dies() {
    let s = synapse();
    let (client, fake) = FakeApiServer::start();
    let (lp_a, lp_b) = (s.unique_localpart("leader-a"), s.unique_localpart("leader-b"));

    let (a_leads, a_task) = replica(client.clone(), "a", lp_a.clone(), Arc::default(), SHORT);
    wait_until("a leads", Duration::from_secs(10), async || {
        a_leads.load(Ordering::SeqCst)
    })
    .await;
    wait_until("a wrote", Duration::from_secs(10), async || exists(&lp_a).await).await;

    let (b_leads, b_task) = replica(client.clone(), "b", lp_b.clone(), Arc::default(), SHORT);
    // Three lease durations: b would have taken over had a not renewed.
    tokio::time::sleep(SHORT * 3).await;
    assert!(!b_leads.load(Ordering::SeqCst), "b must stand by while a renews");
    assert!(!exists(&lp_b).await, "a standby makes no admin writes");
    assert_eq!(holder(&fake), "a");

    // The leader dies without releasing the lease: b takes over once it expires.
    a_task.abort();
    wait_until("b leads", Duration::from_secs(15), async || {
        b_leads.load(Ordering::SeqCst)
    })
    .await;
    wait_until("b wrote", Duration::from_secs(10), async || exists(&lp_b).await).await;
    assert_eq!(holder(&fake), "b");
    b_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_releases_the_lease_to_the_standby() {
    let s = synapse();
    let (client, fake) = FakeApiServer::start();
    let (lp_a, lp_b) = (s.unique_localpart("release-a"), s.unique_localpart("release-b"));
    let stop_a = Arc::new(tokio::sync::Notify::new());

    let (a_leads, a_task) = replica(client.clone(), "a", lp_a.clone(), stop_a.clone(), LONG);
    wait_until("a leads", Duration::from_secs(10), async || {
        a_leads.load(Ordering::SeqCst)
    })
    .await;
    let (b_leads, b_task) = replica(client.clone(), "b", lp_b.clone(), Arc::default(), LONG);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!b_leads.load(Ordering::SeqCst));

    // a's work ends (a graceful shutdown): it releases the lease, and b
    // takes it at its next try instead of waiting for expiry.
    let released_at = Instant::now();
    stop_a.notify_one();
    a_task.await.unwrap();
    assert_ne!(holder(&fake), "a", "released (and maybe taken by b already)");
    wait_until("b leads", Duration::from_secs(10), async || {
        b_leads.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        released_at.elapsed() < LONG / 2,
        "b took a released lease without waiting for it to expire"
    );
    wait_until("b wrote", Duration::from_secs(10), async || exists(&lp_b).await).await;
    b_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_renew_stops_its_work() {
    let (client, fake) = FakeApiServer::start();
    let elector = LeaderElector::new(client, lease("a", SHORT));
    let working = Arc::new(AtomicBool::new(false));
    let flag = working.clone();
    let run = tokio::spawn(async move {
        elector
            .run(
                move || {
                    Box::pin(async move {
                        // Marks itself working until it is dropped.
                        struct Working(Arc<AtomicBool>);
                        impl Drop for Working {
                            fn drop(&mut self) {
                                self.0.store(false, Ordering::SeqCst);
                            }
                        }
                        flag.store(true, Ordering::SeqCst);
                        let _guard = Working(flag);
                        std::future::pending::<()>().await
                    })
                },
                || {},
                std::future::pending(),
            )
            .await
    });
    wait_until("a works", Duration::from_secs(10), async || {
        working.load(Ordering::SeqCst)
    })
    .await;
    // Another replica takes the lease from under it (as after a partition).
    let path = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/matrix-user-operator";
    let mut taken = fake.get(path).expect("lease");
    taken["spec"]["holderIdentity"] = json!("intruder");
    taken["metadata"]["resourceVersion"] = json!("999");
    fake.put(taken);
    let result = tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("run returns")
        .unwrap();
    assert!(
        matches!(result, Err(matrix_user_operator::leader::LeaderError::Lost(_))),
        "{result:?}"
    );
    assert!(!working.load(Ordering::SeqCst), "the work was dropped");
    assert_eq!(holder(&fake), "intruder", "the lease is not taken back");
}
