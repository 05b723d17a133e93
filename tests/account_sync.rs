//! The library's Synapse client and sync loop against a real Synapse
//! (see `testkit/src/synapse.rs`). Every check of Synapse's state reads the
//! raw JSON of `GET /_synapse/admin/v2/users/<id>`, independent of the
//! library's own decoding.

use matrix_user_operator_testkit as common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use matrix_user_operator::account::Account;
use matrix_user_operator::api::{DeletionPolicy, MatrixUserSpec, UserType};
use matrix_user_operator::apply::{
    Halt, PendingOutcome, Progress, SyncError, Unguarded, Write, WriteGuard, delete_account, sync_account,
};
use matrix_user_operator::backend::BackendError;
use matrix_user_operator::plan::{
    Authority, DeletionAction, Desired, DesiredPassword, PendingCreation, Refusal, Untouched, desired_from_spec,
};
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::synapse::{
    ClientConfig, ErrorClass, ExternalId, RequestObserver, SynapseClient, Threepid, UserId,
};
use serde_json::{Value, json};

use common::{SynapseServer, synapse};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn client(s: &SynapseServer) -> SynapseClient {
    client_with_token(s, &s.admin_token)
}

fn client_with_token(s: &SynapseServer, token: &str) -> SynapseClient {
    SynapseClient::new(ClientConfig::new(&s.base_url, SecretString::new(token)))
        .expect("a client for the test homeserver")
}

fn user_id(s: &SynapseServer, localpart: &str) -> UserId {
    UserId::new(localpart, &s.server_name).expect("a valid user ID")
}

/// A new localpart and its user ID.
fn new_user(s: &SynapseServer, prefix: &str) -> (String, UserId) {
    let localpart = s.unique_localpart(prefix);
    let id = user_id(s, &localpart);
    (localpart, id)
}

/// Manages nothing but the account's existence.
fn desired(id: &UserId) -> Desired {
    Desired::existing(id.clone())
}

fn password(value: &str, applied: bool, logout_devices: bool) -> DesiredPassword {
    DesiredPassword {
        value: SecretString::new(value),
        applied,
        logout_devices,
    }
}

fn email(address: &str) -> Threepid {
    Threepid {
        medium: "email".into(),
        address: address.into(),
    }
}

fn ext(auth_provider: &str, external_id: &str) -> ExternalId {
    ExternalId {
        auth_provider: auth_provider.into(),
        external_id: external_id.into(),
    }
}

/// The account was created for (or adopted by) the resource.
const OWNED: Authority = Authority {
    owned: true,
    adopt_requested: false,
    adoption_allowed: false,
    admin_allowed: false,
    owned_creation_ts: None,
    pending_creation: None,
};

/// A resource that has not recorded an account yet.
const FRESH: Authority = Authority {
    owned: false,
    adopt_requested: false,
    adoption_allowed: false,
    admin_allowed: false,
    owned_creation_ts: None,
    pending_creation: None,
};

async fn sync(c: &SynapseClient, d: &Desired, authority: Authority) -> (Result<Account, SyncError>, Progress) {
    let mut progress = Progress::default();
    let result = sync_account(c, d, authority, &mut Unguarded, &mut progress).await;
    (result, progress)
}

async fn sync_ok(c: &SynapseClient, d: &Desired, authority: Authority) -> Progress {
    let (result, progress) = sync(c, d, authority).await;
    if let Err(e) = result {
        panic!("sync of {} failed: {e} ({e:?}); progress {progress:?}", d.user_id);
    }
    progress
}

async fn refused(c: &SynapseClient, d: &Desired, authority: Authority) -> (Refusal, Progress) {
    match sync(c, d, authority).await {
        (Err(SyncError::Refused(r)), progress) => (r, progress),
        (other, progress) => panic!(
            "sync of {} should be refused, got {other:?}; progress {progress:?}",
            d.user_id
        ),
    }
}

/// Percent-encodes a user ID for a URL path segment.
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn user_path(id: &UserId) -> String {
    format!("/_synapse/admin/v2/users/{}", encode(id.as_str()))
}

/// The raw GET of the account.
async fn raw(s: &SynapseServer, id: &UserId) -> (u16, Value) {
    s.admin_get(&user_path(id)).await
}

/// The raw GET of an account that must exist.
async fn raw_ok(s: &SynapseServer, id: &UserId) -> Value {
    let (status, body) = raw(s, id).await;
    assert_eq!(status, 200, "GET {id}: {body}");
    body
}

/// The account as a raw GET shows it, minus what changes without a write,
/// with its lists in a fixed order.
async fn raw_stable(s: &SynapseServer, id: &UserId) -> Value {
    let mut v = raw_ok(s, id).await;
    let obj = v.as_object_mut().expect("a user object");
    obj.remove("last_seen_ts");
    for key in ["threepids", "external_ids"] {
        if let Some(Value::Array(items)) = obj.get_mut(key) {
            items.sort_by_key(|i| i.to_string());
        }
    }
    v
}

