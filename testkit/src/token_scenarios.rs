//! MatrixAccessToken scenarios on a MAS homeserver, written against
//! [`MasTarget`] only: `tests/mas_controller.rs` runs them against the
//! stand-in, `tests/mas_e2e.rs` against a real MAS. Each runs the token
//! controller's reconcile through the fake Kubernetes API server, and
//! checks MAS (its admin API) and Synapse (whoami) over HTTP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::Api;
use matrix_user_operator::api::{Homeserver, MatrixAccessToken};
use matrix_user_operator::controller::{
    Config, HOMESERVER_FINALIZER, ROTATE_ANNOTATION, reconcile_homeserver, reconcile_token,
};
use serde_json::{Value, json};

use super::fake_kube::{FakeApiServer, path_of};
use super::fixtures::{context_with, matrix_user_in, secret_in};
use super::mas::MasTarget;
use super::mas_scenarios::unique;

const NS: &str = "bots";

/// A cluster with a checked MAS Homeserver `hs` and its Secrets.
async fn cluster(t: &MasTarget) -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    let hs = json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": "hs", "namespace": NS, "generation": 1, "finalizers": [HOMESERVER_FINALIZER]},
        "spec": {
            "url": t.synapse_url,
            "adminTokenSecretRef": {"name": "admin", "key": "token"},
            "mas": {"url": t.mas_url, "clientId": t.client_id,
                    "clientSecretRef": {"name": "mas-client", "key": "secret"}},
        },
    });
    fake.put(hs.clone());
    fake.put(secret_in(NS, "admin", "token", &t.synapse_admin_token));
    fake.put(secret_in(NS, "mas-client", "secret", &t.client_secret));
    let obj: Homeserver = serde_json::from_value(fake.get(&path_of(&hs)).unwrap()).unwrap();
    let _ = reconcile_homeserver(Arc::new(obj), context_with(client.clone(), Config::default(), &[])).await;
    let checked: Homeserver = serde_json::from_value(fake.get(&path_of(&hs)).unwrap()).unwrap();
    let ready = checked
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.status.clone(), c.message.clone()));
    assert_eq!(
        ready.as_ref().map(|r| r.0.as_str()),
        Some("True"),
        "the MAS Homeserver is ready: {ready:?}"
    );
    (client, fake)
}

