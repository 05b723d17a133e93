//! The checks every way of installing the operator must pass, shared by
//! `tests/deploy.rs` (deploy/, rendered with `kubectl kustomize`) and
//! `tests/helm.rs` (the Helm chart, rendered by Helm's own SDK):
//!
//! - the RBAC grants exactly the API calls the code makes (recorded from the
//!   code running against the fake API server, not listed by hand), bound to
//!   the ServiceAccount the Deployment runs as, without wildcards;
//! - the Deployment passes only flags `run --help` lists, and values the
//!   binary accepts;
//! - the pod is locked down and probed.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use kube::runtime::reflector::store::Writer;
use matrix_user_operator::api::{Homeserver, MatrixAccessToken, MatrixUser};
use matrix_user_operator::controller::{
    self, Config, Context, ROTATE_ANNOTATION, reconcile_homeserver, reconcile_token, reconcile_user,
};
use matrix_user_operator::leader::{LeaderElector, LeaseConfig};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};

use super::fake_kube::{FakeApiServer, Recorded};
use super::synapse;

/// The repository's deploy/ (`CARGO_MANIFEST_DIR` is the kit's directory,
/// `testkit/` in the repository).
pub const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// `kubectl kustomize deploy/<dir>`, as documents.
pub fn kustomize(dir: &str) -> Vec<Value> {
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

/// The documents of a multi-document YAML stream, empty ones left out.
pub fn parse_docs(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

pub fn kinds(docs: &[Value]) -> BTreeSet<String> {
    docs.iter().map(|d| d["kind"].as_str().unwrap().to_string()).collect()
}

/// The one Deployment.
pub fn deployment(docs: &[Value]) -> &Value {
    let all = of_kind(docs, "Deployment");
    assert_eq!(all.len(), 1, "exactly one Deployment: {all:?}");
    all[0]
}

pub fn args(docs: &[Value]) -> Vec<String> {
    deployment(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .expect("the container has args")
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The namespaces of the `--namespace` args (empty: all namespaces).
pub fn watched_namespaces(args: &[String]) -> Vec<String> {
    args.iter()
        .filter_map(|a| a.strip_prefix("--namespace="))
        .flat_map(|list| list.split(','))
        .map(str::to_string)
        .collect()
}

fn run_help(operator: &str) -> String {
    let help = Command::new(operator).args(["run", "--help"]).output().unwrap();
    String::from_utf8(help.stdout).unwrap()
}

/// `args` is `run` and flags of `run --help` in `--flag=value` form, and the
/// binary accepts them up to the point where it needs a cluster. `operator`
/// is the binary (`env!("CARGO_BIN_EXE_matrix-user-operator")`, which only the
/// operator's own tests see).
pub fn check_args(operator: &str, what: &str, args: &[String]) {
    let help = run_help(operator);
    assert_eq!(args[0], "run", "{what}: {args:?}");
    for arg in &args[1..] {
        assert!(
            arg.starts_with("--") && arg.contains('='),
            "{what}: {arg} is not --flag=value"
        );
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")),
            "{what}: {flag} is not in `run --help`:\n{help}"
        );
    }
    let out = Command::new(operator)
        .args(args)
        .env("KUBECONFIG", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr) + String::from_utf8_lossy(&out.stdout);
    assert!(stderr.contains("cannot reach Kubernetes"), "{what}: {args:?}: {stderr}");
}

/// Non-root, no privilege escalation, read-only root, no capabilities,
/// seccomp, probes on /healthz and /readyz at the port `--health-addr`
/// names, requests and limits for CPU and memory, and the ServiceAccount the
/// documents create.
pub fn check_locked_down_and_probed(what: &str, docs: &[Value]) {
    let dep = deployment(docs);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{what}");
    assert_eq!(pod["securityContext"]["runAsUser"], 65532, "{what}");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
        "{what}"
    );
    let sa = pod["serviceAccountName"].as_str().expect("serviceAccountName");
    let ns = &dep["metadata"]["namespace"];
    assert!(
        of_kind(docs, "ServiceAccount")
            .iter()
            .any(|s| s["metadata"]["name"] == sa && s["metadata"]["namespace"] == *ns),
        "{what}: the pod's ServiceAccount {sa} is not among the documents"
    );
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "{what}");
    let c = &containers[0];
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{what}");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true, "{what}");
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]), "{what}");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
    for k in ["cpu", "memory"] {
        assert!(
            c["resources"]["requests"][k].is_string() && c["resources"]["limits"][k].is_string(),
            "{what}: {k}"
        );
    }
    let port = c["ports"][0]["containerPort"].as_u64().unwrap();
    assert!(
        args(docs).contains(&format!("--health-addr=0.0.0.0:{port}")),
        "{what}: {:?}",
        args(docs)
    );
}

