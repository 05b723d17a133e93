//! `matrix-user-operator plan`, the built binary, against the fake
//! Kubernetes API server and a real Synapse (behind a proxy that counts
//! its requests): the exact changes of a manifest set and exit code 2,
//! then, once the controller applied them, exit code 0; a refusal; the
//! JSON output; and never a write, to Kubernetes or to Synapse.

use matrix_user_operator_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{cluster_in, homeserver_in, reason_of, run_operator, secret_in, stored_user, wait_until};
use common::proxy::{Misbehave, Proxy};
use common::synapse;
use matrix_user_operator::controller::Config;
use matrix_user_operator::secret::DigestKey;
use serde_json::{Value, json};

const NS: &str = "plan";
/// Where the operator's digest key lives in the fake cluster.
const OPERATOR_NS: &str = "operator";

struct Plan {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the binary; the test's runtime keeps serving the proxy meanwhile.
async fn plan(fake: &FakeApiServer, dir: &Path, args: &[&str]) -> Plan {
    let mut command = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"));
    command
        .arg("plan")
        .args(args)
        .args(["--operator-namespace", OPERATOR_NS])
        .env("KUBECONFIG", fake.kubeconfig_file(dir));
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("the binary runs");
    // Shown with --nocapture: the README's example output comes from here.
    eprintln!(
        "$ matrix-user-operator plan {}\n{}{}(exit {:?})",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    Plan {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn manifest(name: &str, spec: Value) -> String {
    let mut spec = spec;
    spec["homeserverRef"] = json!({"name": "hs"});
    let obj = json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
        "metadata": {"name": name, "namespace": NS}, "spec": spec,
    });
    serde_yaml::to_string(&obj).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("plan-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    dir
}

fn writes_to(proxy: &Proxy) -> Vec<String> {
    proxy
        .seen()
        .iter()
        .filter(|s| s.method != "GET")
        .map(|s| format!("{} {}", s.method, s.path))
        .collect()
}

/// A cluster whose Homeserver reaches Synapse through a counting proxy,
/// with the operator's digest key in a Secret the plan may read.
async fn rig(policy: Value) -> (FakeApiServer, Proxy, Config) {
    let s = synapse();
    let proxy = Proxy::start(&s.base_url, |_| Misbehave::Forward).await;
    let (_, fake) = cluster_in(&[NS], json!({}));
    let mut hs = homeserver_in(NS, "hs", policy);
    hs["spec"]["url"] = json!(proxy.url);
    fake.put(hs);
    fake.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "matrix-user-operator-digest-key", "namespace": OPERATOR_NS},
        "data": {"key": "a2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2s="},
    }));
    let config = Config {
        digest_key: DigestKey::from_bytes(&[b'k'; 32]).unwrap(),
        resync_interval: Duration::from_secs(3600),
        ..Config::default()
    };
    (fake, proxy, config)
}

