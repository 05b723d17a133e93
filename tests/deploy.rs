//! deploy/: every manifest and overlay renders with `kubectl kustomize`, the
//! Deployment is locked down and passes only flags the binary has, and the
//! RBAC allows exactly the API calls the code makes (recorded from the code
//! running against the fake API server, not listed by hand).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::fake_kube::{FakeApiServer, Recorded};
use common::synapse;
use http::Method;
use kube::runtime::reflector::store::Writer;
use matrix_user_operator::api::{Homeserver, MatrixUser};
use matrix_user_operator::controller::{self, Config, Context, reconcile_homeserver, reconcile_user};
use matrix_user_operator::leader::{LeaderElector, LeaseConfig};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");
const OPERATOR_NS: &str = "matrix-user-operator";

fn kustomize(dir: &str) -> Vec<Value> {
    let out = Command::new("kubectl")
        .args(["kustomize", &format!("{DEPLOY}/{dir}")])
        .output()
        .unwrap_or_else(|e| panic!("kubectl is needed to render deploy/ ({e}); install the kubectl client"));
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_docs(&String::from_utf8(out.stdout).unwrap())
}

fn parse_docs(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect()
}

#[test]
fn every_overlay_renders_and_parses() {
    for dir in [".", "base", "overlays/ha", "overlays/single-namespace"] {
        let docs = kustomize(dir);
        for d in &docs {
            assert!(d["apiVersion"].is_string() && d["kind"].is_string(), "{dir}: {d}");
            assert!(d["metadata"]["name"].is_string(), "{dir}: {d}");
        }
        let k = kinds(&docs);
        for expected in [
            "Namespace",
            "ServiceAccount",
            "Deployment",
            "Service",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
        ] {
            assert!(k.contains(expected), "{dir} lacks a {expected}: {k:?}");
        }
    }
    assert!(kinds(&kustomize(".")).contains("ClusterRole"));
}

fn deployment(docs: &[Value]) -> &Value {
    find(docs, "Deployment", "matrix-user-operator").expect("the Deployment")
}

