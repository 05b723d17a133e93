//! Controller tests: reconcile against the fake Kubernetes API server and a
//! real Synapse.

use matrix_user_operator_testkit as common;

use std::sync::Arc;

use common::fake_kube::FakeApiServer;
use common::synapse;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use matrix_user_operator::api::{Homeserver, MatrixUser};
use matrix_user_operator::controller::{Config, Context, FINALIZER, reconcile_homeserver, reconcile_user};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};

const NS: &str = "chat";

fn homeserver(policy: Value) -> Value {
    common::fixtures::homeserver_in(NS, "hs", policy)
}

fn secret(name: &str, key: &str, value: &str) -> Value {
    use std::io::Write;
    let mut b64 = Vec::new();
    {
        // Base64 by hand keeps the test free of another dependency.
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        for chunk in value.as_bytes().chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.write_all(&[A[(n >> (18 - 6 * i) & 63) as usize]]).unwrap();
                } else {
                    b64.write_all(b"=").unwrap();
                }
            }
        }
    }
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "data": {key: String::from_utf8(b64).unwrap()}
    })
}

fn matrix_user(name: &str, spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
        "metadata": {"name": name, "namespace": NS, "generation": 1, "finalizers": [FINALIZER]},
        "spec": spec,
        "status": status,
    })
}

/// The fake server, seeded with a ready Homeserver and its admin token.
fn cluster(policy: Value) -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    fake.put(homeserver(policy));
    fake.put(secret("admin", "token", &synapse().admin_token));
    (client, fake)
}

fn context(client: kube::Client, users: &[&MatrixUser]) -> Arc<Context> {
    context_with_metrics(client, users, Metrics::new())
}

fn context_with_metrics(client: kube::Client, users: &[&MatrixUser], metrics: Metrics) -> Arc<Context> {
    let mut writer = Writer::<MatrixUser>::default();
    for u in users {
        writer.apply_watcher_event(&watcher::Event::Apply((*u).clone()));
    }
    Arc::new(Context::new(client, Config::default(), writer.as_reader(), metrics))
}

/// Stores `obj` and reconciles it once, with only itself in the cache.
async fn reconcile_stored(fake: &FakeApiServer, client: kube::Client, obj: &Value) {
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    reconcile_user(Arc::new(user.clone()), context(client, &[&user]))
        .await
        .expect("reconcile");
}

/// [`reconcile_stored`], then the object as the fake server holds it.
async fn reconcile_once(fake: &FakeApiServer, client: kube::Client, obj: &Value) -> MatrixUser {
    reconcile_stored(fake, client, obj).await;
    stored(fake, obj)
}

/// The object as the fake server now holds it.
fn stored(fake: &FakeApiServer, obj: &Value) -> MatrixUser {
    serde_json::from_value(fake.get(&common::fake_kube::path_of(obj)).expect("object stored")).unwrap()
}

fn ready_of(u: &MatrixUser) -> (String, String, String) {
    let c = u
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

async fn account(user_id: &str) -> (u16, Value) {
    synapse()
        .admin_get(&format!("/_synapse/admin/v2/users/{user_id}"))
        .await
}

#[tokio::test]
async fn new_user_is_created_and_recorded_then_in_sync_costs_no_writes() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-new");
    let (client, fake) = cluster(json!({}));
    fake.put(secret("alice-pw", "password", "first-password"));
    let obj = matrix_user(
        "alice",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Alice",
               "threepids": [{"medium": "email", "address": format!("{lp}@Example.org")}],
               "password": {"secretRef": {"name": "alice-pw", "key": "password"}}}),
        Value::Null,
    );
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    let ctx = context(client, &[&user]);

    let action = reconcile_user(Arc::new(user), ctx.clone()).await.expect("reconcile");
    // No requeue held per MatrixUser: the resync clock looks at it again
    // (`controller::resync`; faults.rs `a_resync_of_in_sync_users_asks_the_api_server_nothing`
    // waits for two resyncs of each).
    assert_eq!(action, Action::await_change());

    let user = stored(&fake, &obj);
    assert_eq!(ready_of(&user).0, "True", "{:?}", ready_of(&user));
    assert_eq!(ready_of(&user).1, "InSync");
    let status = user.status.clone().unwrap();
    assert_eq!(status.user_id.as_deref(), Some(s.user_id(&lp).as_str()));
    assert_eq!(status.observed_generation, Some(1));
    let digest = status.password_digest.clone().expect("password digest recorded");
    assert!(!digest.contains("first-password"));
    // One Event for the new account, naming what was set (never a value).
    assert_eq!(fake.event_reasons(), vec!["Created"]);
    let note = fake
        .requests()
        .iter()
        .find(|r| r.path.ends_with("/events"))
        .and_then(|r| r.body["note"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(
        note.contains("displayname") && note.contains("threepids") && note.contains("password"),
        "{note}"
    );
    assert!(!note.contains("first-password"), "{note}");
    let (code, acc) = account(&s.user_id(&lp)).await;
    assert_eq!(code, 200);
    assert_eq!(acc["displayname"], "Alice");
    assert_eq!(acc["threepids"][0]["address"], format!("{lp}@example.org"));
    assert!(s.login(&lp, "first-password").await.is_ok());

    // The same resource, now with its status: one GET to Synapse, no write
    // anywhere — neither Kubernetes nor Synapse (counted by the client's
    // request metrics, apart from the code's own bookkeeping).
    fake.clear_requests();
    let token = s.login(&lp, "first-password").await.unwrap();
    let metrics = Metrics::new();
    let counting = context_with_metrics(ctx.client.clone(), &[&user], metrics.clone());
    reconcile_user(Arc::new(user.clone()), counting)
        .await
        .expect("reconcile");
    let admin_requests: Vec<String> = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("matrix_user_operator_admin_requests_total{"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        admin_requests,
        vec![r#"matrix_user_operator_admin_requests_total{endpoint="get_user",status_class="2xx"} 1"#]
    );
    let lines: Vec<String> = fake.requests().iter().map(|r| r.line()).collect();
    assert_eq!(
        lines,
        vec![
            format!("GET /apis/matrix-operator.io/v1alpha1/namespaces/{NS}/homeservers/hs"),
            format!("GET /api/v1/namespaces/{NS}/secrets/admin"),
            format!("GET /api/v1/namespaces/{NS}/secrets/alice-pw"),
        ]
    );
    let (_, after) = account(&s.user_id(&lp)).await;
    assert_eq!(
        after["threepids"], acc["threepids"],
        "threepids not re-sent (timestamps unchanged)"
    );
    assert_eq!(
        s.whoami_status(&token).await,
        200,
        "no password re-sent: sessions survive"
    );

    // A new password in the Secret is applied.
    fake.put(secret("alice-pw", "password", "second-password"));
    fake.clear_requests();
    reconcile_user(Arc::new(user), ctx).await.expect("reconcile");
    assert_eq!(fake.event_reasons(), vec!["PasswordChanged"]);
    assert!(s.login(&lp, "second-password").await.is_ok());
    assert_eq!(s.login(&lp, "first-password").await, Err(403));
    let user = stored(&fake, &obj);
    assert_ne!(user.status.unwrap().password_digest.unwrap(), digest);
}

#[tokio::test]
async fn missing_password_secret_is_a_condition_naming_it() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-nosecret");
    let (client, fake) = cluster(json!({}));
    let obj = matrix_user(
        "bob",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp,
               "password": {"secretRef": {"name": "bob-pw", "key": "pass"}}}),
        Value::Null,
    );
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    let action = reconcile_user(Arc::new(user.clone()), context(client, &[&user]))
        .await
        .expect("permanent: no error");
    // Waits for a change (the Secret is watched); the resync clock looks at
    // it again too (`controller::resync`), with no requeue held for it.
    assert_eq!(action, Action::await_change());
    let (status, reason, message) = ready_of(&stored(&fake, &obj));
    assert_eq!((status.as_str(), reason.as_str()), ("False", "SecretNotFound"));
    assert!(message.contains("bob-pw"), "{message}");
    assert_eq!(fake.event_reasons(), vec!["SecretNotFound"]);
    assert_eq!(account(&s.user_id(&lp)).await.0, 404, "nothing created");

    // A key missing from an existing Secret names the key.
    let (c, fake2) = cluster(json!({}));
    fake2.put(secret("bob-pw", "other", "x"));
    fake2.put(obj.clone());
    reconcile_user(Arc::new(user.clone()), context(c, &[&user]))
        .await
        .unwrap();
    let (_, reason, message) = ready_of(&stored(&fake2, &obj));
    assert_eq!(reason, "SecretNotFound");
    assert!(message.contains("bob-pw") && message.contains("pass"), "{message}");
}

