//! MatrixAccessToken on a real Synapse, through the fake Kubernetes API
//! server: issue, whoami, rotation with grace, revocation on deletion,
//! drift, a foreign Secret, the MatrixUser deactivated or deleted first,
//! a device token from the managed password, and namespace deletion.

use matrix_user_operator_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{cluster_in, context_with, matrix_user_in, run_operator, secret_in, wait_until};
use common::synapse;
use kube::{Api, ResourceExt};
use matrix_user_operator::api::{MatrixAccessToken, MatrixUser};
use matrix_user_operator::controller::{
    Config, ROTATE_ANNOTATION, TOKEN_FINALIZER, TOKEN_SECRET_FINALIZER, reconcile_token,
};
use serde_json::{Value, json};

const NS: &str = "chat";
const PASSWORD: &str = "Tortoise-Lantern-Quarry-58";

/// An account on the test Synapse and a MatrixUser that owns it (its
/// status as the MatrixUser controller writes it once in sync).
async fn bot(fake: &FakeApiServer, prefix: &str, spec_extra: Value) -> (String, String) {
    let s = synapse();
    let localpart = s.unique_localpart(prefix);
    let user_id = s.user_id(&localpart);
    let (status, body) = s
        .admin_put(
            &format!("/_synapse/admin/v2/users/{user_id}"),
            json!({"password": PASSWORD, "user_type": "bot"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let mut spec = json!({"homeserverRef": {"name": "hs"}, "localpart": localpart, "userType": "bot"});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    let user = matrix_user_in(
        NS,
        &localpart,
        spec,
        json!({"userId": user_id, "observedGeneration": 1,
               "conditions": [{"type": "Ready", "status": "True", "reason": "InSync", "message": "",
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
    );
    fake.put(user);
    (localpart, user_id)
}

fn token_obj(name: &str, user: &str, spec_extra: Value) -> Value {
    let mut spec = json!({"userRef": {"name": user}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), spec_extra.as_object()) {
        spec.extend(extra.clone());
    }
    json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixAccessToken",
           "metadata": {"name": name, "namespace": NS, "generation": 1, "uid": format!("uid-{name}")},
           "spec": spec})
}

fn stored(fake: &FakeApiServer, obj: &Value) -> Option<MatrixAccessToken> {
    fake.get(&path_of(obj)).map(|v| serde_json::from_value(v).unwrap())
}

async fn reconcile(fake: &FakeApiServer, client: &kube::Client, obj: &Value) -> MatrixAccessToken {
    let current = stored(fake, obj).expect("the MatrixAccessToken is stored");
    let ctx = context_with(client.clone(), Config::default(), &[]);
    let _ = reconcile_token(Arc::new(current), ctx).await;
    stored(fake, obj).expect("still stored")
}

fn ready(t: &MatrixAccessToken) -> (String, String, String) {
    let c = t
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("a Ready condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn condition(t: &MatrixAccessToken, type_: &str) -> String {
    t.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

/// A key of the Secret, decoded.
fn secret_key(fake: &FakeApiServer, name: &str, key: &str) -> Option<String> {
    let secret = fake.get(&secret_path(name))?;
    let b64 = secret["data"][key].as_str()?;
    let bytes = base64_decode(b64);
    Some(String::from_utf8(bytes).unwrap())
}

/// Makes the token in Secret `name` two minutes old, as the record says.
fn backdate_issue(fake: &FakeApiServer, name: &str) {
    let mut secret = fake.get(&secret_path(name)).expect("the Secret");
    let then = std::time::SystemTime::now() - Duration::from_secs(120);
    let then = then.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    secret["metadata"]["annotations"]["matrix-operator.io/issued-at"] =
        json!(k8s_openapi::jiff::Timestamp::from_second(then).unwrap().to_string());
    fake.put(secret);
}

fn base64_decode(s: &str) -> Vec<u8> {
    common::mas::util::base64_decode(s).expect("base64")
}

async fn whoami(token: &str) -> (u16, Value) {
    let s = synapse();
    let response = synapse::http_client()
        .get(format!("{}/_matrix/client/v3/account/whoami", s.base_url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, synapse::parse_body(&response.text().await.unwrap()))
}

/// Every place a token must never show: the object (status), the Events,
/// every request body the operator sent to the API server but the Secret's.
fn assert_nowhere_but_the_secret(fake: &FakeApiServer, obj: &Value, token: &str) {
    let object = fake.get(&path_of(obj)).map(|o| o.to_string()).unwrap_or_default();
    assert!(!object.contains(token), "the token is in the object: {object}");
    for r in fake.requests() {
        if r.path.contains("/secrets") {
            continue;
        }
        assert!(
            !r.body.to_string().contains(token),
            "the token is in {}: {}",
            r.line(),
            r.body
        );
    }
}

#[tokio::test]
async fn a_token_is_issued_into_an_owned_secret_and_answers_whoami_as_the_user() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, user_id) = bot(&fake, "tok-issue", json!({})).await;
    let obj = token_obj("notifier", &localpart, json!({"validFor": "720h"}));
    fake.put(obj.clone());
    let t = reconcile(&fake, &client, &obj).await;
    assert_eq!(t.finalizers(), [TOKEN_FINALIZER]);
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, message) = ready(&t);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Issued"), "{message}");
    assert_eq!(condition(&t, "Reconciling"), "False");
    assert_eq!(condition(&t, "Stalled"), "False");
    let st = t.status.clone().unwrap();
    assert_eq!(st.user_id.as_deref(), Some(user_id.as_str()));
    assert!(st.issued_at.is_some() && st.expires_at.is_some(), "{st:?}");
    assert_eq!(st.device_id, None);

    let secret = fake
        .get(&secret_path("notifier-token"))
        .expect("the default Secret name");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["kind"], "MatrixAccessToken");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-notifier");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(secret["metadata"]["finalizers"], json!([TOKEN_SECRET_FINALIZER]));
    let token = secret_key(&fake, "notifier-token", "accessToken").unwrap();
    assert_eq!(
        secret_key(&fake, "notifier-token", "userId").as_deref(),
        Some(user_id.as_str())
    );
    assert_eq!(
        secret_key(&fake, "notifier-token", "homeserverUrl").as_deref(),
        Some(synapse().base_url.as_str())
    );
    let (code, who) = whoami(&token).await;
    assert_eq!(code, 200, "{who}");
    assert_eq!(who["user_id"], user_id.as_str());
    assert_nowhere_but_the_secret(&fake, &obj, &token);

    // Steady: another pass keeps the token and writes nothing.
    fake.clear_requests();
    let _ = reconcile(&fake, &client, &obj).await;
    assert_eq!(
        secret_key(&fake, "notifier-token", "accessToken").as_deref(),
        Some(token.as_str())
    );
    let writes: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.is_write() && !r.path.contains("/events"))
        .map(|r| r.line())
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}

#[tokio::test]
async fn rotation_writes_a_new_token_and_revokes_the_old_one_after_the_grace_period() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, user_id) = bot(&fake, "tok-rotate", json!({})).await;
    let obj = token_obj("rotating", &localpart, json!({"rotationGracePeriod": "3s"}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    let first = secret_key(&fake, "rotating-token", "accessToken").unwrap();

    let mut annotated = fake.get(&path_of(&obj)).unwrap();
    annotated["metadata"]["annotations"] = json!({ROTATE_ANNOTATION: "1"});
    fake.put(annotated);
    let t = reconcile(&fake, &client, &obj).await;
    let second = secret_key(&fake, "rotating-token", "accessToken").unwrap();
    assert_ne!(first, second, "a new token");
    assert_eq!(whoami(&second).await.0, 200);
    assert_eq!(whoami(&first).await.0, 200, "the old one works during its grace period");
    let st = t.status.clone().unwrap();
    assert!(st.retiring.is_some(), "{st:?}");
    assert_eq!(st.rotation.as_deref(), Some("1"));
    assert_eq!(ready(&t).1, "Issued");
    assert_nowhere_but_the_secret(&fake, &obj, &first);
    assert_nowhere_but_the_secret(&fake, &obj, &second);

    // Before the grace period ends, another pass revokes nothing.
    reconcile(&fake, &client, &obj).await;
    assert_eq!(whoami(&first).await.0, 200);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t = reconcile(&fake, &client, &obj).await;
    assert_eq!(whoami(&first).await.0, 401, "the old token is revoked after its grace");
    let (code, who) = whoami(&second).await;
    assert_eq!((code, who["user_id"].as_str()), (200, Some(user_id.as_str())));
    assert!(t.status.unwrap().retiring.is_none());
    assert_eq!(secret_key(&fake, "rotating-token", "previousAccessToken"), None);
}

#[tokio::test]
async fn deleting_the_token_revokes_it_then_the_secret_goes() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, _) = bot(&fake, "tok-delete", json!({})).await;
    let obj = token_obj("deleted", &localpart, json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    let token = secret_key(&fake, "deleted-token", "accessToken").unwrap();
    assert_eq!(whoami(&token).await.0, 200);
    delete_token(&client, "deleted").await;
    let gone = reconcile_gone(&fake, &client, &obj).await;
    assert!(gone, "the MatrixAccessToken went once its token was revoked");
    assert_eq!(whoami(&token).await.0, 401, "revoked at the server");
    assert!(
        fake.get(&secret_path("deleted-token")).is_none(),
        "the Secret went with it"
    );
}

async fn delete_token(client: &kube::Client, name: &str) {
    let api: Api<MatrixAccessToken> = Api::namespaced(client.clone(), NS);
    api.delete(name, &Default::default()).await.unwrap();
}

/// Reconciles a MatrixAccessToken being deleted; whether it is gone after.
async fn reconcile_gone(fake: &FakeApiServer, client: &kube::Client, obj: &Value) -> bool {
    if let Some(current) = stored(fake, obj) {
        let ctx = context_with(client.clone(), Config::default(), &[]);
        let _ = reconcile_token(Arc::new(current), ctx).await;
    }
    stored(fake, obj).is_none()
}

#[tokio::test]
async fn a_token_logged_out_by_hand_is_issued_anew() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, _) = bot(&fake, "tok-drift", json!({})).await;
    let obj = token_obj("drifting", &localpart, json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    let first = secret_key(&fake, "drifting-token", "accessToken").unwrap();
    let response = synapse::http_client()
        .post(format!("{}/_matrix/client/v3/logout", synapse().base_url))
        .bearer_auth(&first)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(whoami(&first).await.0, 401);
    // A token refused moments after it was issued is not replaced at once
    // (no loop of issues): this one has been in use a while.
    backdate_issue(&fake, "drifting-token");
    let t = reconcile(&fake, &client, &obj).await;
    let second = secret_key(&fake, "drifting-token", "accessToken").unwrap();
    assert_ne!(first, second);
    assert_eq!(whoami(&second).await.0, 200);
    assert_eq!(ready(&t).1, "Issued");
    assert!(t.status.unwrap().retiring.is_none(), "a dead token has no grace");
}

#[tokio::test]
async fn a_secret_of_that_name_the_token_does_not_own_is_never_written() {
    let (client, fake) = FakeApiServer::start();
    let synapse_proxy = counted_synapse(&fake).await;
    let (localpart, _) = bot(&fake, "tok-foreign", json!({})).await;
    fake.put(secret_in(NS, "someone-elses", "accessToken", "theirs"));
    let obj = token_obj("foreign", &localpart, json!({"secretName": "someone-elses"}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    fake.clear_requests();
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, message) = ready(&t);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Conflict"), "{message}");
    assert_eq!(condition(&t, "Stalled"), "True");
    let secret = fake.get(&secret_path("someone-elses")).unwrap();
    assert_eq!(secret["stringData"]["accessToken"], "theirs");
    assert!(
        fake.requests()
            .iter()
            .all(|r| !(r.is_write() && r.path.contains("/secrets"))),
        "no write to the Secret"
    );
    // No token was issued at all: nothing to store it in (an admin-login
    // token has no device: count the logins).
    assert_eq!(admin_logins(&synapse_proxy), 0);
    assert_eq!(synapse_proxy.count("/_matrix/client/v3/login"), 0);
}

#[tokio::test]
async fn deactivating_the_matrixuser_revokes_its_token_and_issues_none() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, _) = bot(&fake, "tok-deact", json!({})).await;
    let obj = token_obj("deact", &localpart, json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    let token = secret_key(&fake, "deact-token", "accessToken").unwrap();
    let user_path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{localpart}");
    let mut user = fake.get(&user_path).unwrap();
    user["spec"]["deactivated"] = json!(true);
    fake.put(user);
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, message) = ready(&t);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "UserDeactivated"),
        "{message}"
    );
    assert!(message.contains(&localpart), "names the MatrixUser: {message}");
    assert_eq!(whoami(&token).await.0, 401, "revoked by the operator");
    assert_eq!(secret_key(&fake, "deact-token", "accessToken"), None);
    assert!(t.status.unwrap().user_id.is_none());
}

