//! The fault suite: what the operator does when things go wrong — stale
//! caches, a crash between create and record, namespace deletion, rivals
//! across namespaces, outages — against the fake API server and a real
//! Synapse. Each test reproduces a defect the operator once had.
//!
//! The tests share one Synapse and some of them disturb the world (a
//! stopped process, an API server going down), so they run one at a time.

use matrix_user_operator_testkit as common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{
    account, cluster_in, condition_of, context_with, homeserver_in, matrix_user_in, reason_of, run_operator,
    run_operator_with, secret_in, stored_user, wait_until,
};
use common::synapse;
use kube::ResourceExt;
use matrix_user_operator::api::MatrixUser;
use matrix_user_operator::controller::{self, Config, reconcile_user};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};
use tokio::sync::{Mutex, MutexGuard};

const NS: &str = "chat";

/// One fault test at a time; the operator's logs go to the test's output
/// (shown for a failing test), at `RUST_LOG`'s level or `info`.
async fn serial() -> MutexGuard<'static, ()> {
    // tokio's Mutex: each test has a runtime of its own, and the guard is
    // held across awaits.
    static LOCK: Mutex<()> = Mutex::const_new(());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
    LOCK.lock().await
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Stores `obj` with `status` written as the operator writes it (its field
/// manager, server-side apply), so that the operator may later drop fields
/// of it as it would drop its own.
async fn put_with_status(fake: &FakeApiServer, obj: &Value, status: Value) {
    fake.put(obj.clone());
    let api: kube::Api<MatrixUser> =
        kube::Api::namespaced(fake.client(), obj["metadata"]["namespace"].as_str().unwrap());
    let patch = json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser", "status": status});
    api.patch_status(
        obj["metadata"]["name"].as_str().unwrap(),
        &kube::api::PatchParams::apply(controller::MANAGER).force(),
        &kube::api::Patch::Apply(&patch),
    )
    .await
    .expect("seed the status");
}

/// Reconciles the stored copy of `obj` once, with the given cache.
async fn reconcile(fake: &FakeApiServer, client: &kube::Client, obj: &Value, cache: &[&MatrixUser]) {
    let user = stored_user(fake, obj);
    reconcile_user(Arc::new(user), context_with(client.clone(), Config::default(), cache))
        .await
        .expect("reconcile");
}

/// Every Ready reason the object's status ever showed.
fn reasons_ever(fake: &FakeApiServer, obj: &Value) -> Vec<String> {
    fake.status_history(&path_of(obj))
        .iter()
        .filter_map(|s| {
            s["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")
                .map(|c| c["reason"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

/// Defect 1: a reconcile that runs on a cache entry older than the last
/// status write (a trigger from another watch) once reported
/// AdoptionRefused on the resource's own account and erased its ownership.
#[tokio::test]
async fn a_stale_copy_never_erases_ownership() {
    let _serial = serial().await;
    let s = synapse();
    let lp = s.unique_localpart("stale");
    let (client, fake) = cluster_in(&[NS], json!({}));
    fake.put(secret_in(NS, "pw", "password", "stale-password"));
    let obj = matrix_user_in(
        NS,
        "stale",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp,
               "password": {"secretRef": {"name": "pw", "key": "password"}}}),
        Value::Null,
    );
    fake.put(obj.clone());
    // The copy a cache holds before the first status write.
    let before = stored_user(&fake, &obj);
    reconcile(&fake, &client, &obj, &[]).await;
    let owned = stored_user(&fake, &obj).status.unwrap();
    assert!(
        owned.user_id.is_some() && owned.account_creation_ts.is_some(),
        "{owned:?}"
    );

    // A trigger that hands the controller the old copy.
    let ctx = context_with(client.clone(), Config::default(), &[&before]);
    reconcile_user(Arc::new(before), ctx).await.expect("reconcile");

    let after = stored_user(&fake, &obj);
    let status = after.status.clone().unwrap();
    assert_eq!(status.user_id, owned.user_id, "userId kept");
    assert_eq!(status.account_creation_ts, owned.account_creation_ts);
    assert_eq!(status.password_digest, owned.password_digest);
    assert_eq!(reason_of(&after), "InSync");
    let reasons = reasons_ever(&fake, &obj);
    assert!(!reasons.iter().any(|r| r == "AdoptionRefused"), "{reasons:?}");
    assert!(s.login(&lp, "stale-password").await.is_ok());
}

/// Defect 2: killed after Synapse's 201 and before status.userId was
/// written, the operator once saw an account it did not own.
#[tokio::test]
async fn an_account_created_before_a_crash_is_recognised_by_its_pending_creation() {
    let _serial = serial().await;
    let s = synapse();
    let lp = s.unique_localpart("crashed");
    let user_id = s.user_id(&lp);
    let (client, fake) = cluster_in(&[NS], json!({}));
    // What the operator left behind: the record, then the create it sent.
    let obj = matrix_user_in(
        NS,
        "crashed",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Came Back"}),
        Value::Null,
    );
    put_with_status(
        &fake,
        &obj,
        json!({"pendingCreation": {"userId": user_id, "requestedAt": now_secs()}}),
    )
    .await;
    let (code, _) = s
        .admin_put(&format!("/_synapse/admin/v2/users/{user_id}"), json!({}))
        .await;
    assert_eq!(code, 201);

    reconcile(&fake, &client, &obj, &[]).await;
    let u = stored_user(&fake, &obj);
    assert_eq!(reason_of(&u), "InSync", "{:?}", condition_of(&u, "Ready"));
    let status = u.status.unwrap();
    assert_eq!(status.user_id.as_deref(), Some(user_id.as_str()));
    assert!(status.account_creation_ts.is_some());
    assert_eq!(status.pending_creation, None, "settled");
    assert_eq!(account(&user_id).await.1["displayname"], "Came Back");
    assert!(fake.event_reasons().contains(&"Created".to_string()));
}

/// The other side of defect 2: a pending creation recognises only an
/// account created in its window, and only if no one else claims it.
#[tokio::test]
async fn a_pending_creation_does_not_take_an_account_made_at_another_time_or_claimed_by_another() {
    let _serial = serial().await;
    let s = synapse();
    let lp = s.unique_localpart("notmine");
    let user_id = s.user_id(&lp);
    s.register_user(&lp, "theirs", false).await;
    let (client, fake) = cluster_in(&[NS, "other"], json!({}));
    let spec = json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Mine Now"});
    let hour_ago = json!({"pendingCreation": {"userId": user_id, "requestedAt": now_secs() - 3600}});
    let obj = matrix_user_in(NS, "late", spec.clone(), Value::Null);
    put_with_status(&fake, &obj, hour_ago).await;
    reconcile(&fake, &client, &obj, &[]).await;
    assert_eq!(reason_of(&stored_user(&fake, &obj)), "AdoptionRefused");

    // In the window, but another MatrixUser, elsewhere, is creating it too.
    let now = json!({"pendingCreation": {"userId": user_id, "requestedAt": now_secs()}});
    let rival = matrix_user_in("other", &lp, json!({"homeserverRef": {"name": "hs"}}), Value::Null);
    put_with_status(&fake, &rival, now.clone()).await;
    let obj = matrix_user_in(NS, "racing", spec, Value::Null);
    put_with_status(&fake, &obj, now).await;
    reconcile(&fake, &client, &obj, &[]).await;
    let u = stored_user(&fake, &obj);
    assert_eq!(reason_of(&u), "Conflict", "{:?}", condition_of(&u, "Ready"));
    assert_eq!(u.status.unwrap().user_id, None);
    assert_eq!(account(&user_id).await.1["displayname"], lp.as_str(), "untouched");
}

/// Defect 5: when the later-sorting of two MatrixUsers for one Matrix ID
/// owned the account, both ended in Conflict. The owner wins.
#[tokio::test]
async fn the_owner_of_an_account_wins_a_duplicate() {
    let _serial = serial().await;
    let s = synapse();
    let lp = s.unique_localpart("dup-owner");
    let (client, fake) = cluster_in(&[NS], json!({}));
    let spec = json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Owner"});
    let mut owner = matrix_user_in(NS, "owner", spec.clone(), Value::Null);
    owner["metadata"]["creationTimestamp"] = json!("2026-02-01T00:00:00Z");
    fake.put(owner.clone());
    reconcile(&fake, &client, &owner, &[]).await;
    assert_eq!(reason_of(&stored_user(&fake, &owner)), "InSync");

    // An older resource (by creation time) names the same Matrix ID.
    let mut older = matrix_user_in(NS, "older", spec, Value::Null);
    older["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    fake.put(older.clone());
    let (owner_now, older_now) = (stored_user(&fake, &owner), stored_user(&fake, &older));
    reconcile(&fake, &client, &older, &[&owner_now, &older_now]).await;
    reconcile(&fake, &client, &owner, &[&owner_now, &older_now]).await;
    assert_eq!(reason_of(&stored_user(&fake, &older)), "Conflict");
    assert_eq!(reason_of(&stored_user(&fake, &owner)), "InSync");
}

// ---------------------------------------------------------------------------
// The operator running (its controllers in this process, or the binary as a
// process of its own) against the fake API server's watches.

/// How many MatrixUser reconciles succeeded, by the operator's metrics.
fn user_reconciles(metrics: &Metrics) -> u64 {
    let prefix = r#"matrix_user_operator_reconciliations_total{kind="MatrixUser",result="success"} "#;
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn config_for(namespaces: &[&str]) -> Config {
    Config {
        namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
        request_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// Whether every object of `objs` is InSync and records its account.
fn all_in_sync(fake: &FakeApiServer, objs: &[Value]) -> bool {
    objs.iter().all(|o| {
        fake.get(&path_of(o))
            .and_then(|v| serde_json::from_value::<MatrixUser>(v).ok())
            .is_some_and(|u| reason_of(&u) == "InSync" && u.status.as_ref().is_some_and(|s| s.user_id.is_some()))
    })
}

/// A Homeserver without status, as a user applies it: the operator checks it.
fn fresh_homeserver(ns: &str, policy: Value) -> Value {
    let mut hs = homeserver_in(ns, "hs", policy);
    hs["status"] = Value::Null;
    hs["metadata"]["finalizers"] = Value::Null;
    hs
}

/// The fake server with, in each namespace, a Homeserver as a user applies
/// it (the operator checks it) and its admin token.
fn with_homeservers(namespaces: &[(&str, Value)]) -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    for (ns, policy) in namespaces {
        fake.put(fresh_homeserver(ns, policy.clone()));
        fake.put(secret_in(ns, "admin", "token", &synapse().admin_token));
    }
    (client, fake)
}

/// A MatrixUser as a user applies it: no finalizer, no status.
fn applied_user(ns: &str, name: &str, spec: Value) -> Value {
    let mut u = matrix_user_in(ns, name, spec, Value::Null);
    u["metadata"]["finalizers"] = Value::Null;
    u
}

/// Defect 1, as measured: 60 MatrixUsers with generated passwords applied
/// at once; each one's own credentials Secret triggers it again, on a copy
/// that may predate its last status write.
#[tokio::test]
async fn sixty_generated_passwords_applied_at_once_are_all_owned() {
    let _serial = serial().await;
    let s = synapse();
    let (_, fake) = with_homeservers(&[(NS, json!({}))]);
    let stop = run_operator(&fake, config_for(&[NS]));
    let users: Vec<Value> = (0..60)
        .map(|i| {
            let lp = s.unique_localpart("gen60");
            applied_user(
                NS,
                &format!("gen-{i}"),
                json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "password": {"generate": true}}),
            )
        })
        .collect();
    for u in &users {
        fake.put(u.clone());
    }
    wait_until(Duration::from_secs(180), "60 MatrixUsers InSync", || async {
        all_in_sync(&fake, &users)
    })
    .await;
    for u in &users {
        let stored = stored_user(&fake, u);
        let status = stored.status.clone().unwrap();
        assert!(
            status.account_creation_ts.is_some(),
            "{}: {status:?}",
            stored.name_any()
        );
        let reasons = reasons_ever(&fake, u);
        assert!(
            !reasons.iter().any(|r| r == "AdoptionRefused"),
            "{}: {reasons:?}",
            stored.name_any()
        );
        let (code, _) = account(status.user_id.as_deref().unwrap()).await;
        assert_eq!(code, 200);
    }
    drop(stop);
}

/// Defect 3: deleting a namespace deleted the Homeserver and its Secret at
/// once, and the MatrixUsers let go without their deletion policy.
#[tokio::test]
async fn deleting_a_namespace_runs_every_deletion_policy() {
    let _serial = serial().await;
    let s = synapse();
    let ns = "doomed";
    let (_, fake) = with_homeservers(&[(ns, json!({}))]);
    fake.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
    fake.put(secret_in(ns, "pw", "password", "doomed-password"));
    let stop = run_operator(&fake, config_for(&[ns]));
    let mut ids = Vec::new();
    let users: Vec<Value> = (0..10)
        .map(|i| {
            let lp = s.unique_localpart("doomed");
            ids.push((s.user_id(&lp), lp.clone(), i % 4 == 0));
            let policy = if i % 4 == 0 { "Erase" } else { "Deactivate" };
            applied_user(
                ns,
                &format!("user-{i}"),
                json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": format!("Doomed {i}"),
                       "deletionPolicy": policy, "password": {"secretRef": {"name": "pw", "key": "password"}}}),
            )
        })
        .collect();
    for u in &users {
        fake.put(u.clone());
    }
    wait_until(Duration::from_secs(120), "10 MatrixUsers InSync", || async {
        all_in_sync(&fake, &users)
    })
    .await;
    assert!(s.login(&ids[1].1, "doomed-password").await.is_ok());

    fake.delete_namespace(ns);
    let namespace_path = format!("/api/v1/namespaces/{ns}");
    let gone = tokio::time::timeout(Duration::from_secs(120), async {
        while fake.get(&namespace_path).is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    if gone.is_err() {
        let left: Vec<String> = users
            .iter()
            .chain(std::iter::once(&fresh_homeserver(ns, json!({}))))
            .filter_map(|o| fake.get(&path_of(o)))
            .map(|o| format!("{} {}: {}", o["kind"], o["metadata"]["name"], o["status"]["conditions"]))
            .collect();
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> = kube::Api::namespaced(fake.client(), ns);
        let secrets: Vec<String> = secrets
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .map(|s| format!("Secret {} {:?}", s.name_any(), s.finalizers()))
                    .collect()
            })
            .unwrap_or_default();
        panic!(
            "the namespace is still there after 120 s: {}; left:\n{}\n{}",
            fake.get(&namespace_path).unwrap_or_default(),
            left.join("\n"),
            secrets.join("\n")
        );
    }
    for (user_id, lp, erase) in &ids {
        let (_, a) = account(user_id).await;
        assert_eq!(a["deactivated"], true, "{user_id}: {a}");
        assert_eq!(a["erased"], *erase, "{user_id}: {a}");
        assert_eq!(s.login(lp, "doomed-password").await, Err(403));
    }
    drop(stop);
}

/// Defect 4: with `--namespace n1,n2`, n2's MatrixUser (adopt, and an
/// adopting Homeserver) took over n1's account.
#[tokio::test]
async fn one_matrix_id_in_two_namespaces_has_one_owner() {
    let _serial = serial().await;
    let s = synapse();
    let lp = s.unique_localpart("twons");
    let user_id = s.user_id(&lp);
    let (client, fake) = with_homeservers(&[("n1", json!({})), ("n2", json!({"allowAdoption": true}))]);
    let stop = run_operator(&fake, config_for(&["n1", "n2"]));
    let first = applied_user(
        "n1",
        "first",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "First"}),
    );
    fake.put(first.clone());
    wait_until(Duration::from_secs(60), "n1's MatrixUser InSync", || async {
        all_in_sync(&fake, std::slice::from_ref(&first))
    })
    .await;

    let second = applied_user(
        "n2",
        "second",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Second", "adopt": true}),
    );
    fake.put(second.clone());
    wait_until(Duration::from_secs(60), "n2's MatrixUser refused", || async {
        fake.get(&path_of(&second))
            .and_then(|v| serde_json::from_value::<MatrixUser>(v).ok())
            .is_some_and(|u| reason_of(&u) == "Conflict")
    })
    .await;
    let refused = stored_user(&fake, &second);
    assert_eq!(condition_of(&refused, "Stalled").unwrap().0, "True");
    assert_eq!(refused.status.unwrap().user_id, None);
    assert_eq!(account(&user_id).await.1["displayname"], "First");

    // Deleting the refused one touches nothing.
    let api: kube::Api<MatrixUser> = kube::Api::namespaced(client, "n2");
    api.delete("second", &Default::default()).await.unwrap();
    wait_until(Duration::from_secs(60), "n2's MatrixUser gone", || async {
        fake.get(&path_of(&second)).is_none()
    })
    .await;
    let (_, a) = account(&user_id).await;
    assert_eq!(
        (a["deactivated"].clone(), a["displayname"].clone()),
        (json!(false), json!("First"))
    );
    assert!(all_in_sync(&fake, std::slice::from_ref(&first)));

    // Once the owner lets go of the account (Retain), the one held off in
    // the other namespace looks again at once, not at its next resync.
    fake.put(second.clone());
    wait_until(Duration::from_secs(60), "n2's MatrixUser refused again", || async {
        reason_of(&stored_user(&fake, &second)) == "Conflict"
    })
    .await;
    let owners: kube::Api<MatrixUser> = kube::Api::namespaced(fake.client(), "n1");
    owners
        .patch(
            "first",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"deletionPolicy": "Retain"}})),
        )
        .await
        .unwrap();
    owners.delete("first", &Default::default()).await.unwrap();
    wait_until(
        Duration::from_secs(30),
        "n2's MatrixUser adopts the released account",
        || async { all_in_sync(&fake, std::slice::from_ref(&second)) },
    )
    .await;
    assert_eq!(account(&user_id).await.1["displayname"], "Second");
    drop(stop);
}