#[tokio::test]
async fn existing_account_is_refused_without_adoption_and_adopted_with_it() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-adopt");
    s.register_user(&lp, "their-password", false).await;
    let spec = json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Taken Over"});

    let (client, fake) = cluster(json!({"allowAdoption": true}));
    let obj = matrix_user("carol", spec.clone(), Value::Null);
    reconcile_stored(&fake, client, &obj).await;
    let refused = stored(&fake, &obj);
    assert_eq!(ready_of(&refused).1, "AdoptionRefused");
    assert_eq!(refused.status.unwrap().user_id, None, "not recorded as owned");
    assert_eq!(
        account(&s.user_id(&lp)).await.1["displayname"],
        lp.as_str(),
        "untouched"
    );

    // adopt: true but the Homeserver does not allow it.
    let mut adopting = spec.clone();
    adopting["adopt"] = json!(true);
    let (client, fake) = cluster(json!({"allowAdoption": false}));
    let obj = matrix_user("carol", adopting.clone(), Value::Null);
    let (_, reason, message) = ready_of(&reconcile_once(&fake, client, &obj).await);
    assert_eq!(reason, "AdoptionRefused");
    assert!(message.contains("allowAdoption"), "{message}");
    assert_eq!(
        account(&s.user_id(&lp)).await.1["displayname"],
        lp.as_str(),
        "untouched"
    );

    // Both allow it: adopted, recorded, changed.
    let (client, fake) = cluster(json!({"allowAdoption": true}));
    let adopted = reconcile_once(&fake, client, &obj).await;
    assert_eq!(ready_of(&adopted).1, "InSync");
    assert_eq!(
        adopted.status.unwrap().user_id.as_deref(),
        Some(s.user_id(&lp).as_str())
    );
    assert_eq!(fake.event_reasons(), vec!["Adopted", "Updated"]);
    assert_eq!(account(&s.user_id(&lp)).await.1["displayname"], "Taken Over");
}

#[tokio::test]
async fn admin_needs_the_homeserver_policy() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-admin");
    let (client, fake) = cluster(json!({"allowAdminUsers": false}));
    let obj = matrix_user(
        "dave",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "admin": true}),
        Value::Null,
    );
    reconcile_stored(&fake, client, &obj).await;
    assert_eq!(ready_of(&stored(&fake, &obj)).1, "AdminNotAllowed");
    assert_eq!(account(&s.user_id(&lp)).await.0, 404);
}

#[tokio::test]
async fn the_newer_of_two_users_for_one_matrix_id_gets_a_conflict_and_writes_nothing() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-dup");
    let (client, fake) = cluster(json!({}));
    let spec = json!({"homeserverRef": {"name": "hs"}, "localpart": lp});
    let mut older = matrix_user("first", spec.clone(), Value::Null);
    older["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    older["metadata"]["uid"] = json!("uid-older");
    let mut newer = matrix_user("second", spec, Value::Null);
    newer["metadata"]["creationTimestamp"] = json!("2026-02-01T00:00:00Z");
    newer["metadata"]["uid"] = json!("uid-newer");
    fake.put(older.clone());
    fake.put(newer.clone());
    let older_user: MatrixUser = serde_json::from_value(older).unwrap();
    let newer_user: MatrixUser = serde_json::from_value(newer.clone()).unwrap();
    let ctx = context(client, &[&older_user, &newer_user]);
    reconcile_user(Arc::new(newer_user), ctx).await.unwrap();
    let (_, reason, message) = ready_of(&stored(&fake, &newer));
    assert_eq!(reason, "Conflict");
    assert!(message.contains("first"), "{message}");
    assert_eq!(account(&s.user_id(&lp)).await.0, 404, "no write reached Synapse");
}

