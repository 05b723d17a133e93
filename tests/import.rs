//! `matrix-user-operator import` against a real Synapse of its own, with 50
//! accounts of every shape and a real appservice (bridge) user: the built
//! binary reads the Homeserver and its Secret from the fake API server
//! through a kubeconfig, as a user runs it. Its output is compared with
//! the golden files in tests/golden/import/ (`UPDATE_GOLDEN=1` rewrites
//! them); the imported manifests, applied with `--manage`, become Ready
//! through the controller with no write to Synapse (they match).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};

use common::appservice::Appservice;
use common::fake_kube::{FakeApiServer, KUBECTL};
use common::fixtures::{matrix_user_in, secret_in, wait_until};
use common::proxy::{Misbehave, Proxy};
use common::synapse::{SERVER_NAME, run_on_keeper_thread, shared_secret_register, start_synapse_process};
use common::venv::target_dir;
use matrix_user_operator_testkit as common;

const NS: &str = "chat";
const HS: &str = "synapse";
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/import");

/// A Synapse with an appservice whose users are `@bridge-…`, and its admin.
struct Server {
    base_url: String,
    admin_token: String,
    appservice: Appservice,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = target_dir().join(format!("import-appservice-{}", std::process::id()));
        let appservice = Appservice::write(&dir, "import-bridge", "bridge-", SERVER_NAME);
        let config = appservice.config_override();
        // Started and registered on the keeper thread: no runtime there
        // (the tests' own would refuse a nested one).
        let (process, admin_token) = run_on_keeper_thread("import-synapse", move || {
            let process = start_synapse_process("import", config)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let (admin_token, _) = runtime.block_on(shared_secret_register(
                &process.base_url,
                &process.registration_shared_secret,
                "import-admin",
                "import-admin-password",
                true,
            ))?;
            Ok((process, admin_token))
        })
        .expect("start a Synapse with an appservice");
        Server {
            base_url: process.base_url,
            admin_token,
            appservice,
        }
    })
}

async fn admin(method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
    let s = server();
    let response = common::synapse::http_client()
        .request(method, format!("{}{path}", s.base_url))
        .bearer_auth(&s.admin_token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, common::synapse::parse_body(&response.text().await.unwrap()))
}

async fn put_user(localpart: &str, body: Value) {
    let path = format!("/_synapse/admin/v2/users/@{localpart}:{SERVER_NAME}");
    let (status, answer) = admin(reqwest::Method::PUT, &path, body).await;
    assert!(status == 200 || status == 201, "PUT {localpart}: {status} {answer}");
}

/// [`make_accounts`], once per process: the tests share the Synapse.
async fn accounts() {
    static MADE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    MADE.get_or_init(make_accounts).await;
}

/// 50 accounts: the admin, 41 people (some with emails, SSO links,
/// avatars), an admin, a locked one, a deactivated one, a bot, two whose
/// localparts are no object names, one a MatrixUser manages already, and
/// the appservice's user.
async fn make_accounts() {
    for n in 0..41 {
        let mut body = json!({"displayname": format!("Person {n:02}")});
        if n % 3 == 0 {
            body["threepids"] = json!([{"medium": "email", "address": format!("person-{n:02}@example.test")}]);
        }
        if n % 5 == 0 {
            body["external_ids"] = json!([{"auth_provider": "oidc-corp", "external_id": format!("sub-{n:02}")}]);
        }
        if n % 7 == 0 {
            body["avatar_url"] = json!(format!("mxc://{SERVER_NAME}/avatar{n:02}"));
        }
        put_user(&format!("person-{n:02}"), body).await;
    }
    put_user("ops-admin", json!({"displayname": "Ops", "admin": true})).await;
    // Synapse applies `locked` to an account that exists only.
    put_user("locked-user", json!({})).await;
    put_user("locked-user", json!({"locked": true})).await;
    put_user("gone-user", json!({"displayname": "Gone"})).await;
    put_user("gone-user", json!({"deactivated": true})).await;
    put_user("helper-bot", json!({"displayname": "Helper", "user_type": "bot"})).await;
    put_user("svc_relay", json!({"displayname": "Relay"})).await;
    put_user("team.a=b", json!({})).await;
    put_user("already-managed", json!({"displayname": "Managed"})).await;
    let (status, answer) = server()
        .appservice
        .register_user(&server().base_url, "bridge-alice")
        .await;
    assert_eq!(status, 200, "appservice registration: {answer}");
}

