//! Room memberships (`MatrixUser.spec.rooms`) on a real Synapse, through
//! the fake Kubernetes API server: public and invite-only rooms joined, a
//! room the admin is not in refused without holding the others back, an
//! unknown alias, a ban, a room removed from the list left as the user, a
//! room the user joined on their own left alone, a manual leave undone at
//! resync, deactivation and re-activation, and what a resync costs.
//! Every check of Synapse's side reads its own API.

use matrix_user_operator_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_kube::FakeApiServer;
use common::fixtures::{cluster_in, condition_of, matrix_user_in, reason_of, stored_user, wait_until};
use common::synapse;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use matrix_user_operator::api::{ManagedRoom, MatrixUser};
use matrix_user_operator::controller::{Config, Context, reconcile_user};
use matrix_user_operator::metrics::Metrics;
use reqwest::Method;
use serde_json::{Value, json};

const NS: &str = "rooms";

/// A room made by the admin (`preset`: `public_chat` or `private_chat`),
/// with `alias_name` if given. Returns its ID.
async fn admin_room(preset: &str, alias_name: Option<&str>) -> String {
    let s = synapse();
    room_of(&s.admin_token, preset, alias_name).await
}

async fn room_of(token: &str, preset: &str, alias_name: Option<&str>) -> String {
    let mut body = json!({"preset": preset});
    if let Some(a) = alias_name {
        body["room_alias_name"] = json!(a);
    }
    let (status, answer) = client_call(Method::POST, "/_matrix/client/v3/createRoom", token, body).await;
    assert_eq!(status, 200, "{answer}");
    answer["room_id"].as_str().unwrap().to_string()
}