#[tokio::test]
async fn an_email_of_another_account_is_a_conflict_and_stays_there() {
    let s = synapse();
    let owner = s.unique_localpart("ctl-owner");
    s.register_user(&owner, "pw", false).await;
    let email = format!("{owner}@example.org");
    s.admin_put(
        &format!("/_synapse/admin/v2/users/{}", s.user_id(&owner)),
        json!({"threepids": [{"medium": "email", "address": email}]}),
    )
    .await;
    let lp = s.unique_localpart("ctl-thief");
    let (client, fake) = cluster(json!({}));
    let obj = matrix_user(
        "thief",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp,
               "threepids": [{"medium": "email", "address": email.to_uppercase()}]}),
        Value::Null,
    );
    let (_, reason, message) = ready_of(&reconcile_once(&fake, client, &obj).await);
    assert_eq!(reason, "Conflict");
    assert!(message.contains("another account"), "{message}");
    assert!(
        !message.contains(&s.user_id(&owner)),
        "the owner is not revealed: {message}"
    );
    assert_eq!(
        account(&s.user_id(&owner)).await.1["threepids"][0]["address"],
        email.as_str()
    );
}

async fn deleted_with_policy(policy: &str) -> (String, Value, Vec<String>) {
    let s = synapse();
    let lp = s.unique_localpart(&format!("ctl-del-{}", policy.to_lowercase()));
    let (client, fake) = cluster(json!({}));
    let spec =
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Doomed", "deletionPolicy": policy});
    let obj = matrix_user("eve", spec, Value::Null);
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    let ctx = context(client, &[&user]);
    reconcile_user(Arc::new(user), ctx.clone()).await.unwrap();
    let mut deleting = stored(&fake, &obj);
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    fake.put(serde_json::to_value(&deleting).unwrap());
    fake.clear_requests();
    reconcile_user(Arc::new(deleting), ctx).await.expect("cleanup");
    assert!(
        fake.get(&common::fake_kube::path_of(&obj)).is_none(),
        "finalizer removed, object gone"
    );
    let (_, acc) = account(&s.user_id(&lp)).await;
    (lp, acc, fake.event_reasons())
}

/// A localpart with `=` (Synapse's SSO mapping makes such) goes into the
/// field selectors that look for other owners before the deletion policy
/// runs: escaped, the API server answers them and the deletion finishes.
#[tokio::test]
async fn deletion_of_a_localpart_with_equals_runs_the_policy_and_finishes() {
    let s = synapse();
    let lp = format!("{}=sso", s.unique_localpart("ctl-del-eq"));
    let (client, fake) = cluster(json!({}));
    let spec = json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "deletionPolicy": "Deactivate"});
    let obj = matrix_user("eq", spec, Value::Null);
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    let ctx = context(client, &[&user]);
    reconcile_user(Arc::new(user), ctx.clone()).await.expect("created");
    assert_eq!(ready_of(&stored(&fake, &obj)).1, "InSync");
    assert_eq!(account(&s.user_id(&lp)).await.0, 200);
    let mut deleting = serde_json::to_value(stored(&fake, &obj)).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    fake.put(deleting.clone());
    fake.clear_requests();
    reconcile_user(Arc::new(serde_json::from_value(deleting).unwrap()), ctx)
        .await
        .expect("cleanup");
    let selectors: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.query.contains("fieldSelector"))
        .map(|r| r.query.clone())
        .collect();
    assert!(!selectors.is_empty(), "other owners are looked up");
    assert!(
        fake.get(&common::fake_kube::path_of(&obj)).is_none(),
        "finalizer removed, object gone"
    );
    assert_eq!(account(&s.user_id(&lp)).await.1["deactivated"], true);
    assert_eq!(fake.event_reasons(), vec!["Deactivated"]);
}

#[tokio::test]
async fn deletion_deactivates_by_default() {
    let (_, acc, events) = deleted_with_policy("Deactivate").await;
    assert_eq!(acc["deactivated"], true);
    assert_eq!(acc["erased"], false);
    assert_eq!(events, vec!["Deactivated"]);
}

#[tokio::test]
async fn deletion_erases_with_erase() {
    let (_, acc, events) = deleted_with_policy("Erase").await;
    assert_eq!(acc["deactivated"], true);
    assert_eq!(acc["erased"], true);
    assert_eq!(acc["displayname"], Value::Null);
    assert_eq!(events, vec!["Erased"]);
}

#[tokio::test]
async fn deletion_retains_with_retain() {
    let (_, acc, events) = deleted_with_policy("Retain").await;
    assert_eq!(acc["deactivated"], false);
    assert_eq!(acc["displayname"], "Doomed");
    assert_eq!(events, vec!["Retained"]);
}

#[tokio::test]
async fn deletion_lets_go_when_the_homeserver_is_gone() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-gone");
    let (client, fake) = FakeApiServer::start();
    let mut obj = matrix_user(
        "frank",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp}),
        json!({"userId": s.user_id(&lp)}),
    );
    obj["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    reconcile_user(Arc::new(user.clone()), context(client, &[&user]))
        .await
        .expect("cleanup lets go");
    assert!(
        fake.get(&common::fake_kube::path_of(&obj)).is_none(),
        "finalizer removed"
    );
    assert_eq!(fake.event_reasons(), vec!["HomeserverGone"]);
}

#[tokio::test]
async fn deletion_of_an_account_never_owned_touches_nothing() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-notmine");
    s.register_user(&lp, "pw", false).await;
    let (client, fake) = cluster(json!({}));
    let mut obj = matrix_user(
        "gina",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp}),
        Value::Null,
    );
    obj["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    reconcile_stored(&fake, client, &obj).await;
    assert!(fake.get(&common::fake_kube::path_of(&obj)).is_none());
    assert_eq!(account(&s.user_id(&lp)).await.1["deactivated"], false);
}

#[tokio::test]
async fn generated_password_goes_into_an_owned_secret_and_logs_in() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-gen");
    let (client, fake) = cluster(json!({}));
    let mut obj = matrix_user(
        "gen",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "password": {"generate": true}}),
        Value::Null,
    );
    obj["metadata"]["uid"] = json!("uid-gen");
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    let ctx = context(client, &[&user]);
    reconcile_user(Arc::new(user.clone()), ctx.clone()).await.unwrap();
    let secret = fake
        .get(&format!("/api/v1/namespaces/{NS}/secrets/gen-credentials"))
        .expect("Secret created");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-gen");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
    let keys: Vec<&String> = secret["data"].as_object().unwrap().keys().collect();
    assert_eq!(keys, vec!["homeserverUrl", "password", "userId", "username"]);
    let password: Vec<u8> = serde_json::from_value(secret["data"]["password"].clone())
        .map(|b: k8s_openapi::ByteString| b.0)
        .unwrap();
    let password = String::from_utf8(password).unwrap();
    assert_eq!(password.len(), 32);
    assert!(s.login(&lp, &password).await.is_ok());
    assert_eq!(ready_of(&stored(&fake, &obj)).1, "InSync");
    assert!(fake.event_reasons().contains(&"CredentialsGenerated".to_string()));

    // The next pass reads the same Secret and changes nothing.
    fake.clear_requests();
    reconcile_user(Arc::new(stored(&fake, &obj)), ctx).await.unwrap();
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