#[tokio::test]
async fn the_matrixuser_deleted_first_revokes_the_token_and_the_token_waits() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, _) = bot(&fake, "tok-userfirst", json!({})).await;
    let obj = token_obj("orphan", &localpart, json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    let token = secret_key(&fake, "orphan-token", "accessToken").unwrap();
    let user_path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{localpart}");
    let mut user = fake.get(&user_path).unwrap();
    user["metadata"]["finalizers"] = json!([]);
    fake.put(user);
    let users: Api<MatrixUser> = Api::namespaced(client.clone(), NS);
    users.delete(&localpart, &Default::default()).await.unwrap();
    assert!(fake.get(&user_path).is_none());
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, _) = ready(&t);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "UserNotFound"));
    assert_eq!(condition(&t, "Stalled"), "True");
    assert_eq!(whoami(&token).await.0, 401);
    // Deleting the token now needs nothing from the server.
    delete_token(&client, "orphan").await;
    assert!(reconcile_gone(&fake, &client, &obj).await);
}

#[tokio::test]
async fn a_matrixuser_not_ready_gets_no_token_and_the_reason_names_it() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let obj = token_obj("waiting", "nobody", json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, message) = ready(&t);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "UserNotFound"),
        "{message}"
    );
    assert!(message.contains("nobody"), "{message}");
    fake.put(matrix_user_in(
        NS,
        "nobody",
        json!({"homeserverRef": {"name": "hs"}}),
        json!({}),
    ));
    let t = reconcile(&fake, &client, &obj).await;
    let (_, reason, message) = ready(&t);
    assert_eq!(reason, "UserNotReady", "{message}");
    assert!(message.contains("nobody"), "{message}");
    assert_eq!(condition(&t, "Reconciling"), "True");
    assert!(fake.get(&secret_path("waiting-token")).is_none());
}

