//! The MAS backend against the in-process MAS stand-in
//! (`testkit/src/mas/`) and the real Synapse it provisions, in MAS mode.
//! The scenarios are `testkit/src/mas_scenarios.rs`, which
//! `tests/mas_e2e.rs` runs unchanged against a real MAS; the tests after
//! them use knobs only the stand-in has.

use matrix_user_operator_testkit as common;

use common::mas::mas_standin;
use common::mas_scenarios::{self as scenarios, STRONG, backend, unique};
use matrix_user_operator::account::UserId;
use matrix_user_operator::apply::{Progress, Unguarded, sync_account};
use matrix_user_operator::backend::{AccountBackend, Parts};
use matrix_user_operator::plan::{Authority, Desired, DesiredPassword};
use matrix_user_operator::secret::SecretString;

#[tokio::test]
async fn create_with_every_field_then_steady() {
    scenarios::create_with_every_field_then_steady(&mas_standin().target()).await;
}

#[tokio::test]
async fn every_field_changed() {
    scenarios::every_field_changed(&mas_standin().target()).await;
}

#[tokio::test]
async fn lock_and_unlock() {
    scenarios::lock_and_unlock(&mas_standin().target()).await;
}

#[tokio::test]
async fn deactivate_and_reactivate() {
    scenarios::deactivate_and_reactivate(&mas_standin().target()).await;
}

#[tokio::test]
async fn deletion_policies() {
    scenarios::deletion_policies(&mas_standin().target()).await;
}

#[tokio::test]
async fn adoption_refused_then_allowed() {
    scenarios::adoption_refused_then_allowed(&mas_standin().target()).await;
}

#[tokio::test]
async fn conflicts() {
    scenarios::conflicts(&mas_standin().target()).await;
}

#[tokio::test]
async fn password_change_logs_out_only_when_asked() {
    scenarios::password_change_logs_out_only_when_asked(&mas_standin().target()).await;
}

#[tokio::test]
async fn refusals_of_mas_mode() {
    scenarios::refusals_of_mas_mode(&mas_standin().target()).await;
}

#[tokio::test]
async fn a_resync_reads_only_what_the_spec_manages() {
    scenarios::a_resync_reads_only_what_the_spec_manages(&mas_standin().target()).await;
}

#[tokio::test]
async fn rooms_joined_left_and_joined_again() {
    scenarios::rooms_joined_left_and_joined_again(&mas_standin().target()).await;
}

#[tokio::test]
async fn observe_compares_and_never_writes() {
    scenarios::observe_compares_and_never_writes(&mas_standin().target()).await;
}