/// A MatrixUser name may be 253 characters long, a label value 63: the
/// generated Secret of a long name carries no label of it, and is made.
#[tokio::test]
async fn generated_password_secret_of_a_200_character_name_is_made() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-gen-long");
    let (client, fake) = cluster(json!({}));
    let name = format!("long-{}", "n".repeat(195));
    assert_eq!(name.len(), 200);
    let mut obj = matrix_user(
        &name,
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "password": {"generate": true}}),
        Value::Null,
    );
    obj["metadata"]["uid"] = json!("uid-long");
    let user = reconcile_once(&fake, client, &obj).await;
    assert_eq!(ready_of(&user).1, "InSync", "{:?}", ready_of(&user));
    let secret = fake
        .get(&format!("/api/v1/namespaces/{NS}/secrets/{name}-credentials"))
        .expect("Secret created");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-long");
    assert_eq!(
        secret["metadata"]["labels"],
        json!({"app.kubernetes.io/managed-by": "matrix-user-operator"})
    );
    assert_eq!(account(&s.user_id(&lp)).await.0, 200);
}

/// A request the API server refuses as invalid gets the same answer when
/// tried again: the MatrixUser stalls with the API server's message instead
/// of retrying without end. Here the Secret's name (`<name>-credentials`)
/// would be longer than the 253 characters a name may have.
#[tokio::test]
async fn a_secret_the_api_server_refuses_stalls_the_matrixuser() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-gen-refused");
    let (client, fake) = cluster(json!({}));
    let name = "r".repeat(250);
    let mut obj = matrix_user(
        &name,
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "password": {"generate": true}}),
        Value::Null,
    );
    obj["metadata"]["uid"] = json!("uid-refused");
    let user = reconcile_once(&fake, client, &obj).await;
    let (ready, reason, message) = ready_of(&user);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "KubernetesRefused"),
        "{message}"
    );
    assert!(message.contains("must be no more than 253 characters"), "{message}");
    assert!(message.contains("(422 Invalid)"), "{message}");
    let conditions = &user.status.as_ref().unwrap().conditions;
    let stalled = conditions.iter().find(|c| c.type_ == "Stalled").expect("Stalled");
    assert_eq!(
        (stalled.status.as_str(), stalled.reason.as_str()),
        ("True", "KubernetesRefused")
    );
    assert_eq!(account(&s.user_id(&lp)).await.0, 404, "no account without its password");
}

#[tokio::test]
async fn generated_password_never_overwrites_a_secret_it_does_not_own() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-gen-taken");
    let (client, fake) = cluster(json!({}));
    fake.put(secret("taken-credentials", "password", "someone-elses"));
    let obj = matrix_user(
        "taken",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "password": {"generate": true}}),
        Value::Null,
    );
    let (_, reason, message) = ready_of(&reconcile_once(&fake, client, &obj).await);
    assert_eq!(reason, "Conflict");
    assert!(message.contains("taken-credentials"), "{message}");
    let kept = fake
        .get(&format!("/api/v1/namespaces/{NS}/secrets/taken-credentials"))
        .unwrap();
    assert_eq!(
        kept["data"],
        secret("taken-credentials", "password", "someone-elses")["data"]
    );
    assert!(kept["metadata"]["ownerReferences"].is_null());
    assert!(
        fake.writes().iter().all(|w| !w.path.contains("/secrets")),
        "{:?}",
        fake.writes()
    );
    assert_eq!(account(&s.user_id(&lp)).await.0, 404);
}

async fn homeserver_outcome(
    token: &str,
    url: Option<&str>,
    server_name: Option<&str>,
) -> (String, String, Result<(), String>) {
    let (client, fake) = FakeApiServer::start();
    let mut hs = homeserver(json!({}));
    hs["status"] = Value::Null;
    if let Some(url) = url {
        hs["spec"]["url"] = json!(url);
    }
    if let Some(name) = server_name {
        hs["spec"]["serverName"] = json!(name);
    }
    fake.put(hs.clone());
    fake.put(secret("admin", "token", token));
    let hs_obj: Homeserver = serde_json::from_value(hs.clone()).unwrap();
    let result = reconcile_homeserver(Arc::new(hs_obj), context(client, &[])).await;
    let stored: Homeserver = serde_json::from_value(fake.get(&common::fake_kube::path_of(&hs)).unwrap()).unwrap();
    let status = stored.status.unwrap();
    let c = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    (
        c.reason.clone(),
        c.message.clone(),
        result.map(|_| ()).map_err(|e| e.to_string()),
    )
}

#[tokio::test]
async fn homeserver_conditions() {
    let s = synapse();
    let (reason, message, result) = homeserver_outcome(&s.admin_token, None, None).await;
    assert_eq!(reason, "Connected", "{message}");
    assert!(message.contains(common::SYNAPSE_VERSION), "{message}");
    assert!(result.is_ok());

    let (reason, message, result) = homeserver_outcome("not-a-token", None, None).await;
    assert_eq!(reason, "Unauthorized", "{message}");
    assert!(!message.contains("not-a-token"), "the token never shows: {message}");
    assert!(result.is_ok(), "a bad token waits for a new Secret");

    let lp = s.unique_localpart("ctl-plain");
    let user_token = s.register_user(&lp, "pw", false).await;
    let (reason, message, _) = homeserver_outcome(&user_token, None, None).await;
    assert_eq!(reason, "NotAdmin", "{message}");

    let (reason, message, _) = homeserver_outcome(&s.admin_token, None, Some("other.example")).await;
    assert_eq!(reason, "ServerNameMismatch", "{message}");

    // Nothing listens on port 9 of loopback.
    let (reason, _, result) = homeserver_outcome(&s.admin_token, Some("http://127.0.0.1:9"), None).await;
    assert_eq!(reason, "Unreachable");
    assert!(result.is_err(), "unreachable is retried with backoff");
}