/// Defect 7: after the API server was down, watches shared one backoff and
/// a change reached Synapse only minutes later.
#[tokio::test]
async fn a_change_after_an_api_server_outage_reaches_synapse_within_seconds() {
    let _serial = serial().await;
    let s = synapse();
    let lp = s.unique_localpart("outage");
    let user_id = s.user_id(&lp);
    let (client, fake) = with_homeservers(&[(NS, json!({}))]);
    let stop = run_operator(&fake, config_for(&[NS]));
    let obj = applied_user(
        NS,
        "outage",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Before"}),
    );
    fake.put(obj.clone());
    wait_until(Duration::from_secs(60), "InSync", || async {
        all_in_sync(&fake, std::slice::from_ref(&obj))
    })
    .await;

    // Down long enough for every watch to fail again and again, then back
    // as a restarted API server: old resourceVersions are gone.
    fake.set_down(true);
    tokio::time::sleep(Duration::from_secs(20)).await;
    fake.restart();
    fake.set_down(false);
    let back = Instant::now();
    let api: kube::Api<MatrixUser> = kube::Api::namespaced(client, NS);
    api.patch(
        "outage",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"displayName": "After"}})),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(30), "the change in Synapse", || async {
        account(&user_id).await.1["displayname"] == "After"
    })
    .await;
    eprintln!(
        "the change reached Synapse {:?} after the API server was back",
        back.elapsed()
    );
    drop(stop);
}