#[tokio::test]
async fn a_device_token_on_synapse_logs_in_with_the_managed_password() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    fake.put(secret_in(NS, "bot-password", "password", PASSWORD));
    let (localpart, user_id) = bot(
        &fake,
        "tok-device",
        json!({"password": {"secretRef": {"name": "bot-password", "key": "password"}}}),
    )
    .await;
    let obj = token_obj(
        "device",
        &localpart,
        json!({"deviceId": "NOTIFIERBOT01", "deviceDisplayName": "Notifier"}),
    );
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let t = reconcile(&fake, &client, &obj).await;
    assert_eq!(ready(&t).1, "Issued", "{:?}", ready(&t));
    assert_eq!(t.status.clone().unwrap().device_id.as_deref(), Some("NOTIFIERBOT01"));
    let token = secret_key(&fake, "device-token", "accessToken").unwrap();
    assert_eq!(
        secret_key(&fake, "device-token", "deviceId").as_deref(),
        Some("NOTIFIERBOT01")
    );
    let (code, who) = whoami(&token).await;
    assert_eq!(code, 200);
    assert_eq!(
        (who["user_id"].as_str(), who["device_id"].as_str()),
        (Some(user_id.as_str()), Some("NOTIFIERBOT01"))
    );
    assert_nowhere_but_the_secret(&fake, &obj, &token);
    assert_nowhere_but_the_secret(&fake, &obj, PASSWORD);

    // A rotation of a Synapse device token would end the device's keys:
    // refused, and the token stays.
    let mut annotated = fake.get(&path_of(&obj)).unwrap();
    annotated["metadata"]["annotations"] = json!({ROTATE_ANNOTATION: "x"});
    fake.put(annotated);
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, message) = ready(&t);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RotationUnsupported"),
        "{message}"
    );
    assert_eq!(condition(&t, "Stalled"), "True");
    assert_eq!(whoami(&token).await.0, 200);

    // Without a managed password there is no way to log in: InvalidSpec.
    let (other, _) = bot(&fake, "tok-nopw", json!({})).await;
    let obj = token_obj("nopw", &other, json!({"deviceId": "X1"}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let t = reconcile(&fake, &client, &obj).await;
    let (_, reason, message) = ready(&t);
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("password"), "{message}");
}