/// What one API request needs from RBAC.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub group: String,
    pub resource: String,
    pub verb: String,
}

/// The namespace of a request's path, `None` for one across namespaces.
fn namespace_of(r: &Recorded) -> Option<String> {
    let seg: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let rest = match seg[0] {
        "api" => &seg[2..],
        "apis" => &seg[3..],
        other => panic!("unexpected path {other}"),
    };
    match rest {
        ["namespaces", ns, _, ..] => Some(ns.to_string()),
        _ => None,
    }
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

/// What a Role's or ClusterRole's rules allow; panics on a wildcard.
pub fn granted(role: &Value) -> BTreeSet<Access> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        assert!(rule.get("resourceNames").is_none(), "no resourceNames: {rule}");
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

/// What one binding gives the operator's ServiceAccount.
#[derive(Debug)]
struct Grant {
    /// `kind/name` of the binding.
    binding: String,
    /// The namespace it applies in; `None` for a ClusterRoleBinding.
    namespace: Option<String>,
    access: BTreeSet<Access>,
}

/// Every binding of `docs` naming the ServiceAccount `sa` of namespace
/// `sa_ns`, with what its role allows. A binding naming a role that is not
/// among the documents fails.
fn grants(what: &str, docs: &[Value], sa: &str, sa_ns: &str) -> Vec<Grant> {
    let mut out = Vec::new();
    for binding in docs
        .iter()
        .filter(|d| d["kind"] == "RoleBinding" || d["kind"] == "ClusterRoleBinding")
    {
        let kind = binding["kind"].as_str().unwrap();
        let name = binding["metadata"]["name"].as_str().unwrap();
        let namespace = binding["metadata"]["namespace"].as_str().map(str::to_string);
        assert_eq!(
            kind == "RoleBinding",
            namespace.is_some(),
            "{what}: {kind}/{name}: a RoleBinding has a namespace, a ClusterRoleBinding none"
        );
        let names_sa = binding["subjects"].as_array().unwrap().iter().any(|s| {
            // A RoleBinding's ServiceAccount subject defaults to its namespace.
            let subject_ns = s["namespace"].as_str().map(str::to_string).or(namespace.clone());
            s["kind"] == "ServiceAccount" && s["name"] == sa && subject_ns.as_deref() == Some(sa_ns)
        });
        if !names_sa {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().unwrap();
        let role_name = binding["roleRef"]["name"].as_str().unwrap();
        let role = docs
            .iter()
            .find(|d| {
                d["kind"] == role_kind
                    && d["metadata"]["name"] == role_name
                    && (role_kind == "ClusterRole" || d["metadata"]["namespace"].as_str() == namespace.as_deref())
            })
            .unwrap_or_else(|| panic!("{what}: {kind}/{name} binds {role_kind}/{role_name}, which is not there"));
        out.push(Grant {
            binding: format!("{kind}/{name}"),
            namespace,
            access: granted(role),
        });
    }
    out
}

/// The RBAC of `docs` allows the operator's ServiceAccount every call in
/// `requests` (recorded with [`record_operator_calls`] for the namespaces
/// the Deployment's `--namespace` names) and nothing else: no binding grants
/// a call the code does not make in its scope. Leases are used in the
/// operator's namespace only; with `--namespace`, every other call is in a
/// watched namespace.
pub fn check_rbac(what: &str, docs: &[Value], requests: &[Recorded]) {
    let dep = deployment(docs);
    let operator_ns = dep["metadata"]["namespace"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: the Deployment has no namespace"));
    let sa = dep["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
    let watched = watched_namespaces(&args(docs));
    let grants = grants(what, docs, sa, operator_ns);
    assert!(!grants.is_empty(), "{what}: nothing is bound to ServiceAccount {sa}");
    assert!(!requests.is_empty());

    let mut used: BTreeMap<Option<String>, BTreeSet<Access>> = BTreeMap::new();
    for r in requests {
        let a = access(r);
        let ns = namespace_of(r);
        if a.resource == "leases" {
            assert_eq!(
                ns.as_deref(),
                Some(operator_ns),
                "{what}: Leases live in the operator's namespace ({})",
                r.line()
            );
        } else if !watched.is_empty() {
            assert!(
                ns.as_ref().is_some_and(|n| watched.contains(n)),
                "{what}: with --namespace={}, a call outside those namespaces ({})",
                watched.join(","),
                r.line()
            );
        }
        let allowed = grants
            .iter()
            .any(|g| (g.namespace.is_none() || g.namespace == ns) && g.access.contains(&a));
        assert!(
            allowed,
            "{what}: no binding of ServiceAccount {operator_ns}/{sa} allows {a:?}{} ({})",
            ns.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default(),
            r.line()
        );
        let entry = used.entry(ns).or_default();
        entry.insert(a);
        entry.extend(implied(r));
    }
    for g in &grants {
        let used_here: BTreeSet<&Access> = used
            .iter()
            .filter(|(ns, _)| g.namespace.is_none() || g.namespace == **ns)
            .flat_map(|(_, a)| a)
            .collect();
        let unused: Vec<&Access> = g.access.iter().filter(|a| !used_here.contains(a)).collect();
        assert!(
            unused.is_empty(),
            "{what}: {} grants what the code never uses{}: {unused:?}",
            g.binding,
            g.namespace
                .as_ref()
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default()
        );
    }
}

fn secret(ns: &str, name: &str, key: &str, value: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
           "stringData": {key: value}})
}

/// The namespace of the operator in every rendering the tests check.
pub const OPERATOR_NS: &str = "matrix-user-operator";

/// The namespace the reconciles run in when the operator watches all.
pub const USER_NS: &str = "chat";

/// Runs every code path that talks to Kubernetes against the fake API
/// server, and returns the requests it made: the reconciles in each of
/// `watch` (in [`USER_NS`] when `watch` is empty), leader election in
/// [`OPERATOR_NS`], and the controllers' watches of `watch` (all namespaces
/// when empty), as `run --namespace` runs them.
pub async fn record_operator_calls(watch: &[&str]) -> Vec<Recorded> {
    let s = synapse();
    let (client, fake) = FakeApiServer::start();
    let ctx = Arc::new(Context::new(
        client.clone(),
        Config {
            namespaces: watch.iter().map(|ns| ns.to_string()).collect(),
            ..Config::default()
        },
        Writer::<MatrixUser>::default().as_reader(),
        Metrics::new(),
    ));
    let reconcile_in: Vec<&str> = if watch.is_empty() {
        vec![USER_NS]
    } else {
        watch.to_vec()
    };
    for ns in reconcile_in {
        fake.put(json!({
            "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
            "metadata": {"name": "hs", "namespace": ns, "generation": 1},
            "spec": {"url": s.base_url, "adminTokenSecretRef": {"name": "admin", "key": "token"},
                     "policy": {"allowAdoption": true}},
        }));
        fake.put(secret(ns, "admin", "token", &s.admin_token));
        fake.put(secret(ns, "pw", "password", "one"));

        // The Homeserver reconcile writes the status the users need.
        let hs_path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{ns}/homeservers/hs");
        // First pass adds the finalizer, the second checks the token (and
        // holds its Secret).
        for _ in 0..2 {
            let hs: Homeserver = serde_json::from_value(fake.get(&hs_path).unwrap()).unwrap();
            reconcile_homeserver(Arc::new(hs), ctx.clone()).await.unwrap();
        }

        let user_path = |name: &str| format!("/apis/matrix-operator.io/v1alpha1/namespaces/{ns}/matrixusers/{name}");
        let get_user =
            |name: &str| -> MatrixUser { serde_json::from_value(fake.get(&user_path(name)).unwrap()).unwrap() };
        // An account that exists already, for the adoption path.
        let existing = s.unique_localpart("adopted");
        s.register_user(&existing, "adopted password", false).await;
        for (name, localpart, spec) in [
            (
                "withpw",
                s.unique_localpart("withpw"),
                json!({"password": {"secretRef": {"name": "pw", "key": "password"}}}),
            ),
            (
                "gen",
                s.unique_localpart("gen"),
                json!({"password": {"generate": true}}),
            ),
            ("adopter", existing, json!({"adopt": true})),
        ] {
            let mut spec = spec;
            spec["homeserverRef"] = json!({"name": "hs"});
            spec["localpart"] = json!(localpart);
            fake.put(json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": name, "namespace": ns, "generation": 1},
                "spec": spec,
            }));
            // First pass adds the finalizer, the second creates the account.
            for _ in 0..2 {
                reconcile_user(Arc::new(get_user(name)), ctx.clone()).await.unwrap();
            }
        }
        // Two password changes after the creation: the second repeats the
        // first's Event, and the recorder updates its Event series.
        for password in ["two", "three"] {
            fake.put(secret(ns, "pw", "password", password));
            reconcile_user(Arc::new(get_user("withpw")), ctx.clone()).await.unwrap();
        }
        // A MatrixAccessToken of "gen": issued (finalizer, Secret, status),
        // rotated, the replaced token revoked after its grace, then deleted
        // (revoked, the Secret's finalizer taken off).
        let token_path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{ns}/matrixaccesstokens/bot");
        fake.put(json!({
            "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixAccessToken",
            "metadata": {"name": "bot", "namespace": ns, "generation": 1},
            "spec": {"userRef": {"name": "gen"}, "rotationGracePeriod": "1s"},
        }));
        let get_token = || -> MatrixAccessToken { serde_json::from_value(fake.get(&token_path).unwrap()).unwrap() };
        for _ in 0..2 {
            reconcile_token(Arc::new(get_token()), ctx.clone()).await.unwrap();
        }
        let mut rotated = fake.get(&token_path).unwrap();
        rotated["metadata"]["annotations"] = json!({ROTATE_ANNOTATION: "1"});
        fake.put(rotated);
        reconcile_token(Arc::new(get_token()), ctx.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        reconcile_token(Arc::new(get_token()), ctx.clone()).await.unwrap();
        assert!(
            get_token().status.unwrap().retiring.is_none(),
            "the replaced token was revoked"
        );
        let mut deleting = fake.get(&token_path).unwrap();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
        fake.put(deleting.clone());
        reconcile_token(Arc::new(serde_json::from_value(deleting).unwrap()), ctx.clone())
            .await
            .unwrap();

        // Deletion runs the policy and removes the finalizer.
        for name in ["withpw", "gen", "adopter"] {
            let mut deleting = fake.get(&user_path(name)).unwrap();
            deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
            fake.put(deleting.clone());
            reconcile_user(Arc::new(serde_json::from_value(deleting).unwrap()), ctx.clone())
                .await
                .unwrap();
        }
        // The Homeserver goes once its MatrixUsers are gone, and lets go of
        // its admin token Secret.
        let mut deleting = fake.get(&hs_path).unwrap();
        deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
        fake.put(deleting.clone());
        reconcile_homeserver(Arc::new(serde_json::from_value(deleting).unwrap()), ctx.clone())
            .await
            .unwrap();
    }

    // Leader election: create, renew, release.
    let elector = LeaderElector::new(client.clone(), LeaseConfig::new(OPERATOR_NS, "me"));
    assert!(elector.try_acquire_or_renew().await.unwrap());
    assert!(elector.try_acquire_or_renew().await.unwrap());
    elector.release().await;

    // The controllers' watches.
    let config = Config {
        namespaces: watch.iter().map(|ns| ns.to_string()).collect(),
        ..Config::default()
    };
    let shutdown = tokio::time::sleep(Duration::from_secs(2));
    controller::run(client, config, Metrics::new(), shutdown, || {}).await;
    fake.requests()
}

/// The ValidatingAdmissionPolicy on the operator's Secret writes, as
/// deploy/secrets-policy/ holds it.
pub fn reference_secrets_policy() -> Value {
    let text = std::fs::read_to_string(format!("{DEPLOY}/secrets-policy/secrets-policy.yaml")).unwrap();
    parse_docs(&text)
        .into_iter()
        .find(|d| d["kind"] == "ValidatingAdmissionPolicy")
        .expect("deploy/secrets-policy/secrets-policy.yaml holds the policy")
}

/// `docs` hold the Secrets policy and its binding: cluster-wide, the
/// binding denying by the policy, matching requests of the ServiceAccount
/// the Deployment runs as (in the namespace it runs in), and with the
/// validations of deploy/secrets-policy/.
pub fn check_secrets_policy(what: &str, docs: &[Value]) {
    let policies = of_kind(docs, "ValidatingAdmissionPolicy");
    let bindings = of_kind(docs, "ValidatingAdmissionPolicyBinding");
    assert_eq!(
        (policies.len(), bindings.len()),
        (1, 1),
        "{what}: one policy, one binding"
    );
    let (policy, binding) = (policies[0], bindings[0]);
    for d in [policy, binding] {
        assert!(d["metadata"]["namespace"].is_null(), "{what}: cluster-wide: {d}");
    }
    assert_eq!(binding["spec"]["policyName"], policy["metadata"]["name"], "{what}");
    assert_eq!(binding["spec"]["validationActions"], json!(["Deny"]), "{what}");
    assert!(
        binding["spec"].get("matchResources").is_none(),
        "{what}: every namespace"
    );
    let spec = &policy["spec"];
    assert_eq!(spec["failurePolicy"], "Fail", "{what}");
    let rules = &spec["matchConstraints"]["resourceRules"];
    assert_eq!(rules[0]["resources"], json!(["secrets"]), "{what}");
    assert_eq!(rules[0]["operations"], json!(["CREATE", "UPDATE", "DELETE"]), "{what}");
    let dep = deployment(docs);
    let sa = dep["spec"]["template"]["spec"]["serviceAccountName"].as_str().unwrap();
    let ns = dep["metadata"]["namespace"].as_str().unwrap();
    let conditions = spec["matchConditions"].as_array().unwrap();
    assert_eq!(conditions.len(), 1, "{what}");
    assert_eq!(
        conditions[0]["expression"],
        format!("request.userInfo.username == 'system:serviceaccount:{ns}:{sa}'"),
        "{what}: the policy matches the Deployment's ServiceAccount"
    );
    assert_eq!(
        spec["validations"],
        reference_secrets_policy()["spec"]["validations"],
        "{what}: the validations of deploy/secrets-policy/"
    );
}