fn args(docs: &[Value]) -> Vec<String> {
    deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn deployment_args_exist_in_run_help() {
    let help = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for dir in [".", "overlays/ha", "overlays/single-namespace"] {
        let args = args(&kustomize(dir));
        assert_eq!(args[0], "run", "{dir}");
        for arg in &args[1..] {
            let flag = arg.split('=').next().unwrap();
            assert!(
                help.contains(&format!("{flag} ")),
                "{dir}: {flag} is not in `run --help`:\n{help}"
            );
        }
    }
    // And their values parse: the binary accepts the base's args up to the
    // point where it needs a cluster.
    let base = args(&kustomize("."));
    let out = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
        .args(&base)
        .env("KUBECONFIG", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    assert!(stderr.contains("cannot reach Kubernetes"), "{stderr}");
}

#[test]
fn deployment_is_locked_down_and_probed() {
    let docs = kustomize(".");
    let pod = &deployment(&docs)["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(pod["serviceAccountName"], "matrix-user-operator");
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    for k in ["cpu", "memory"] {
        assert!(
            c["resources"]["requests"][k].is_string() && c["resources"]["limits"][k].is_string(),
            "{k}"
        );
    }
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(args(&docs).contains(&format!("--health-addr=0.0.0.0:{port}")));
}

#[test]
fn ha_runs_two_replicas_with_leader_election() {
    let docs = kustomize("overlays/ha");
    assert_eq!(deployment(&docs)["spec"]["replicas"], 2);
    assert!(args(&docs).contains(&"--leader-election=on".to_string()));
    assert!(find(&docs, "PodDisruptionBudget", "matrix-user-operator").is_some());
}

fn rules(role: &Value) -> &Value {
    &role["rules"]
}

#[test]
fn single_namespace_gets_a_role_with_the_cluster_roles_rules() {
    let docs = kustomize("overlays/single-namespace");
    assert!(!kinds(&docs).contains("ClusterRole") && !kinds(&docs).contains("ClusterRoleBinding"));
    let role = find(&docs, "Role", "matrix-user-operator").expect("the Role");
    let base = kustomize(".");
    let cluster_role = find(&base, "ClusterRole", "matrix-user-operator").unwrap();
    assert_eq!(rules(role), rules(cluster_role));
    let ns = role["metadata"]["namespace"].as_str().unwrap();
    assert!(args(&docs).contains(&format!("--namespace={ns}")));
    let binding = find(&docs, "RoleBinding", "matrix-user-operator").unwrap();
    assert_eq!(binding["metadata"]["namespace"], ns);
    assert_eq!(binding["subjects"][0]["namespace"], OPERATOR_NS);
}

#[test]
fn examples_parse_and_pass_the_schema_rules() {
    let mut users = 0;
    for file in ["homeserver.yaml", "matrixusers.yaml"] {
        let text = std::fs::read_to_string(format!("{DEPLOY}/examples/{file}")).unwrap();
        for doc in parse_docs(&text) {
            match doc["kind"].as_str().unwrap() {
                "MatrixUser" => {
                    let u: MatrixUser = serde_json::from_value(doc.clone()).expect("a MatrixUser");
                    kube::core::cel::validate_cel(&u).unwrap_or_else(|e| panic!("{file}: {e}"));
                    users += 1;
                }
                "Homeserver" => {
                    let _: Homeserver = serde_json::from_value(doc.clone()).expect("a Homeserver");
                }
                "Secret" | "Namespace" => {}
                other => panic!("{file}: unexpected {other}"),
            }
        }
    }
    assert!(users >= 3);
    let all: Vec<Value> = parse_docs(&std::fs::read_to_string(format!("{DEPLOY}/examples/matrixusers.yaml")).unwrap());
    let policies: BTreeSet<&str> = all
        .iter()
        .filter(|d| d["kind"] == "MatrixUser")
        .map(|d| d["spec"]["deletionPolicy"].as_str().unwrap_or("Deactivate"))
        .collect();
    assert_eq!(
        policies,
        BTreeSet::from(["Deactivate", "Erase", "Retain"]),
        "each deletion policy shown"
    );
}

/// What one API request needs from RBAC.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    group: String,
    resource: String,
    verb: String,
}

fn access(r: &Recorded) -> Access {
    let seg: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let (group, rest) = match seg[0] {
        "api" => (String::new(), &seg[2..]),
        "apis" => (seg[1].to_string(), &seg[3..]),
        other => panic!("unexpected path {other}"),
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    let (resource, named) = match rest {
        [r] => (r.to_string(), false),
        [r, _name] => (r.to_string(), true),
        [r, _name, sub] => (format!("{r}/{sub}"), true),
        _ => panic!("unexpected path {}", r.path),
    };
    let watch = r.query.split('&').any(|q| q == "watch=true" || q == "watch=1");
    let verb = match (&r.method, named, watch) {
        (&Method::GET, _, true) => "watch",
        (&Method::GET, true, _) => "get",
        (&Method::GET, false, _) => "list",
        (&Method::POST, _, _) => "create",
        (&Method::PUT, _, _) => "update",
        (&Method::PATCH, _, _) => "patch",
        (&Method::DELETE, _, _) => "delete",
        (m, _, _) => panic!("unexpected method {m}"),
    };
    Access {
        group,
        resource,
        verb: verb.to_string(),
    }
}

/// Owner references with blockOwnerDeletion need `update` on the owner's
/// finalizers subresource.
fn implied(r: &Recorded) -> Option<Access> {
    if r.method != Method::POST {
        return None;
    }
    let owner = r.body["metadata"]["ownerReferences"]
        .as_array()?
        .iter()
        .find(|o| o["blockOwnerDeletion"] == true)?;
    let group = owner["apiVersion"].as_str()?.split('/').next()?.to_string();
    let plural = format!("{}s", owner["kind"].as_str()?.to_lowercase());
    Some(Access {
        group,
        resource: format!("{plural}/finalizers"),
        verb: "update".into(),
    })
}

fn granted(role: &Value) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        for group in rule["apiGroups"].as_array().unwrap() {
            for resource in rule["resources"].as_array().unwrap() {
                for verb in rule["verbs"].as_array().unwrap() {
                    let (g, r, v) = (
                        group.as_str().unwrap(),
                        resource.as_str().unwrap(),
                        verb.as_str().unwrap(),
                    );
                    assert!(g != "*" && r != "*" && v != "*", "no wildcards: {rule}");
                    out.insert(Access {
                        group: g.into(),
                        resource: r.into(),
                        verb: v.into(),
                    });
                }
            }
        }
    }
    out
}

fn secret(ns: &str, name: &str, key: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
           "stringData": {key: value}})
}

