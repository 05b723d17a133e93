//! The MAS scenarios, written against [`MasTarget`] only: `tests/mas.rs`
//! runs them against the in-process stand-in (and its real MAS-mode
//! Synapse) in CI, `tests/mas_e2e.rs` runs the very same functions against a
//! real MAS when `MAS_URL` and friends are set.
//!
//! Each drives the library's executor ([`sync_account`], [`delete_account`])
//! through the MAS backend, and checks MAS and Synapse through their own
//! HTTP APIs, not through the operator's decoding.

use matrix_user_operator::account::{Account, ExternalId, Threepid, UserId};
use matrix_user_operator::api::{DeletionPolicy, RoomName, UserType};
use matrix_user_operator::apply::{Progress, SyncError, Unguarded, delete_account, sync_account, sync_rooms};
use std::sync::{Arc, Mutex};

use matrix_user_operator::backend::RequestObserver;
use matrix_user_operator::backend::mas::{MasBackend, MasClient, MasConfig};
use matrix_user_operator::plan::{Authority, DeletionAction, Desired, DesiredPassword, Refusal, Untouched};
use matrix_user_operator::preview::{OBSERVER, Observation, observation, preview_account, preview_rooms};
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::synapse::{ClientConfig, SynapseClient};

use super::mas::MasTarget;

/// A password MAS's policy accepts (zxcvbn score 4 on a real MAS too).
pub const STRONG: &str = "Tortoise-Lantern-Quarry-58";
const STRONG_2: &str = "Velvet-Harbour-Compass-91";

const OWNED: Authority = Authority {
    owned: true,
    adopt_requested: false,
    adoption_allowed: false,
    admin_allowed: true,
    owned_creation_ts: None,
    pending_creation: None,
};

const FRESH: Authority = Authority {
    owned: false,
    adopt_requested: false,
    adoption_allowed: false,
    admin_allowed: true,
    owned_creation_ts: None,
    pending_creation: None,
};

pub fn backend(t: &MasTarget) -> MasBackend {
    let mas = MasClient::new(MasConfig::new(
        &t.mas_url,
        &t.client_id,
        SecretString::new(&t.client_secret),
    ))
    .expect("a MAS client");
    let synapse = SynapseClient::new(ClientConfig::new(
        &t.synapse_url,
        SecretString::new(&t.synapse_admin_token),
    ))
    .expect("a Synapse client");
    MasBackend::new(mas, synapse)
}

/// A localpart no earlier run used (MAS cannot delete users).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{prefix}-{:x}", nanos % 0xffff_ffff_ffff)
}

fn user_id(t: &MasTarget, localpart: &str) -> UserId {
    UserId::new(localpart, &t.server_name).expect("a valid Matrix ID")
}

fn password(value: &str, applied: bool) -> DesiredPassword {
    DesiredPassword {
        value: SecretString::new(value),
        applied,
        logout_devices: false,
    }
}

fn email(address: &str) -> Threepid {
    Threepid {
        medium: "email".into(),
        address: address.into(),
    }
}

fn link(provider: &str, subject: &str) -> ExternalId {
    ExternalId {
        auth_provider: provider.into(),
        external_id: subject.into(),
    }
}

async fn sync(b: &MasBackend, d: &Desired, authority: Authority) -> (Result<Account, SyncError>, Progress) {
    let mut progress = Progress::default();
    let result = sync_account(b, d, authority, &mut Unguarded, &mut progress).await;
    (result, progress)
}

async fn sync_ok(b: &MasBackend, d: &Desired, authority: Authority) -> (Account, Progress) {
    match sync(b, d, authority).await {
        (Ok(account), progress) => (account, progress),
        (Err(e), progress) => panic!("sync of {} failed: {e}; progress {progress:?}", d.user_id),
    }
}

/// Synapse's view of the account, raw.
async fn synapse_user(t: &MasTarget, localpart: &str) -> serde_json::Value {
    let (status, body) = t.synapse_user(localpart).await;
    assert_eq!(status, 200, "Synapse's GET of {localpart}: {body}");
    body
}