/// A MAS account (provisioned in Synapse) and a MatrixUser that owns it.
async fn bot(t: &MasTarget, fake: &FakeApiServer, prefix: &str) -> (String, String, String) {
    let localpart = unique(prefix);
    let user = t.create_user_directly(&localpart).await;
    let user_id = t.user_id(&localpart);
    wait(Duration::from_secs(15), "Synapse provisions the account", || async {
        t.synapse_user(&localpart).await.0 == 200
    })
    .await;
    fake.put(matrix_user_in(
        NS,
        &localpart,
        json!({"homeserverRef": {"name": "hs"}, "localpart": localpart, "userType": "bot"}),
        json!({"userId": user_id, "masUserId": user.id, "observedGeneration": 1,
               "conditions": [{"type": "Ready", "status": "True", "reason": "InSync", "message": "",
                               "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
    ));
    (localpart, user_id, user.id)
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

async fn reconcile(fake: &FakeApiServer, client: &kube::Client, obj: &Value) -> Option<MatrixAccessToken> {
    let current = stored(fake, obj)?;
    let _ = reconcile_token(Arc::new(current), context_with(client.clone(), Config::default(), &[])).await;
    stored(fake, obj)
}

fn reason(t: &MatrixAccessToken) -> (String, String) {
    t.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .map(|c| (c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

fn secret_key(fake: &FakeApiServer, name: &str, key: &str) -> Option<String> {
    let secret = fake.get(&format!("/api/v1/namespaces/{NS}/secrets/{name}"))?;
    let bytes = super::mas::util::base64_decode(secret["data"][key].as_str()?)?;
    String::from_utf8(bytes).ok()
}

async fn whoami(t: &MasTarget, token: &str) -> (u16, Value) {
    t.synapse_request(
        reqwest::Method::GET,
        "/_matrix/client/v3/account/whoami",
        Some(token),
        None,
    )
    .await
}

/// MAS's record of a personal session: `revoked_at` is null while active.
async fn session(t: &MasTarget, id: &str) -> Value {
    let (status, body) = t
        .admin()
        .await
        .get(&format!("/api/admin/v1/personal-sessions/{id}"))
        .await;
    assert_eq!(status, 200, "GET personal session {id}: {body}");
    body["data"]["attributes"].clone()
}

async fn wait<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Makes the token in Secret `name` two minutes old, as the record says.
fn backdate_issue(fake: &FakeApiServer, name: &str) {
    let path = format!("/api/v1/namespaces/{NS}/secrets/{name}");
    let mut secret = fake.get(&path).expect("the Secret");
    let then = std::time::SystemTime::now() - Duration::from_secs(120);
    let then = then.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    secret["metadata"]["annotations"]["matrix-operator.io/issued-at"] =
        json!(k8s_openapi::jiff::Timestamp::from_second(then).unwrap().to_string());
    fake.put(secret);
}

fn assert_not_in_object(fake: &FakeApiServer, obj: &Value, token: &str) {
    let object = fake.get(&path_of(obj)).map(|o| o.to_string()).unwrap_or_default();
    assert!(!object.contains(token), "the token is in the object");
    for r in fake.requests() {
        if !r.path.contains("/secrets") {
            assert!(!r.body.to_string().contains(token), "the token is in {}", r.line());
        }
    }
}

/// A personal session with a device: issued into the Secret, whoami
/// answers the user and the device; deleting the MatrixAccessToken revokes
/// the session, and the device (and so the token) goes from Synapse.
pub async fn token_issue_and_revoke_on_delete(t: &MasTarget) {
    let (client, fake) = cluster(t).await;
    let (localpart, user_id, _) = bot(t, &fake, "mxat-issue").await;
    let obj = token_obj("issue", &localpart, json!({"deviceId": "MXATBOT01", "validFor": "1h"}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let token = reconcile(&fake, &client, &obj).await.unwrap();
    let (r, message) = reason(&token);
    assert_eq!(r, "Issued", "{message}");
    let status = token.status.clone().unwrap();
    let session_id = status.session_id.clone().expect("status.sessionId");
    assert_eq!(status.device_id.as_deref(), Some("MXATBOT01"));
    assert!(status.expires_at.is_some());
    let access = secret_key(&fake, "issue-token", "accessToken").expect("a token in the Secret");
    let (code, who) = whoami(t, &access).await;
    assert_eq!(code, 200, "{who}");
    assert_eq!(who["user_id"], user_id.as_str());
    assert_eq!(who["device_id"], "MXATBOT01");
    let attributes = session(t, &session_id).await;
    assert!(attributes["revoked_at"].is_null(), "{attributes}");
    assert!(
        attributes["scope"]
            .as_str()
            .unwrap()
            .contains("urn:matrix:client:device:MXATBOT01")
    );
    assert_not_in_object(&fake, &obj, &access);

    let api: Api<MatrixAccessToken> = Api::namespaced(client.clone(), NS);
    api.delete("issue", &Default::default()).await.unwrap();
    assert!(reconcile(&fake, &client, &obj).await.is_none(), "gone once revoked");
    let attributes = session(t, &session_id).await;
    assert!(!attributes["revoked_at"].is_null(), "revoked in MAS: {attributes}");
    wait(Duration::from_secs(15), "the device's token stops working", || async {
        whoami(t, &access).await.0 == 401
    })
    .await;
}

/// A rotation makes a new personal session on the same device, and
/// revokes the old session only after the grace period; the device (and
/// the new token) outlive the old session.
pub async fn token_rotation_with_grace(t: &MasTarget) {
    let (client, fake) = cluster(t).await;
    let (localpart, user_id, _) = bot(t, &fake, "mxat-rotate").await;
    let obj = token_obj(
        "rotate",
        &localpart,
        json!({"deviceId": "MXATROT01", "rotationGracePeriod": "3s"}),
    );
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let first = reconcile(&fake, &client, &obj).await.unwrap();
    let first_session = first.status.clone().unwrap().session_id.unwrap();
    let first_token = secret_key(&fake, "rotate-token", "accessToken").unwrap();

    let mut annotated = fake.get(&path_of(&obj)).unwrap();
    annotated["metadata"]["annotations"] = json!({ROTATE_ANNOTATION: "1"});
    fake.put(annotated);
    let second = reconcile(&fake, &client, &obj).await.unwrap();
    let (r, message) = reason(&second);
    assert_eq!(r, "Issued", "{message}");
    let status = second.status.clone().unwrap();
    let second_session = status.session_id.clone().unwrap();
    assert_ne!(first_session, second_session, "a new session");
    assert_eq!(
        status.retiring.as_ref().and_then(|r| r.session_id.as_deref()),
        Some(first_session.as_str())
    );
    let second_token = secret_key(&fake, "rotate-token", "accessToken").unwrap();
    assert_ne!(first_token, second_token);
    assert_eq!(
        secret_key(&fake, "rotate-token", "previousAccessToken"),
        None,
        "MAS needs no token to revoke"
    );
    assert!(
        session(t, &first_session).await["revoked_at"].is_null(),
        "in its grace period"
    );
    assert_eq!(whoami(t, &first_token).await.0, 200);
    let (code, who) = whoami(t, &second_token).await;
    assert_eq!((code, who["device_id"].as_str()), (200, Some("MXATROT01")));

    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = reconcile(&fake, &client, &obj).await.unwrap();
    assert!(after.status.unwrap().retiring.is_none());
    assert!(
        !session(t, &first_session).await["revoked_at"].is_null(),
        "the old session is revoked after the grace period"
    );
    assert!(session(t, &second_session).await["revoked_at"].is_null());
    // The device stays: the new session names it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, who) = whoami(t, &second_token).await;
    assert_eq!(
        (code, who["user_id"].as_str(), who["device_id"].as_str()),
        (200, Some(user_id.as_str()), Some("MXATROT01"))
    );
}

/// A session revoked in MAS out of band is noticed and issued anew.
pub async fn token_revoked_out_of_band_is_reissued(t: &MasTarget) {
    let (client, fake) = cluster(t).await;
    let (localpart, _, _) = bot(t, &fake, "mxat-drift").await;
    let obj = token_obj("drift", &localpart, json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let first = reconcile(&fake, &client, &obj).await.unwrap();
    let first_session = first.status.unwrap().session_id.unwrap();
    let (status, body) = t
        .admin()
        .await
        .post(
            &format!("/api/admin/v1/personal-sessions/{first_session}/revoke"),
            json!({}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // A token refused moments after it was issued is not replaced at once
    // (no loop of issues): this one has been in use a while.
    backdate_issue(&fake, "drift-token");
    let again = reconcile(&fake, &client, &obj).await.unwrap();
    let (r, message) = reason(&again);
    assert_eq!(r, "Issued", "{message}");
    let status = again.status.unwrap();
    let second_session = status.session_id.unwrap();
    assert_ne!(first_session, second_session);
    assert!(status.retiring.is_none(), "a dead token has no grace");
    let token = secret_key(&fake, "drift-token", "accessToken").unwrap();
    assert_eq!(whoami(t, &token).await.0, 200);
}

/// A deactivated MatrixUser's session is revoked and none is issued.
pub async fn token_of_a_deactivated_user_is_revoked(t: &MasTarget) {
    let (client, fake) = cluster(t).await;
    let (localpart, _, _) = bot(t, &fake, "mxat-deact").await;
    let obj = token_obj("deact", &localpart, json!({}));
    fake.put(obj.clone());
    reconcile(&fake, &client, &obj).await;
    let first = reconcile(&fake, &client, &obj).await.unwrap();
    let session_id = first.status.unwrap().session_id.unwrap();
    let path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{localpart}");
    let mut user = fake.get(&path).unwrap();
    user["spec"]["deactivated"] = json!(true);
    fake.put(user);
    let after = reconcile(&fake, &client, &obj).await.unwrap();
    let (r, message) = reason(&after);
    assert_eq!(r, "UserDeactivated", "{message}");
    assert!(!session(t, &session_id).await["revoked_at"].is_null());
    assert_eq!(secret_key(&fake, "deact-token", "accessToken"), None);
}

/// Finding 2: the session IDs in the Secret's annotations are anyone's
/// who may patch Secrets in the namespace. One pointed at another bot's
/// session (as its previous one, its grace over, and as its current one)
/// makes the operator revoke nothing but its own sessions.
pub async fn token_revokes_no_session_named_in_a_tampered_secret(t: &MasTarget) {
    let (client, fake) = cluster(t).await;
    let (victim_user, _, _) = bot(t, &fake, "mxat-victim").await;
    let (own_user, _, _) = bot(t, &fake, "mxat-tamper").await;
    let victim = token_obj("victim", &victim_user, json!({}));
    let own = token_obj("tamper", &own_user, json!({}));
    fake.put(victim.clone());
    fake.put(own.clone());
    for obj in [&victim, &own] {
        reconcile(&fake, &client, obj).await;
        reconcile(&fake, &client, obj).await;
    }
    let victim_session = stored(&fake, &victim).unwrap().status.unwrap().session_id.unwrap();
    let own_session = stored(&fake, &own).unwrap().status.unwrap().session_id.unwrap();
    let path = format!("/api/v1/namespaces/{NS}/secrets/tamper-token");
    let mut secret = fake.get(&path).unwrap();
    let annotations = secret["metadata"]["annotations"].as_object_mut().unwrap();
    annotations.insert("matrix-operator.io/session-id".into(), json!(victim_session));
    annotations.insert("matrix-operator.io/previous-session-id".into(), json!(victim_session));
    annotations.insert(
        "matrix-operator.io/previous-revoke-at".into(),
        json!("2020-01-01T00:00:00Z"),
    );
    fake.put(secret);
    reconcile(&fake, &client, &own).await;
    assert!(
        session(t, &victim_session).await["revoked_at"].is_null(),
        "another's session named as the previous one is not revoked"
    );
    let api: Api<MatrixAccessToken> = Api::namespaced(client.clone(), NS);
    api.delete("tamper", &Default::default()).await.unwrap();
    assert!(reconcile(&fake, &client, &own).await.is_none(), "gone once revoked");
    assert!(
        session(t, &victim_session).await["revoked_at"].is_null(),
        "another's session named in the Secret is not revoked"
    );
    assert!(
        !session(t, &own_session).await["revoked_at"].is_null(),
        "its own session is revoked"
    );
}
