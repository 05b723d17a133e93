//! The controllers with a Homeserver whose Synapse delegates to MAS: the
//! in-process MAS stand-in in front of a real MAS-mode Synapse, and the
//! fake Kubernetes API server.

use matrix_user_operator_testkit as common;

use std::sync::Arc;

use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{matrix_user_in, secret_in};
use common::mas::mas_standin;
use common::mas_scenarios::{STRONG, unique};
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use matrix_user_operator::api::{Homeserver, MatrixUser};
use matrix_user_operator::controller::{
    ADMIN_TOKEN_FINALIZER, Config, Context, HOMESERVER_FINALIZER, reconcile_homeserver, reconcile_user,
};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};

const NS: &str = "chat";

fn context(client: kube::Client, users: &[&MatrixUser]) -> Arc<Context> {
    let mut writer = Writer::<MatrixUser>::default();
    for u in users {
        writer.apply_watcher_event(&watcher::Event::Apply((*u).clone()));
    }
    Arc::new(Context::new(
        client,
        Config::default(),
        writer.as_reader(),
        Metrics::new(),
    ))
}

/// A Homeserver on the MAS-mode Synapse, with `spec.mas` or without.
fn homeserver(with_mas: bool) -> Value {
    let t = mas_standin().target();
    let mut spec = json!({
        "url": t.synapse_url,
        "adminTokenSecretRef": {"name": "admin", "key": "token"},
        "policy": {"allowAdminUsers": true},
    });
    if with_mas {
        spec["mas"] = json!({
            "url": t.mas_url,
            "clientId": t.client_id,
            "clientSecretRef": {"name": "mas-client", "key": "secret"},
        });
    }
    json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": "hs", "namespace": NS, "generation": 1, "finalizers": [HOMESERVER_FINALIZER]},
        "spec": spec,
    })
}

/// A cluster with the Homeserver and its Secrets, the Homeserver checked
/// once; returns its Ready reason and message.
async fn checked_homeserver(with_mas: bool) -> (kube::Client, FakeApiServer, Homeserver) {
    let t = mas_standin().target();
    let (client, fake) = FakeApiServer::start();
    let hs = homeserver(with_mas);
    fake.put(hs.clone());
    fake.put(secret_in(NS, "admin", "token", &t.synapse_admin_token));
    fake.put(secret_in(NS, "mas-client", "secret", &t.client_secret));
    let obj: Homeserver = serde_json::from_value(hs.clone()).unwrap();
    let _ = reconcile_homeserver(Arc::new(obj), context(client.clone(), &[])).await;
    let stored: Homeserver = serde_json::from_value(fake.get(&path_of(&hs)).unwrap()).unwrap();
    (client, fake, stored)
}

fn ready(hs: &Homeserver) -> (String, String, String) {
    let c = hs
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
        .expect("a Ready condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

#[tokio::test]
async fn a_delegating_synapse_without_spec_mas_is_delegates_to_mas() {
    let (_, _, hs) = checked_homeserver(false).await;
    let (status, reason, message) = ready(&hs);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "DelegatesToMAS"),
        "{message}"
    );
    assert!(message.contains("spec.mas"), "the message says what to do: {message}");
    let stalled = hs
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Stalled");
    assert_eq!(
        stalled.map(|c| c.status.as_str()),
        Some("True"),
        "it waits for a spec change"
    );
}

#[tokio::test]
async fn a_matrixuser_on_a_mas_homeserver_is_created_in_mas_and_then_in_sync() {
    let t = mas_standin().target();
    let (client, fake, hs) = checked_homeserver(true).await;
    let (status, reason, message) = ready(&hs);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Connected"), "{message}");
    let hs_status = hs.status.as_ref().unwrap();
    assert_eq!(hs_status.backend.as_deref(), Some("MAS"));
    assert!(hs_status.mas_version.is_some(), "{hs_status:?}");
    // Both Secrets are held, so that a namespace deletion leaves them
    // readable until the MatrixUsers' deletion policies (in MAS) ran.
    assert_eq!(
        hs_status.held_mas_secret.as_deref(),
        Some("mas-client"),
        "{hs_status:?}"
    );
    for name in ["admin", "mas-client"] {
        let secret = fake.get(&path_of(&secret_in(NS, name, "k", "v"))).expect("the Secret");
        assert!(
            secret["metadata"]["finalizers"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == ADMIN_TOKEN_FINALIZER)),
            "{name} is held: {}",
            secret["metadata"]
        );
    }

    let lp = unique("ctl");
    fake.put(secret_in(NS, "pw", "password", STRONG));
    let user = matrix_user_in(
        NS,
        &lp,
        json!({
            "homeserverRef": {"name": "hs"},
            "displayName": "Through The Controller",
            "password": {"secretRef": {"name": "pw", "key": "password"}},
            "threepids": [{"medium": "email", "address": format!("{lp}@example.org")}],
        }),
        Value::Null,
    );
    fake.put(user.clone());
    for _ in 0..2 {
        let current: MatrixUser = serde_json::from_value(fake.get(&path_of(&user)).unwrap()).unwrap();
        reconcile_user(Arc::new(current.clone()), context(client.clone(), &[&current]))
            .await
            .expect("reconcile");
    }
    let stored: MatrixUser = serde_json::from_value(fake.get(&path_of(&user)).unwrap()).unwrap();
    let status = stored.status.as_ref().expect("a status");
    let c = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "InSync"),
        "{}",
        c.message
    );
    assert_eq!(status.user_id.as_deref(), Some(t.user_id(&lp).as_str()));
    let mas = t.get_user_by_username(&lp).await.expect("the MAS user");
    assert_eq!(status.mas_user_id.as_deref(), Some(mas.id.as_str()), "{status:?}");
    assert_eq!(t.user_emails(&mas.id).await, vec![format!("{lp}@example.org")]);
    t.login(&lp, STRONG).await.expect("password login through MAS");
    let (_, s) = t.synapse_user(&lp).await;
    assert_eq!(s["displayname"], "Through The Controller", "{s}");
}