fn threepids_of(v: &Value) -> BTreeSet<(String, String)> {
    v["threepids"]
        .as_array()
        .unwrap_or_else(|| panic!("threepids in {v}"))
        .iter()
        .map(|t| {
            (
                t["medium"].as_str().unwrap().to_owned(),
                t["address"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn emails(addresses: &[&str]) -> BTreeSet<(String, String)> {
    addresses
        .iter()
        .map(|a| ("email".to_owned(), (*a).to_owned()))
        .collect()
}

fn external_ids_of(v: &Value) -> BTreeSet<(String, String)> {
    v["external_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("external_ids in {v}"))
        .iter()
        .map(|e| {
            (
                e["auth_provider"].as_str().unwrap().to_owned(),
                e["external_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

/// Creates an account owned by nobody in the test (like one made by hand),
/// with the given fields, through the raw admin API.
async fn create_raw(s: &SynapseServer, id: &UserId, body: Value) {
    let (status, resp) = s.admin_put(&user_path(id), body).await;
    assert_eq!(status, 201, "creating {id}: {resp}");
}

fn spec(value: Value) -> MatrixUserSpec {
    let mut value = value;
    value["homeserverRef"] = json!({"name": "synapse"});
    serde_json::from_value(value).expect("a valid MatrixUserSpec")
}

// ---------------------------------------------------------------------------
// Each seed field: set on create, changed later, read back raw
// ---------------------------------------------------------------------------

#[tokio::test]
async fn password_set_on_create_and_changed() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "seed-password");

    let mut d = desired(&id);
    d.password = Some(password("first password", false, false));
    let p = sync_ok(&c, &d, FRESH).await;
    assert!(p.created && p.password_applied, "{p:?}");
    s.login(&lp, "first password")
        .await
        .expect("the first password logs in");

    d.password = Some(password("second password", false, false));
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(!p.created && p.password_applied, "{p:?}");
    assert_eq!(p.writes, 1, "{p:?}");
    s.login(&lp, "second password")
        .await
        .expect("the second password logs in");
    assert_eq!(s.login(&lp, "first password").await, Err(403));
    // Synapse never reports a password or its hash.
    let v = raw_ok(s, &id).await;
    assert!(v.get("password").is_none() && v.get("password_hash").is_none(), "{v}");
}

#[tokio::test]
async fn displayname_set_on_create_changed_and_cleared() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "seed-displayname");

    let mut d = desired(&id);
    d.displayname = Some("First Name".into());
    let p = sync_ok(&c, &d, FRESH).await;
    assert!(p.created, "{p:?}");
    assert_eq!(raw_ok(s, &id).await["displayname"], "First Name");

    d.displayname = Some("Second Name ✓".into());
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 1, "{p:?}");
    assert_eq!(p.updates, vec![vec!["displayname"]]);
    assert_eq!(raw_ok(s, &id).await["displayname"], "Second Name ✓");

    // "" clears it; Synapse then reports null, which is in line with "".
    d.displayname = Some(String::new());
    sync_ok(&c, &d, OWNED).await;
    let v = raw_ok(s, &id).await;
    assert!(v["displayname"].is_null(), "cleared displayname: {v}");
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "a cleared displayname is in line with \"\": {p:?}");
}

#[tokio::test]
async fn avatar_url_set_on_create_changed_and_cleared() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "seed-avatar");

    let mut d = desired(&id);
    d.avatar_url = Some("mxc://example.test/first".into());
    sync_ok(&c, &d, FRESH).await;
    assert_eq!(raw_ok(s, &id).await["avatar_url"], "mxc://example.test/first");

    d.avatar_url = Some("mxc://example.test/second".into());
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.updates, vec![vec!["avatar_url"]]);
    assert_eq!(raw_ok(s, &id).await["avatar_url"], "mxc://example.test/second");

    d.avatar_url = Some(String::new());
    sync_ok(&c, &d, OWNED).await;
    let v = raw_ok(s, &id).await;
    assert!(v["avatar_url"].is_null(), "cleared avatar: {v}");
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
}

#[tokio::test]
async fn threepids_set_on_create_changed_and_removed() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "seed-threepids");
    let a = format!("{lp}.a@example.test");
    let b = format!("{lp}.b+tag@example.test");
    let cc = format!("{lp}.c@example.test");
    // Each test binary has its own Synapse and only this test uses one.
    let msisdn = "447700900123".to_owned();

    // In upper case in the spec: stored (and compared) lower case.
    let mut sp = spec(json!({
        "threepids": [{"medium": "email", "address": a.to_uppercase()}],
    }));
    let d = desired_from_spec(&sp, id.clone(), None);
    let p = sync_ok(&c, &d, FRESH).await;
    assert!(p.created, "{p:?}");
    assert_eq!(threepids_of(&raw_ok(s, &id).await), emails(&[&a]));

    sp.threepids = Some(
        serde_json::from_value(json!([
            {"medium": "email", "address": b},
            {"medium": "email", "address": format!(" {cc} ")},
            {"medium": "msisdn", "address": msisdn},
        ]))
        .unwrap(),
    );
    let d = desired_from_spec(&sp, id.clone(), None);
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.updates, vec![vec!["threepids"]]);
    let v = raw_ok(s, &id).await;
    let mut expected = emails(&[&b, &cc]);
    expected.insert(("msisdn".into(), msisdn.clone()));
    assert_eq!(threepids_of(&v), expected);
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
    for t in v["threepids"].as_array().unwrap() {
        assert!(t["validated_at"].is_number() && t["added_at"].is_number(), "{t}");
    }

    sp.threepids = Some(vec![]);
    let d = desired_from_spec(&sp, id.clone(), None);
    sync_ok(&c, &d, OWNED).await;
    assert_eq!(threepids_of(&raw_ok(s, &id).await), BTreeSet::new());
}

#[tokio::test]
async fn external_ids_set_on_create_changed_and_removed() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "seed-extids");
    let first = format!("{lp}-first");
    let second = format!("{lp}/second");

    let mut d = desired(&id);
    d.external_ids = Some(vec![ext("oidc-test", &first)]);
    sync_ok(&c, &d, FRESH).await;
    assert_eq!(external_ids_of(&raw_ok(s, &id).await), pairs(&[("oidc-test", &first)]));

    d.external_ids = Some(vec![ext("oidc-test", &second), ext("saml-test", &first)]);
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.updates, vec![vec!["external_ids"]]);
    assert_eq!(
        external_ids_of(&raw_ok(s, &id).await),
        pairs(&[("oidc-test", &second), ("saml-test", &first)])
    );
    // The lookup (with a '/' in the external id) finds the account.
    assert_eq!(
        c.external_id_owner("oidc-test", &second).await.unwrap(),
        Some(id.to_string())
    );

    d.external_ids = Some(vec![]);
    sync_ok(&c, &d, OWNED).await;
    assert_eq!(external_ids_of(&raw_ok(s, &id).await), BTreeSet::new());
    // (Synapse's lookup of `second` is stale now: see
    // `external_id_released_by_another_account_can_be_taken`.)
}

#[tokio::test]
async fn admin_set_on_create_and_changed() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "seed-admin");
    let allowed = Authority {
        admin_allowed: true,
        ..FRESH
    };

    let mut d = desired(&id);
    d.admin = Some(true);
    sync_ok(&c, &d, allowed).await;
    assert_eq!(raw_ok(s, &id).await["admin"], true);

    d.admin = Some(false);
    let p = sync_ok(&c, &d, Authority { owned: true, ..allowed }).await;
    assert_eq!(p.updates, vec![vec!["admin"]]);
    assert_eq!(raw_ok(s, &id).await["admin"], false);

    // Demoting needs no policy; promoting does.
    d.admin = Some(true);
    let (r, p) = refused(&c, &d, OWNED).await;
    assert_eq!(r, Refusal::AdminNotAllowed);
    assert_eq!(p.writes, 0);
    assert_eq!(raw_ok(s, &id).await["admin"], false);
}