#[tokio::test]
async fn the_admins_own_account_is_refused_and_stalls() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let s = synapse();
    let admin_localpart = s
        .admin_user_id
        .trim_start_matches('@')
        .split(':')
        .next()
        .unwrap()
        .to_string();
    fake.put(matrix_user_in(
        NS,
        "admin-user",
        json!({"homeserverRef": {"name": "hs"}, "localpart": admin_localpart}),
        json!({"userId": s.admin_user_id, "observedGeneration": 1,
               "conditions": [{"type": "Ready", "status": "True", "reason": "InSync", "message": "",
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
    ));
    let obj = token_obj("self", "admin-user", json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let t = reconcile(&fake, &client, &obj).await;
    let (status, reason, message) = ready(&t);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TokenRefused"),
        "{message}"
    );
    assert_eq!(condition(&t, "Stalled"), "True");
    // The Secret is made before the token is asked for; it holds none.
    assert_eq!(secret_key(&fake, "self-token", "accessToken"), None);
}

#[tokio::test]
async fn the_operator_issues_and_a_namespace_deletion_revokes() {
    let (_client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, user_id) = bot(&fake, "tok-ns", json!({})).await;
    let obj = token_obj("ns-bot", &localpart, json!({}));
    fake.put(obj.clone());
    let stop = run_operator(&fake, Config::default());
    wait_until(Duration::from_secs(30), "a token in the Secret", || async {
        secret_key(&fake, "ns-bot-token", "accessToken").is_some()
    })
    .await;
    let token = secret_key(&fake, "ns-bot-token", "accessToken").unwrap();
    let (code, who) = whoami(&token).await;
    assert_eq!((code, who["user_id"].as_str()), (200, Some(user_id.as_str())));
    fake.delete_namespace(NS);
    wait_until(Duration::from_secs(60), "the namespace's objects gone", || async {
        stored(&fake, &obj).is_none() && fake.get(&secret_path("ns-bot-token")).is_none()
    })
    .await;
    assert_eq!(whoami(&token).await.0, 401, "revoked before the Secret went");
    let _ = stop.send(());
}

/// The operator binary, logging at debug, issues, rotates (the grace
/// over) and revokes a device token and a plain one: neither token, nor the
/// password it logged in with, is in its log, the objects or the Events.
#[tokio::test]
async fn the_operator_binary_logs_no_token_nor_password_at_debug() {
    let (_client, fake) = cluster_in(&[NS], json!({}));
    fake.put(secret_in(NS, "leak-password", "password", PASSWORD));
    let (localpart, _) = bot(
        &fake,
        "tok-leak",
        json!({"password": {"secretRef": {"name": "leak-password", "key": "password"}}}),
    )
    .await;
    let plain = token_obj("leak-plain", &localpart, json!({"rotationGracePeriod": "1s"}));
    let device = token_obj("leak-device", &localpart, json!({"deviceId": "LEAKBOT01"}));
    fake.put(plain.clone());
    fake.put(device.clone());
    let dir = std::env::temp_dir().join(format!("mxat-leaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = fake.kubeconfig_file(&dir);
    let log = dir.join("operator.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut operator = std::process::Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
        .args([
            "run",
            "--namespace",
            NS,
            "--leader-election",
            "off",
            "--health-addr",
            "0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "debug")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start the operator binary");
    let mut seen: Vec<String> = Vec::new();
    wait_until(Duration::from_secs(60), "both tokens issued", || async {
        secret_key(&fake, "leak-plain-token", "accessToken").is_some()
            && secret_key(&fake, "leak-device-token", "accessToken").is_some()
    })
    .await;
    seen.push(secret_key(&fake, "leak-plain-token", "accessToken").unwrap());
    seen.push(secret_key(&fake, "leak-device-token", "accessToken").unwrap());
    let mut annotated = fake.get(&path_of(&plain)).unwrap();
    annotated["metadata"]["annotations"] = json!({ROTATE_ANNOTATION: "1"});
    fake.put(annotated);
    wait_until(
        Duration::from_secs(60),
        "rotated, and the old token revoked",
        || async {
            let rotated = secret_key(&fake, "leak-plain-token", "accessToken").is_some_and(|t| t != seen[0]);
            rotated && secret_key(&fake, "leak-plain-token", "previousAccessToken").is_none()
        },
    )
    .await;
    seen.push(secret_key(&fake, "leak-plain-token", "accessToken").unwrap());
    assert_eq!(whoami(&seen[0]).await.0, 401, "the replaced token was revoked");
    let tokens: Api<MatrixAccessToken> = Api::namespaced(fake.client(), NS);
    for name in ["leak-plain", "leak-device"] {
        tokens.delete(name, &Default::default()).await.unwrap();
    }
    wait_until(Duration::from_secs(60), "both revoked and gone", || async {
        stored(&fake, &plain).is_none() && stored(&fake, &device).is_none()
    })
    .await;
    operator.kill().ok();
    operator.wait().ok();
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    std::fs::remove_dir_all(&dir).ok();
    assert!(output.contains("token"), "the log says something of the tokens");
    for t in &seen {
        assert_eq!(whoami(t).await.0, 401);
        assert!(!output.contains(t.as_str()), "a token is in the operator's log");
        assert_nowhere_but_the_secret(&fake, &plain, t);
    }
    assert!(!output.contains(PASSWORD), "the password is in the operator's log");
    let events: Vec<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/events"))
        .map(|r| r.body.to_string())
        .collect();
    assert!(events.iter().any(|e| e.contains("Rotated")), "{events:?}");
    for t in seen.iter().map(String::as_str).chain([PASSWORD]) {
        assert!(events.iter().all(|e| !e.contains(t)), "a secret in an Event");
    }
}

/// Finding 4: the Secret's current token removed by hand while a replaced
/// one is in its grace period: the replaced one is revoked, not dropped.
#[tokio::test]
async fn a_replaced_token_in_its_grace_is_revoked_when_the_current_one_is_removed_by_hand() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let (localpart, _) = bot(&fake, "tok-graceless", json!({})).await;
    let obj = token_obj("graceless", &localpart, json!({"rotationGracePeriod": "1h"}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    let first = secret_key(&fake, "graceless-token", "accessToken").unwrap();
    let mut annotated = fake.get(&path_of(&obj)).unwrap();
    annotated["metadata"]["annotations"] = json!({ROTATE_ANNOTATION: "1"});
    fake.put(annotated);
    reconcile(&fake, &client, &obj).await;
    let second = secret_key(&fake, "graceless-token", "accessToken").unwrap();
    assert_ne!(first, second);
    assert_eq!(whoami(&first).await.0, 200, "in its grace period");
    // Someone takes the current token out of the Secret.
    let mut secret = fake.get(&secret_path("graceless-token")).unwrap();
    secret["data"].as_object_mut().unwrap().remove("accessToken");
    fake.put(secret);
    let t = reconcile(&fake, &client, &obj).await;
    let third = secret_key(&fake, "graceless-token", "accessToken").unwrap();
    assert_ne!(third, second);
    assert_eq!(whoami(&third).await.0, 200);
    assert_eq!(
        whoami(&first).await.0,
        401,
        "the replaced token is revoked, not forgotten"
    );
    assert_eq!(secret_key(&fake, "graceless-token", "previousAccessToken"), None);
    assert!(t.status.unwrap().retiring.is_none());
}

/// Finding 1: a server that refuses every token it issues (a user locked
/// behind the operator's back, a broken introspection) gets no loop of
/// issue and revoke: the token just issued is not issued anew at once, and
/// the MatrixAccessToken says why.
#[tokio::test]
async fn a_server_refusing_the_token_it_just_issued_gets_no_loop_of_issues() {
    let s = synapse();
    let admin = s.admin_token.clone();
    let proxy = common::proxy::Proxy::start(&s.base_url, move |seen| {
        let user_whoami =
            seen.path.starts_with("/_matrix/client/v3/account/whoami") && seen.bearer.as_deref() != Some(&admin);
        if user_whoami {
            common::proxy::Misbehave::Respond {
                status: 401,
                content_type: "application/json",
                body: br#"{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed."}"#.to_vec(),
            }
        } else {
            common::proxy::Misbehave::Forward
        }
    })
    .await;
    let (_client, fake) = FakeApiServer::start();
    let mut hs = common::fixtures::homeserver_in(NS, "hs", json!({}));
    hs["spec"]["url"] = json!(proxy.url);
    fake.put(hs);
    fake.put(secret_in(NS, "admin", "token", &s.admin_token));
    let (localpart, _) = bot(&fake, "tok-loop", json!({})).await;
    let obj = token_obj("looping", &localpart, json!({}));
    fake.put(obj.clone());
    let stop = run_operator(&fake, Config::default());
    wait_until(Duration::from_secs(30), "a token in the Secret", || async {
        secret_key(&fake, "looping-token", "accessToken").is_some()
    })
    .await;
    // A window in which a loop would issue dozens.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let logins = proxy
        .seen()
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/_synapse/admin/v1/users/") && r.path.ends_with("/login"))
        .count();
    assert!(logins <= 2, "{logins} tokens issued in a few seconds: a loop");
    let t = stored(&fake, &obj).unwrap();
    let (status, reason, message) = ready(&t);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "TokenRejected"),
        "{message}"
    );
    assert_eq!(condition(&t, "Reconciling"), "True");
    let _ = stop.send(());
}

/// Finding 7: on Synapse two MatrixAccessTokens of one device would end
/// each other's token (a `/logout` deletes the device): the second is a
/// Conflict, and the first's token keeps working.
#[tokio::test]
async fn a_second_token_for_the_same_device_on_synapse_is_a_conflict() {
    let (client, fake) = cluster_in(&[NS], json!({}));
    fake.put(secret_in(NS, "shared-password", "password", PASSWORD));
    let (localpart, _) = bot(
        &fake,
        "tok-shared",
        json!({"password": {"secretRef": {"name": "shared-password", "key": "password"}}}),
    )
    .await;
    let first = token_obj("dev-a", &localpart, json!({"deviceId": "SHAREDBOT01"}));
    let second = token_obj("dev-b", &localpart, json!({"deviceId": "SHAREDBOT01"}));
    fake.put(first.clone());
    fake.put(second.clone());
    reconcile(&fake, &client, &first).await;
    let t = reconcile(&fake, &client, &first).await;
    assert_eq!(ready(&t).1, "Issued", "{:?}", ready(&t));
    let token = secret_key(&fake, "dev-a-token", "accessToken").unwrap();
    reconcile(&fake, &client, &second).await;
    let t = reconcile(&fake, &client, &second).await;
    let (status, reason, message) = ready(&t);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Conflict"), "{message}");
    assert!(message.contains("dev-a"), "names the other: {message}");
    assert_eq!(condition(&t, "Stalled"), "True");
    assert!(secret_key(&fake, "dev-b-token", "accessToken").is_none());
    assert_eq!(whoami(&token).await.0, 200, "the first token still works");
    // The first keeps its token at its next pass.
    let t = reconcile(&fake, &client, &first).await;
    assert_eq!(ready(&t).1, "Issued", "{:?}", ready(&t));
    assert_eq!(
        secret_key(&fake, "dev-a-token", "accessToken").as_deref(),
        Some(token.as_str())
    );
}

/// A Synapse behind a proxy that counts the operator's requests, and a
/// cluster whose Homeserver `hs` points at it.
async fn counted_synapse(fake: &FakeApiServer) -> common::proxy::Proxy {
    let s = synapse();
    let proxy = common::proxy::Proxy::start(&s.base_url, |_| common::proxy::Misbehave::Forward).await;
    let mut hs = common::fixtures::homeserver_in(NS, "hs", json!({}));
    hs["spec"]["url"] = json!(proxy.url);
    fake.put(hs);
    fake.put(secret_in(NS, "admin", "token", &s.admin_token));
    proxy
}

fn admin_logins(proxy: &common::proxy::Proxy) -> usize {
    proxy
        .seen()
        .iter()
        .filter(|r| r.method == "POST" && r.path.starts_with("/_synapse/admin/v1/users/") && r.path.ends_with("/login"))
        .count()
}

/// A kube client through a proxy that answers 403 (a quota, an admission
/// policy) to the Secret writes `refuse` picks.
async fn kube_refusing(
    fake: &FakeApiServer,
    refuse: impl Fn(&common::proxy::Seen) -> bool + Send + Sync + 'static,
) -> (kube::Client, common::proxy::Proxy) {
    let proxy = common::proxy::Proxy::start(&fake.url(), move |seen| {
        if refuse(seen) {
            common::proxy::Misbehave::Respond {
                status: 403,
                content_type: "application/json",
                body: br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"exceeded quota","reason":"Forbidden","code":403}"#.to_vec(),
            }
        } else {
            common::proxy::Misbehave::Forward
        }
    })
    .await;
    let client = kube::Client::try_from(kube::Config::new(proxy.url.parse().unwrap())).unwrap();
    (client, proxy)
}

/// Finding 5: a Secret that cannot be created gets no token issued (and
/// revoked) at every pass: the Secret is made before the token.
#[tokio::test]
async fn a_secret_that_cannot_be_created_gets_no_token_issued() {
    let (_, fake) = FakeApiServer::start();
    let synapse_proxy = counted_synapse(&fake).await;
    let (localpart, _) = bot(&fake, "tok-quota", json!({})).await;
    let obj = token_obj("quota", &localpart, json!({}));
    fake.put(obj.clone());
    let (client, _kube) = kube_refusing(&fake, |seen| seen.method == "POST" && seen.path.contains("/secrets")).await;
    for _ in 0..3 {
        reconcile(&fake, &client, &obj).await;
    }
    let t = stored(&fake, &obj).unwrap();
    assert_eq!(ready(&t).0, "False", "{:?}", ready(&t));
    assert_eq!(
        admin_logins(&synapse_proxy),
        0,
        "no token issued without a Secret to hold it"
    );
}

/// Finding 8: a token the Secret does not take (its write refused) is
/// revoked at once: recorded or revoked, never live and unrecorded.
#[tokio::test]
async fn a_token_the_secret_does_not_take_is_revoked() {
    let (_, fake) = FakeApiServer::start();
    let synapse_proxy = counted_synapse(&fake).await;
    let (localpart, _) = bot(&fake, "tok-unrecorded", json!({})).await;
    let obj = token_obj("unrecorded", &localpart, json!({}));
    fake.put(obj.clone());
    let (client, _kube) = kube_refusing(&fake, |seen| {
        seen.method == "PATCH" && seen.path.contains("/secrets/unrecorded-token")
    })
    .await;
    reconcile(&fake, &client, &obj).await;
    reconcile(&fake, &client, &obj).await;
    assert_eq!(admin_logins(&synapse_proxy), 1, "one token issued");
    let logouts = synapse_proxy.count("/_matrix/client/v3/logout");
    assert_eq!(logouts, 1, "and revoked, the Secret not taking it");
    assert_eq!(secret_key(&fake, "unrecorded-token", "accessToken"), None);
}