/// Defect 2, as measured: the operator process killed (SIGKILL) at several
/// points of a bulk create; afterwards every account exists once, is owned
/// and converges.
#[tokio::test]
async fn an_operator_killed_mid_bulk_leaves_every_account_owned() {
    let _serial = serial().await;
    let s = synapse();
    let (_, fake) = with_homeservers(&[(NS, json!({}))]);
    fake.put(secret_in(NS, "pw", "password", "bulk-password"));
    let users: Vec<(Value, String)> = (0..40)
        .map(|i| {
            let lp = s.unique_localpart("killed");
            let obj = applied_user(
                NS,
                &format!("bulk-{i}"),
                json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": format!("Bulk {i}"),
                       "password": {"secretRef": {"name": "pw", "key": "password"}}}),
            );
            (obj, lp)
        })
        .collect();
    for (u, _) in &users {
        fake.put(u.clone());
    }
    let dir = std::env::temp_dir().join(format!("mxu-faults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = fake.kubeconfig_file(&dir);
    let log = dir.join("operator.log");
    let start = || {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
            .args([
                "run",
                "--namespace",
                NS,
                "--leader-election",
                "off",
                "--health-addr",
                "0",
            ])
            .args(["--concurrency", "8", "--request-timeout", "5s"])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the operator binary")
    };
    for after in [
        Duration::from_millis(1500),
        Duration::from_secs(3),
        Duration::from_secs(5),
    ] {
        let mut operator = start();
        tokio::time::sleep(after).await;
        operator.kill().expect("SIGKILL");
        operator.wait().unwrap();
    }
    let mut operator = start();
    let objs: Vec<Value> = users.iter().map(|(o, _)| o.clone()).collect();
    let converged = tokio::time::timeout(Duration::from_secs(180), async {
        while !all_in_sync(&fake, &objs) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
    .await;
    operator.kill().ok();
    operator.wait().ok();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        converged.is_ok(),
        "not every account converged; reasons: {:?}\noperator log (tail):\n{}",
        objs.iter()
            .map(|o| reason_of(&stored_user(&fake, o)))
            .collect::<Vec<_>>(),
        output.lines().rev().take(40).collect::<Vec<_>>().join("\n")
    );
    for (obj, lp) in &users {
        let status = stored_user(&fake, obj).status.unwrap();
        assert_eq!(status.user_id.as_deref(), Some(s.user_id(lp).as_str()));
        assert!(status.account_creation_ts.is_some());
        let (_, a) = account(&s.user_id(lp)).await;
        assert_eq!(a["displayname"], obj["spec"]["displayName"], "{lp}");
        assert!(s.login(lp, "bulk-password").await.is_ok(), "{lp} logs in");
        let reasons = reasons_ever(&fake, obj);
        assert!(!reasons.iter().any(|r| r == "AdoptionRefused"), "{lp}: {reasons:?}");
    }
    assert!(!output.contains("bulk-password"), "no password in the operator's log");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Synapse stopped (SIGSTOP: it answers nothing) in the middle of a bulk
/// create, then continued: everything converges, nothing is duplicated.
#[tokio::test]
async fn synapse_stopped_mid_bulk_converges() {
    let _serial = serial().await;
    let s = synapse();
    let (_, fake) = with_homeservers(&[(NS, json!({}))]);
    let stop = run_operator(&fake, config_for(&[NS]));
    let users: Vec<Value> = (0..30)
        .map(|i| {
            let lp = s.unique_localpart("paused");
            applied_user(
                NS,
                &format!("paused-{i}"),
                json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": format!("Paused {i}")}),
            )
        })
        .collect();
    for u in &users {
        fake.put(u.clone());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = s.pid as libc::pid_t;
    // SAFETY: signalling the test's own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    wait_until(Duration::from_secs(180), "30 MatrixUsers InSync", || async {
        all_in_sync(&fake, &users)
    })
    .await;
    for u in &users {
        let status = stored_user(&fake, u).status.unwrap();
        let (_, a) = account(status.user_id.as_deref().unwrap()).await;
        assert_eq!(a["displayname"], u["spec"]["displayName"]);
        assert_eq!(
            status.account_creation_ts,
            a["creation_ts"]
                .as_i64()
                .or(a["creation_ts"].as_f64().map(|f| f as i64))
        );
    }
    drop(stop);
}

/// The admin token revoked, then replaced in its Secret: Unauthorized,
/// nothing written meanwhile, and everything resumes.
#[tokio::test]
async fn a_revoked_admin_token_waits_for_a_new_one() {
    let _serial = serial().await;
    let s = synapse();
    let admin = s.unique_localpart("admin");
    let token = s.register_user(&admin, "admin-password", true).await;
    let lp = s.unique_localpart("revoked");
    let user_id = s.user_id(&lp);
    let (client, fake) = FakeApiServer::start();
    fake.put(fresh_homeserver(NS, json!({})));
    fake.put(secret_in(NS, "admin", "token", &token));
    let stop = run_operator(&fake, config_for(&[NS]));
    let obj = applied_user(
        NS,
        "revoked",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "One"}),
    );
    fake.put(obj.clone());
    wait_until(Duration::from_secs(60), "InSync", || async {
        all_in_sync(&fake, std::slice::from_ref(&obj))
    })
    .await;

    let (code, _) = s
        .request(
            reqwest::Method::POST,
            "/_matrix/client/v3/logout",
            Some(&token),
            Some(json!({})),
        )
        .await;
    assert_eq!(code, 200, "the token is revoked");
    let api: kube::Api<MatrixUser> = kube::Api::namespaced(client, NS);
    api.patch(
        "revoked",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"spec": {"displayName": "Two"}})),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(60), "Unauthorized", || async {
        reason_of(&stored_user(&fake, &obj)) == "Unauthorized"
    })
    .await;
    assert_eq!(account(&user_id).await.1["displayname"], "One", "nothing written");

    let new_token = s.login(&admin, "admin-password").await.expect("a new token");
    fake.put(secret_in(NS, "admin", "token", &new_token));
    wait_until(Duration::from_secs(60), "resumed", || async {
        account(&user_id).await.1["displayname"] == "Two" && all_in_sync(&fake, std::slice::from_ref(&obj))
    })
    .await;
    drop(stop);
}