#[tokio::test]
async fn deactivated_set_on_create_and_changed() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "seed-deactivated");

    let mut d = desired(&id);
    d.deactivated = Some(true);
    d.password = Some(password("deactivated password", false, false));
    let p = sync_ok(&c, &d, FRESH).await;
    // Synapse ignores `deactivated` on create: the sync needs a second PUT.
    assert!(p.created && p.deactivated, "{p:?}");
    assert!(!p.password_applied, "no password for a deactivated account");
    assert_eq!(raw_ok(s, &id).await["deactivated"], true);
    assert_eq!(s.login(&lp, "deactivated password").await, Err(403));

    d.deactivated = Some(false);
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(p.reactivated && p.password_applied, "{p:?}");
    assert!(!p.reactivated_without_password, "{p:?}");
    assert_eq!(raw_ok(s, &id).await["deactivated"], false);
    s.login(&lp, "deactivated password")
        .await
        .expect("the re-activated account logs in");
}

#[tokio::test]
async fn locked_set_on_create_and_changed() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "seed-locked");

    let mut d = desired(&id);
    d.locked = Some(true);
    d.password = Some(password("locked password", false, false));
    let p = sync_ok(&c, &d, FRESH).await;
    assert!(p.created, "{p:?}");
    assert_eq!(raw_ok(s, &id).await["locked"], true);
    // A locked account cannot log in: 401 (M_USER_LOCKED).
    assert_eq!(s.login(&lp, "locked password").await, Err(401));

    d.locked = Some(false);
    d.password = Some(password("locked password", true, false));
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.updates, vec![vec!["locked"]]);
    assert_eq!(raw_ok(s, &id).await["locked"], false);
    let token = s
        .login(&lp, "locked password")
        .await
        .expect("the unlocked account logs in");
    assert_eq!(s.whoami_status(&token).await, 200);

    // Locking ends the sessions the account has.
    d.locked = Some(true);
    sync_ok(&c, &d, OWNED).await;
    assert_eq!(raw_ok(s, &id).await["locked"], true);
    assert_eq!(s.whoami_status(&token).await, 401);
}

#[tokio::test]
async fn user_type_set_on_create_and_changed() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "seed-usertype");

    let mut d = desired(&id);
    d.user_type = Some(UserType::Bot);
    sync_ok(&c, &d, FRESH).await;
    assert_eq!(raw_ok(s, &id).await["user_type"], "bot");

    d.user_type = Some(UserType::Support);
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.updates, vec![vec!["user_type"]]);
    assert_eq!(raw_ok(s, &id).await["user_type"], "support");

    // Unmanaged: left as it is.
    d.user_type = None;
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
    assert_eq!(raw_ok(s, &id).await["user_type"], "support");
}

// ---------------------------------------------------------------------------
// Idempotence
// ---------------------------------------------------------------------------

#[tokio::test]
async fn same_desired_state_twice_writes_nothing() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "idempotent");
    let sp = spec(json!({
        "displayName": "Idem Potent",
        "avatarUrl": "mxc://example.test/idem",
        "admin": false,
        "deactivated": false,
        "locked": false,
        "userType": "bot",
        "threepids": [
            {"medium": "email", "address": format!("{}@Example.Test", lp.to_uppercase())},
            {"medium": "email", "address": format!("{lp}.second@example.test")},
        ],
        "externalIds": [
            {"authProvider": "oidc-test", "externalId": format!("{lp}-ext")},
        ],
    }));
    let d = desired_from_spec(&sp, id.clone(), Some(password("idem password", false, false)));
    let p = sync_ok(&c, &d, FRESH).await;
    assert!(p.created && p.password_applied, "{p:?}");
    let before = raw_stable(s, &id).await;
    assert_eq!(
        threepids_of(&before),
        emails(&[&format!("{lp}@example.test"), &format!("{lp}.second@example.test")])
    );

    // The controller records the password as applied after the first sync.
    let d = desired_from_spec(&sp, id.clone(), Some(password("idem password", true, false)));
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
    assert!(p.updates.is_empty(), "{p:?}");
    assert_eq!(raw_stable(s, &id).await, before);
    s.login(&lp, "idem password").await.expect("login");
}

// ---------------------------------------------------------------------------
// Passwords and sessions
// ---------------------------------------------------------------------------

#[tokio::test]
async fn password_change_without_logout_keeps_sessions() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "pw-keep");

    let mut d = desired(&id);
    d.password = Some(password("old password", false, false));
    sync_ok(&c, &d, FRESH).await;
    let token = s.login(&lp, "old password").await.expect("login");

    d.password = Some(password("new password", false, false));
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(p.password_applied, "{p:?}");
    s.login(&lp, "new password").await.expect("the new password logs in");
    assert_eq!(s.login(&lp, "old password").await, Err(403));
    assert_eq!(s.whoami_status(&token).await, 200, "the session survives");
}

#[tokio::test]
async fn password_change_with_logout_ends_sessions() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "pw-logout");

    let mut d = desired(&id);
    d.password = Some(password("old password", false, true));
    sync_ok(&c, &d, FRESH).await;
    let token = s.login(&lp, "old password").await.expect("login");
    assert_eq!(s.whoami_status(&token).await, 200);

    d.password = Some(password("new password", false, true));
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(p.password_applied, "{p:?}");
    s.login(&lp, "new password").await.expect("the new password logs in");
    assert_eq!(s.login(&lp, "old password").await, Err(403));
    assert_eq!(s.whoami_status(&token).await, 401, "the session is ended");
}

#[tokio::test]
async fn applied_password_is_not_sent_again() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "pw-applied");

    let mut d = desired(&id);
    d.password = Some(password("the password", false, true));
    sync_ok(&c, &d, FRESH).await;
    let token = s.login(&lp, "the password").await.expect("login");

    d.password = Some(password("the password", true, true));
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
    assert!(!p.password_applied, "{p:?}");
    assert_eq!(s.whoami_status(&token).await, 200, "no logout: not re-sent");
}

// ---------------------------------------------------------------------------
// Deactivation, re-activation, deletion
// ---------------------------------------------------------------------------