/// `spec.rooms` through the controller on a MAS Homeserver: joined with
/// Synapse's admin join API, recorded, and left (as the user, with a MAS
/// personal session) when taken out of the list.
#[tokio::test]
async fn rooms_of_a_matrixuser_on_a_mas_homeserver_are_joined_and_left() {
    let t = mas_standin().target();
    let (client, fake, _) = checked_homeserver(true).await;
    let (status, body) = t
        .synapse_request(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&t.synapse_admin_token),
            Some(json!({"preset": "public_chat"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let room = body["room_id"].as_str().unwrap().to_string();
    let lp = unique("ctl-rooms");
    let user = matrix_user_in(
        NS,
        &lp,
        json!({"homeserverRef": {"name": "hs"}, "rooms": [room]}),
        Value::Null,
    );
    fake.put(user.clone());
    let pass = || async {
        let current: MatrixUser = serde_json::from_value(fake.get(&path_of(&user)).unwrap()).unwrap();
        let _ = reconcile_user(Arc::new(current.clone()), context(client.clone(), &[&current])).await;
        let stored: MatrixUser = serde_json::from_value(fake.get(&path_of(&user)).unwrap()).unwrap();
        stored
    };
    let joined = |body: Value| body["joined_rooms"].clone();
    let stored = pass().await;
    let status = stored.status.clone().unwrap();
    let c = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(c.reason, "InSync", "{}", c.message);
    assert_eq!(status.rooms.len(), 1, "{status:?}");
    assert_eq!(status.joined_rooms, Some(1));
    let user_id = t.user_id(&lp);
    let (_, body) = t
        .synapse_admin_get(&format!("/_synapse/admin/v1/users/{user_id}/joined_rooms"))
        .await;
    assert_eq!(joined(body), json!([room]));

    let mut obj = fake.get(&path_of(&user)).unwrap();
    obj["spec"]["rooms"] = json!([]);
    obj["metadata"]["generation"] = json!(2);
    fake.put(obj);
    let stored = pass().await;
    let status = stored.status.clone().unwrap();
    let c = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(c.reason, "InSync", "{}", c.message);
    assert!(status.rooms.is_empty(), "{status:?}");
    let (_, body) = t
        .synapse_admin_get(&format!("/_synapse/admin/v1/users/{user_id}/joined_rooms"))
        .await;
    assert_eq!(joined(body), json!([]));
    let mas = t.get_user_by_username(&lp).await.expect("the MAS user");
    let sessions = mas_standin().personal_sessions_of(&mas.id);
    assert_eq!(sessions.len(), 1, "one session for the leave: {sessions:?}");
    assert!(sessions[0].1, "the leave's session is revoked: {sessions:?}");
}

// The MatrixAccessToken scenarios (testkit/src/token_scenarios.rs), which
// tests/mas_e2e.rs runs unchanged against a real MAS.

#[tokio::test]
async fn token_issue_and_revoke_on_delete() {
    common::token_scenarios::token_issue_and_revoke_on_delete(&mas_standin().target()).await;
}

#[tokio::test]
async fn token_rotation_with_grace() {
    common::token_scenarios::token_rotation_with_grace(&mas_standin().target()).await;
}

#[tokio::test]
async fn token_revoked_out_of_band_is_reissued() {
    common::token_scenarios::token_revoked_out_of_band_is_reissued(&mas_standin().target()).await;
}

#[tokio::test]
async fn token_of_a_deactivated_user_is_revoked() {
    common::token_scenarios::token_of_a_deactivated_user_is_revoked(&mas_standin().target()).await;
}

#[tokio::test]
async fn token_revokes_no_session_named_in_a_tampered_secret() {
    common::token_scenarios::token_revokes_no_session_named_in_a_tampered_secret(&mas_standin().target()).await;
}