/// Synapse's account once `until` holds of it: MAS answers a deactivation
/// before its job has deactivated the account in Synapse (≈50 ms later on
/// a real MAS), so a read right after may still see it active.
async fn synapse_user_once(
    t: &MasTarget,
    localpart: &str,
    until: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let s = synapse_user(t, localpart).await;
        if until(&s) || std::time::Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Create with every field MAS mode manages, then a second sync writes
/// nothing, and the password logs in through MAS's compatibility login.
pub async fn create_with_every_field_then_steady(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("every");
    let id = user_id(t, &lp);
    let mut d = Desired::existing(id.clone());
    d.displayname = Some("Every Field".into());
    d.avatar_url = Some("mxc://example.org/every".into());
    d.user_type = Some(UserType::Bot);
    d.admin = Some(true);
    d.locked = Some(false);
    d.password = Some(password(STRONG, false));
    d.threepids = Some(vec![email(&format!("{lp}@example.org"))]);
    // By the provider's human name: prepare() maps it to the ID.
    d.external_ids = Some(vec![link(&t.upstream_provider_name, &format!("sub-{lp}"))]);
    let (account, p) = sync_ok(&b, &d, FRESH).await;
    assert!(p.created && p.password_applied, "{p:?}");
    assert!(account.account_id.is_some(), "MAS's ID is read: {account:?}");

    let mas = t.get_user_by_username(&lp).await.expect("the MAS user");
    assert!(mas.admin && !mas.locked && !mas.deactivated, "{mas:?}");
    assert_eq!(t.user_emails(&mas.id).await, vec![format!("{lp}@example.org")]);
    let links = t.upstream_links(&mas.id).await;
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0].provider_id, t.upstream_provider_id);
    assert_eq!(links[0].subject, format!("sub-{lp}"));
    let s = synapse_user(t, &lp).await;
    assert_eq!(s["displayname"], "Every Field", "{s}");
    assert_eq!(s["avatar_url"], "mxc://example.org/every", "{s}");
    assert_eq!(s["user_type"], "bot", "{s}");
    t.login(&lp, STRONG).await.expect("password login through MAS");

    let mut d = d.clone();
    d.password = Some(password(STRONG, true));
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert_eq!(p.writes, 0, "a steady state is read-only: {p:?}");
}