#[tokio::test]
async fn deactivate_and_reactivate_with_password() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "deact");
    let address = format!("{lp}@example.test");

    let mut d = desired(&id);
    d.displayname = Some("Soon Gone".into());
    d.threepids = Some(vec![email(&address)]);
    d.external_ids = Some(vec![ext("oidc-test", &lp)]);
    d.password = Some(password("deact password", false, false));
    sync_ok(&c, &d, FRESH).await;
    let token = s.login(&lp, "deact password").await.expect("login");
    assert_eq!(threepids_of(&raw_ok(s, &id).await), emails(&[&address]));

    d.password = Some(password("deact password", true, false));
    d.deactivated = Some(true);
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(p.deactivated, "{p:?}");
    assert_eq!(p.writes, 1, "{p:?}");
    let v = raw_ok(s, &id).await;
    assert_eq!(v["deactivated"], true);
    assert_eq!(threepids_of(&v), BTreeSet::new(), "threepids gone: {v}");
    assert_eq!(v["displayname"], "Soon Gone", "profile kept: {v}");
    assert_eq!(
        external_ids_of(&v),
        pairs(&[("oidc-test", &lp)]),
        "external ids kept: {v}"
    );
    assert_eq!(s.login(&lp, "deact password").await, Err(403));
    assert_eq!(s.whoami_status(&token).await, 401);

    // Synapse removed the threepids: a deactivated account has none to
    // manage, so the next sync does not fight it.
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");

    // Re-activate: the password (recorded as applied) goes along, since
    // deactivation removed the hash; the threepids come back.
    d.deactivated = Some(false);
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(p.reactivated && p.password_applied, "{p:?}");
    assert!(!p.reactivated_without_password, "{p:?}");
    let v = raw_ok(s, &id).await;
    assert_eq!(v["deactivated"], false);
    assert_eq!(threepids_of(&v), emails(&[&address]));
    s.login(&lp, "deact password")
        .await
        .expect("the re-activated account logs in");
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
}

#[tokio::test]
async fn reactivate_without_a_managed_password() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "react-nopw");

    let mut d = desired(&id);
    d.password = Some(password("some password", false, false));
    sync_ok(&c, &d, FRESH).await;
    d.deactivated = Some(true);
    d.password = Some(password("some password", true, false));
    sync_ok(&c, &d, OWNED).await;
    assert_eq!(raw_ok(s, &id).await["deactivated"], true);

    d.deactivated = Some(false);
    d.password = None;
    let p = sync_ok(&c, &d, OWNED).await;
    assert!(p.reactivated && p.reactivated_without_password, "{p:?}");
    assert!(!p.password_applied, "{p:?}");
    assert_eq!(raw_ok(s, &id).await["deactivated"], false);
    // Deactivation removed the password hash: no password logs in.
    assert_eq!(s.login(&lp, "some password").await, Err(403));
}

#[tokio::test]
async fn delete_with_erase() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "del-erase");

    let mut d = desired(&id);
    d.displayname = Some("To Be Erased".into());
    d.avatar_url = Some("mxc://example.test/erased".into());
    d.password = Some(password("erase password", false, false));
    sync_ok(&c, &d, FRESH).await;

    let action = delete_account(&c, &id, DeletionPolicy::Erase, OWNED).await.unwrap();
    assert_eq!(action, Ok(DeletionAction::Deactivate { erase: true }));
    let v = raw_ok(s, &id).await;
    assert_eq!(v["deactivated"], true, "{v}");
    assert_eq!(v["erased"], true, "{v}");
    assert!(v["displayname"].is_null(), "{v}");
    assert!(v["avatar_url"].is_null(), "{v}");
    assert_eq!(s.login(&lp, "erase password").await, Err(403));

    // A sync that leaves it deactivated keeps the profile erased.
    d.password = Some(password("erase password", true, false));
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
    let v = raw_ok(s, &id).await;
    assert_eq!(v["erased"], true, "{v}");
    assert!(v["displayname"].is_null(), "{v}");

    // Done already: nothing more to do.
    let action = delete_account(&c, &id, DeletionPolicy::Erase, OWNED).await.unwrap();
    assert_eq!(action, Err(Untouched::AlreadyDone));
}

#[tokio::test]
async fn delete_with_deactivate() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "del-deact");

    let mut d = desired(&id);
    d.displayname = Some("Deactivated Only".into());
    d.password = Some(password("deact password", false, false));
    sync_ok(&c, &d, FRESH).await;

    let action = delete_account(&c, &id, DeletionPolicy::Deactivate, OWNED)
        .await
        .unwrap();
    assert_eq!(action, Ok(DeletionAction::Deactivate { erase: false }));
    let v = raw_ok(s, &id).await;
    assert_eq!(v["deactivated"], true, "{v}");
    assert_eq!(v["erased"], false, "{v}");
    assert_eq!(v["displayname"], "Deactivated Only", "{v}");
    assert_eq!(s.login(&lp, "deact password").await, Err(403));

    let action = delete_account(&c, &id, DeletionPolicy::Deactivate, OWNED)
        .await
        .unwrap();
    assert_eq!(action, Err(Untouched::AlreadyDone));
}

#[tokio::test]
async fn delete_with_erase_of_a_deactivated_account() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "del-erase-deact");

    let mut d = desired(&id);
    d.displayname = Some("Already Deactivated".into());
    d.deactivated = Some(true);
    sync_ok(&c, &d, FRESH).await;
    let v = raw_ok(s, &id).await;
    assert_eq!((&v["deactivated"], &v["erased"]), (&json!(true), &json!(false)));

    let action = delete_account(&c, &id, DeletionPolicy::Erase, OWNED).await.unwrap();
    assert_eq!(action, Ok(DeletionAction::Deactivate { erase: true }));
    let v = raw_ok(s, &id).await;
    assert_eq!(v["erased"], true, "{v}");
    assert!(v["displayname"].is_null(), "{v}");
}

#[tokio::test]
async fn delete_of_a_missing_account_does_nothing() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "del-missing");
    for (policy, expected) in [
        (DeletionPolicy::Erase, Untouched::AccountGone),
        (DeletionPolicy::Deactivate, Untouched::AccountGone),
        (DeletionPolicy::Retain, Untouched::Retained),
    ] {
        let action = delete_account(&c, &id, policy, OWNED).await.unwrap();
        assert_eq!(action, Err(expected), "{policy:?}");
    }
    assert_eq!(raw(s, &id).await.0, 404);
}

#[tokio::test]
async fn delete_with_retain_leaves_the_account() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "del-retain");

    let mut d = desired(&id);
    d.displayname = Some("Retained".into());
    d.password = Some(password("retain password", false, false));
    sync_ok(&c, &d, FRESH).await;
    let before = raw_stable(s, &id).await;

    let action = delete_account(&c, &id, DeletionPolicy::Retain, OWNED).await.unwrap();
    assert_eq!(action, Err(Untouched::Retained));
    assert_eq!(raw_stable(s, &id).await, before);
    s.login(&lp, "retain password").await.expect("still logs in");
}

#[tokio::test]
async fn delete_of_an_account_not_owned_touches_nothing() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "del-notowned");
    s.register_user(&lp, "not owned password", false).await;
    let before = raw_stable(s, &id).await;

    for policy in [DeletionPolicy::Erase, DeletionPolicy::Deactivate] {
        let action = delete_account(&c, &id, policy, FRESH).await.unwrap();
        assert_eq!(action, Err(Untouched::NotOwned), "{policy:?}");
    }
    assert_eq!(raw_stable(s, &id).await, before);
    s.login(&lp, "not owned password").await.expect("still logs in");
}