/// Issue 9, point 3: every reconcile read its Homeserver, the admin token
/// and the password Secret from the API server, so a resync of in-sync
/// users cost three GETs each. They come from the watches now: a resync
/// asks the API server nothing (and writes nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_of_in_sync_users_asks_the_api_server_nothing() {
    let _serial = serial().await;
    let s = synapse();
    let (_, fake) = with_homeservers(&[(NS, json!({}))]);
    fake.put(secret_in(NS, "steady-pw", "password", "steady-password"));
    let specs = [
        json!({"password": {"secretRef": {"name": "steady-pw", "key": "password"}}}),
        json!({"password": {"generate": true}}),
        json!({"displayName": "No password"}),
    ];
    let users: Vec<Value> = specs
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let mut spec = json!({"homeserverRef": {"name": "hs"}, "localpart": s.unique_localpart("steady")});
            spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            applied_user(NS, &format!("steady-{i}"), spec)
        })
        .collect();
    let metrics = Metrics::new();
    let config = Config {
        resync_interval: Duration::from_secs(2),
        ..config_for(&[NS])
    };
    let stop = run_operator_with(&fake, config, metrics.clone());
    for u in &users {
        fake.put(u.clone());
    }
    wait_until(Duration::from_secs(60), "the MatrixUsers InSync", || async {
        all_in_sync(&fake, &users)
    })
    .await;
    // What the creation set off (its own status writes, the credentials
    // Secret) has been seen.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fake.clear_requests();
    let before = user_reconciles(&metrics);
    wait_until(Duration::from_secs(30), "each MatrixUser resynced twice", || async {
        user_reconciles(&metrics) >= before + 2 * users.len() as u64
    })
    .await;
    let asked: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| !r.query.contains("watch=true"))
        .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
        .collect();
    drop(stop);
    assert!(asked.is_empty(), "in-sync resyncs asked the API server: {asked:#?}");
    assert!(all_in_sync(&fake, &users));
}