/// Runs every code path that talks to Kubernetes against the fake API
/// server, and returns the requests it made.
async fn exercise_the_operator() -> Vec<Recorded> {
    let s = synapse();
    let ns = "chat";
    let (client, fake) = FakeApiServer::start();
    fake.put(json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": "hs", "namespace": ns, "generation": 1},
        "spec": {"url": s.base_url, "adminTokenSecretRef": {"name": "admin", "key": "token"}},
    }));
    fake.put(secret(ns, "admin", "token", &s.admin_token));
    fake.put(secret(ns, "pw", "password", "one"));
    let ctx = Arc::new(Context::new(
        client.clone(),
        Config::default(),
        Writer::<MatrixUser>::default().as_reader(),
        Metrics::new(),
    ));

    // The Homeserver reconcile writes the status the users need.
    let hs_path = "/apis/matrix-operator.io/v1alpha1/namespaces/chat/homeservers/hs";
    let hs: Homeserver = serde_json::from_value(fake.get(hs_path).unwrap()).unwrap();
    reconcile_homeserver(Arc::new(hs), ctx.clone()).await.unwrap();

    let user_path = |name: &str| format!("/apis/matrix-operator.io/v1alpha1/namespaces/{ns}/matrixusers/{name}");
    let get_user = |name: &str| -> MatrixUser { serde_json::from_value(fake.get(&user_path(name)).unwrap()).unwrap() };
    for (name, password) in [
        ("withpw", json!({"secretRef": {"name": "pw", "key": "password"}})),
        ("gen", json!({"generate": true})),
    ] {
        fake.put(json!({
            "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
            "metadata": {"name": name, "namespace": ns, "generation": 1},
            "spec": {"homeserverRef": {"name": "hs"}, "localpart": s.unique_localpart(name), "password": password},
        }));
        // First pass adds the finalizer, the second creates the account.
        for _ in 0..2 {
            reconcile_user(Arc::new(get_user(name)), ctx.clone()).await.unwrap();
        }
    }
    // A second password change: the recorder updates its Event series.
    fake.put(secret(ns, "pw", "password", "two"));
    reconcile_user(Arc::new(get_user("withpw")), ctx.clone()).await.unwrap();
    // Deletion runs the policy and removes the finalizer.
    let mut deleting = fake.get(&user_path("withpw")).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    fake.put(deleting.clone());
    reconcile_user(Arc::new(serde_json::from_value(deleting).unwrap()), ctx.clone())
        .await
        .unwrap();

    // Leader election: create, renew, release.
    let elector = LeaderElector::new(client.clone(), LeaseConfig::new(OPERATOR_NS, "me"));
    assert!(elector.try_acquire_or_renew().await.unwrap());
    assert!(elector.try_acquire_or_renew().await.unwrap());
    elector.release().await;

    // The controllers' watches, all namespaces.
    let shutdown = tokio::time::sleep(Duration::from_secs(2));
    controller::run(client, Config::default(), Metrics::new(), shutdown, || {}).await;
    fake.requests()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_exactly_the_calls_the_code_makes() {
    let requests = exercise_the_operator().await;
    let docs = kustomize(".");
    let cluster = granted(find(&docs, "ClusterRole", "matrix-user-operator").unwrap());
    let leases = granted(find(&docs, "Role", "matrix-user-operator-leader-election").unwrap());
    let leader_role = find(&docs, "Role", "matrix-user-operator-leader-election").unwrap();
    assert_eq!(leader_role["metadata"]["namespace"], OPERATOR_NS);

    let mut used = BTreeSet::new();
    for r in &requests {
        let a = access(r);
        if a.resource == "leases" {
            assert!(
                r.path.contains(&format!("/namespaces/{OPERATOR_NS}/")),
                "Leases live in the operator's namespace"
            );
            assert!(
                leases.contains(&a),
                "the leader-election Role does not allow {a:?} ({})",
                r.line()
            );
        } else {
            assert!(
                cluster.contains(&a),
                "the ClusterRole does not allow {a:?} ({})",
                r.line()
            );
        }
        used.insert(a);
        used.extend(implied(r));
    }
    let unused: Vec<&Access> = cluster.union(&leases).filter(|a| !used.contains(a)).collect();
    assert!(unused.is_empty(), "RBAC grants what the code never uses: {unused:?}");
}