#[tokio::test]
async fn a_plan_names_the_changes_exits_2_and_exits_0_once_the_operator_applied_them() {
    let s = synapse();
    let (fake, proxy, config) = rig(json!({"allowAdoption": true})).await;
    let new = s.unique_localpart("plan-new");
    let kept = s.unique_localpart("plan-kept");
    let watched = s.unique_localpart("plan-watched");
    s.register_user(&kept, "kept-password", false).await;
    s.register_user(&watched, "watched-password", false).await;
    let (status, body) = s
        .admin_put(
            &format!("/_synapse/admin/v2/users/{}", s.user_id(&watched)),
            json!({"displayname": "As It Is"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    fake.put(secret_in(NS, "new-password", "password", "a-first-password"));
    let dir = scratch("changes");
    let manifests = dir.join("manifests");
    std::fs::write(
        manifests.join("users.yaml"),
        [
            manifest(
                "new",
                json!({"localpart": new, "displayName": "New One",
                       "password": {"secretRef": {"name": "new-password", "key": "password"}}}),
            ),
            manifest(
                "kept",
                json!({"localpart": kept, "adopt": true, "displayName": "Kept", "locked": false}),
            ),
        ]
        .join("---\n"),
    )
    .unwrap();
    std::fs::write(
        manifests.join("watched.yml"),
        manifest(
            "watched",
            json!({"localpart": watched, "managementPolicy": "Observe", "displayName": "As Git Says"}),
        ),
    )
    .unwrap();
    std::fs::write(
        manifests.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [users.yaml, watched.yml]\n",
    )
    .unwrap();
    let dir_arg = manifests.to_str().unwrap();
    fake.clear_requests();

    let p = plan(&fake, &dir, &["-f", dir_arg]).await;
    assert_eq!(p.code, 2, "{}\n{}", p.stdout, p.stderr);
    let server = &s.server_name;
    let expected = format!(
        "note: {dir_arg}/kustomization.yaml: Kustomization (kustomize.config.k8s.io/v1beta1) is not a MatrixUser: ignored\n\
         MatrixUser plan/new (@{new}:{server}): will be created\n\
         \x20 + create the account\n\
         \x20 ~ set displayname\n\
         \x20 ~ set the password (from its Secret; not shown)\n\
         MatrixUser plan/kept (@{kept}:{server}): will be changed\n\
         \x20 ~ adopt the existing account (spec.adopt)\n\
         \x20 ~ set displayname\n\
         MatrixUser plan/watched (@{watched}:{server}): drifted in displayname; no changes will be made (Observe)\n\
         \n\
         Plan: 2 to change, 0 unchanged, 0 refused, 0 errors, 1 observed (1 drifted).\n"
    );
    assert_eq!(p.stdout, expected);
    assert!(!p.stdout.contains("a-first-password"));
    assert_eq!(fake.writes().len(), 0, "{:?}", fake.writes());
    assert_eq!(writes_to(&proxy), Vec::<String>::new());

    // The same as JSON.
    let p = plan(&fake, &dir, &["-f", dir_arg, "--output", "json"]).await;
    assert_eq!(p.code, 2, "{}", p.stderr);
    let report: Value = serde_json::from_str(&p.stdout).expect("JSON");
    let users = report["users"].as_array().unwrap();
    let by_name = |n: &str| users.iter().find(|u| u["name"] == n).unwrap().clone();
    assert_eq!(by_name("new")["action"], "create");
    assert_eq!(by_name("new")["fields"], json!(["password", "displayname"]));
    assert_eq!(by_name("new")["password"], "set");
    assert_eq!(by_name("kept")["action"], "update");
    assert_eq!(by_name("kept")["adopt"], true);
    assert_eq!(by_name("kept")["fields"], json!(["displayname"]));
    assert_eq!(by_name("watched")["action"], "observe");
    assert_eq!(by_name("watched")["observed"], "Drifted");
    assert_eq!(by_name("watched")["fields"], json!(["displayname"]));
    assert_eq!(report["summary"]["changes"], 2);
    assert_eq!(report["ignored"][0]["kind"], "Kustomization");

    // Applied by the operator.
    for (name, body) in [
        ("new", "users.yaml"),
        ("kept", "users.yaml"),
        ("watched", "watched.yml"),
    ] {
        let text = std::fs::read_to_string(manifests.join(body)).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let obj: Value = serde::Deserialize::deserialize(doc).unwrap();
            if obj["metadata"]["name"] == name {
                fake.put(obj);
            }
        }
    }
    let stop = run_operator(&fake, config);
    for (name, reason) in [("new", "InSync"), ("kept", "InSync"), ("watched", "Drifted")] {
        let obj = json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                         "metadata": {"name": name, "namespace": NS}});
        wait_until(Duration::from_secs(60), &format!("{name} is {reason}"), || {
            let fake = &fake;
            let obj = &obj;
            async move {
                fake.get(&path_of(obj))
                    .is_some_and(|_| reason_of(&stored_user(fake, obj)) == reason)
            }
        })
        .await;
    }
    drop(stop);

    let writes_before = writes_to(&proxy).len();
    fake.clear_requests();
    let p = plan(&fake, &dir, &["-f", dir_arg]).await;
    assert_eq!(p.code, 0, "{}\n{}", p.stdout, p.stderr);
    assert!(
        p.stdout
            .contains(&format!("MatrixUser plan/new (@{new}:{server}): no changes\n")),
        "{}",
        p.stdout
    );
    assert!(
        p.stdout
            .contains(&format!("MatrixUser plan/kept (@{kept}:{server}): no changes\n")),
        "{}",
        p.stdout
    );
    assert!(
        p.stdout
            .contains("Plan: 0 to change, 2 unchanged, 0 refused, 0 errors, 1 observed (1 drifted).")
    );
    assert_eq!(fake.writes().len(), 0, "{:?}", fake.writes());
    assert_eq!(writes_to(&proxy).len(), writes_before, "no write to Synapse");

    // A new password in the Secret: the plan says it would be set.
    fake.put(secret_in(NS, "new-password", "password", "a-second-password"));
    let p = plan(&fake, &dir, &["-f", manifests.join("users.yaml").to_str().unwrap()]).await;
    assert_eq!(p.code, 2, "{}\n{}", p.stdout, p.stderr);
    assert!(
        p.stdout.contains(&format!(
            "MatrixUser plan/new (@{new}:{server}): will be changed\n  ~ set the password (from its Secret; not shown)\n"
        )),
        "{}",
        p.stdout
    );
    assert!(!p.stdout.contains("a-second-password"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_plan_reports_the_refusal_the_operator_would_and_exits_1() {
    let s = synapse();
    let (fake, proxy, _) = rig(json!({"allowAdoption": false})).await;
    let taken = s.unique_localpart("plan-taken");
    s.register_user(&taken, "taken-password", false).await;
    let dir = scratch("refusal");
    let file = dir.join("manifests").join("taken.yaml");
    std::fs::write(
        &file,
        manifest(
            "taken",
            json!({"localpart": taken, "adopt": true, "displayName": "Mine"}),
        ),
    )
    .unwrap();
    let p = plan(&fake, &dir, &["-f", file.to_str().unwrap(), "--output", "json"]).await;
    assert_eq!(p.code, 1, "{}\n{}", p.stdout, p.stderr);
    let report: Value = serde_json::from_str(&p.stdout).expect("JSON");
    let user = &report["users"][0];
    assert_eq!(user["action"], "refused");
    assert_eq!(user["reason"], "AdoptionRefused");
    assert!(
        user["message"]
            .as_str()
            .unwrap()
            .contains("policy.allowAdoption is false"),
        "{user}"
    );
    assert_eq!(report["summary"]["refused"], 1);
    assert_eq!(writes_to(&proxy), Vec::<String>::new());
    assert_eq!(fake.writes().len(), 0, "{:?}", fake.writes());
    let _ = std::fs::remove_dir_all(&dir);
}