/// `/metrics` over HTTP, as Prometheus would scrape it.
async fn scrape(metrics: Metrics) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(matrix_user_operator::health::serve(
        listener,
        matrix_user_operator::health::Readiness::default(),
        metrics,
    ));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    server.abort();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

#[tokio::test]
async fn metrics_endpoint_serves_every_family_after_a_reconcile() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-metrics");
    let (client, fake) = cluster(json!({}));
    let obj = matrix_user(
        "mia",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp}),
        Value::Null,
    );
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj).unwrap();
    let metrics = Metrics::new();
    let ctx = context_with_metrics(client, &[&user], metrics.clone());
    reconcile_user(Arc::new(user), ctx.clone()).await.unwrap();
    let hs: Homeserver = serde_json::from_value(homeserver(json!({}))).unwrap();
    reconcile_homeserver(Arc::new(hs), ctx).await.unwrap();
    let text = scrape(metrics).await;
    for expected in [
        r#"matrix_user_operator_reconciliations_total{kind="MatrixUser",result="success"} 1"#,
        r#"matrix_user_operator_reconciliations_total{kind="Homeserver",result="success"} 1"#,
        r#"matrix_user_operator_reconcile_duration_seconds_count{kind="MatrixUser"} 1"#,
        r#"matrix_user_operator_admin_requests_total{endpoint="get_user",status_class="4xx"} 1"#,
        r#"matrix_user_operator_admin_requests_total{endpoint="put_user",status_class="2xx"}"#,
        r#"matrix_user_operator_admin_requests_total{endpoint="whoami",status_class="2xx"} 1"#,
        r#"matrix_user_operator_admin_request_duration_seconds_count{endpoint="put_user"}"#,
        r#"matrix_user_operator_matrixusers{reason="InSync"} 1"#,
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
}

#[tokio::test]
async fn a_homeserver_status_of_an_older_spec_does_not_count() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-stale-hs");
    let (client, fake) = FakeApiServer::start();
    let mut hs = homeserver(json!({}));
    // The URL changed (generation 2) and the Homeserver was not checked since.
    hs["metadata"]["generation"] = json!(2);
    fake.put(hs);
    fake.put(secret("admin", "token", &s.admin_token));
    let obj = matrix_user(
        "stale",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp}),
        Value::Null,
    );
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    // Waited for with backoff (the Homeserver's own check triggers it again).
    let result = reconcile_user(Arc::new(user.clone()), context(client, &[&user])).await;
    assert_eq!(result.err().map(|e| e.reason()), Some("HomeserverNotReady"));
    let (_, reason, message) = ready_of(&stored(&fake, &obj));
    assert_eq!(reason, "HomeserverNotReady");
    assert!(message.contains("spec changed"), "{message}");
    assert_eq!(account(&s.user_id(&lp)).await.0, 404);
}

#[tokio::test]
async fn the_admin_tokens_own_account_is_not_managed() {
    let s = synapse();
    let (client, fake) = cluster(json!({"allowAdoption": true, "allowAdminUsers": true}));
    let localpart = s
        .admin_user_id
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let obj = matrix_user(
        "admin",
        json!({"homeserverRef": {"name": "hs"}, "localpart": localpart, "adopt": true, "locked": true}),
        Value::Null,
    );
    let (_, reason, message) = ready_of(&reconcile_once(&fake, client, &obj).await);
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("admin token"), "{message}");
    assert_eq!(account(&s.admin_user_id).await.1["locked"], false);
}

#[tokio::test]
async fn an_account_owned_by_a_matrixuser_elsewhere_cannot_be_adopted() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-owned-elsewhere");
    s.register_user(&lp, "pw", false).await;
    let (client, fake) = cluster(json!({"allowAdoption": true}));
    // Another namespace's MatrixUser (through its own Homeserver) owns it.
    let mut owner = matrix_user(
        "owner",
        json!({"homeserverRef": {"name": "other-hs"}, "localpart": lp}),
        json!({"userId": s.user_id(&lp)}),
    );
    owner["metadata"]["namespace"] = json!("elsewhere");
    let owner: MatrixUser = serde_json::from_value(owner).unwrap();
    let obj = matrix_user(
        "thief",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "adopt": true,
        "displayName": "Stolen"}),
        Value::Null,
    );
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    reconcile_user(Arc::new(user.clone()), context(client, &[&user, &owner]))
        .await
        .unwrap();
    let (_, reason, message) = ready_of(&stored(&fake, &obj));
    assert_eq!(reason, "Conflict");
    assert!(message.contains("elsewhere/owner"), "{message}");
    assert_eq!(account(&s.user_id(&lp)).await.1["displayname"], lp.as_str());
}

#[tokio::test]
async fn skip_cleanup_lets_go_without_touching_the_account() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-skip");
    let (client, fake) = cluster(json!({}));
    let obj = matrix_user(
        "kept",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp}),
        Value::Null,
    );
    let created = reconcile_once(&fake, client.clone(), &obj).await;
    let mut deleting = serde_json::to_value(&created).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    deleting["metadata"]["annotations"] = json!({"matrix-operator.io/skip-cleanup": "true"});
    fake.clear_requests();
    reconcile_stored(&fake, client, &deleting).await;
    assert!(
        fake.get(&common::fake_kube::path_of(&obj)).is_none(),
        "finalizer removed"
    );
    assert_eq!(fake.event_reasons(), vec!["CleanupSkipped"]);
    assert_eq!(account(&s.user_id(&lp)).await.1["deactivated"], false);
}

#[tokio::test]
async fn a_name_that_is_no_localpart_is_invalid_spec() {
    let (client, fake) = cluster(json!({}));
    // The CRD cannot check metadata.name (CEL cost budget): the operator does.
    let obj = matrix_user("1234", json!({"homeserverRef": {"name": "hs"}}), Value::Null);
    let (status, reason, message) = ready_of(&reconcile_once(&fake, client, &obj).await);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("all digits"), "{message}");
    assert_eq!(account(&synapse().user_id("1234")).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_watches_only_the_namespaces_it_is_given() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (client, fake) = FakeApiServer::start();
    let config = Config {
        namespaces: vec!["team-a".into(), "team-b".into()],
        ..Config::default()
    };
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    matrix_user_operator::controller::run(
        client,
        config,
        Metrics::new(),
        tokio::time::sleep(std::time::Duration::from_secs(2)),
        move || flag.store(true, Ordering::SeqCst),
    )
    .await;
    assert!(
        ready.load(Ordering::SeqCst),
        "ready once both namespaces' caches synced"
    );
    let paths: Vec<String> = fake.requests().iter().map(|r| r.path.clone()).collect();
    for path in &paths {
        assert!(
            path.contains("/namespaces/team-a/") || path.contains("/namespaces/team-b/"),
            "{path}"
        );
    }
    for ns in ["team-a", "team-b"] {
        for resource in ["matrixusers", "homeservers", "secrets"] {
            let suffix = format!("/namespaces/{ns}/{resource}");
            assert!(
                paths.iter().any(|p| p.ends_with(&suffix)),
                "no watch of {suffix} in {paths:?}"
            );
        }
    }
}

