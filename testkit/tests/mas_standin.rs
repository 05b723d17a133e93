//! Tests of the MAS stand-in (testkit/src/mas) against its real MAS-mode
//! Synapse: one test per row of /work/shared/mas/README.md where practical.
//! They share one stand-in and one Synapse; every test makes its own users.
//!
//! Tests that flip a stand-in-wide knob (`expire_admin_tokens`,
//! `set_unavailable`) take [`EXCLUSIVE`] for writing; all others hold it for
//! reading, so no test sees another's knob.

use matrix_user_operator_testkit as common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::RwLock;

use common::mas::{
    ADMIN_LOCALPART, DISABLED_PROVIDER_NAME, MasAdminClient, MasTarget, PROVIDER_NAME, STRONG_PASSWORD, mas_standin,
    password_is_strong,
};
use common::synapse::http_client;

static EXCLUSIVE: RwLock<()> = RwLock::const_new(());
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A username no other test of this process uses.
fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-p{}",
        COUNTER.fetch_add(1, Ordering::Relaxed),
        std::process::id()
    )
}

async fn setup() -> (MasTarget, MasAdminClient) {
    let target = mas_standin().target();
    let admin = target.admin().await;
    (target, admin)
}

fn title(body: &Value) -> &str {
    body["errors"][0]["title"].as_str().unwrap_or_default()
}

/// A user in MAS (and Synapse) with `STRONG_PASSWORD` set; returns its ULID.
async fn user_with_password(admin: &MasAdminClient, username: &str) -> String {
    let user = admin.create_user(username).await;
    let (status, body) = admin.set_password(&user.id, STRONG_PASSWORD).await;
    assert_eq!(status, 204, "set-password: {body}");
    user.id
}

#[tokio::test]
async fn version_and_site_config_follow_the_spec() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let (status, body) = admin.get("/api/admin/v1/version").await;
    assert_eq!((status, body), (200, json!({"version": "v1.22.0"})));
    let (status, body) = admin.get("/api/admin/v1/site-config").await;
    assert_eq!(status, 200);
    assert_eq!(body["server_name"], json!(target.server_name));
    for key in [
        "password_login_enabled",
        "password_registration_enabled",
        "password_registration_email_required",
        "password_registration_token_required",
        "registration_token_required",
        "email_change_allowed",
        "displayname_change_allowed",
        "password_change_allowed",
        "account_recovery_allowed",
        "account_deactivation_allowed",
        "captcha_enabled",
    ] {
        assert!(body[key].is_boolean(), "{key} in {body}");
    }
    assert_eq!(body["minimum_password_complexity"], json!(3));
}