/// Issue 15, point 4: two Synapse versions behind one load balancer (a
/// rolling upgrade) made every Homeserver check write a new
/// `status.serverVersion`; that write triggered the next check at once,
/// skipping backoff, and re-reconciled every MatrixUser of the Homeserver
/// each time (an admin GET each), for as long as the upgrade lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_version_that_flaps_sets_off_no_checks_or_reconciles() {
    let _serial = serial().await;
    let s = synapse();
    let proxy = common::proxy::Proxy::start(&s.base_url, |seen| {
        if seen.path.starts_with("/_synapse/admin/v1/server_version") {
            let version = if seen.earlier % 2 == 0 { "1.163.2" } else { "1.164.0rc1" };
            common::proxy::Misbehave::Respond {
                status: 200,
                content_type: "application/json",
                body: format!(r#"{{"server_version": "{version}"}}"#).into_bytes(),
            }
        } else {
            common::proxy::Misbehave::Forward
        }
    })
    .await;
    let (_, fake) = FakeApiServer::start();
    let mut hs = fresh_homeserver(NS, json!({}));
    hs["spec"]["url"] = json!(proxy.url);
    fake.put(hs);
    fake.put(secret_in(NS, "admin", "token", &s.admin_token));
    let users: Vec<Value> = (0..3)
        .map(|i| {
            let spec = json!({"homeserverRef": {"name": "hs"}, "localpart": s.unique_localpart("flap")});
            applied_user(NS, &format!("flap-{i}"), spec)
        })
        .collect();
    for u in &users {
        fake.put(u.clone());
    }
    let stop = run_operator(&fake, config_for(&[NS]));
    wait_until(Duration::from_secs(60), "the MatrixUsers InSync", || async {
        all_in_sync(&fake, &users)
    })
    .await;
    // What the start set off has settled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks = proxy.count("/_synapse/admin/v1/server_version");
    let user_reads = proxy.count("/_synapse/admin/v2/users/");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let more_checks = proxy.count("/_synapse/admin/v1/server_version") - checks;
    let more_user_reads = proxy.count("/_synapse/admin/v2/users/") - user_reads;
    drop(stop);
    assert_eq!(more_checks, 0, "Homeserver checks set off by the status they wrote");
    assert_eq!(
        more_user_reads, 0,
        "MatrixUser reconciles set off by the Homeserver's status"
    );
}

/// A test of the fake API server (testkit/tests/fake_kube.rs has the others)
/// that needs the operator binary, which only the operator's own tests see.
#[tokio::test]
async fn the_fake_api_server_serves_the_operator_binary_and_outlives_a_killed_one() {
    let (client, fake) = FakeApiServer::start();
    let users: kube::Api<MatrixUser> = kube::Api::namespaced(client, NS);
    let dir = std::env::temp_dir().join(format!("fake-kube-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut operator = std::process::Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
        .args(["run", "--health-addr=0", "--leader-election=off", "--namespace", NS])
        .env("KUBECONFIG", fake.kubeconfig_file(&dir))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let watching = async {
        while !fake
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/matrixusers") && r.query.contains("watch=true"))
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), watching)
        .await
        .expect("the operator watches MatrixUsers");
    // SIGKILL, mid-watch.
    operator.kill().unwrap();
    operator.wait().unwrap();
    fake.put(json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
        "metadata": {"name": "after", "namespace": NS},
        "spec": {"homeserverRef": {"name": "hs"}},
    }));
    let names: Vec<String> = users
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|u| u.name_any())
        .collect();
    assert_eq!(names, vec!["after"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