#[tokio::test]
async fn an_account_of_the_same_id_created_at_another_time_is_not_taken_for_the_owned_one() {
    // As after a Homeserver was repointed at another server with the same
    // server name: status records @x as owned, created at another time.
    let s = synapse();
    let lp = s.unique_localpart("ctl-repointed");
    s.register_user(&lp, "their-password", false).await;
    let (client, fake) = cluster(json!({}));
    let obj = matrix_user(
        "repointed",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Mine", "deletionPolicy": "Deactivate"}),
        json!({"userId": s.user_id(&lp), "accountCreationTs": 1}),
    );
    let refused = reconcile_once(&fake, client.clone(), &obj).await;
    assert_eq!(ready_of(&refused).1, "AdoptionRefused");
    assert_eq!(
        account(&s.user_id(&lp)).await.1["displayname"],
        lp.as_str(),
        "untouched"
    );
    // Deleting it leaves that account alone too.
    let mut deleting = serde_json::to_value(&refused).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    reconcile_stored(&fake, client, &deleting).await;
    assert_eq!(account(&s.user_id(&lp)).await.1["deactivated"], false);
}

#[tokio::test]
async fn the_creation_time_of_a_new_account_is_recorded_with_it() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-created-at");
    let (client, fake) = cluster(json!({}));
    let obj = matrix_user(
        "fresh",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp}),
        Value::Null,
    );
    let created = reconcile_once(&fake, client, &obj).await;
    let status = created.status.unwrap();
    let (_, acc) = account(&s.user_id(&lp)).await;
    assert_eq!(status.account_creation_ts, acc["creation_ts"].as_i64());
    assert!(status.account_creation_ts.is_some());
}

/// Issue 20: a new account costs 3 Kubernetes writes — the finalizer and
/// the pending-creation record in one patch, the final status, the
/// `Created` Event — in one pass; the next pass writes nothing. (It was 4,
/// in two passes: the finalizer alone first.)
#[tokio::test]
async fn a_new_account_costs_three_kubernetes_writes_in_one_pass() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-writes");
    let (client, fake) = cluster(json!({}));
    let mut hs = homeserver(json!({}));
    hs["spec"]["registrationSharedSecretRef"] = json!({"name": "registration", "key": "secret"});
    fake.put(hs);
    fake.put(secret("registration", "secret", &s.registration_shared_secret));
    fake.put(secret("writes-pw", "password", "a-password"));
    // As a user creates it: no finalizer.
    let mut obj = matrix_user(
        "writes",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp,
               "password": {"secretRef": {"name": "writes-pw", "key": "password"}}}),
        Value::Null,
    );
    obj["metadata"].as_object_mut().unwrap().remove("finalizers");
    fake.put(obj.clone());
    let before = fake.writes().len();
    let fresh = stored(&fake, &obj);
    reconcile_user(Arc::new(fresh.clone()), context(client.clone(), &[&fresh]))
        .await
        .expect("reconcile");
    let writes: Vec<String> = fake.writes()[before..].iter().map(|w| w.line()).collect();
    let user_path = common::fake_kube::path_of(&obj);
    assert_eq!(
        writes,
        [
            format!("PATCH {user_path}"),
            format!("PATCH {user_path}/status"),
            format!("POST /apis/events.k8s.io/v1/namespaces/{NS}/events"),
        ],
        "{writes:#?}"
    );
    let created = stored(&fake, &obj);
    assert_eq!(ready_of(&created).1, "InSync");
    assert_eq!(created.finalizers(), [FINALIZER]);
    // The registration does not say when the account was made; the read
    // after it does, and the status written in the same pass records it:
    // the record is settled, and a cached copy keeps nothing of it.
    assert!(created.status.as_ref().unwrap().account_creation_ts.is_some());
    assert_eq!(created.pending_creation(), None, "settled");
    let mut cached = created.clone();
    cached.forget_settled_record();
    assert_eq!(cached.metadata.annotations, None, "a cached copy keeps no record");
    // The next pass (a resync) writes nothing.
    let settled = created;
    let before = fake.writes().len();
    reconcile_user(Arc::new(settled.clone()), context(client, &[&settled]))
        .await
        .expect("reconcile");
    let writes: Vec<String> = fake.writes()[before..].iter().map(|w| w.line()).collect();
    assert!(writes.is_empty(), "{writes:#?}");
}

