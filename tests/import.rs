//! `matrix-user-operator import` against a real Synapse of its own, with 50
//! accounts of every shape and a real appservice (bridge) user: the built
//! binary reads the Homeserver and its Secret from the fake API server
//! through a kubeconfig, as a user runs it. Its output is compared with
//! the golden files in tests/golden/import/ (`UPDATE_GOLDEN=1` rewrites
//! them); the imported manifests, applied with `--manage`, become Ready
//! through the controller with no write to Synapse (they match). One test
//! walks the README's adoption flow end to end: import (Observe) → apply
//! → plan the switch to Manage → apply → drift in Observe and in Manage
//! → plan.

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
    let (client, fake) = homeserver_only(url);
    fake.put(matrix_user_in(
        "elsewhere",
        "managed",
        json!({"homeserverRef": {"name": "hs"}, "localpart": "already-managed"}),
        json!({"userId": format!("@already-managed:{SERVER_NAME}")}),
    ));
    (client, fake)
}

/// The fake cluster with the Homeserver (at `url`, adoption allowed) and
/// its admin token Secret only: no MatrixUser yet.
fn homeserver_only(url: &str) -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    fake.put(json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": HS, "namespace": NS},
        "spec": {"url": url, "adminTokenSecretRef": {"name": "synapse-admin", "key": "token"},
                 "policy": {"allowAdoption": true, "allowAdminUsers": true}},
    }));
    fake.put(secret_in(NS, "synapse-admin", "token", &server().admin_token));
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

/// The accounts the adoption walk-through imports: `already-managed` is
/// its own (the other tests' clusters record it, so their imports skip it
/// and it is the only account this test changes in Synapse); the others
/// are shared and only read.
const ADOPTED: &str = "^(already-managed|helper-bot|locked-user|ops-admin|person-0[3-5])$";

/// `plan`, the built binary, against the fake API server: its exit code
/// and stdout. Printed with `--nocapture` (the README quotes it).
async fn plan(fake: &FakeApiServer, dir: &Path, args: &[&str]) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"));
    command
        .arg("plan")
        .args(args)
        .env("KUBECONFIG", fake.kubeconfig_file(dir))
        .env_remove("KUBERNETES_SERVICE_HOST");
    // Off the runtime: the proxy in front of Synapse keeps serving.
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run the binary");
    let stdout = String::from_utf8(out.stdout).unwrap();
    eprintln!(
        "$ matrix-user-operator plan {}\n{stdout}{}(exit {:?})",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// The MatrixUser manifests `import --output-dir` wrote into `dir`: their
/// names, sorted.
fn manifest_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter_map(|f| f.strip_suffix(".yaml").map(str::to_string))
        .filter(|f| f != "kustomization")
        .collect();
    names.sort();
    names
}

/// `kubectl apply` of the manifest `name` in `dir`.
fn apply_manifest(fake: &FakeApiServer, dir: &Path, name: &str) {
    let text = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
    fake.apply(KUBECTL, serde_yaml::from_str(&text).unwrap());
}