/// The fake cluster: the Homeserver (at `url`) and its admin token Secret,
/// and a MatrixUser that records `already-managed`.
fn cluster(url: &str) -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    fake.put(json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": HS, "namespace": NS},
        "spec": {"url": url, "adminTokenSecretRef": {"name": "synapse-admin", "key": "token"},
                 "policy": {"allowAdoption": true, "allowAdminUsers": true}},
    }));
    fake.put(secret_in(NS, "synapse-admin", "token", &server().admin_token));
    fake.put(matrix_user_in(
        "elsewhere",
        "managed",
        json!({"homeserverRef": {"name": "hs"}, "localpart": "already-managed"}),
        json!({"userId": format!("@already-managed:{SERVER_NAME}")}),
    ));
    (client, fake)
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn import(fake: &FakeApiServer, dir: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
        .arg("import")
        .args(["--homeserver", &format!("{NS}/{HS}")])
        .args(args)
        .env("KUBECONFIG", fake.kubeconfig_file(dir))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("run the binary");
    Run {
        ok: output.status.success(),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// Compares `actual` with the golden file `name`, or writes it with
/// `UPDATE_GOLDEN=1`.
fn golden(name: &str, actual: &str) {
    let path = Path::new(GOLDEN).join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    if expected != actual {
        let first = expected
            .lines()
            .zip(actual.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(expected.lines().count().min(actual.lines().count()));
        panic!(
            "{} differs from the output (first at line {}):\n{actual}",
            path.display(),
            first + 1
        );
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = target_dir().join(format!("import-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn import_writes_every_unmanaged_account_as_a_manifest_that_then_matches() {
    accounts().await;
    let proxy = Proxy::start(&server().base_url, |_| Misbehave::Forward).await;
    let (_, fake) = cluster(&proxy.url);
    let dir = scratch("main");

    // Observe, on stdout.
    let first = import(&fake, &dir, &[]);
    assert!(first.ok, "{}", first.stderr);
    golden("observe.yaml", &first.stdout);
    assert!(
        first.stderr.lines().last().unwrap_or_default()
            == "import: 50 accounts listed, 46 imported; skipped: 1 the admin token's own account, \
                1 appservice (bridge) users, 1 deactivated (--include-deactivated takes them), \
                1 already managed by a MatrixUser"
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" "),
        "{}",
        first.stderr
    );
    assert!(!first.stderr.contains(&server().admin_token));
    // A re-run: the same bytes.
    let again = import(&fake, &dir, &[]);
    assert_eq!(again.stdout, first.stdout);

    // Manage, deactivated ones too, into a directory.
    let out = dir.join("out");
    let managed = import(
        &fake,
        &dir,
        &[
            "--manage",
            "--include-deactivated",
            "--output-dir",
            out.to_str().unwrap(),
        ],
    );
    assert!(managed.ok, "{}", managed.stderr);
    assert_eq!(managed.stdout, "");
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    golden("manage/files.txt", &files.join("\n"));
    for file in &files {
        golden(
            &format!("manage/{file}"),
            &std::fs::read_to_string(out.join(file)).unwrap(),
        );
    }

    // Applied with the operator: every one Ready, with no write to Synapse.
    let before = proxy.seen().len();
    for file in files.iter().filter(|f| *f != "kustomization.yaml") {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        let obj: Value = serde_yaml::from_str(&text).unwrap();
        fake.apply(KUBECTL, obj);
    }
    let stop = common::fixtures::run_operator(&fake, Default::default());
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.strip_suffix(".yaml"))
        .filter(|f| *f != "kustomization")
        .map(str::to_string)
        .collect();
    assert_eq!(names.len(), 47);
    wait_until(Duration::from_secs(120), "every imported MatrixUser Ready", || {
        let ready = names.iter().all(|n| {
            fake.get(&format!(
                "/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{n}"
            ))
            .and_then(|u| {
                u["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Ready").map(|c| c["status"] == "True"))
            })
            .unwrap_or(false)
        });
        async move { ready }
    })
    .await;
    drop(stop);
    let writes: Vec<String> = proxy.seen()[before..]
        .iter()
        .filter(|s| s.method != "GET")
        .map(|s| format!("{} {}", s.method, s.path))
        .collect();
    assert_eq!(
        writes,
        Vec::<String>::new(),
        "the imported manifests match: nothing to write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_that_never_ends_is_cut_off_and_reported() {
    // A server whose user list always has a next page (of one new
    // account each time): import stops at its bound and writes nothing.
    accounts().await;
    let proxy = Proxy::start(&server().base_url, |seen| {
        if seen.path.starts_with("/_synapse/admin/v2/users?") {
            let n = seen.earlier;
            Misbehave::Respond {
                status: 200,
                content_type: "application/json",
                body: json!({
                    "users": [{"name": format!("@endless-{n}:{SERVER_NAME}")}],
                    "next_token": "0",
                    "total": 1
                })
                .to_string()
                .into_bytes(),
            }
        } else {
            Misbehave::Forward
        }
    })
    .await;
    let (_, fake) = cluster(&proxy.url);
    let run = import(&fake, &scratch("endless"), &[]);
    assert!(!run.ok);
    assert_eq!(run.stdout, "", "nothing is written");
    assert!(run.stderr.contains("next_token does not move"), "{}", run.stderr);
    assert!(proxy.count("/_synapse/admin/v2/users?") <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_homeserver_counts_its_accounts_and_writes_them_only_when_they_change() {
    accounts().await;
    let proxy = Proxy::start(&server().base_url, |_| Misbehave::Forward).await;
    let (_, fake) = cluster(&proxy.url);
    let metrics = matrix_user_operator::metrics::Metrics::new();
    let config = matrix_user_operator::controller::Config {
        resync_interval: Duration::from_secs(1),
        account_count_interval: Duration::from_secs(1),
        ..Default::default()
    };
    let stop = common::fixtures::run_operator_with(&fake, config, metrics.clone());
    let hs_path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/homeservers/{HS}");
    let counts = || {
        fake.get(&hs_path)
            .map(|hs| hs["status"]["accounts"].clone())
            .unwrap_or_default()
    };
    // 50 accounts: the admin and the appservice's two (its sender and
    // bridge-alice) are not counted; gone-user is deactivated;
    // already-managed is recorded by a MatrixUser of another namespace.
    wait_until(Duration::from_secs(60), "the accounts counted", || {
        let c = counts();
        async move { c == json!({"managed": 1, "unmanaged": 46, "deactivated": 1}) }
    })
    .await;
    // A MatrixUser takes one over: counted as managed at the next count.
    fake.apply(
        KUBECTL,
        json!({
            "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
            "metadata": {"name": "person-00", "namespace": NS},
            "spec": {"homeserverRef": {"name": HS}, "adopt": true, "deletionPolicy": "Retain"},
        }),
    );
    wait_until(Duration::from_secs(60), "the managed account counted", || {
        let c = counts();
        async move { c == json!({"managed": 2, "unmanaged": 45, "deactivated": 1}) }
    })
    .await;
    let text = metrics.encode();
    assert!(
        text.contains(&format!(
            r#"matrix_user_operator_homeserver_accounts{{namespace="{NS}",homeserver="{HS}",state="unmanaged"}} 45"#
        )),
        "{text}"
    );
    // Three more counts, the same numbers: no status write.
    let status_writes = || {
        fake.writes()
            .iter()
            .filter(|r| r.path == format!("{hs_path}/status"))
            .count()
    };
    let writes = status_writes();
    let listed = proxy.count("/_synapse/admin/v2/users?");
    wait_until(Duration::from_secs(60), "three more counts", || {
        let n = proxy.count("/_synapse/admin/v2/users?");
        async move { n >= listed + 3 }
    })
    .await;
    assert_eq!(status_writes(), writes, "unchanged counts are not written");
    // The appservice's users were looked up once, not at every count.
    let lookups = proxy
        .seen()
        .iter()
        .filter(|s| s.path.starts_with("/_synapse/admin/v2/users/@bridge-alice"))
        .count();
    assert_eq!(lookups, 1);
    drop(stop);
}

/// Not a test: what import and one account count cost at 10,000 accounts
/// (`cargo test --test import -- --ignored --nocapture measure`). Prints
/// the times; asserts nothing of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn measure_at_10000_accounts() {
    use futures::StreamExt;
    let started = std::time::Instant::now();
    futures::stream::iter(0..10_000)
        .map(|n| async move { put_user(&format!("load-{n:05}"), json!({"displayname": format!("Load {n}")})).await })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    eprintln!(
        "measure: 10,000 accounts made in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // The listing alone: pages of 500.
    let started = std::time::Instant::now();
    let mut from = 0u64;
    let mut pages = 0;
    loop {
        let (status, page) = admin(
            reqwest::Method::GET,
            &format!("/_synapse/admin/v2/users?from={from}&limit=500&guests=false&deactivated=true&locked=true"),
            json!(null),
        )
        .await;
        assert_eq!(status, 200);
        pages += 1;
        match page["next_token"].as_str() {
            Some(next) => from = next.parse().unwrap(),
            None => break,
        }
    }
    eprintln!(
        "measure: the listing, {pages} pages of 500, took {:.2}s",
        started.elapsed().as_secs_f64()
    );
    // One GET per account (what tells appservice users apart).
    let started = std::time::Instant::now();
    futures::stream::iter(0..10_000)
        .map(|n| async move {
            admin(
                reqwest::Method::GET,
                &format!("/_synapse/admin/v2/users/@load-{n:05}:{SERVER_NAME}"),
                json!(null),
            )
            .await
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    eprintln!(
        "measure: 10,000 user GETs, 8 at once, took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // The whole import, by the binary.
    let (_, fake) = cluster(&server().base_url);
    let started = std::time::Instant::now();
    let run = import(&fake, &scratch("measure"), &[]);
    assert!(run.ok, "{}", run.stderr);
    eprintln!(
        "measure: import of {} manifests took {:.1}s; {}",
        run.stdout.matches("\n---\n").count() + 1,
        started.elapsed().as_secs_f64(),
        run.stderr.lines().last().unwrap_or_default()
    );
}