#[tokio::test]
async fn create_user_provisions_synapse_with_the_profile() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("create");
    let (status, body) = admin
        .post(
            "/api/admin/v1/users",
            json!({"username": username, "displayname": "Ada Lovelace", "avatar_url": "mxc://example.test/ada"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let data = &body["data"];
    let id = data["id"].as_str().unwrap();
    assert_eq!(id.len(), 26, "a ULID: {id}");
    assert_eq!(data["type"], "user");
    assert_eq!(data["links"]["self"], json!(format!("/api/admin/v1/users/{id}")));
    assert_eq!(body["links"]["self"], json!(format!("/api/admin/v1/users/{id}")));
    let a = &data["attributes"];
    assert_eq!(a["username"], json!(username));
    assert!(a["created_at"].as_str().unwrap().ends_with('Z'), "{a}");
    assert_eq!(
        (&a["locked_at"], &a["deactivated_at"], &a["admin"], &a["legacy_guest"]),
        (&Value::Null, &Value::Null, &json!(false), &json!(false))
    );

    let (status, synapse) = target.synapse_user(&username).await;
    assert_eq!(status, 200, "{synapse}");
    assert_eq!(synapse["displayname"], "Ada Lovelace");
    assert_eq!(synapse["avatar_url"], "mxc://example.test/ada");
    assert_eq!(
        (&synapse["admin"], &synapse["deactivated"], &synapse["locked"]),
        (&json!(false), &json!(false), &json!(false))
    );
    assert!(
        mas_standin().synapse_job_errors().is_empty(),
        "{:?}",
        mas_standin().synapse_job_errors()
    );
}

#[tokio::test]
async fn create_user_refusals() {
    let _shared = EXCLUSIVE.read().await;
    let (_, admin) = setup().await;
    let username = unique("dup");
    admin.create_user(&username).await;
    let (status, body) = admin.post("/api/admin/v1/users", json!({"username": username})).await;
    assert_eq!((status, title(&body)), (409, "User already exists"), "{body}");

    for invalid in ["Upper", "with space", "_leading", "zoë", &"a".repeat(256), ""] {
        let (status, body) = admin.post("/api/admin/v1/users", json!({"username": invalid})).await;
        assert_eq!(
            (status, title(&body)),
            (400, "Username is not valid"),
            "{invalid:?}: {body}"
        );
    }
    // Synapse reserves all-digit localparts for guests.
    let digits = format!("{}", 900_000_000 + COUNTER.fetch_add(1, Ordering::Relaxed));
    let (status, body) = admin.post("/api/admin/v1/users", json!({"username": digits})).await;
    assert_eq!(
        (status, title(&body)),
        (409, "Username is reserved by the homeserver"),
        "{body}"
    );

    let (status, body) = admin.post("/api/admin/v1/users", json!({"name": "x"})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body.is_string(), "plain text: {body}");
    let response = http_client()
        .post(format!("{}/api/admin/v1/users", admin.mas_url))
        .bearer_auth(&admin.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 422, "malformed JSON");
    let response = http_client()
        .post(format!("{}/api/admin/v1/users", admin.mas_url))
        .bearer_auth(&admin.token)
        .body(json!({"username": unique("notype")}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 415, "no JSON content type");
}

#[tokio::test]
async fn get_users_by_id_and_username() {
    let _shared = EXCLUSIVE.read().await;
    let (_, admin) = setup().await;
    let username = unique("get");
    let user = admin.create_user(&username).await;
    assert_eq!(admin.get_user_by_username(&username).await, Some(user.clone()));
    assert_eq!(admin.get_user(&user.id).await, Some(user));
    assert_eq!(admin.get_user_by_username(&unique("nobody")).await, None);
    let (status, body) = admin.get("/api/admin/v1/users/01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
    assert_eq!(
        (status, title(&body)),
        (404, "User ID 01ARZ3NDEKTSV4RRFFQ69G5FAV not found")
    );
    let (status, _) = admin
        .delete(&format!(
            "/api/admin/v1/users/{}",
            admin.get_user_by_username(&username).await.unwrap().id
        ))
        .await;
    assert_eq!(status, 405, "MAS has no user deletion");
}

#[tokio::test]
async fn admin_tokens_are_client_credentials_for_five_minutes() {
    let _shared = EXCLUSIVE.read().await;
    let standin = mas_standin();
    let target = standin.target();
    let (status, body) = target
        .token_request(&target.client_id, &target.client_secret, "urn:mas:admin")
        .await;
    assert_eq!(status, 200, "{}", body["error"]);
    assert_eq!(
        (&body["token_type"], &body["expires_in"], &body["scope"]),
        (&json!("Bearer"), &json!(300), &json!("urn:mas:admin"))
    );
    let token = body["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("mat_"));

    let (status, body) = target.token_request(&target.client_id, "wrong", "urn:mas:admin").await;
    assert_eq!((status, &body["error"]), (401, &json!("invalid_client")));
    let (status, body) = target
        .token_request(
            &target.client_id,
            &target.client_secret,
            "urn:mas:admin urn:synapse:admin:*",
        )
        .await;
    assert_eq!((status, &body["error"]), (403, &json!("invalid_scope")));
    assert_eq!(body["error_description"], "scope 'urn:synapse:admin:*' not allowed");
    let (other_id, other_secret) = standin.non_admin_client();
    let (status, body) = target.token_request(&other_id, &other_secret, "urn:mas:admin").await;
    assert_eq!(
        (status, &body["error"]),
        (403, &json!("invalid_scope")),
        "not an admin client"
    );

    // One expired token: 401; a new one works.
    let admin = MasAdminClient {
        mas_url: target.mas_url.clone(),
        token: token.clone(),
    };
    assert_eq!(admin.get("/api/admin/v1/version").await.0, 200);
    standin.expire_admin_token(&token);
    let (status, body) = admin.get("/api/admin/v1/version").await;
    assert_eq!(status, 401, "{body}");
    assert!(!title(&body).is_empty(), "{body}");
    assert_eq!(target.admin().await.get("/api/admin/v1/version").await.0, 200);

    let bare = MasAdminClient {
        mas_url: target.mas_url.clone(),
        token: "mat_not_a_token".to_owned(),
    };
    assert_eq!(bare.get("/api/admin/v1/version").await.0, 401);
}

#[tokio::test]
async fn expire_admin_tokens_expires_them_all() {
    let _exclusive = EXCLUSIVE.write().await;
    let standin = mas_standin();
    let target = standin.target();
    let (first, second) = (target.admin().await, target.admin().await);
    standin.expire_admin_tokens();
    assert_eq!(first.get("/api/admin/v1/version").await.0, 401);
    assert_eq!(second.get("/api/admin/v1/version").await.0, 401);
    assert_eq!(target.admin().await.get("/api/admin/v1/version").await.0, 200);
}

#[tokio::test]
async fn a_mas_admin_token_is_no_synapse_token() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let (status, body) = target
        .synapse_request(
            Method::GET,
            "/_synapse/admin/v2/users/@x:example.test",
            Some(&admin.token),
            None,
        )
        .await;
    assert_eq!((status, &body["errcode"]), (401, &json!("M_UNKNOWN_TOKEN")), "{body}");
    assert_eq!(body["error"], "Token doesn't grant access to the Matrix C-S API");
}

#[tokio::test]
async fn set_password_and_compat_login() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("login");
    let user = admin.create_user(&username).await;
    // No password yet.
    assert_eq!(
        target.login(&username, STRONG_PASSWORD).await.err(),
        Some((403, "M_FORBIDDEN".to_owned()))
    );

    assert!(!password_is_strong(&target.weak_password));
    let (status, body) = admin.set_password(&user.id, &target.weak_password).await;
    assert_eq!((status, title(&body)), (400, "Password is too weak"));
    let (status, _) = admin
        .user_action(
            &user.id,
            "set-password",
            json!({"password": "short", "skip_password_check": true}),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(target.login(&username, "short").await.map(|_| ()), Ok(()));
    let (status, body) = admin.set_password(&user.id, STRONG_PASSWORD).await;
    assert_eq!((status, &body), (204, &Value::Null));
    let (status, body) = admin.set_password("01ARZ3NDEKTSV4RRFFQ69G5FAV", STRONG_PASSWORD).await;
    assert_eq!(
        (status, title(&body)),
        (404, "User ID 01ARZ3NDEKTSV4RRFFQ69G5FAV not found")
    );

    assert_eq!(
        target.login(&username, "short").await.err(),
        Some((403, "M_FORBIDDEN".to_owned()))
    );
    let token = target.login(&username, STRONG_PASSWORD).await.expect("login");
    assert!(token.starts_with("mct_"));
    let (status, whoami) = target
        .synapse_request(Method::GET, "/_matrix/client/v3/account/whoami", Some(&token), None)
        .await;
    assert_eq!(status, 200, "{whoami}");
    assert_eq!(whoami["user_id"], json!(target.user_id(&username)));
    let device = whoami["device_id"].as_str().expect("a device").to_owned();
    let (status, devices) = target
        .synapse_admin_get(&format!(
            "/_synapse/admin/v2/users/{}/devices",
            target.user_id(&username)
        ))
        .await;
    assert_eq!(status, 200, "{devices}");
    assert!(
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["device_id"] == json!(device)),
        "{devices}"
    );

    // Legacy `user` field, full MXID, and the login flows.
    let client = http_client();
    let response = client
        .post(format!("{}/_matrix/client/v3/login", target.mas_url))
        .json(&json!({"type": "m.login.password", "user": target.user_id(&username), "password": STRONG_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user_id"], json!(target.user_id(&username)));
    assert!(body["device_id"].is_string() && body["access_token"].is_string());
    let flows: Value = client
        .get(format!("{}/_matrix/client/v3/login", target.mas_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        flows["flows"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["type"] == "m.login.password"),
        "{flows}"
    );
}

#[tokio::test]
async fn lock_and_unlock_follow_into_synapse() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("lock");
    let id = user_with_password(&admin, &username).await;
    let before = target.login(&username, STRONG_PASSWORD).await.expect("login");
    assert_eq!(target.synapse_whoami_status(&before).await, 200);

    for _ in 0..2 {
        let (status, body) = admin.user_action(&id, "lock", Value::Null).await;
        assert_eq!(status, 200, "idempotent: {body}");
        assert!(body["data"]["attributes"]["locked_at"].is_string());
        assert_eq!(body["links"]["self"], json!(format!("/api/admin/v1/users/{id}/lock")));
    }
    assert_eq!(target.synapse_user(&username).await.1["locked"], json!(true));
    assert_eq!(
        target.login(&username, STRONG_PASSWORD).await.err(),
        Some((401, "M_USER_LOCKED".to_owned()))
    );
    // Synapse caches the introspection of a token it has seen (2 minutes),
    // so that one still works; a token it has not seen is inactive.
    assert_eq!(target.synapse_whoami_status(&before).await, 200);
    let (fresh, _) = mas_standin().issue_compatibility_token(&username, false).await;
    assert_eq!(target.synapse_whoami_status(&fresh).await, 401);

    for _ in 0..2 {
        let (status, body) = admin.user_action(&id, "unlock", Value::Null).await;
        assert_eq!((status, &body["data"]["attributes"]["locked_at"]), (200, &Value::Null));
    }
    assert_eq!(target.synapse_user(&username).await.1["locked"], json!(false));
    assert!(target.login(&username, STRONG_PASSWORD).await.is_ok());
}

#[tokio::test]
async fn deactivate_erases_deletes_emails_and_reactivate_keeps_them_gone() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("deact");
    let (status, body) = admin
        .post(
            "/api/admin/v1/users",
            json!({"username": username, "displayname": "Doomed"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["data"]["id"].as_str().unwrap().to_owned();
    admin.set_password(&id, STRONG_PASSWORD).await;
    let email = format!("{username}@example.test");
    assert_eq!(admin.add_email(&id, &email).await.0, 201);
    let unused = target.login(&username, STRONG_PASSWORD).await.expect("login");

    let (status, body) = admin.user_action(&id, "deactivate", Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["data"]["attributes"]["deactivated_at"].is_string());
    let (_, synapse) = target.synapse_user(&username).await;
    assert_eq!(
        (&synapse["deactivated"], &synapse["erased"]),
        (&json!(true), &json!(true)),
        "{synapse}"
    );
    assert!(
        synapse["displayname"].is_null() || synapse["displayname"] == "",
        "{synapse}"
    );
    assert_eq!(synapse["threepids"], json!([]));
    assert!(
        admin.user_emails(&id).await.is_empty(),
        "deactivation deletes the emails in MAS"
    );
    assert_eq!(
        target.login(&username, STRONG_PASSWORD).await.err(),
        Some((403, "M_FORBIDDEN".to_owned()))
    );
    assert_eq!(target.synapse_whoami_status(&unused).await, 401, "its sessions ended");
    // Deactivated users show in filter[status]=deactivated.
    let listed = admin
        .list_all(&format!(
            "/api/admin/v1/users?filter[status]=deactivated&filter[search]={username}"
        ))
        .await;
    assert_eq!(listed.len(), 1);

    let (status, body) = admin.user_action(&id, "reactivate", Value::Null).await;
    assert_eq!(
        (status, &body["data"]["attributes"]["deactivated_at"]),
        (200, &Value::Null),
        "{body}"
    );
    let (_, synapse) = target.synapse_user(&username).await;
    assert_eq!(synapse["deactivated"], json!(false), "{synapse}");
    assert!(
        synapse["displayname"].is_null() || synapse["displayname"] == "",
        "stays cleared: {synapse}"
    );
    assert!(admin.user_emails(&id).await.is_empty(), "emails are not restored");
    // The password survives.
    assert!(target.login(&username, STRONG_PASSWORD).await.is_ok());
}

#[tokio::test]
async fn deactivate_with_skip_erase_does_not_erase() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("skiperase");
    let id = admin.create_user(&username).await.id;
    assert_eq!(admin.add_email(&id, &format!("{username}@example.test")).await.0, 201);
    let (status, _) = admin.user_action(&id, "deactivate", json!({"skip_erase": true})).await;
    assert_eq!(status, 200);
    let (_, synapse) = target.synapse_user(&username).await;
    assert_eq!(
        (&synapse["deactivated"], &synapse["erased"]),
        (&json!(true), &json!(false)),
        "{synapse}"
    );
    assert!(
        admin.user_emails(&id).await.is_empty(),
        "either kind deletes the emails"
    );
}

#[tokio::test]
async fn a_repeated_deactivate_can_land_after_a_reactivate() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let standin = mas_standin();
    let username = unique("race");
    let id = admin.create_user(&username).await.id;
    assert_eq!(admin.user_action(&id, "deactivate", Value::Null).await.0, 200);
    standin.set_synapse_job_delay_for(&username, Some(Duration::from_secs(5)));
    assert_eq!(
        admin.user_action(&id, "deactivate", Value::Null).await.0,
        200,
        "repeated: 200"
    );
    standin.clear_synapse_job_delay_for(&username);
    assert_eq!(admin.user_action(&id, "reactivate", Value::Null).await.0, 200);
    assert_eq!(target.synapse_user(&username).await.1["deactivated"], json!(false));
    standin.wait_for_synapse_jobs(Duration::from_secs(30)).await;
    // The queued job of the second deactivate landed last.
    assert_eq!(target.synapse_user(&username).await.1["deactivated"], json!(true));
    assert_eq!(
        admin.get_user(&id).await.map(|u| u.deactivated),
        Some(false),
        "MAS says active, Synapse says deactivated"
    );
}

#[tokio::test]
async fn set_admin_changes_mas_only() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("setadmin");
    let id = admin.create_user(&username).await.id;
    let (status, body) = admin.user_action(&id, "set-admin", json!({"admin": true})).await;
    assert_eq!((status, &body["data"]["attributes"]["admin"]), (200, &json!(true)));
    assert_eq!(target.synapse_user(&username).await.1["admin"], json!(false));
    // The harness's own admin: MAS admin, Synapse admin token, Synapse admin: false.
    assert_eq!(
        admin.get_user_by_username(ADMIN_LOCALPART).await.map(|u| u.admin),
        Some(true)
    );
    assert_eq!(target.synapse_user(ADMIN_LOCALPART).await.1["admin"], json!(false));
    let admins = admin.list_all("/api/admin/v1/users?filter[admin]=true").await;
    assert!(admins.iter().any(|u| u["attributes"]["username"] == json!(username)));
}

#[tokio::test]
async fn emails_go_to_synapse_threepids() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("email");
    let id = admin.create_user(&username).await.id;
    let email = format!("{username}@example.test");
    let (status, body) = admin.add_email(&id, &email).await;
    assert_eq!(status, 201, "{body}");
    let email_id = body["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(body["data"]["type"], "user-email");
    assert_eq!(body["data"]["attributes"]["user_id"], json!(id));
    let (_, synapse) = target.synapse_user(&username).await;
    let threepids = synapse["threepids"].as_array().unwrap();
    assert_eq!(threepids.len(), 1, "{synapse}");
    assert_eq!(
        (&threepids[0]["medium"], &threepids[0]["address"]),
        (&json!("email"), &json!(email))
    );
    assert!(threepids[0]["validated_at"].is_number());

    // In use, by anyone.
    let other = admin.create_user(&unique("email-other")).await.id;
    let (status, body) = admin.add_email(&other, &email).await;
    assert_eq!(
        (status, title(&body)),
        (409, format!("User email \"{email}\" already in use").as_str())
    );
    assert_eq!(admin.add_email(&id, &email).await.0, 409);
    let (status, _) = admin.add_email("01ARZ3NDEKTSV4RRFFQ69G5FAV", "x@example.test").await;
    assert_eq!(status, 404);
    assert_eq!(admin.add_email(&id, "not an email").await.0, 400);
    let (status, body) = admin
        .get("/api/admin/v1/user-emails?filter[user]=01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await;
    assert_eq!(status, 404, "unknown user: 404, not an empty list: {body}");
    assert_eq!(admin.user_emails(&id).await, vec![email.clone()]);
    let (status, body) = admin.get(&format!("/api/admin/v1/user-emails/{email_id}")).await;
    assert_eq!((status, &body["data"]["attributes"]["email"]), (200, &json!(email)));

    let (status, body) = admin.delete(&format!("/api/admin/v1/user-emails/{email_id}")).await;
    assert_eq!((status, body), (204, Value::Null));
    assert_eq!(
        admin.delete(&format!("/api/admin/v1/user-emails/{email_id}")).await.0,
        404
    );
    assert_eq!(target.synapse_user(&username).await.1["threepids"], json!([]));
}

#[tokio::test]
async fn upstream_links_stay_in_mas() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let standin = mas_standin();
    let username = unique("link");
    let id = admin.create_user(&username).await.id;
    let subject = unique("subject");
    let (status, body) = admin
        .add_upstream_link(&id, &target.upstream_provider_id, &subject)
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["type"], "upstream-oauth-link");
    let link_id = body["data"]["id"].as_str().unwrap().to_owned();

    let other = admin.create_user(&unique("link-other")).await.id;
    let (status, body) = admin
        .add_upstream_link(&other, &target.upstream_provider_id, &subject)
        .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = admin
        .add_upstream_link(&id, "01ARZ3NDEKTSV4RRFFQ69G5FAV", &subject)
        .await;
    assert_eq!(status, 404, "unknown provider");
    // The same subject at another provider is another account.
    let (status, _) = admin
        .add_upstream_link(&other, standin.disabled_provider_id(), &subject)
        .await;
    assert_eq!(status, 201);

    let links = admin.upstream_links(&id).await;
    assert_eq!(links.len(), 1);
    assert_eq!(
        (links[0].provider_id.as_str(), links[0].subject.as_str()),
        (target.upstream_provider_id.as_str(), subject.as_str())
    );
    let by_subject = admin
        .list_all(&format!(
            "/api/admin/v1/upstream-oauth-links?filter[provider]={}&filter[subject]={subject}",
            target.upstream_provider_id
        ))
        .await;
    assert_eq!(by_subject.len(), 1);
    assert_eq!(by_subject[0]["attributes"]["user_id"], json!(id));
    assert_eq!(
        target.synapse_user(&username).await.1["external_ids"],
        json!([]),
        "not mirrored"
    );

    let (status, _) = admin
        .delete(&format!("/api/admin/v1/upstream-oauth-links/{link_id}"))
        .await;
    assert_eq!(status, 204);
    assert!(admin.upstream_links(&id).await.is_empty());
}

#[tokio::test]
async fn upstream_providers() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let all = admin.list_all("/api/admin/v1/upstream-oauth-providers").await;
    let names: Vec<&str> = all
        .iter()
        .filter_map(|p| p["attributes"]["human_name"].as_str())
        .collect();
    assert_eq!(names, vec![PROVIDER_NAME, DISABLED_PROVIDER_NAME]);
    for p in &all {
        for key in ["issuer", "human_name", "brand_name", "created_at", "disabled_at"] {
            assert!(p["attributes"].get(key).is_some(), "{key} in {p}");
        }
    }
    let enabled = admin
        .list_all("/api/admin/v1/upstream-oauth-providers?filter[enabled]=true")
        .await;
    assert_eq!(enabled.len(), 1);
    assert_eq!(enabled[0]["id"], json!(target.upstream_provider_id));
    let (status, body) = admin
        .get(&format!(
            "/api/admin/v1/upstream-oauth-providers/{}",
            target.upstream_provider_id
        ))
        .await;
    assert_eq!(
        (status, &body["data"]["attributes"]["human_name"]),
        (200, &json!(target.upstream_provider_name))
    );
}

#[tokio::test]
async fn users_pagination_and_filters() {
    let _shared = EXCLUSIVE.read().await;
    let (_, admin) = setup().await;
    let prefix = unique("page");
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(admin.create_user(&format!("{prefix}-{i:02}")).await.id);
    }
    let (status, page) = admin.get(&format!("/api/admin/v1/users?filter[search]={prefix}")).await;
    assert_eq!(status, 200);
    assert_eq!(page["meta"]["count"], json!(12));
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 10, "10 a page unless asked");
    assert_eq!(data[0]["meta"]["page"]["cursor"], json!(ids[0]));
    let next = page["links"]["next"].as_str().expect("a next link").to_owned();
    let (_, rest) = admin.get(&next).await;
    let rest_ids: Vec<&Value> = rest["data"].as_array().unwrap().iter().map(|u| &u["id"]).collect();
    assert_eq!(rest_ids, vec![&json!(ids[10]), &json!(ids[11])]);
    assert!(rest["links"]["next"].is_null());

    let (_, five) = admin
        .get(&format!(
            "/api/admin/v1/users?filter[search]={prefix}&page[first]=5&page[after]={}",
            ids[1]
        ))
        .await;
    let five: Vec<String> = five["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(five, ids[2..7].to_vec());

    assert_eq!(admin.user_action(&ids[3], "lock", Value::Null).await.0, 200);
    let locked = admin
        .list_all(&format!(
            "/api/admin/v1/users?filter[search]={prefix}&filter[status]=locked"
        ))
        .await;
    assert_eq!(locked.len(), 1);
    let active = admin
        .list_all(&format!(
            "/api/admin/v1/users?filter[search]={prefix}&filter[status]=active"
        ))
        .await;
    assert_eq!(active.len(), 11);
}

#[tokio::test]
async fn synapse_is_in_mas_mode() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let (status, body) = target
        .synapse_admin_put(
            &format!("/_synapse/admin/v2/users/{}", target.user_id(&unique("new"))),
            json!({}),
        )
        .await;
    assert_eq!((status, &body["errcode"]), (403, &json!("M_FORBIDDEN")), "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("User creation via the Admin API is not available"),
        "{body}"
    );

    let username = unique("mode");
    admin.create_user(&username).await;
    let path = format!("/_synapse/admin/v2/users/{}", target.user_id(&username));
    let (status, body) = target
        .synapse_admin_put(&path, json!({"password": STRONG_PASSWORD}))
        .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = target
        .synapse_admin_put(&path, json!({"displayname": "Set in Synapse"}))
        .await;
    assert_eq!(status, 200, "{body}");

    let (status, metadata) = target
        .synapse_request(Method::GET, "/_matrix/client/v1/auth_metadata", None, None)
        .await;
    assert_eq!(status, 200, "{metadata}");
    assert_eq!(metadata["issuer"], json!(format!("{}/", target.mas_url)));
    let (status, _) = target
        .synapse_request(Method::GET, "/_matrix/client/v3/login", None, None)
        .await;
    assert_eq!(status, 404, "Synapse's own login is gone");
}

#[tokio::test]
async fn personal_sessions_mint_synapse_admin_tokens() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let id = admin.create_user(&unique("pat")).await.id;
    let (status, body) = admin
        .post(
            "/api/admin/v1/personal-sessions",
            json!({"actor_user_id": id, "human_name": "operator", "scope": "urn:matrix:client:api:* urn:synapse:admin:*"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["data"]["type"], "personal-session");
    let token = body["data"]["attributes"]["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("mpt_"));
    let (status, body) = target
        .synapse_request(Method::GET, "/_synapse/admin/v1/server_version", Some(&token), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = target
        .synapse_request(
            Method::GET,
            &format!("/_synapse/admin/v2/users/{}", target.user_id(ADMIN_LOCALPART)),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200, "a Synapse admin token for a non-admin user: {body}");
}

/// What a real MAS 1.22 answered to personal-session calls (measured):
/// revoke 200 then 409, unknown 404, a bad ID 400; regenerate ends the
/// previous token at once and is 422 on a revoked session; a device scope
/// makes the device in Synapse, kept while another active session names
/// it; a deactivated user gets 410 and its sessions are revoked.
#[tokio::test]
async fn personal_sessions_revoke_regenerate_and_devices_as_measured() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("pat-dev");
    let id = admin.create_user(&username).await.id;
    let create = |scope: &str| json!({"actor_user_id": id, "human_name": "bot", "scope": scope, "expires_in": 3600});
    let device_scope = "urn:matrix:client:api:* urn:matrix:client:device:PATDEV1";
    let (status, one) = admin
        .post("/api/admin/v1/personal-sessions", create(device_scope))
        .await;
    assert_eq!(status, 201, "{one}");
    let (status, two) = admin
        .post("/api/admin/v1/personal-sessions", create(device_scope))
        .await;
    assert_eq!(status, 201, "{two}");
    let one_id = one["data"]["id"].as_str().unwrap().to_owned();
    let two_token = two["data"]["attributes"]["access_token"].as_str().unwrap().to_owned();
    let (status, who) = target
        .synapse_request(Method::GET, "/_matrix/client/v3/account/whoami", Some(&two_token), None)
        .await;
    assert_eq!((status, who["device_id"].as_str()), (200, Some("PATDEV1")), "{who}");

    let revoke = format!("/api/admin/v1/personal-sessions/{one_id}/revoke");
    let (status, body) = admin.post(&revoke, json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(!body["data"]["attributes"]["revoked_at"].is_null());
    assert!(body["data"]["attributes"]["access_token"].is_null());
    let (status, body) = admin.post(&revoke, json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(title(&body).ends_with("is already revoked"), "{body}");
    let (status, _) = admin
        .post(
            "/api/admin/v1/personal-sessions/01ARZ3NDEKTSV4RRFFQ69G5FAV/revoke",
            json!({}),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _) = admin.get("/api/admin/v1/personal-sessions/notaulid").await;
    assert_eq!(status, 400);
    // The device stays: session two names it.
    let (_, devices) = target
        .synapse_admin_get(&format!(
            "/_synapse/admin/v2/users/{}/devices",
            target.user_id(&username)
        ))
        .await;
    assert_eq!(devices["total"], 1, "{devices}");
    let (status, _) = admin
        .post(
            &format!("/api/admin/v1/personal-sessions/{one_id}/regenerate"),
            json!({}),
        )
        .await;
    assert_eq!(status, 422, "a revoked session is not regenerated");

    let two_id = two["data"]["id"].as_str().unwrap().to_owned();
    let (status, regenerated) = admin
        .post(
            &format!("/api/admin/v1/personal-sessions/{two_id}/regenerate"),
            json!({}),
        )
        .await;
    assert_eq!(status, 201, "{regenerated}");
    let new_token = regenerated["data"]["attributes"]["access_token"].as_str().unwrap();
    assert_ne!(new_token, two_token);
    let introspected = |token: String| {
        let target = target.clone();
        async move {
            let response = http_client()
                .post(format!("{}/oauth2/introspect", target.mas_url))
                .basic_auth(&target.client_id, Some(&target.client_secret))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}"))
                .send()
                .await
                .unwrap();
            let body: Value = response.json().await.unwrap();
            body["active"].as_bool().unwrap_or_default()
        }
    };
    assert!(
        !introspected(two_token.clone()).await,
        "regenerate ends the previous token"
    );
    assert!(introspected(new_token.to_owned()).await);

    let (status, _) = admin
        .post(
            &format!("/api/admin/v1/users/{id}/deactivate"),
            json!({"skip_erase": true}),
        )
        .await;
    assert_eq!(status, 200);
    let (_, session) = admin.get(&format!("/api/admin/v1/personal-sessions/{two_id}")).await;
    assert!(!session["data"]["attributes"]["revoked_at"].is_null(), "{session}");
    let (status, body) = admin
        .post("/api/admin/v1/personal-sessions", create("urn:matrix:client:api:*"))
        .await;
    assert_eq!((status, title(&body)), (410, "User is not active"));
    let (status, body) = admin
        .post(
            "/api/admin/v1/personal-sessions",
            json!({"actor_user_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV", "human_name": "x", "scope": "urn:matrix:client:api:*"}),
        )
        .await;
    assert_eq!((status, title(&body)), (404, "User not found"));
}

#[tokio::test]
async fn admin_api_authentication() {
    let _shared = EXCLUSIVE.read().await;
    let target = mas_standin().target();
    let response = http_client()
        .get(format!("{}/api/admin/v1/users", target.mas_url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    // A compatibility token (even a Synapse admin one) is no MAS admin token.
    let compat = MasAdminClient {
        mas_url: target.mas_url.clone(),
        token: target.synapse_admin_token.clone(),
    };
    assert_eq!(compat.get("/api/admin/v1/users").await.0, 401);
}

#[tokio::test]
async fn the_request_log_records_calls() {
    let _shared = EXCLUSIVE.read().await;
    let (_, admin) = setup().await;
    let standin = mas_standin();
    let name = unique("logged");
    assert_eq!(admin.get_user_by_username(&name).await, None);
    let path = format!("/api/admin/v1/users/by-username/{name}");
    let requests = standin.requests();
    let seen: Vec<_> = requests.iter().filter(|r| r.path == path).collect();
    assert_eq!(seen.len(), 1, "{requests:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].status, seen[0].from_synapse),
        ("GET", 404, false)
    );
    assert!(!seen[0].is_admin_write());
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/oauth2/introspect" && r.from_synapse),
        "Synapse introspects"
    );
}

#[tokio::test]
async fn unavailable_answers_503() {
    let _exclusive = EXCLUSIVE.write().await;
    let standin = mas_standin();
    let target = standin.target();
    let admin = target.admin().await;
    standin.set_unavailable(true);
    let status = admin.get("/api/admin/v1/version").await.0;
    standin.set_unavailable(false);
    assert_eq!(status, 503);
    standin.set_down(true);
    let result = http_client()
        .get(format!("{}/api/admin/v1/version", target.mas_url))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    standin.set_down(false);
    assert!(result.is_err(), "dropped: {result:?}");
    assert_eq!(admin.get("/api/admin/v1/version").await.0, 200);
}

#[tokio::test]
async fn client_secret_post_is_accepted_too() {
    let _shared = EXCLUSIVE.read().await;
    let target = mas_standin().target();
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "client_credentials")
        .append_pair("scope", "urn:mas:admin")
        .append_pair("client_id", &target.client_id)
        .append_pair("client_secret", &target.client_secret)
        .finish();
    let response = http_client()
        .post(format!("{}/oauth2/token", target.mas_url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["access_token"].as_str().unwrap().starts_with("mat_"));
}

#[tokio::test]
async fn compat_logout_ends_the_session_and_the_device() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("logout");
    user_with_password(&admin, &username).await;
    let token = target.login(&username, STRONG_PASSWORD).await.expect("login");
    let (_, whoami) = target
        .synapse_request(Method::GET, "/_matrix/client/v3/account/whoami", Some(&token), None)
        .await;
    let device = whoami["device_id"].clone();
    let response = http_client()
        .post(format!("{}/_matrix/client/v3/logout", target.mas_url))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (_, devices) = target
        .synapse_admin_get(&format!(
            "/_synapse/admin/v2/users/{}/devices",
            target.user_id(&username)
        ))
        .await;
    assert!(
        devices["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["device_id"] != device),
        "{devices}"
    );
    // The device is gone, so Synapse drops even its cached introspection.
    assert_eq!(target.synapse_whoami_status(&token).await, 401);
}

#[tokio::test]
async fn mas_target_is_the_stand_in_without_mas_url() {
    if std::env::var_os("MAS_URL").is_none() {
        let _shared = EXCLUSIVE.read().await;
        assert_eq!(common::mas::mas_target().mas_url, mas_standin().url());
        let shown = format!("{:?}", mas_standin().target());
        assert!(
            !shown.contains(&mas_standin().target().client_secret),
            "Debug redacts secrets"
        );
    }
}

#[tokio::test]
async fn synapse_side_changes_and_mas_reprovisioning() {
    let _shared = EXCLUSIVE.read().await;
    let (target, admin) = setup().await;
    let username = unique("reprov");
    let id = admin.create_user(&username).await.id;
    let email = format!("{username}@example.test");
    assert_eq!(admin.add_email(&id, &email).await.0, 201);
    let path = format!("/_synapse/admin/v2/users/{}", target.user_id(&username));
    let (status, body) = target
        .synapse_admin_put(
            &path,
            json!({
                "threepids": [{"medium": "email", "address": format!("other-{email}")}],
                "admin": true,
                "external_ids": [{"auth_provider": "oidc-keycloak", "external_id": "sub-1"}],
            }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Any re-provisioning (here: lock) puts MAS's emails back; Synapse's
    // own admin flag and external_ids stay.
    assert_eq!(admin.user_action(&id, "lock", Value::Null).await.0, 200);
    let (_, synapse) = target.synapse_user(&username).await;
    let addresses: Vec<&Value> = synapse["threepids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["address"])
        .collect();
    assert_eq!(addresses, vec![&json!(email)], "{synapse}");
    assert_eq!(synapse["admin"], json!(true));
    assert_eq!(synapse["external_ids"].as_array().map(Vec::len), Some(1), "{synapse}");
    assert_eq!(
        admin.get_user(&id).await.map(|u| u.admin),
        Some(false),
        "MAS is not told"
    );
}