// ---------------------------------------------------------------------------
// Threepids and external ids of other accounts
// ---------------------------------------------------------------------------

/// Another account holding `address` (created by hand, not by the operator).
async fn other_with_email(s: &SynapseServer, prefix: &str, address: &str) -> UserId {
    let (_, other) = new_user(s, prefix);
    create_raw(
        s,
        &other,
        json!({"threepids": [{"medium": "email", "address": address}]}),
    )
    .await;
    assert_eq!(threepids_of(&raw_ok(s, &other).await), emails(&[address]));
    other
}

#[tokio::test]
async fn email_of_another_account_is_refused() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "email-mine");
    let address = format!("{lp}.taken+x@example.test");
    let other = other_with_email(s, "email-other", &address).await;

    let mut d = desired(&id);
    d.displayname = Some("Mine".into());
    sync_ok(&c, &d, FRESH).await;
    let before = raw_stable(s, &id).await;

    d.threepids = Some(vec![email(&address)]);
    let (r, p) = refused(&c, &d, OWNED).await;
    assert_eq!(
        r,
        Refusal::ThreepidInUse {
            medium: "email".into(),
            address: address.clone(),
            owner: other.to_string(),
        }
    );
    assert_eq!(p.writes, 0, "{p:?}");
    assert_eq!(threepids_of(&raw_ok(s, &other).await), emails(&[&address]));
    assert_eq!(raw_stable(s, &id).await, before);
}

#[tokio::test]
async fn email_of_another_account_in_upper_case_is_refused() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "email-upper");
    let address = format!("{lp}.taken@example.test");
    let other = other_with_email(s, "email-upper-other", &address).await;

    sync_ok(&c, &desired(&id), FRESH).await;
    let sp = spec(json!({
        "threepids": [{"medium": "email", "address": address.to_uppercase()}],
    }));
    let d = desired_from_spec(&sp, id.clone(), None);
    let (r, p) = refused(&c, &d, OWNED).await;
    assert!(
        matches!(&r, Refusal::ThreepidInUse { address: a, owner, .. }
            if *a == address && *owner == other.to_string()),
        "{r:?}"
    );
    assert_eq!(p.writes, 0, "{p:?}");
    assert_eq!(threepids_of(&raw_ok(s, &other).await), emails(&[&address]));
    assert_eq!(threepids_of(&raw_ok(s, &id).await), BTreeSet::new());
}

#[tokio::test]
async fn email_of_another_account_is_refused_before_create() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "email-new");
    let address = format!("{lp}.taken@example.test");
    let other = other_with_email(s, "email-new-other", &address).await;

    for given in [address.clone(), address.to_uppercase()] {
        let sp = spec(json!({
            "displayName": "Never Created",
            "threepids": [{"medium": "email", "address": given}],
        }));
        let d = desired_from_spec(&sp, id.clone(), Some(password("pw", false, false)));
        let (r, p) = refused(&c, &d, FRESH).await;
        assert!(
            matches!(&r, Refusal::ThreepidInUse { owner, .. } if *owner == other.to_string()),
            "{r:?}"
        );
        assert_eq!(p, Progress::default());
        assert_eq!(raw(s, &id).await.0, 404, "no account created");
        assert_eq!(threepids_of(&raw_ok(s, &other).await), emails(&[&address]));
    }
}

#[tokio::test]
async fn external_id_of_another_account_is_refused() {
    let s = synapse();
    let c = client(s);
    let (lp, id) = new_user(s, "extid-mine");
    let (_, other) = new_user(s, "extid-other");
    let taken = format!("{lp}-taken");
    create_raw(
        s,
        &other,
        json!({"external_ids": [{"auth_provider": "oidc-test", "external_id": taken}]}),
    )
    .await;

    // Before the account exists: nothing is created.
    let mut d = desired(&id);
    d.external_ids = Some(vec![ext("oidc-test", &taken)]);
    let (r, p) = refused(&c, &d, FRESH).await;
    let expected = Refusal::ExternalIdInUse {
        auth_provider: "oidc-test".into(),
        external_id: taken.clone(),
        owner: other.to_string(),
    };
    assert_eq!(r, expected);
    assert_eq!(p, Progress::default());
    assert_eq!(raw(s, &id).await.0, 404, "no account created");

    // Once it exists: nothing is changed.
    d.external_ids = Some(vec![ext("oidc-test", &format!("{lp}-mine"))]);
    sync_ok(&c, &d, FRESH).await;
    d.external_ids = Some(vec![ext("oidc-test", &format!("{lp}-mine")), ext("oidc-test", &taken)]);
    let (r, p) = refused(&c, &d, OWNED).await;
    assert_eq!(r, expected);
    assert_eq!(p.writes, 0);
    assert_eq!(
        external_ids_of(&raw_ok(s, &id).await),
        pairs(&[("oidc-test", &format!("{lp}-mine"))])
    );
    assert_eq!(
        external_ids_of(&raw_ok(s, &other).await),
        pairs(&[("oidc-test", &taken)])
    );
}

/// Account B asks for an external id that A holds and is refused; A lets
/// go of it; B must get it now.
///
/// Synapse 1.163.2 caches the lookup `GET /_synapse/admin/v1/auth_providers/
/// <p>/users/<id>` and its `replace_user_external_id` (the PUT's
/// `external_ids`) invalidates only the ids it adds, never those it removes:
/// after B's refused sync looked the id up, the lookup keeps naming A (until
/// the cache entry expires, 30 min by default) although A no longer holds it
/// and a PUT giving it to B would succeed.
#[tokio::test]
async fn external_id_released_by_another_account_can_be_taken() {
    let s = synapse();
    let c = client(s);
    let (lp, a) = new_user(s, "extid-release-a");
    let (_, b) = new_user(s, "extid-release-b");
    let wanted = format!("{lp}-shared");

    let mut da = desired(&a);
    da.external_ids = Some(vec![ext("oidc-test", &wanted)]);
    sync_ok(&c, &da, FRESH).await;

    let mut db = desired(&b);
    db.external_ids = Some(vec![ext("oidc-test", &wanted)]);
    let (r, _) = refused(&c, &db, FRESH).await;
    assert!(
        matches!(&r, Refusal::ExternalIdInUse { owner, .. } if *owner == a.to_string()),
        "{r:?}"
    );

    da.external_ids = Some(vec![]);
    sync_ok(&c, &da, OWNED).await;
    assert_eq!(external_ids_of(&raw_ok(s, &a).await), BTreeSet::new());

    let (result, p) = sync(&c, &db, FRESH).await;
    if let Err(e) = result {
        panic!(
            "B is refused an external id nobody holds: {e}; Synapse's lookup says {:?}, \
             A holds {:?}; progress {p:?}",
            c.external_id_owner("oidc-test", &wanted).await,
            external_ids_of(&raw_ok(s, &a).await)
        );
    }
    assert_eq!(external_ids_of(&raw_ok(s, &b).await), pairs(&[("oidc-test", &wanted)]));
}