/// Issue 9: with the registration shared secret, a new account is made in
/// one create-only call with its password and displayname, and nothing is
/// read before it; its creation time, which the registration does not
/// tell, is read right after (issue 20: until then the pending creation
/// record stayed on the object, and in every cached copy, until a resync).
#[tokio::test]
async fn with_the_registration_secret_a_new_account_costs_one_call_and_one_read_of_its_creation_time() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-registered");
    let (client, fake) = cluster(json!({}));
    let mut hs = homeserver(json!({}));
    hs["spec"]["registrationSharedSecretRef"] = json!({"name": "registration", "key": "secret"});
    fake.put(hs);
    fake.put(secret("registration", "secret", &s.registration_shared_secret));
    fake.put(secret("reg-pw", "password", "registered-password"));
    let obj = matrix_user(
        "registered",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Registered",
               "password": {"secretRef": {"name": "reg-pw", "key": "password"}}}),
        Value::Null,
    );
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    let metrics = Metrics::new();
    reconcile_user(
        Arc::new(user.clone()),
        context_with_metrics(client.clone(), &[&user], metrics.clone()),
    )
    .await
    .expect("reconcile");

    let created = stored(&fake, &obj);
    assert_eq!(ready_of(&created).1, "InSync", "{:?}", ready_of(&created));
    let status = created.status.clone().unwrap();
    assert_eq!(status.user_id.as_deref(), Some(s.user_id(&lp).as_str()));
    let (_, acc) = account(&s.user_id(&lp)).await;
    assert_eq!(status.account_creation_ts, acc["creation_ts"].as_i64());
    assert!(status.account_creation_ts.is_some());
    assert_eq!(created.pending_creation(), None, "settled by the read");
    assert!(status.password_digest.is_some());
    let mut admin_requests: Vec<String> = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("matrix_user_operator_admin_requests_total{"))
        .map(str::to_string)
        .collect();
    admin_requests.sort();
    assert_eq!(
        admin_requests,
        vec![
            r#"matrix_user_operator_admin_requests_total{endpoint="get_user",status_class="2xx"} 1"#,
            r#"matrix_user_operator_admin_requests_total{endpoint="register",status_class="2xx"} 1"#,
            r#"matrix_user_operator_admin_requests_total{endpoint="register_nonce",status_class="2xx"} 1"#,
        ]
    );
    assert_eq!(fake.event_reasons(), vec!["Created"]);
    let (_, acc) = account(&s.user_id(&lp)).await;
    assert_eq!(acc["displayname"], "Registered");
    assert!(s.login(&lp, "registered-password").await.is_ok());

    // The next reconcile (a resync, say) reads the account and changes
    // nothing.
    let before = fake.writes().len();
    reconcile_user(Arc::new(created.clone()), context(client, &[&created]))
        .await
        .expect("reconcile");
    assert_eq!(fake.writes().len(), before, "nothing written");
    let confirmed_user = stored(&fake, &obj);
    let confirmed = confirmed_user.status.clone().unwrap();
    assert_eq!(confirmed.account_creation_ts, acc["creation_ts"].as_i64());
    assert_eq!(confirmed_user.pending_creation(), None, "settled");
}

/// Issue 9, point 4: the failure counts, the admin clients (holding the
/// token) and the per-user metrics entries of objects that are gone are
/// dropped, whether they went through the finalizer or vanished.
#[tokio::test]
async fn what_is_kept_per_object_goes_with_the_object() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::core::PartialObjectMeta;
    use matrix_user_operator::controller::{CacheSizes, Error, SecretCache, WatchedScope};
    let s = synapse();
    let (client, fake) = cluster(json!({}));
    let users: Vec<MatrixUser> = (0..12)
        .map(|i| {
            let obj = matrix_user(
                &format!("churn-{i}"),
                json!({"homeserverRef": {"name": "hs"}, "localpart": s.unique_localpart("churn")}),
                Value::Null,
            );
            fake.put(obj.clone());
            stored(&fake, &obj)
        })
        .collect();
    let hs: Homeserver = serde_json::from_value(
        fake.get("/apis/matrix-operator.io/v1alpha1/namespaces/chat/homeservers/hs")
            .unwrap(),
    )
    .unwrap();
    let admin: PartialObjectMeta<Secret> =
        serde_json::from_value(fake.get("/api/v1/namespaces/chat/secrets/admin").unwrap()).unwrap();
    // The caches as the watches fill them.
    let (mut user_cache, mut hs_cache, secret_cache) = (
        Writer::<MatrixUser>::default(),
        Writer::<Homeserver>::default(),
        SecretCache::default(),
    );
    user_cache.apply_watcher_event(&watcher::Event::Init);
    for u in &users {
        user_cache.apply_watcher_event(&watcher::Event::InitApply(u.clone()));
    }
    user_cache.apply_watcher_event(&watcher::Event::InitDone);
    hs_cache.apply_watcher_event(&watcher::Event::Init);
    hs_cache.apply_watcher_event(&watcher::Event::InitApply(hs.clone()));
    hs_cache.apply_watcher_event(&watcher::Event::InitDone);
    secret_cache.apply_watcher_event(&watcher::Event::Init);
    secret_cache.apply_watcher_event(&watcher::Event::InitApply(admin.clone()));
    secret_cache.apply_watcher_event(&watcher::Event::InitDone);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Config::default(),
            user_cache.as_reader(),
            Metrics::new(),
        )
        .with_watches(vec![WatchedScope {
            namespace: Some(NS.into()),
            users: user_cache.as_reader(),
            homeservers: hs_cache.as_reader(),
            secrets: secret_cache.clone(),
        }]),
    );
    reconcile_homeserver(Arc::new(hs.clone()), ctx.clone()).await.unwrap();
    for u in &users {
        reconcile_user(Arc::new(u.clone()), ctx.clone()).await.unwrap();
        ctx.backoff(u, &Error::Stale);
    }
    ctx.backoff(&hs, &Error::Stale);
    let sizes = ctx.cache_sizes();
    assert_eq!(
        sizes,
        CacheSizes {
            failures: 13,
            synapse_clients: 1,
            secret_values: 1,
            user_metrics: 12,
            digests: 0,
        }
    );
    ctx.sweep();
    assert_eq!(ctx.cache_sizes(), sizes, "nothing of what is there is dropped");
    // Half go through the finalizer; the others vanish (their finalizer
    // taken off by someone else).
    for (i, u) in users.iter().enumerate() {
        if i % 2 == 0 {
            let mut deleting = serde_json::to_value(stored(&fake, &serde_json::to_value(u).unwrap())).unwrap();
            deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
            fake.put(deleting.clone());
            reconcile_user(Arc::new(serde_json::from_value(deleting).unwrap()), ctx.clone())
                .await
                .unwrap();
        }
        user_cache.apply_watcher_event(&watcher::Event::Delete(u.clone()));
    }
    // The Homeserver goes too, through its finalizer, and its Secret.
    let mut deleting = serde_json::to_value(&hs).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    let api: kube::Api<MatrixUser> = kube::Api::namespaced(client.clone(), NS);
    for (i, u) in users.iter().enumerate() {
        if i % 2 == 1 {
            let name = u.metadata.name.as_deref().unwrap();
            api.delete(name, &Default::default()).await.unwrap();
            let unfinalize = json!({"metadata": {"finalizers": null}});
            api.patch(name, &Default::default(), &kube::api::Patch::Merge(&unfinalize))
                .await
                .unwrap();
        }
    }
    reconcile_homeserver(Arc::new(serde_json::from_value(deleting).unwrap()), ctx.clone())
        .await
        .unwrap();
    hs_cache.apply_watcher_event(&watcher::Event::Delete(hs));
    secret_cache.apply_watcher_event(&watcher::Event::Delete(admin));
    ctx.sweep();
    assert_eq!(ctx.cache_sizes(), CacheSizes::default());
}