/// Sets the spec's managementPolicy of the manifest `name` in `dir`, as a
/// user edits the file (the header comments stay as import wrote them).
fn set_policy(dir: &Path, name: &str, policy: &str) {
    let path = dir.join(format!("{name}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap();
    let edited: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("  managementPolicy: ") {
            Some(_) => format!("  managementPolicy: {policy}"),
            None => l.to_string(),
        })
        .collect();
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
}

/// The Ready condition's `(reason, message)` of MatrixUser `name`, once
/// its status describes the current spec.
fn ready_now(fake: &FakeApiServer, name: &str) -> Option<(String, String)> {
    let u = fake.get(&format!(
        "/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{name}"
    ))?;
    if u["status"]["observedGeneration"] != u["metadata"]["generation"] {
        return None;
    }
    let ready = u["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?;
    Some((
        ready["reason"].as_str()?.to_string(),
        ready["message"].as_str().unwrap_or_default().to_string(),
    ))
}

async fn wait_for_reason(fake: &FakeApiServer, names: &[String], reason: &str) {
    wait_until(Duration::from_secs(120), &format!("{names:?} {reason}"), || {
        let all = names
            .iter()
            .all(|n| ready_now(fake, n).is_some_and(|(r, _)| r == reason));
        async move { all }
    })
    .await;
}

fn writes_since(proxy: &Proxy, before: usize) -> Vec<String> {
    proxy.seen()[before..]
        .iter()
        .filter(|s| s.method != "GET")
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

/// The README's "Adopting an existing homeserver" walk-through, as a user
/// runs it: import (Observe) → apply → plan the switch to Manage → apply →
/// an account changed behind Git's back is Drifted in Observe and
/// corrected in Manage → plan finds nothing to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_adoption_walk_through_import_observe_plan_manage_drift() {
    accounts().await;
    let proxy = Proxy::start(&server().base_url, |_| Misbehave::Forward).await;
    let (_, fake) = homeserver_only(&proxy.url);
    let dir = scratch("adopt");
    let out = dir.join("users");
    let out_arg = out.to_str().unwrap();
    let user_id = |n: &str| format!("@{n}:{SERVER_NAME}");

    // 1. import, Observe by default; applied with the operator running:
    // every one InSync, and not one write to Synapse.
    let run = import(&fake, &dir, &["--localpart", ADOPTED, "--output-dir", out_arg]);
    assert!(run.ok, "{}", run.stderr);
    let names = manifest_names(&out);
    assert_eq!(
        names,
        [
            "already-managed",
            "helper-bot",
            "locked-user",
            "ops-admin",
            "person-03",
            "person-04",
            "person-05"
        ]
    );
    let before = proxy.seen().len();
    let stop = common::fixtures::run_operator(
        &fake,
        matrix_user_operator::controller::Config {
            // Only the test's edits make the operator look again.
            resync_interval: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    for n in &names {
        apply_manifest(&fake, &out, n);
    }
    wait_for_reason(&fake, &names, "InSync").await;
    assert_eq!(
        writes_since(&proxy, before),
        Vec::<String>::new(),
        "Observe never writes"
    );

    // 2. Switched to Manage in the files: the plan says each would be
    // adopted, with no field to change.
    for n in &names {
        set_policy(&out, n, "Manage");
    }
    let (code, text) = plan(&fake, &dir, &["-f", out_arg]).await;
    let mut expected = format!(
        "note: {out_arg}/kustomization.yaml: Kustomization (kustomize.config.k8s.io/v1beta1) is not a MatrixUser: ignored\n"
    );
    for n in &names {
        expected.push_str(&format!(
            "MatrixUser {NS}/{n} ({}): will be changed\n  ~ adopt the existing account (spec.adopt)\n",
            user_id(n)
        ));
    }
    expected.push_str("\nPlan: 7 to change, 0 unchanged, 0 refused, 0 errors, 0 observed (0 drifted).\n");
    assert_eq!((code, text), (2, expected));
    let (code, text) = plan(&fake, &dir, &["-f", out_arg, "--output", "json"]).await;
    assert_eq!(code, 2, "{text}");
    let report: Value = serde_json::from_str(&text).expect("JSON");
    let users = report["users"].as_array().unwrap();
    assert_eq!(users.len(), names.len(), "{report}");
    for u in users {
        assert_eq!(u["action"], "update", "{u}");
        assert_eq!(u["adopt"], true, "{u}");
        assert_eq!(u["fields"], json!([]), "no field would change: {u}");
    }
    assert_eq!(report["summary"]["changes"], 7, "{report}");

    // 3. Applied: adopted (the status records each), still InSync, and
    // still not one write to Synapse: they match.
    for n in &names {
        apply_manifest(&fake, &out, n);
    }
    wait_for_reason(&fake, &names, "InSync").await;
    for n in &names {
        let u = fake
            .get(&format!(
                "/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{n}"
            ))
            .unwrap();
        assert_eq!(u["status"]["userId"], json!(user_id(n)), "{u}");
    }
    assert_eq!(
        writes_since(&proxy, before),
        Vec::<String>::new(),
        "adoption of matching accounts writes nothing"
    );

    // 4. Someone changes an account in Synapse. Observe: Drifted, naming
    // the field (not its value), Synapse untouched; Manage: corrected.
    let changed = "already-managed";
    let account_path = format!("/_synapse/admin/v2/users/{}", user_id(changed));
    put_user(changed, json!({"displayname": "Renamed By Hand"})).await;
    set_policy(&out, changed, "Observe");
    apply_manifest(&fake, &out, changed);
    // An observer makes one pass: its first status for this spec is its
    // answer.
    wait_until(Duration::from_secs(120), "the Observe spec looked at", || {
        let seen = ready_now(&fake, changed).is_some();
        async move { seen }
    })
    .await;
    let (reason, message) = ready_now(&fake, changed).unwrap();
    assert_eq!(reason, "Drifted", "{message}");
    assert!(message.contains("differs from the spec in displayname "), "{message}");
    assert!(
        !message.contains("Renamed") && !message.contains("Managed"),
        "{message}"
    );
    assert_eq!(
        writes_since(&proxy, before),
        Vec::<String>::new(),
        "Observe never writes"
    );
    let (_, account) = admin(reqwest::Method::GET, &account_path, json!(null)).await;
    assert_eq!(account["displayname"], "Renamed By Hand");

    set_policy(&out, changed, "Manage");
    apply_manifest(&fake, &out, changed);
    wait_for_reason(&fake, &[changed.to_string()], "InSync").await;
    let (_, account) = admin(reqwest::Method::GET, &account_path, json!(null)).await;
    assert_eq!(account["displayname"], "Managed", "the spec's value, put back");
    let writes = writes_since(&proxy, before);
    eprintln!("writes to Synapse in the whole walk-through: {writes:?}");
    assert!(!writes.is_empty());
    assert!(
        writes.iter().all(|w| w.contains(&format!("@{changed}:"))),
        "only the drifted account is written: {writes:?}"
    );
    wait_for_reason(&fake, &names, "InSync").await;

    // 5. The final manifests: nothing left to do.
    let (code, text) = plan(&fake, &dir, &["-f", out_arg]).await;
    assert_eq!(code, 0, "{text}");
    assert!(
        text.ends_with("\nPlan: 0 to change, 7 unchanged, 0 refused, 0 errors, 0 observed (0 drifted).\n"),
        "{text}"
    );
    drop(stop);
    let _ = std::fs::remove_dir_all(&dir);
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