// ---------------------------------------------------------------------------
// Existing accounts, adoption, admin policy
// ---------------------------------------------------------------------------

/// An account registered by hand, and a desired state that would change it.
async fn existing_account(s: &SynapseServer, prefix: &str) -> (String, UserId, Desired) {
    let (lp, id) = new_user(s, prefix);
    s.register_user(&lp, "original password", false).await;
    let mut d = desired(&id);
    d.displayname = Some("Taken Over".into());
    d.password = Some(password("operator password", false, false));
    (lp, id, d)
}

async fn assert_untouched(s: &SynapseServer, lp: &str, id: &UserId, before: &Value) {
    let after = raw_stable(s, id).await;
    assert_eq!(&after, before);
    assert_eq!(after["displayname"], lp, "registered displayname kept");
    s.login(lp, "original password")
        .await
        .expect("the original password still logs in");
    assert_eq!(s.login(lp, "operator password").await, Err(403));
}

#[tokio::test]
async fn existing_account_is_not_adopted_unless_requested() {
    let s = synapse();
    let c = client(s);
    let (lp, id, d) = existing_account(s, "adopt-unrequested").await;
    let before = raw_stable(s, &id).await;

    let authority = Authority {
        adoption_allowed: true,
        ..FRESH
    };
    let (r, p) = refused(&c, &d, authority).await;
    assert_eq!(
        r,
        Refusal::AdoptionNotRequested {
            user_id: id.to_string()
        }
    );
    assert_eq!(p, Progress::default());
    assert_untouched(s, &lp, &id, &before).await;
}

#[tokio::test]
async fn existing_account_is_not_adopted_unless_allowed() {
    let s = synapse();
    let c = client(s);
    let (lp, id, d) = existing_account(s, "adopt-disallowed").await;
    let before = raw_stable(s, &id).await;

    let authority = Authority {
        adopt_requested: true,
        ..FRESH
    };
    let (r, p) = refused(&c, &d, authority).await;
    assert_eq!(
        r,
        Refusal::AdoptionNotAllowed {
            user_id: id.to_string()
        }
    );
    assert_eq!(p, Progress::default());
    assert_untouched(s, &lp, &id, &before).await;
}

#[tokio::test]
async fn existing_account_is_adopted_when_requested_and_allowed() {
    let s = synapse();
    let c = client(s);
    let (lp, id, d) = existing_account(s, "adopt-ok").await;

    let authority = Authority {
        adopt_requested: true,
        adoption_allowed: true,
        ..FRESH
    };
    let p = sync_ok(&c, &d, authority).await;
    assert!(p.adopted && !p.created && p.password_applied, "{p:?}");
    // The profile first, then the password in a call of its own.
    assert_eq!(p.updates, vec![vec!["displayname"], vec!["password"]], "{p:?}");
    assert_eq!(raw_ok(s, &id).await["displayname"], "Taken Over");
    s.login(&lp, "operator password")
        .await
        .expect("the operator's password logs in");
    assert_eq!(s.login(&lp, "original password").await, Err(403));
}

#[tokio::test]
async fn admin_without_policy_is_refused_and_nothing_created() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "admin-refused");

    let mut d = desired(&id);
    d.admin = Some(true);
    d.displayname = Some("Would Be Admin".into());
    let (r, p) = refused(&c, &d, FRESH).await;
    assert_eq!(r, Refusal::AdminNotAllowed);
    assert_eq!(p, Progress::default());
    assert_eq!(raw(s, &id).await.0, 404);
}

// ---------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------

/// Synapse limits profile changes per target user with `rc_message` (the
/// harness keeps its default: burst 10, 0.2/s). Measured on 1.163.2: the 11th
/// quick change gets 429 M_LIMIT_EXCEEDED with `retry_after_ms` just under
/// 5000 — within the 5 s that `sync_account` waits inline — so every sync
/// settles, none fails. The rate-limited PUT has already applied the
/// displayname, so the sync that waited finds nothing left to write.
#[tokio::test]
async fn displayname_changes_past_the_rate_limit_settle() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "ratelimit");

    let mut d = desired(&id);
    sync_ok(&c, &d, FRESH).await;
    let started = Instant::now();
    const CHANGES: usize = 13;
    for i in 0..CHANGES {
        d.displayname = Some(format!("Name {i}"));
        let (result, p) = sync(&c, &d, OWNED).await;
        let user = result.unwrap_or_else(|e| panic!("change {i}: {e} ({e:?}); {p:?}"));
        assert_eq!(user.displayname, d.displayname, "change {i}");
    }
    assert_eq!(raw_ok(s, &id).await["displayname"], format!("Name {}", CHANGES - 1));
    // The limit was hit and waited out (≈5 s per 429).
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "no rate limit hit in {:?}",
        started.elapsed()
    );

    // What Synapse answers at the limit, seen raw.
    let mut limited = None;
    for i in 0..20 {
        let (status, body) = s
            .admin_put(&user_path(&id), json!({"displayname": format!("Raw {i}")}))
            .await;
        if status == 429 {
            limited = Some(body);
            break;
        }
        assert_eq!(status, 200, "{body}");
    }
    let body = limited.expect("a 429 within 20 quick changes");
    assert_eq!(body["errcode"], "M_LIMIT_EXCEEDED", "{body}");
    let retry_after_ms = body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(
        (1..=5000).contains(&retry_after_ms),
        "retry_after_ms {retry_after_ms} is not within the 5 s sync_account waits inline"
    );
}

// ---------------------------------------------------------------------------
// The client's typed errors and URL encoding
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bad_admin_token_is_unauthorized() {
    let s = synapse();
    let c = client_with_token(s, "not-a-valid-token");
    let (_, id) = new_user(s, "badtoken");
    let e = c.get_user(&id).await.expect_err("a bad token fails");
    assert_eq!(e.class(), ErrorClass::Unauthorized, "{e:?}");
    assert!(!e.to_string().contains("not-a-valid-token"), "{e}");
    let e = c.whoami().await.expect_err("a bad token fails");
    assert_eq!(e.class(), ErrorClass::Unauthorized, "{e:?}");
}