/// Issue 15, point 8: ownership is read from status, which whoever may
/// patch `matrixusers/status` can write. A forged record for a server
/// admin's account let a MatrixUser rewrite that admin's password (the
/// admin check ran only at adoption) and deactivate it on deletion.
#[tokio::test]
async fn a_forged_ownership_record_of_a_server_admin_changes_nothing() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-forged-admin");
    s.register_user(&lp, "the-admins-password", true).await;
    let (_, created) = account(&s.user_id(&lp)).await;
    let (client, fake) = cluster(json!({}));
    fake.put(secret("forged-pw", "password", "the-attackers-password"));
    // Exactly what the operator would have written for an account it made.
    let forged = json!({"userId": s.user_id(&lp), "accountCreationTs": created["creation_ts"]});
    let obj = matrix_user(
        "forger",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": "Owned",
               "password": {"secretRef": {"name": "forged-pw", "key": "password"}}}),
        forged,
    );
    let (ready, reason, message) = ready_of(&reconcile_once(&fake, client.clone(), &obj).await);
    assert_eq!(
        (ready.as_str(), reason.as_str()),
        ("False", "AdminNotAllowed"),
        "{message}"
    );
    assert!(
        s.login(&lp, "the-admins-password").await.is_ok(),
        "the password is the admin's"
    );
    assert!(s.login(&lp, "the-attackers-password").await.is_err());
    assert_ne!(account(&s.user_id(&lp)).await.1["displayname"], "Owned");

    // Deleting it leaves the admin's account active.
    let mut deleting = stored(&fake, &obj);
    deleting.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    fake.put(serde_json::to_value(&deleting).unwrap());
    reconcile_user(Arc::new(deleting.clone()), context(client, &[&deleting]))
        .await
        .expect("cleanup lets go");
    assert!(
        fake.get(&common::fake_kube::path_of(&obj)).is_none(),
        "finalizer removed"
    );
    assert_eq!(account(&s.user_id(&lp)).await.1["deactivated"], false);
    assert!(fake.event_reasons().contains(&"Retained".to_string()));
}

/// Issue 15, point 10: the sync refused the admin token's own account, the
/// deletion policy did not: a MatrixUser recording it (forged, or from
/// before) deactivated the operator's own admin on deletion.
#[tokio::test]
async fn deleting_a_matrixuser_never_deactivates_the_admin_tokens_own_account() {
    let s = synapse();
    let (client, fake) = cluster(json!({"allowAdminUsers": true}));
    let localpart = s
        .admin_user_id
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let (_, admin) = account(&s.admin_user_id).await;
    let mut obj = matrix_user(
        "admin",
        json!({"homeserverRef": {"name": "hs"}, "localpart": localpart}),
        json!({"userId": s.admin_user_id, "accountCreationTs": admin["creation_ts"]}),
    );
    obj["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    fake.put(obj.clone());
    let user: MatrixUser = serde_json::from_value(obj.clone()).unwrap();
    reconcile_user(Arc::new(user.clone()), context(client, &[&user]))
        .await
        .expect("cleanup lets go");
    assert!(
        fake.get(&common::fake_kube::path_of(&obj)).is_none(),
        "finalizer removed"
    );
    assert_eq!(account(&s.admin_user_id).await.1["deactivated"], false);
    assert_eq!(fake.event_reasons(), vec!["Retained"]);
}

/// A password digest as releases before the operator's key made them:
/// salted PBKDF2-HMAC-SHA256, 10,000 rounds.
fn legacy_digest(password: &str) -> String {
    let salt = *b"0123456789abcdef";
    let mut hash = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(10_000).unwrap(),
        &salt,
        password.as_bytes(),
        &mut hash,
    );
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("pbkdf2-sha256$10000${}${}", hex(&salt), hex(&hash))
}

/// Issue 15, point 10: the digest in status was an unkeyed PBKDF2 of the
/// password, which whoever reads status can brute-force offline. It is
/// keyed now; a digest of an earlier release that matches is replaced by a
/// keyed one without sending the password again (no session ends).
#[tokio::test]
async fn a_digest_of_an_earlier_release_is_rekeyed_without_sending_the_password() {
    let s = synapse();
    let lp = s.unique_localpart("ctl-rekey");
    s.register_user(&lp, "kept-password", false).await;
    let token = s.login(&lp, "kept-password").await.expect("login");
    let (_, acc) = account(&s.user_id(&lp)).await;
    let (client, fake) = cluster(json!({}));
    fake.put(secret("rekey-pw", "password", "kept-password"));
    let obj = matrix_user(
        "rekey",
        json!({"homeserverRef": {"name": "hs"}, "localpart": lp,
               "password": {"secretRef": {"name": "rekey-pw", "key": "password"}, "logoutDevicesOnChange": true}}),
        json!({"userId": s.user_id(&lp), "accountCreationTs": acc["creation_ts"],
               "passwordDigest": legacy_digest("kept-password")}),
    );
    let stored = reconcile_once(&fake, client, &obj).await;
    assert_eq!(ready_of(&stored).1, "InSync");
    let digest = stored.status.unwrap().password_digest.unwrap();
    assert!(digest.starts_with("hmac-sha256$"), "{digest}");
    assert_eq!(s.whoami_status(&token).await, 200, "the password was not sent again");
}

/// The key lives in a Secret of the operator's namespace: made once, the
/// same for every start and replica after.
#[tokio::test]
async fn the_digest_key_is_made_once_and_read_by_every_start() {
    use matrix_user_operator::controller::digest_key;
    let (client, fake) = FakeApiServer::start();
    let first = digest_key::load_or_create(client.clone(), "operator").await.unwrap();
    let again = digest_key::load_or_create(client.clone(), "operator").await.unwrap();
    assert_eq!(first.expose(), again.expose());
    let stored = fake
        .get(&format!(
            "/api/v1/namespaces/operator/secrets/{}",
            digest_key::SECRET_NAME
        ))
        .expect("the key's Secret");
    assert_eq!(stored["type"], "Opaque");
    let elsewhere = digest_key::load_or_create(client, "other").await.unwrap();
    assert_ne!(first.expose(), elsewhere.expose());
}