/// A client API call as the holder of `token`. Synapse limits room
/// creation and joins per user (rc_room_creation, rc_joins): the tests make
/// more than its bursts, so they wait as they are told.
async fn client_call(method: Method, path: &str, token: &str, body: Value) -> (u16, Value) {
    for _ in 0..60 {
        let (status, answer) = synapse()
            .request(method.clone(), path, Some(token), Some(body.clone()))
            .await;
        if status != 429 {
            return (status, answer);
        }
        let wait = answer["retry_after_ms"].as_u64().unwrap_or(1000).min(10_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    panic!("{method} {path}: Synapse kept answering 429")
}

/// A token of `user_id`, from the admin login API.
async fn token_of(user_id: &str) -> String {
    let (status, answer) = synapse()
        .admin_post(&format!("/_synapse/admin/v1/users/{user_id}/login"), json!({}))
        .await;
    assert_eq!(status, 200, "{answer}");
    answer["access_token"].as_str().unwrap().to_string()
}

/// The rooms `user_id` is in, as Synapse says.
async fn joined(user_id: &str) -> Vec<String> {
    let (status, answer) = synapse()
        .admin_get(&format!("/_synapse/admin/v1/users/{user_id}/joined_rooms"))
        .await;
    assert_eq!(status, 200, "{answer}");
    let mut rooms: Vec<String> = serde_json::from_value(answer["joined_rooms"].clone()).unwrap();
    rooms.sort();
    rooms
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

struct Rig {
    fake: FakeApiServer,
    client: kube::Client,
    obj: Value,
    user_id: String,
}

impl Rig {
    async fn new(prefix: &str, rooms: Value) -> Self {
        let s = synapse();
        let localpart = s.unique_localpart(prefix);
        let (client, fake) = cluster_in(&[NS], json!({}));
        let obj = matrix_user_in(
            NS,
            "member",
            json!({"homeserverRef": {"name": "hs"}, "localpart": localpart, "rooms": rooms}),
            Value::Null,
        );
        fake.put(obj.clone());
        Rig {
            fake,
            client,
            obj,
            user_id: s.user_id(&localpart),
        }
    }

    /// Reconciles the MatrixUser as the fake server holds it; returns it
    /// as it is after.
    async fn reconcile(&self) -> MatrixUser {
        self.reconcile_counting(Metrics::new()).await
    }

    async fn reconcile_counting(&self, metrics: Metrics) -> MatrixUser {
        let user = stored_user(&self.fake, &self.obj);
        let mut writer = Writer::<MatrixUser>::default();
        writer.apply_watcher_event(&watcher::Event::Apply(user.clone()));
        let ctx = Arc::new(Context::new(
            self.client.clone(),
            Config::default(),
            writer.as_reader(),
            metrics,
        ));
        let _ = reconcile_user(Arc::new(user), ctx).await;
        stored_user(&self.fake, &self.obj)
    }

    /// Changes the spec (a new generation), as `kubectl apply` would.
    fn set_spec(&self, field: &str, value: Value) {
        let mut obj = self.fake.get(&common::fake_kube::path_of(&self.obj)).unwrap();
        obj["spec"][field] = value;
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        self.fake.put(obj);
    }

    /// The notes of the Events published with `reason`.
    fn notes(&self, reason: &str) -> Vec<String> {
        self.fake
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/events") && r.body["reason"] == reason)
            .map(|r| r.body["note"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// The admin requests counted, one line per endpoint and status class.
fn admin_calls(metrics: &Metrics) -> Vec<String> {
    let mut calls: Vec<String> = metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("matrix_user_operator_admin_requests_total{"))
        .map(str::to_string)
        .collect();
    calls.sort();
    calls
}

fn records(u: &MatrixUser) -> Vec<ManagedRoom> {
    u.status.clone().unwrap_or_default().rooms
}

#[tokio::test]
async fn listed_rooms_are_joined_and_one_that_cannot_be_is_named_without_holding_the_others_back() {
    let s = synapse();
    let tag = s.unique_localpart("r");
    let public = admin_room("public_chat", None).await;
    let private_alias = format!("#{tag}-team:{}", s.server_name);
    let private = admin_room("private_chat", Some(&format!("{tag}-team"))).await;
    // A private room the admin is not in: made by someone else.
    let owner = s.unique_localpart("room-owner");
    let owner_token = s.register_user(&owner, "owner-password", false).await;
    let elsewhere = room_of(&owner_token, "private_chat", None).await;
    let unknown_alias = format!("#{tag}-nosuch:{}", s.server_name);
    let rig = Rig::new("rooms-join", json!([public, private_alias, elsewhere, unknown_alias])).await;

    let user = rig.reconcile().await;
    // The public room and the invite-only one the admin is in are joined.
    assert_eq!(
        joined(&rig.user_id).await,
        sorted(vec![public.clone(), private.clone()])
    );
    let (status, reason, message) = condition_of(&user, "Ready").unwrap();
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "RoomNotJoinable"),
        "{message}"
    );
    assert_eq!(
        condition_of(&user, "Stalled").map(|c| c.0).as_deref(),
        Some("True"),
        "waits for a change"
    );
    assert!(
        message.contains(&elsewhere) && message.contains("not in room"),
        "{message}"
    );
    assert!(
        message.contains(&unknown_alias) && message.contains("M_NOT_FOUND"),
        "{message}"
    );
    assert!(message.contains("the others are joined"), "{message}");
    assert!(!message.contains(&s.admin_token), "{message}");
    let status = user.status.clone().unwrap();
    assert_eq!(status.joined_rooms, Some(2));
    assert_eq!(
        records(&user),
        vec![
            ManagedRoom {
                room_id: public.clone(),
                alias: None,
                joined: true
            },
            ManagedRoom {
                room_id: private.clone(),
                alias: Some(private_alias.clone()),
                joined: true
            },
        ]
    );
    let notes = rig.notes("JoinedRoom");
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains(&public) && notes[0].contains(&private_alias),
        "{notes:?}"
    );

    // Once the admin is invited and joins, the room follows at the next pass.
    let (code, body) = client_call(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{elsewhere}/invite"),
        &owner_token,
        json!({"user_id": s.admin_user_id}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = client_call(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{elsewhere}/join"),
        &s.admin_token,
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    rig.set_spec("rooms", json!([public, private_alias, elsewhere]));
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));
    assert!(joined(&rig.user_id).await.contains(&elsewhere));
    assert_eq!(user.status.unwrap().joined_rooms, Some(3));
}

#[tokio::test]
async fn a_banned_user_and_an_unknown_room_id_are_refused_and_wait() {
    let s = synapse();
    let public = admin_room("public_chat", None).await;
    let rig = Rig::new("rooms-ban", json!([])).await;
    rig.reconcile().await;
    let (code, body) = client_call(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{public}/ban"),
        &s.admin_token,
        json!({"user_id": rig.user_id}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let unknown = format!("!nosuchroom{}:{}", std::process::id(), s.server_name);
    rig.set_spec("rooms", json!([public, unknown]));
    let user = rig.reconcile().await;
    let (_, reason, message) = condition_of(&user, "Ready").unwrap();
    assert_eq!(reason, "RoomNotJoinable", "{message}");
    assert_eq!(condition_of(&user, "Stalled").map(|c| c.0).as_deref(), Some("True"));
    assert!(
        message.contains(&public) && message.contains("M_BAD_STATE"),
        "{message}"
    );
    assert!(message.contains(&unknown) && message.contains("HTTP 404"), "{message}");
    assert!(joined(&rig.user_id).await.is_empty());
    assert!(records(&user).is_empty());
}

#[tokio::test]
async fn a_room_removed_from_the_list_is_left_and_the_users_own_rooms_are_untouched() {
    let s = synapse();
    let a = admin_room("public_chat", None).await;
    let b = admin_room("private_chat", None).await;
    let own = admin_room("public_chat", None).await;
    let rig = Rig::new("rooms-leave", json!([a, b, own])).await;
    // The user is in `own` before the operator ever looks.
    let (status, body) = s
        .admin_put(&format!("/_synapse/admin/v2/users/{}", rig.user_id), json!({}))
        .await;
    assert_eq!(status, 201, "{body}");
    let token = token_of(&rig.user_id).await;
    let (code, body) = client_call(
        Method::POST,
        &format!("/_matrix/client/v3/join/{own}"),
        &token,
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    rig.fake.put({
        let mut o = rig.obj.clone();
        o["spec"]["adopt"] = json!(true);
        o
    });
    rig.fake.put(common::fixtures::homeserver_in(
        NS,
        "hs",
        json!({"allowAdoption": true}),
    ));
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));
    assert_eq!(
        joined(&rig.user_id).await,
        sorted(vec![a.clone(), b.clone(), own.clone()])
    );
    // `own` was joined by the user: not the operator's membership.
    let ids: Vec<String> = records(&user).into_iter().map(|r| r.room_id).collect();
    assert_eq!(sorted(ids), sorted(vec![a.clone(), b.clone()]));
    assert_eq!(user.status.unwrap().joined_rooms, Some(3));

    // Taken out of the list: `b` is left, as the user; `own` stays.
    rig.fake.clear_requests();
    rig.set_spec("rooms", json!([a]));
    let metrics = Metrics::new();
    let user = rig.reconcile_counting(metrics.clone()).await;
    // One token of the user, from the admin login API, ended once used.
    let calls = admin_calls(&metrics);
    for call in ["admin_login", "leave_room", "logout"] {
        let line = format!(r#"matrix_user_operator_admin_requests_total{{endpoint="{call}",status_class="2xx"}} 1"#);
        assert!(calls.contains(&line), "{call}: {calls:?}");
    }
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));
    assert_eq!(joined(&rig.user_id).await, sorted(vec![a.clone(), own.clone()]));
    let ids: Vec<String> = records(&user).into_iter().map(|r| r.room_id).collect();
    assert_eq!(ids, vec![a.clone()]);
    let left = rig.notes("LeftRoom");
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains(&b), "{left:?}");
    // The leave is the user's own membership event.
    let (code, state) = s
        .request(
            Method::GET,
            &format!("/_matrix/client/v3/rooms/{b}/state/m.room.member/{}", rig.user_id),
            Some(&s.admin_token),
            None,
        )
        .await;
    assert_eq!((code, state["membership"].as_str()), (200, Some("leave")), "{state}");

    // `rooms: []`: `a` is left too, `own` never.
    rig.set_spec("rooms", json!([]));
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync");
    assert_eq!(joined(&rig.user_id).await, vec![own.clone()]);
    assert!(records(&user).is_empty());
    // The user's own token still works: the leave used a token of its own.
    assert_eq!(s.whoami_status(&token).await, 200);
}

#[tokio::test]
async fn a_manual_leave_is_undone_at_resync_which_costs_one_more_get() {
    let s = synapse();
    let a = admin_room("public_chat", None).await;
    let alias_name = s.unique_localpart("lobby");
    let b = admin_room("public_chat", Some(&alias_name)).await;
    let alias = format!("#{alias_name}:{}", s.server_name);
    let rig = Rig::new("rooms-drift", json!([a, alias])).await;
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));

    // In sync: one GET of the account and one of its rooms, nothing else
    // (the alias is not looked up again).
    let metrics = Metrics::new();
    rig.fake.clear_requests();
    let user = rig.reconcile_counting(metrics.clone()).await;
    assert_eq!(reason_of(&user), "InSync");
    let calls = admin_calls(&metrics);
    assert_eq!(
        calls,
        vec![
            r#"matrix_user_operator_admin_requests_total{endpoint="get_user",status_class="2xx"} 1"#,
            r#"matrix_user_operator_admin_requests_total{endpoint="joined_rooms",status_class="2xx"} 1"#,
        ]
    );
    assert!(rig.notes("JoinedRoom").is_empty());

    // The user leaves `b` on their own: joined again at the next pass.
    let token = token_of(&rig.user_id).await;
    let (code, body) = client_call(
        Method::POST,
        &format!("/_matrix/client/v3/rooms/{b}/leave"),
        &token,
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync");
    assert_eq!(joined(&rig.user_id).await, sorted(vec![a.clone(), b.clone()]));
    let notes = rig.notes("JoinedRoom");
    assert_eq!(notes.len(), 1);
    assert!(notes[0].contains(&alias), "{notes:?}");
}

#[tokio::test]
async fn deactivation_leaves_every_room_and_reactivation_joins_the_listed_ones_again() {
    let a = admin_room("public_chat", None).await;
    let b = admin_room("private_chat", None).await;
    let rig = Rig::new("rooms-deact", json!([a, b])).await;
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));

    rig.set_spec("deactivated", json!(true));
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));
    // Synapse parts a deactivated account from its rooms in the background.
    wait_until(Duration::from_secs(30), "Synapse leaves every room", || async {
        joined(&rig.user_id).await.is_empty()
    })
    .await;
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));
    assert!(
        joined(&rig.user_id).await.is_empty(),
        "nothing joined for a deactivated account"
    );
    assert!(records(&user).iter().all(|r| !r.joined), "{:?}", records(&user));
    assert_eq!(records(&user).len(), 2);
    assert_eq!(user.status.unwrap().joined_rooms, Some(0));

    rig.set_spec("deactivated", json!(false));
    let user = rig.reconcile().await;
    assert_eq!(reason_of(&user), "InSync", "{:?}", condition_of(&user, "Ready"));
    assert_eq!(joined(&rig.user_id).await, sorted(vec![a, b]));
    assert!(records(&user).iter().all(|r| r.joined));
}