#[tokio::test]
async fn non_admin_token_is_forbidden() {
    let s = synapse();
    let (lp, id) = new_user(s, "nonadmin");
    let token = s.register_user(&lp, "plain password", false).await;
    let c = client_with_token(s, &token);
    let e = c.get_user(&id).await.expect_err("not an admin");
    assert_eq!(e.class(), ErrorClass::Forbidden, "{e:?}");
    let mut d = desired(&id);
    d.displayname = Some("Self Service".into());
    match sync(&c, &d, OWNED).await {
        (Err(SyncError::Backend(BackendError::Synapse(e))), p) => {
            assert_eq!(e.class(), ErrorClass::Forbidden, "{e:?}");
            assert_eq!(p.writes, 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(raw_ok(s, &id).await["displayname"], lp.as_str());
}

#[tokio::test]
async fn missing_user_is_none() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "missing");
    assert_eq!(c.get_user(&id).await.unwrap(), None);
    assert_eq!(
        c.threepid_owner("email", &format!("{}@example.test", id.localpart()))
            .await
            .unwrap(),
        None
    );
    assert_eq!(c.external_id_owner("oidc-test", id.localpart()).await.unwrap(), None);
}

#[tokio::test]
async fn whoami_is_the_admin() {
    let s = synapse();
    let c = client(s);
    assert_eq!(c.whoami().await.unwrap(), s.admin_user_id);
    let admin = c.get_user_raw(&s.admin_user_id).await.unwrap().unwrap();
    assert!(admin.admin);
}

#[tokio::test]
async fn server_version_is_the_pinned_release() {
    let s = synapse();
    let c = client(s);
    let version = c.server_version().await.unwrap();
    assert_eq!(version.split_whitespace().next(), Some("1.163.2"), "{version}");
}

#[tokio::test]
async fn localpart_with_slash_equals_and_plus_round_trips() {
    let s = synapse();
    let c = client(s);
    let lp = format!("{}/a=b+c", s.unique_localpart("odd"));
    let id = user_id(s, &lp);
    let address = format!("{}+tag@example.test", lp.replace('/', "."));

    let mut d = desired(&id);
    d.displayname = Some("Odd Localpart".into());
    d.threepids = Some(vec![email(&address)]);
    d.password = Some(password("odd password", false, false));
    let p = sync_ok(&c, &d, FRESH).await;
    assert!(p.created, "{p:?}");

    let user = c.get_user(&id).await.unwrap().expect("the account");
    assert_eq!(user.name, id.as_str());
    let v = raw_ok(s, &id).await;
    assert_eq!(v["name"], id.as_str());
    assert_eq!(v["displayname"], "Odd Localpart");
    assert_eq!(threepids_of(&v), emails(&[&address]));
    assert_eq!(c.threepid_owner("email", &address).await.unwrap(), Some(id.to_string()));
    s.login(&lp, "odd password").await.expect("login");

    // Nothing like it was created under another name.
    let prefix = lp.split('/').next().unwrap();
    assert_eq!(raw(s, &user_id(s, prefix)).await.0, 404);

    d.password = Some(password("odd password", true, false));
    let p = sync_ok(&c, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
    let action = delete_account(&c, &id, DeletionPolicy::Erase, OWNED).await.unwrap();
    assert_eq!(action, Ok(DeletionAction::Deactivate { erase: true }));
    assert_eq!(raw_ok(s, &id).await["erased"], true);
}

// ---------------------------------------------------------------------------
// Creation by shared-secret registration
// ---------------------------------------------------------------------------

/// A client that creates accounts by shared-secret registration with
/// `secret`, and the endpoints it called, in order.
fn registering_client(s: &SynapseServer, secret: &str) -> (SynapseClient, Arc<Mutex<Vec<&'static str>>>) {
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let mut config = ClientConfig::new(&s.base_url, SecretString::new(&s.admin_token));
    config.registration_shared_secret = Some(SecretString::new(secret));
    config.observer = Some(RequestObserver(Arc::new(move |endpoint, _, _| {
        seen.lock().unwrap().push(endpoint)
    })));
    (SynapseClient::new(config).expect("a client"), calls)
}

fn take(calls: &Mutex<Vec<&'static str>>) -> Vec<&'static str> {
    std::mem::take(&mut *calls.lock().unwrap())
}

/// Records a pending creation at `at` before every create, as the
/// controller's guard does in status.
struct Recording(PendingCreation);

impl WriteGuard for Recording {
    fn before_write(&mut self, write: Write) -> BoxFuture<'_, Result<Option<PendingCreation>, Halt>> {
        let pending = (write == Write::Create).then_some(self.0);
        Box::pin(async move { Ok(pending) })
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn device_count(s: &SynapseServer, id: &UserId) -> u64 {
    let (code, devices) = s
        .admin_get(&format!("/_synapse/admin/v2/users/{}/devices", encode(id.as_str())))
        .await;
    assert_eq!(code, 200, "{devices}");
    devices["total"].as_u64().expect("a device count")
}

#[tokio::test]
async fn registration_creates_the_account_with_its_password_and_profile_in_one_call() {
    let s = synapse();
    let (c, calls) = registering_client(s, &s.registration_shared_secret);
    let (lp, id) = new_user(s, "reg-one-call");
    let mut d = desired(&id);
    d.displayname = Some("Registered".into());
    d.admin = Some(true);
    d.user_type = Some(UserType::Bot);
    d.password = Some(password("registered password", false, true));
    let authority = Authority {
        admin_allowed: true,
        ..FRESH
    };

    let p = sync_ok(&c, &d, authority).await;
    assert!(p.created && p.password_applied, "{p:?}");
    assert_eq!(p.writes, 1, "{p:?}");
    assert_eq!(p.updates, vec![vec!["displayname", "admin", "user_type"]]);
    // Nothing read before (the registration refuses an existing account);
    // read once after, for when Synapse created it (the registration does
    // not say), and found as registered: no second write.
    assert_eq!(take(&calls), vec!["register_nonce", "register", "get_user"]);
    let acc = raw_ok(s, &id).await;
    assert_eq!(p.creation_ts, acc["creation_ts"].as_i64());
    assert!(p.creation_ts.is_some());
    assert_eq!(acc["displayname"], "Registered");
    assert_eq!(acc["admin"], true);
    assert_eq!(acc["user_type"], "bot");
    assert_eq!(device_count(s, &id).await, 0, "the registration logged nothing in");
    s.login(&lp, "registered password").await.expect("the password was set");

    // The next sync reads, and writes nothing.
    let mut d = d.clone();
    d.password = Some(password("registered password", true, true));
    let owned = Authority {
        admin_allowed: true,
        ..OWNED
    };
    let p = sync_ok(&c, &d, owned).await;
    assert_eq!(p.writes, 0, "{p:?}");
    assert_eq!(take(&calls), vec!["get_user"]);
}

#[tokio::test]
async fn fields_a_registration_cannot_set_follow_in_one_put_without_the_password() {
    let s = synapse();
    let (c, calls) = registering_client(s, &s.registration_shared_secret);
    let (lp, id) = new_user(s, "reg-rest");
    let mut d = desired(&id);
    d.displayname = Some("Rest".into());
    d.avatar_url = Some("mxc://example.test/rest".into());
    d.threepids = Some(vec![email(&format!("{lp}@example.org"))]);
    d.password = Some(password("rest password", false, true));

    let p = sync_ok(&c, &d, FRESH).await;
    assert_eq!(p.writes, 2, "{p:?}");
    assert_eq!(p.updates, vec![vec!["displayname"], vec!["avatar_url", "threepids"]]);
    // The email's holder is looked up before the create and again before
    // the PUT.
    assert_eq!(
        take(&calls),
        vec![
            "threepid_lookup",
            "register_nonce",
            "register",
            "threepid_lookup",
            "put_user"
        ]
    );
    let acc = raw_ok(s, &id).await;
    assert_eq!(acc["avatar_url"], "mxc://example.test/rest");
    assert_eq!(threepids_of(&acc), emails(&[&format!("{lp}@example.org")]));
    // The PUT's answer says when the account was created.
    assert_eq!(p.creation_ts, acc["creation_ts"].as_i64());
    s.login(&lp, "rest password").await.expect("the password was set");
}

#[tokio::test]
async fn registration_leaves_an_account_that_appeared_untouched() {
    let s = synapse();
    let (c, calls) = registering_client(s, &s.registration_shared_secret);
    let (lp, id, d) = existing_account(s, "reg-taken").await;
    let before = raw_stable(s, &id).await;

    let (r, p) = refused(&c, &d, FRESH).await;
    assert_eq!(
        r,
        Refusal::AdoptionNotRequested {
            user_id: id.to_string()
        }
    );
    assert!(!p.created && !p.password_applied, "{p:?}");
    assert_eq!(take(&calls), vec!["register_nonce", "register", "get_user"]);
    assert_untouched(s, &lp, &id, &before).await;
}

#[tokio::test]
async fn a_wrong_registration_secret_creates_nothing_and_says_so() {
    let s = synapse();
    let (c, _) = registering_client(s, "not-the-shared-secret");
    let (_, id) = new_user(s, "reg-wrong");
    let mut d = desired(&id);
    d.password = Some(password("wrong secret password", false, false));
    let (result, p) = sync(&c, &d, FRESH).await;
    let Err(SyncError::Backend(BackendError::Synapse(e))) = result else {
        panic!("expected Synapse's refusal, got {result:?}");
    };
    assert_eq!(e.class(), ErrorClass::Forbidden, "{e:?}");
    let text = e.to_string();
    assert!(text.contains("register") && text.contains("HMAC"), "{text}");
    assert!(!text.contains("wrong secret password") && !text.contains("not-the-shared-secret"));
    assert!(!p.created, "{p:?}");
    assert_eq!(raw(s, &id).await.0, 404, "nothing created");
}

#[tokio::test]
async fn a_registered_accounts_creation_time_is_read_at_once_or_else_by_the_next_sync() {
    let s = synapse();
    let (c, _) = registering_client(s, &s.registration_shared_secret);
    let (_, id) = new_user(s, "reg-confirm");
    let mut d = desired(&id);
    d.password = Some(password("confirmed password", false, false));
    let pending = PendingCreation::at(now_secs());

    let mut progress = Progress::default();
    sync_account(&c, &d, FRESH, &mut Recording(pending), &mut progress)
        .await
        .expect("created");
    // The registration does not say when; the read after it does, under
    // the record, which is settled then (not left for the next sync, on
    // the object and in every cached copy of it).
    assert!(progress.created, "{progress:?}");
    assert_eq!(progress.creation_ts, raw_ok(s, &id).await["creation_ts"].as_i64());
    assert!(progress.creation_ts.is_some());
    assert_eq!(progress.pending_creation, PendingOutcome::Settled);

    // A pass cut between the registration and that read leaves the record
    // unconfirmed: the next sync's read confirms it.
    d.password = Some(password("confirmed password", true, false));
    let owned_unconfirmed = Authority {
        pending_creation: Some(pending),
        ..OWNED
    };
    let p = sync_ok(&c, &d, owned_unconfirmed).await;
    assert_eq!(p.writes, 0, "{p:?}");
    assert_eq!(p.creation_ts, raw_ok(s, &id).await["creation_ts"].as_i64());
    assert!(p.creation_ts.is_some());
    assert_eq!(p.pending_creation, PendingOutcome::Settled);

    // An account of that ID made at another time (a repointed Homeserver)
    // is not the one the record covers.
    let an_hour_before = Authority {
        pending_creation: Some(PendingCreation::at(now_secs() - 3600)),
        ..OWNED
    };
    let (r, p) = refused(&c, &d, an_hour_before).await;
    assert_eq!(
        r,
        Refusal::AdoptionNotRequested {
            user_id: id.to_string()
        }
    );
    assert_eq!(p.writes, 0, "{p:?}");
}

/// Stops every sync before its first write, for a reason of its own.
struct Refusing(&'static str);

impl WriteGuard<&'static str> for Refusing {
    fn before_write(&mut self, _: Write) -> BoxFuture<'_, Result<Option<PendingCreation>, &'static str>> {
        let reason = self.0;
        Box::pin(async move { Err(reason) })
    }
}

#[tokio::test]
async fn a_guards_reason_to_stop_comes_back_in_the_syncs_error_and_nothing_is_written() {
    let s = synapse();
    let c = client(s);
    let (_, id) = new_user(s, "guard-stop");
    let mut progress = Progress::default();
    let result = sync_account(
        &c,
        &desired(&id),
        FRESH,
        &mut Refusing("the copy is stale"),
        &mut progress,
    )
    .await;
    assert!(
        matches!(result, Err(SyncError::Halted("the copy is stale"))),
        "{result:?}"
    );
    assert_eq!(progress.writes, 0, "{progress:?}");
    assert_eq!(raw(s, &id).await.0, 404, "nothing created");
}