/// The personal session made to leave a room is revoked once the leave is
/// done: no token of the user outlives the pass.
#[tokio::test]
async fn the_session_made_to_leave_rooms_is_revoked() {
    use matrix_user_operator::api::RoomName;
    use matrix_user_operator::apply::sync_rooms;
    use matrix_user_operator::plan::Desired;
    let standin = mas_standin();
    let t = standin.target();
    let b = backend(&t);
    let lp = unique("leave-session");
    let id = matrix_user_operator::account::UserId::new(&lp, &t.server_name).unwrap();
    let d = Desired::existing(id.clone());
    let mut progress = matrix_user_operator::apply::Progress::default();
    let fresh = matrix_user_operator::plan::Authority {
        admin_allowed: true,
        ..Default::default()
    };
    let account = matrix_user_operator::apply::sync_account(
        &b,
        &d,
        fresh,
        &mut matrix_user_operator::apply::Unguarded,
        &mut progress,
    )
    .await
    .expect("the account");
    let (status, body) = t
        .synapse_request(
            reqwest::Method::POST,
            "/_matrix/client/v3/createRoom",
            Some(&t.synapse_admin_token),
            Some(serde_json::json!({"preset": "public_chat"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let room = RoomName(body["room_id"].as_str().unwrap().to_string());
    let joined = sync_rooms(&b, &account, &id, std::slice::from_ref(&room), &[], "leave test").await;
    assert_eq!(joined.joined.len(), 1, "{joined:?}");
    let left = sync_rooms(&b, &account, &id, &[], &joined.records, "leave test").await;
    assert_eq!(left.left.len(), 1, "{left:?}");
    let actor = account.account_id.clone().expect("MAS's ID");
    assert_eq!(
        standin.personal_sessions_of(&actor),
        vec![("leave test".to_string(), true)]
    );
}

/// An expired admin token (MAS answers 401) is renewed once, and the call
/// goes through.
#[tokio::test]
async fn an_expired_admin_token_is_renewed() {
    use matrix_user_operator::backend::RequestObserver;
    use matrix_user_operator::backend::mas::{MasBackend, MasClient, MasConfig};
    use matrix_user_operator::synapse::{ClientConfig, SynapseClient};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let standin = mas_standin();
    let t = standin.target();
    // This client's own token requests: the stand-in is shared by the
    // tests running at once, whose clients renew their tokens too.
    let token_requests = std::sync::Arc::new(AtomicUsize::new(0));
    let counting = token_requests.clone();
    let mut config = MasConfig::new(&t.mas_url, &t.client_id, SecretString::new(&t.client_secret));
    config.observer = Some(RequestObserver(std::sync::Arc::new(move |endpoint, _, _| {
        if endpoint == "mas_token" {
            counting.fetch_add(1, Ordering::SeqCst);
        }
    })));
    let synapse = SynapseClient::new(ClientConfig::new(
        &t.synapse_url,
        SecretString::new(&t.synapse_admin_token),
    ))
    .expect("a Synapse client");
    let b = MasBackend::new(MasClient::new(config).expect("a MAS client"), synapse);
    let id = UserId::new(&unique("token"), &t.server_name).unwrap();
    assert!(b.read(&id, Parts::ALL).await.expect("a first read").is_none());
    assert_eq!(token_requests.load(Ordering::SeqCst), 1);
    standin.expire_admin_tokens();
    assert!(b.read(&id, Parts::ALL).await.expect("a read after expiry").is_none());
    assert_eq!(token_requests.load(Ordering::SeqCst), 2, "one new token");
}

/// In sync, a sync sends MAS nothing but GETs.
#[tokio::test]
async fn a_steady_state_sends_mas_no_write() {
    let standin = mas_standin();
    let t = standin.target();
    let b = backend(&t);
    let lp = unique("steady");
    let mut d = Desired::existing(UserId::new(&lp, &t.server_name).unwrap());
    d.displayname = Some("Steady".into());
    d.locked = Some(false);
    d.admin = Some(false);
    d.threepids = Some(vec![matrix_user_operator::account::Threepid {
        medium: "email".into(),
        address: format!("{lp}@example.org"),
    }]);
    d.password = Some(DesiredPassword {
        value: SecretString::new(STRONG),
        applied: false,
        logout_devices: false,
    });
    let owned = Authority {
        owned: true,
        ..Authority::default()
    };
    let mut p = Progress::default();
    sync_account(&b, &d, Authority::default(), &mut Unguarded, &mut p)
        .await
        .expect("the first sync");
    if let Some(pw) = d.password.as_mut() {
        pw.applied = true;
    }
    standin.clear_requests();
    let mut p = Progress::default();
    sync_account(&b, &d, owned, &mut Unguarded, &mut p)
        .await
        .expect("the steady sync");
    assert_eq!(p.writes, 0, "{p:?}");
    let writes: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| r.method != http::Method::GET && r.path != "/oauth2/token" && r.path != "/oauth2/introspect")
        .collect();
    assert!(writes.is_empty(), "MAS got writes: {writes:?}");
}

#[tokio::test]
async fn import_pages_through_every_account() {
    scenarios::import_pages_through_every_account(&mas_standin().target()).await;
}
