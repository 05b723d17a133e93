//! Smoke test for the Synapse test harness in `testkit/src/synapse.rs`.

use matrix_user_operator_testkit as common;

use std::io::Write;

use common::{SYNAPSE_VERSION, synapse};

#[tokio::test]
async fn synapse_runs_and_accounts_work() {
    let server = synapse();

    let (status, body) = server.admin_get("/_synapse/admin/v1/server_version").await;
    assert_eq!(status, 200, "server_version: {body}");
    let version = body["server_version"].as_str().unwrap_or_default();
    // Synapse appends "(b=<branch>,<commit>)" when its files sit inside a git
    // checkout, as the venv under target/ does.
    assert_eq!(
        version.split_whitespace().next(),
        Some(SYNAPSE_VERSION),
        "server_version: {body}"
    );
    // Straight to stderr so the line survives libtest's output capture.
    let _ = writeln!(std::io::stderr(), "synapse {version} at {}", server.base_url);

    let localpart = server.unique_localpart("smoke");
    let password = "correct horse battery staple";
    let token = server.register_user(&localpart, password, false).await;
    assert_eq!(server.whoami_status(&token).await, 200);

    let login_token = server
        .login(&localpart, password)
        .await
        .expect("login with the right password");
    assert_eq!(server.whoami_status(&login_token).await, 200);
    assert_eq!(server.login(&localpart, "wrong password").await, Err(403));
    assert_eq!(server.whoami_status("not-a-token").await, 401);

    let (status, user) = server
        .admin_get(&format!("/_synapse/admin/v2/users/{}", server.user_id(&localpart)))
        .await;
    assert_eq!(status, 200, "{user}");
    assert_eq!(user["name"], server.user_id(&localpart));
    assert_eq!(user["admin"], false);
}

/// The same server is shared with tests on other threads and runtimes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_is_admin_on_a_shared_server() {
    let server = synapse();
    assert_eq!(server.server_name, "example.test");
    assert!(!server.base_url.ends_with('/'));
    assert_eq!(server.admin_user_id, server.user_id("harness-admin"));
    assert_eq!(server.whoami_status(&server.admin_token).await, 200);

    let path = format!("/_synapse/admin/v2/users/{}", server.admin_user_id);
    let (status, admin) = server.admin_get(&path).await;
    assert_eq!(status, 200, "{admin}");
    assert_eq!(admin["admin"], true);

    // PUT upsert round trip.
    let localpart = server.unique_localpart("put");
    let user_path = format!("/_synapse/admin/v2/users/{}", server.user_id(&localpart));
    let (status, body) = server
        .admin_put(&user_path, serde_json::json!({"displayname": "Put Test"}))
        .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["displayname"], "Put Test");
}

/// Works outside any runtime too.
#[test]
fn synapse_from_a_plain_test() {
    let server = synapse();
    let a = server.unique_localpart("plain");
    let b = server.unique_localpart("plain");
    assert_ne!(a, b);
    assert!(
        a.bytes()
            .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/'))
    );
    assert!(std::ptr::eq(server, synapse()));
}