/// Every field changed on an existing account.
pub async fn every_field_changed(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("change");
    let mut d = Desired::existing(user_id(t, &lp));
    d.displayname = Some("Before".into());
    d.password = Some(password(STRONG, false));
    d.threepids = Some(vec![email(&format!("{lp}-a@example.org"))]);
    d.external_ids = Some(vec![link(&t.upstream_provider_id, &format!("a-{lp}"))]);
    d.admin = Some(false);
    sync_ok(&b, &d, FRESH).await;

    d.displayname = Some("After".into());
    d.avatar_url = Some("mxc://example.org/after".into());
    d.password = Some(password(STRONG_2, false));
    d.threepids = Some(vec![email(&format!("{lp}-b@example.org"))]);
    d.external_ids = Some(vec![link(&t.upstream_provider_id, &format!("b-{lp}"))]);
    d.admin = Some(true);
    d.user_type = Some(UserType::Support);
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert!(p.password_applied, "{p:?}");
    let mas = t.get_user_by_username(&lp).await.expect("the MAS user");
    assert!(mas.admin, "{mas:?}");
    assert_eq!(t.user_emails(&mas.id).await, vec![format!("{lp}-b@example.org")]);
    let subjects: Vec<String> = t.upstream_links(&mas.id).await.into_iter().map(|l| l.subject).collect();
    assert_eq!(subjects, vec![format!("b-{lp}")]);
    let s = synapse_user(t, &lp).await;
    assert_eq!(s["displayname"], "After", "{s}");
    assert_eq!(s["user_type"], "support", "{s}");
    assert!(t.login(&lp, STRONG_2).await.is_ok(), "the new password logs in");
    assert!(t.login(&lp, STRONG).await.is_err(), "the old one does not");

    // Unmanaged again: left as they are.
    let (_, p) = sync_ok(&b, &Desired::existing(user_id(t, &lp)), OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");
}

/// Lock and unlock: MAS's compatibility login refuses a locked account.
pub async fn lock_and_unlock(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("lock");
    let mut d = Desired::existing(user_id(t, &lp));
    d.password = Some(password(STRONG, false));
    d.locked = Some(true);
    sync_ok(&b, &d, FRESH).await;
    assert!(t.get_user_by_username(&lp).await.expect("the MAS user").locked);
    assert_eq!(
        t.login(&lp, STRONG).await.map(|_| ()),
        Err((401, "M_USER_LOCKED".into()))
    );
    d.password = Some(password(STRONG, true));
    d.locked = Some(false);
    sync_ok(&b, &d, OWNED).await;
    assert!(!t.get_user_by_username(&lp).await.expect("the MAS user").locked);
    t.login(&lp, STRONG).await.expect("login after unlock");
}

/// Deactivate (not erased), then re-activate: MAS deleted the emails and
/// Synapse cleared the displayname; both come back.
pub async fn deactivate_and_reactivate(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("deact");
    let address = format!("{lp}@example.org");
    let mut d = Desired::existing(user_id(t, &lp));
    d.displayname = Some("Comes Back".into());
    d.password = Some(password(STRONG, false));
    d.threepids = Some(vec![email(&address)]);
    sync_ok(&b, &d, FRESH).await;

    d.deactivated = Some(true);
    d.password = Some(password(STRONG, true));
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert!(p.deactivated, "{p:?}");
    let mas = t.get_user_by_username(&lp).await.expect("the MAS user");
    assert!(mas.deactivated, "{mas:?}");
    let s = synapse_user_once(t, &lp, |s| s["deactivated"] == true).await;
    assert_eq!(s["deactivated"], true, "{s}");
    assert_eq!(s["erased"], false, "spec.deactivated keeps the account unerased: {s}");
    // In sync while deactivated: no second deactivate is ever sent.
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert_eq!(p.writes, 0, "{p:?}");

    d.deactivated = Some(false);
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert!(p.reactivated, "{p:?}");
    let mas = t.get_user_by_username(&lp).await.expect("the MAS user");
    assert!(!mas.deactivated, "{mas:?}");
    assert_eq!(t.user_emails(&mas.id).await, vec![address]);
    let s = synapse_user(t, &lp).await;
    assert_eq!(s["displayname"], "Comes Back", "{s}");
    t.login(&lp, STRONG).await.expect("login after re-activation");
}

/// Each deletion policy.
pub async fn deletion_policies(t: &MasTarget) {
    let b = backend(t);
    for (policy, erased) in [(DeletionPolicy::Deactivate, false), (DeletionPolicy::Erase, true)] {
        let lp = unique("delete");
        let id = user_id(t, &lp);
        let mut d = Desired::existing(id.clone());
        d.displayname = Some("Doomed".into());
        sync_ok(&b, &d, FRESH).await;
        let action = delete_account(&b, &id, policy, OWNED).await.expect("the deletion");
        assert_eq!(action, Ok(DeletionAction::Deactivate { erase: erased }), "{policy:?}");
        assert!(t.get_user_by_username(&lp).await.expect("the MAS user").deactivated);
        let s = synapse_user_once(t, &lp, |s| s["deactivated"] == true && s["erased"] == erased).await;
        assert_eq!(s["deactivated"], true, "{policy:?}: {s}");
        assert_eq!(s["erased"], erased, "{policy:?}: {s}");
        let again = delete_account(&b, &id, policy, OWNED)
            .await
            .expect("the deletion again");
        assert_eq!(again, Err(Untouched::AlreadyDone), "{policy:?}");
    }
    let lp = unique("retain");
    let id = user_id(t, &lp);
    sync_ok(&b, &Desired::existing(id.clone()), FRESH).await;
    let action = delete_account(&b, &id, DeletionPolicy::Retain, OWNED)
        .await
        .expect("retain");
    assert_eq!(action, Err(Untouched::Retained));
    assert!(!t.get_user_by_username(&lp).await.expect("the MAS user").deactivated);
}

/// An account made in MAS by someone else is refused, then adopted when
/// both the spec and the policy allow it; the refusal writes nothing.
pub async fn adoption_refused_then_allowed(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("adopt");
    t.create_user_directly(&lp).await;
    let mut d = Desired::existing(user_id(t, &lp));
    d.displayname = Some("Adopted".into());
    match sync(&b, &d, FRESH).await {
        (Err(SyncError::Refused(Refusal::AdoptionNotRequested { .. })), p) => {
            assert_eq!(p.writes, 0, "{p:?}")
        }
        (other, p) => panic!("expected AdoptionNotRequested, got {other:?}; {p:?}"),
    }
    let adopting = Authority {
        adopt_requested: true,
        adoption_allowed: true,
        ..FRESH
    };
    let (_, p) = sync_ok(&b, &d, adopting).await;
    assert!(p.adopted && !p.created, "{p:?}");
    assert_eq!(synapse_user(t, &lp).await["displayname"], "Adopted");
}

/// An email or an SSO link held by another MAS user is a conflict, and is
/// left where it is.
pub async fn conflicts(t: &MasTarget) {
    let b = backend(t);
    let holder = unique("holder");
    let address = format!("{holder}@example.org");
    let mut h = Desired::existing(user_id(t, &holder));
    h.threepids = Some(vec![email(&address)]);
    h.external_ids = Some(vec![link(&t.upstream_provider_id, &format!("held-{holder}"))]);
    sync_ok(&b, &h, FRESH).await;

    let lp = unique("taker");
    let mut d = Desired::existing(user_id(t, &lp));
    d.threepids = Some(vec![email(&address)]);
    match sync(&b, &d, FRESH).await {
        (Err(SyncError::Refused(Refusal::ThreepidInUse { .. })), _) => {}
        (other, p) => panic!("expected ThreepidInUse, got {other:?}; {p:?}"),
    }
    let mut d = Desired::existing(user_id(t, &lp));
    d.external_ids = Some(vec![link(&t.upstream_provider_id, &format!("held-{holder}"))]);
    match sync(&b, &d, FRESH).await {
        (Err(SyncError::Refused(Refusal::ExternalIdInUse { .. })), _) => {}
        (other, p) => panic!("expected ExternalIdInUse, got {other:?}; {p:?}"),
    }
    let mas = t.get_user_by_username(&holder).await.expect("the holder");
    assert_eq!(t.user_emails(&mas.id).await, vec![address]);
    assert_eq!(t.upstream_links(&mas.id).await.len(), 1);
}

/// What MAS mode cannot do is refused before any write: a weak password
/// (MAS's policy), an msisdn, an unknown upstream provider.
pub async fn refusals_of_mas_mode(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("weak");
    let mut d = Desired::existing(user_id(t, &lp));
    d.password = Some(password(&t.weak_password, false));
    match sync(&b, &d, FRESH).await {
        (Err(SyncError::Backend(matrix_user_operator::backend::BackendError::Mas(e))), p) => {
            assert!(e.is_password_refused(), "{e}");
            assert!(!p.password_applied, "{p:?}");
            // Created before the password was refused: the ownership
            // record is complete all the same.
            assert!(p.created && p.creation_ts.is_some() && p.account_id.is_some(), "{p:?}");
        }
        (other, p) => panic!("expected MAS's refusal, got {other:?}; {p:?}"),
    }

    let mut d = Desired::existing(user_id(t, &unique("msisdn")));
    d.threepids = Some(vec![Threepid {
        medium: "msisdn".into(),
        address: "15551234567".into(),
    }]);
    match sync(&b, &d, FRESH).await {
        (Err(SyncError::Unsupported(m)), p) => {
            assert!(m.contains("msisdn"), "{m}");
            assert_eq!(p.writes, 0, "{p:?}");
        }
        (other, p) => panic!("expected Unsupported, got {other:?}; {p:?}"),
    }

    let lp = unique("provider");
    let mut d = Desired::existing(user_id(t, &lp));
    d.external_ids = Some(vec![link("no-such-provider", "x")]);
    match sync(&b, &d, FRESH).await {
        (Err(SyncError::Unsupported(m)), p) => {
            assert!(m.contains("no-such-provider"), "{m}");
            assert_eq!(p.writes, 0, "{p:?}");
        }
        (other, p) => panic!("expected Unsupported, got {other:?}; {p:?}"),
    }
    assert!(t.get_user_by_username(&lp).await.is_none(), "nothing was created");
}

/// The devices Synapse has for the account (by their IDs).
async fn devices(t: &MasTarget, localpart: &str) -> Vec<String> {
    let path = format!(
        "/_synapse/admin/v2/users/{}/devices",
        url::form_urlencoded::byte_serialize(t.user_id(localpart).as_bytes()).collect::<String>()
    );
    let (status, body) = t.synapse_admin_get(&path).await;
    assert_eq!(status, 200, "{path}: {body}");
    body["devices"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .filter_map(|d| d["device_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A new password with `logoutDevicesOnChange` ends the account's sessions
/// (MAS's `set-password` alone ends none): the password login's device goes
/// from Synapse. Without it, the device stays.
pub async fn password_change_logs_out_only_when_asked(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("logout");
    let mut d = Desired::existing(user_id(t, &lp));
    d.password = Some(password(STRONG, false));
    sync_ok(&b, &d, FRESH).await;
    t.login(&lp, STRONG).await.expect("a password login");
    assert_eq!(devices(t, &lp).await.len(), 1, "the login's device");

    d.password = Some(password(STRONG_2, false));
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert!(p.password_applied, "{p:?}");
    assert_eq!(devices(t, &lp).await.len(), 1, "no logout was asked for");

    d.password = Some(DesiredPassword {
        value: SecretString::new(STRONG),
        applied: false,
        logout_devices: true,
    });
    let (_, p) = sync_ok(&b, &d, OWNED).await;
    assert!(p.password_applied, "{p:?}");
    // MAS removes the device from Synapse after the session ends (a job).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let left = devices(t, &lp).await;
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "devices left after the logout: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    t.login(&lp, STRONG).await.expect("the new password logs in");
}

/// A backend on `t` whose clients record the endpoint of each request they
/// send (a stand-in is shared by the tests running at once, a real MAS by
/// whoever uses it: its own log cannot tell whose a request was).
fn counting_backend(t: &MasTarget) -> (MasBackend, Arc<Mutex<Vec<&'static str>>>) {
    let calls: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let recorded = calls.clone();
    let observer = RequestObserver(Arc::new(move |endpoint, _, _| {
        recorded.lock().unwrap().push(endpoint);
    }));
    let mut mas = MasConfig::new(&t.mas_url, &t.client_id, SecretString::new(&t.client_secret));
    mas.observer = Some(observer.clone());
    let mut synapse = ClientConfig::new(&t.synapse_url, SecretString::new(&t.synapse_admin_token));
    synapse.observer = Some(observer);
    let b = MasBackend::new(
        MasClient::new(mas).expect("a MAS client"),
        SynapseClient::new(synapse).expect("a Synapse client"),
    );
    (b, calls)
}

/// A resync of an account in sync reads only what the plan compares: the
/// MAS user always (its state, admin attribute and creation time, for the
/// ownership check), Synapse's profile only for a managed display name,
/// avatar or user type, MAS's emails only for `threepids` and its upstream
/// links only for `externalIds`. It was 4 GETs whatever the spec managed.
pub async fn a_resync_reads_only_what_the_spec_manages(t: &MasTarget) {
    let (b, calls) = counting_backend(t);
    let lp = unique("reads");
    let mut d = Desired::existing(user_id(t, &lp));
    d.displayname = Some("Reads".into());
    d.locked = Some(false);
    d.password = Some(password(STRONG, false));
    sync_ok(&b, &d, FRESH).await;
    d.password = Some(password(STRONG, true));
    let mut only_password = d.clone();
    only_password.displayname = None;
    only_password.locked = None;
    let mut with_email = d.clone();
    with_email.threepids = Some(vec![email(&format!("{lp}@example.org"))]);
    let mut with_link = d.clone();
    with_link.external_ids = Some(vec![link(&t.upstream_provider_id, &format!("sub-{lp}"))]);
    // (what the spec manages, the GETs of a resync, in order)
    let cases = [
        ("displayName", d, vec!["mas_get_user", "get_user"]),
        ("only a password", only_password, vec!["mas_get_user"]),
        (
            "threepids",
            with_email,
            vec!["mas_get_user", "mas_list_emails", "get_user"],
        ),
        // prepare() maps each link's provider name to its ID: the
        // providers' list, on every sync of a spec with externalIds.
        (
            "externalIds",
            with_link,
            vec!["mas_list_providers", "mas_get_user", "mas_list_links", "get_user"],
        ),
    ];
    for (case, desired, want) in cases {
        // A first sync adds what the case adds (the email, the link); the
        // resync after it is the one counted.
        sync_ok(&b, &desired, OWNED).await;
        calls.lock().unwrap().clear();
        let (_, p) = sync_ok(&b, &desired, OWNED).await;
        assert_eq!(p.writes, 0, "{case}: in sync: {p:?}");
        let made: Vec<&str> = calls
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|e| *e != "mas_token")
            .collect();
        assert_eq!(made, want, "{case}: the calls of a resync");
    }
}

/// A room on the MAS-mode Synapse made by the harness admin; Synapse limits
/// room creation per user, so a 429 is waited out.
async fn admin_room(t: &MasTarget, preset: &str) -> String {
    for _ in 0..60 {
        let (status, body) = t
            .synapse_request(
                reqwest::Method::POST,
                "/_matrix/client/v3/createRoom",
                Some(&t.synapse_admin_token),
                Some(serde_json::json!({"preset": preset})),
            )
            .await;
        if status == 429 {
            let wait = body["retry_after_ms"].as_u64().unwrap_or(1000).min(10_000);
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            continue;
        }
        assert_eq!(status, 200, "createRoom: {body}");
        return body["room_id"].as_str().expect("a room ID").to_string();
    }
    panic!("Synapse kept refusing to create a room (429)")
}

/// The rooms `id` is in, from Synapse's admin API, sorted.
async fn joined_rooms(t: &MasTarget, id: &UserId) -> Vec<String> {
    let (status, body) = t
        .synapse_admin_get(&format!("/_synapse/admin/v1/users/{id}/joined_rooms"))
        .await;
    assert_eq!(status, 200, "joined_rooms: {body}");
    let mut rooms: Vec<String> = serde_json::from_value(body["joined_rooms"].clone()).expect("a list");
    rooms.sort();
    rooms
}

/// Rooms in MAS mode: they live in Synapse, joined with its admin join
/// API; a room taken out of the list is left as the user with a MAS
/// personal session the operator makes and revokes; a manual leave is
/// undone; deactivation leaves every room and re-activation joins the
/// listed ones again.
pub async fn rooms_joined_left_and_joined_again(t: &MasTarget) {
    let b = backend(t);
    let lp = unique("rooms");
    let id = user_id(t, &lp);
    let mut d = Desired::existing(id.clone());
    d.password = Some(password(STRONG, false));
    let (account, _) = sync_ok(&b, &d, FRESH).await;
    let public = admin_room(t, "public_chat").await;
    let private = admin_room(t, "private_chat").await;
    let mut both = vec![public.clone(), private.clone()];
    both.sort();
    let listed = vec![RoomName(public.clone()), RoomName(private.clone())];
    let purpose = "matrix-user-operator: mas scenario rooms";

    let r = sync_rooms(&b, &account, &id, &listed, &[], purpose).await;
    assert!(r.failed.is_none() && r.problems.is_empty(), "{r:?}");
    assert_eq!(r.joined.len(), 2, "{r:?}");
    assert_eq!(joined_rooms(t, &id).await, both);
    // In line: no write.
    let again = sync_rooms(&b, &account, &id, &listed, &r.records, purpose).await;
    assert_eq!((again.writes, again.problems.len()), (0, 0), "{again:?}");

    // The user leaves the private room on their own: joined again.
    let token = t.login(&lp, STRONG).await.expect("a login");
    let (status, body) = t
        .synapse_request(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/rooms/{private}/leave"),
            Some(&token),
            Some(serde_json::json!({})),
        )
        .await;
    assert_eq!(status, 200, "leave: {body}");
    let r = sync_rooms(&b, &account, &id, &listed, &r.records, purpose).await;
    assert_eq!(r.joined, vec![private.clone()], "{r:?}");
    assert_eq!(joined_rooms(t, &id).await, both);

    // Out of the list: left, as the user (a personal session).
    let r = sync_rooms(&b, &account, &id, &listed[..1], &r.records, purpose).await;
    assert!(r.problems.is_empty(), "{r:?}");
    assert_eq!(r.left, vec![private.clone()], "{r:?}");
    assert_eq!(joined_rooms(t, &id).await, vec![public.clone()]);
    // The user's own session is not the one that was ended.
    assert_eq!(t.synapse_whoami_status(&token).await, 200);

    // Deactivated: Synapse leaves every room; nothing is joined.
    d.password = Some(password(STRONG, true));
    d.deactivated = Some(true);
    let (gone, _) = sync_ok(&b, &d, OWNED).await;
    assert!(gone.deactivated);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !joined_rooms(t, &id).await.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let kept = sync_rooms(&b, &gone, &id, &listed[..1], &r.records, purpose).await;
    assert_eq!((kept.writes, kept.problems.len()), (0, 0), "{kept:?}");
    assert!(joined_rooms(t, &id).await.is_empty());
    assert!(kept.records.iter().all(|m| !m.joined), "{kept:?}");

    // Re-activated: the listed room is joined again.
    d.deactivated = Some(false);
    let (back, _) = sync_ok(&b, &d, OWNED).await;
    let r = sync_rooms(&b, &back, &id, &listed[..1], &kept.records, purpose).await;
    assert!(r.problems.is_empty(), "{r:?}");
    assert_eq!(joined_rooms(t, &id).await, vec![public]);
}

/// What `managementPolicy: Observe` makes of the account (the controller's
/// observer: the preview planned with `OBSERVER`, rooms when listed).
async fn observe(b: &MasBackend, d: &Desired, rooms: Option<&[RoomName]>) -> Observation {
    let preview = preview_account(b, d, OBSERVER, false).await.expect("a preview");
    let room_plan = match (rooms, &preview.account) {
        (Some(listed), Some(account)) => Some(
            preview_rooms(b, &d.user_id, listed, &[], !account.deactivated)
                .await
                .expect("the rooms read"),
        ),
        _ => None,
    };
    observation(&preview, room_plan.as_ref())
}

/// The calls that are reads (and MAS's client-credentials token).
const READS: [&str; 8] = [
    "mas_token",
    "mas_get_user",
    "mas_list_emails",
    "mas_list_links",
    "mas_list_providers",
    "get_user",
    "joined_rooms",
    "resolve_alias",
];

/// `managementPolicy: Observe` in MAS mode: an account that matches is in
/// sync, one changed since is drifted in the fields that differ (a listed
/// room it is not in included), a missing one is not found; every call
/// is a read, and nothing of the account changes.
pub async fn observe_compares_and_never_writes(t: &MasTarget) {
    let (b, calls) = counting_backend(t);
    let lp = unique("observe");
    let id = user_id(t, &lp);
    let mut d = Desired::existing(id.clone());
    d.displayname = Some("Observed".into());
    d.threepids = Some(vec![email(&format!("{lp}@example.org"))]);
    d.locked = Some(false);
    sync_ok(&b, &d, FRESH).await;

    calls.lock().unwrap().clear();
    assert_eq!(observe(&b, &d, None).await, Observation::InSync);
    // Changed behind the observer's back (here by a manager).
    let mut changed = d.clone();
    changed.displayname = Some("Changed".into());
    changed.locked = Some(true);
    sync_ok(&b, &changed, OWNED).await;
    calls.lock().unwrap().clear();
    let room = admin_room(t, "public_chat").await;
    let listed = [RoomName(room)];
    assert_eq!(
        observe(&b, &d, Some(&listed)).await,
        Observation::Drifted(vec!["displayname", "locked", "rooms"])
    );
    let missing = Desired::existing(user_id(t, &unique("observe-missing")));
    assert_eq!(observe(&b, &missing, None).await, Observation::NotFound);
    let made: Vec<&str> = calls.lock().unwrap().clone();
    assert!(made.iter().all(|c| READS.contains(c)), "only reads: {made:?}");
    let s = synapse_user(t, &lp).await;
    assert_eq!(s["displayname"], "Changed");
    assert!(joined_rooms(t, &id).await.is_empty(), "no room joined");
    let (status, _) = t.synapse_user(missing.user_id.localpart()).await;
    assert_eq!(status, 404, "not created");
}

/// `import` in MAS mode: MAS's user list, paged with `page[after]` past
/// its pages of 100, gives every account of the scenario's own (a real
/// MAS keeps the users of earlier runs: the scenario filters by its
/// prefix), each read whole (emails, upstream links, lock, deactivation,
/// admin) into a manifest that says what the account has.
pub async fn import_pages_through_every_account(t: &MasTarget) {
    use matrix_user_operator::backend::Backend;
    use matrix_user_operator::import::{self, Known, Selection, Summary};

    let b = backend(t);
    let prefix = unique("imp");
    for n in 0..101 {
        let lp = format!("{prefix}-{n:03}");
        let mut d = Desired::existing(user_id(t, &lp));
        d.displayname = Some(format!("Imported {n}"));
        match n {
            1 => d.threepids = Some(vec![email(&format!("{lp}@example.org"))]),
            2 => d.external_ids = Some(vec![link(&t.upstream_provider_id, &format!("sub-{lp}"))]),
            3 => d.locked = Some(true),
            4 => d.admin = Some(true),
            _ => {}
        }
        sync_ok(&b, &d, FRESH).await;
        if n == 5 {
            d.deactivated = Some(true);
            sync_ok(&b, &d, OWNED).await;
        }
    }
    let backend = Backend::Mas(b);
    let admin = backend.synapse().whoami().await.expect("whoami");
    let selection = Selection {
        include_deactivated: false,
        localpart: Some(regex::Regex::new(&format!("^{}-", regex::escape(&prefix))).unwrap()),
    };
    let mut summary = Summary::default();
    let imported = import::read_accounts(
        &backend,
        &t.server_name,
        &admin,
        &Known::default(),
        &selection,
        &mut summary,
    )
    .await
    .expect("the import reads");
    assert!(summary.listed > 100, "past the first page of 100: {summary:?}");
    let mut localparts: Vec<&str> = imported.iter().map(|i| i.localpart.as_str()).collect();
    localparts.sort();
    let expected: Vec<String> = (0..101)
        .filter(|n| *n != 5)
        .map(|n| format!("{prefix}-{n:03}"))
        .collect();
    assert_eq!(localparts, expected, "{summary:?}");
    assert_eq!(summary.skipped.get(&import::Skip::Deactivated), Some(&1), "{summary:?}");
    let of = |n: usize| {
        let lp = format!("{prefix}-{n:03}");
        imported
            .iter()
            .find(|i| i.localpart == lp)
            .expect("imported")
            .account
            .clone()
    };
    assert_eq!(of(0).displayname.as_deref(), Some("Imported 0"));
    assert_eq!(of(1).threepids, vec![email(&format!("{prefix}-001@example.org"))]);
    assert_eq!(
        of(2).external_ids,
        vec![link(&t.upstream_provider_id, &format!("sub-{prefix}-002"))]
    );
    assert!(of(3).locked && !of(3).deactivated);
    assert!(of(4).admin);

    // With --include-deactivated, the deactivated one too; the manifests
    // parse as MatrixUsers and say what the accounts have.
    let selection = Selection {
        include_deactivated: true,
        ..selection
    };
    let mut summary = Summary::default();
    let imported = import::read_accounts(
        &backend,
        &t.server_name,
        &admin,
        &Known::default(),
        &selection,
        &mut summary,
    )
    .await
    .expect("the import reads");
    assert_eq!(imported.len(), 101);
    let manifests = import::manifests(
        imported,
        "chat",
        "mas",
        matrix_user_operator::api::ManagementPolicy::Observe,
        &Default::default(),
    )
    .expect("manifests");
    let specs: std::collections::HashMap<String, matrix_user_operator::api::MatrixUserSpec> = manifests
        .iter()
        .map(|m| {
            let u: matrix_user_operator::api::MatrixUser = serde_yaml::from_str(&m.text).expect("a MatrixUser");
            (m.name.clone(), u.spec)
        })
        .collect();
    let spec = |n: usize| specs[&format!("{prefix}-{n:03}")].clone();
    assert_eq!(spec(3).locked, Some(true));
    assert_eq!(spec(5).deactivated, Some(true));
    assert_eq!(spec(4).admin, Some(true));
    assert!(spec(0).adopt && spec(0).password.is_none());
    assert_eq!(spec(0).deletion_policy, DeletionPolicy::Retain);
}
