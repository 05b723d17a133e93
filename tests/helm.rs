//! The Helm chart `deploy/helm/matrix-user-operator/`, loaded, linted and
//! rendered by Helm's own SDK (`testkit/src/helm.rs`): it installs what
//! deploy/ installs, each value does what values.yaml says, the schema
//! refuses bad values, and the rendered RBAC, args and pod pass the same
//! checks as deploy/ (`testkit/src/deploy_checks.rs`).

use matrix_user_operator_testkit as common;

use std::collections::BTreeSet;

use common::deploy_checks::{
    DEPLOY, OPERATOR_NS, USER_NS, args, check_args, check_locked_down_and_probed, check_rbac, check_secrets_policy,
    deployment, find, kinds, kustomize, of_kind, record_operator_calls,
};
use common::helm::{CHART, RELEASE, RELEASE_NS, info, lint, render, render_files, rendered, validate};
use serde_json::{Value, json};

fn pod(docs: &[Value]) -> &Value {
    &deployment(docs)["spec"]["template"]["spec"]
}

fn container(docs: &[Value]) -> &Value {
    &pod(docs)["containers"][0]
}

/// Values a platform team sets, each rendering checked by the shared checks.
fn variants() -> Vec<(&'static str, Value)> {
    vec![
        ("defaults", json!({})),
        ("replicaCount: 2", json!({"replicaCount": 2})),
        ("watchNamespaces", json!({"watchNamespaces": [USER_NS, "team-b"]})),
        (
            "tuning",
            json!({"resyncInterval": "1h30m", "concurrency": 8, "requestTimeout": "45s",
                   "log": {"format": "text", "level": "info,matrix_user_operator=debug"}}),
        ),
        (
            "everything",
            json!({"replicaCount": 3, "watchNamespaces": ["a"], "networkPolicy": {"enabled": false},
                   "serviceMonitor": {"enabled": true, "interval": "30s", "labels": {"release": "prom"}},
                   "crds": {"install": false}, "priorityClassName": "system-cluster-critical",
                   "image": {"repository": "registry.example/mxo", "tag": "dev", "pullPolicy": "Always",
                             "pullSecrets": ["regcred"]}}),
        ),
    ]
}

#[test]
fn chart_lints_clean() {
    for (what, values) in variants() {
        let report = lint(&values);
        assert_eq!(report["total_charts_linted"], 1, "{what}: {report}");
        assert_eq!(report["errors"], json!([]), "{what}: {report}");
        // Severity 1 is informational (an icon is recommended); 2 warning, 3 error.
        let serious: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64().unwrap() >= 2)
            .collect();
        assert!(serious.is_empty(), "{what}: helm lint --strict: {serious:?}");
    }
}

#[test]
fn chart_version_and_app_version_are_the_crate_version() {
    let version = env!("CARGO_PKG_VERSION");
    let chart = info();
    assert_eq!(
        chart["metadata"]["version"], version,
        "Chart.yaml version must be Cargo.toml's"
    );
    assert_eq!(
        chart["metadata"]["appVersion"], version,
        "Chart.yaml appVersion must be Cargo.toml's"
    );
    let deps = chart["metadata"]["dependencies"].as_array().unwrap();
    assert_eq!(deps.len(), 1);
    assert_eq!(deps[0]["name"], "matrix-user-operator-crds");
    assert_eq!(deps[0]["version"], version, "the CRD subchart's version in Chart.yaml");
    assert_eq!(deps[0]["condition"], "crds.install");
    let loaded = chart["dependencies"].as_array().unwrap();
    assert_eq!(loaded.len(), 1, "the CRD subchart is in charts/: {loaded:?}");
    assert_eq!(loaded[0]["version"], version);
    assert_eq!(loaded[0]["appVersion"], version);
    // The image the chart runs by default is the same version.
    assert_eq!(
        container(&rendered(json!({})))["image"],
        format!("matrix-user-operator:{version}")
    );
}

#[test]
fn chart_crds_are_the_repositorys_byte_for_byte() {
    let repo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml")).unwrap();
    let copy = std::fs::read_to_string(format!("{CHART}/charts/matrix-user-operator-crds/crds/crds.yaml")).unwrap();
    assert!(
        copy == repo,
        "deploy/helm/matrix-user-operator/charts/matrix-user-operator-crds/crds/crds.yaml differs from \
         crds/crds.yaml: copy it over (cp crds/crds.yaml deploy/helm/matrix-user-operator/charts/\
         matrix-user-operator-crds/crds/)"
    );
    // And that file is what Helm takes for the chart's CRDs.
    let chart = info();
    let crds = chart["crds"].as_array().unwrap();
    assert_eq!(crds.len(), 1, "{crds:?}");
    assert_eq!(
        crds[0]["filename"],
        "matrix-user-operator/charts/matrix-user-operator-crds/crds/crds.yaml"
    );
    assert!(crds[0]["data"].as_str() == Some(repo.as_str()));
}

#[test]
fn crds_install_enables_the_crd_subchart() {
    // Helm drops a subchart whose condition is false before it installs the
    // crds/ of the chart and its subcharts; the subchart's empty template
    // shows in a render exactly when it is enabled.
    let probe = "matrix-user-operator/charts/matrix-user-operator-crds/templates/enabled.yaml";
    let on = render_files(&json!({})).unwrap();
    assert!(on.contains_key(probe), "{:?}", on.keys());
    assert_eq!(on[probe].trim(), "");
    let on = render_files(&json!({"crds": {"install": true}})).unwrap();
    assert!(on.contains_key(probe));
    let off = render_files(&json!({"crds": {"install": false}})).unwrap();
    assert!(!off.contains_key(probe), "{:?}", off.keys());
}

#[test]
fn defaults_install_what_deploy_installs_in_the_release_namespace() {
    let docs = rendered(json!({}));
    let mut expected = kinds(&kustomize("."));
    expected.remove("Namespace"); // Helm's release namespace (--create-namespace)
    assert_eq!(kinds(&docs), expected);
    let base = kustomize(".");
    for d in &docs {
        let kind = d["kind"].as_str().unwrap();
        let name = d["metadata"]["name"].as_str().unwrap();
        assert!(
            find(&base, kind, name).is_some(),
            "{kind}/{name} is not in deploy/ (release {RELEASE})"
        );
        if !kind.starts_with("Cluster") && !kind.starts_with("ValidatingAdmissionPolicy") {
            assert_eq!(d["metadata"]["namespace"], RELEASE_NS, "{kind}/{name}");
        }
        assert_eq!(
            d["metadata"]["labels"]["app.kubernetes.io/instance"], RELEASE,
            "{kind}/{name}"
        );
    }
    // The Deployment, probes and pod as deploy/'s, but for the labels Helm
    // adds and the flags that show the chart's defaults.
    let chart = deployment(&docs);
    let kust = deployment(&base);
    for path in [
        "/spec/replicas",
        "/spec/template/spec/securityContext",
        "/spec/template/spec/serviceAccountName",
        "/spec/template/spec/automountServiceAccountToken",
        "/spec/template/spec/containers/0/name",
        "/spec/template/spec/containers/0/ports",
        "/spec/template/spec/containers/0/livenessProbe",
        "/spec/template/spec/containers/0/readinessProbe",
        "/spec/template/spec/containers/0/resources",
        "/spec/template/spec/containers/0/securityContext",
    ] {
        assert_eq!(chart.pointer(path), kust.pointer(path), "{path}");
    }
    assert_eq!(
        container(&docs)["image"],
        format!("{}:{}", "matrix-user-operator", env!("CARGO_PKG_VERSION"))
    );
    let kust_args: BTreeSet<String> = args(&base).into_iter().collect();
    let chart_args: BTreeSet<String> = args(&docs).into_iter().collect();
    assert!(
        kust_args.is_subset(&chart_args),
        "deploy/'s args {kust_args:?} within the chart's {chart_args:?}"
    );
    assert!(!kinds(&docs).contains("PodDisruptionBudget"));
    assert!(!kinds(&docs).contains("ServiceMonitor"));
}

#[test]
fn selectors_select_the_pods() {
    for (what, values) in variants() {
        let docs = rendered(values);
        let dep = deployment(&docs);
        let labels = &dep["spec"]["template"]["metadata"]["labels"];
        let selects = |selector: &Value, whose: &str| {
            for (k, v) in selector.as_object().unwrap() {
                assert_eq!(&labels[k], v, "{what}: {whose} selects {k}={v}, the pods have {labels}");
            }
        };
        selects(&dep["spec"]["selector"]["matchLabels"], "the Deployment");
        for s in of_kind(&docs, "Service") {
            selects(&s["spec"]["selector"], "the Service");
        }
        for n in of_kind(&docs, "NetworkPolicy") {
            selects(&n["spec"]["podSelector"]["matchLabels"], "the NetworkPolicy");
        }
        for p in of_kind(&docs, "PodDisruptionBudget") {
            selects(&p["spec"]["selector"]["matchLabels"], "the PodDisruptionBudget");
        }
        for m in of_kind(&docs, "ServiceMonitor") {
            let service = of_kind(&docs, "Service")[0];
            for (k, v) in m["spec"]["selector"]["matchLabels"].as_object().unwrap() {
                assert_eq!(
                    &service["metadata"]["labels"][k], v,
                    "{what}: the ServiceMonitor selects {k}"
                );
            }
            assert_eq!(m["spec"]["endpoints"][0]["port"], service["spec"]["ports"][0]["name"]);
        }
    }
}

#[test]
fn deployment_args_exist_in_run_help() {
    for (what, values) in variants() {
        check_args(
            env!("CARGO_BIN_EXE_matrix-user-operator"),
            &format!("chart, {what}"),
            &args(&rendered(values)),
        );
    }
}

#[test]
fn deployment_is_locked_down_and_probed() {
    for (what, values) in variants() {
        check_locked_down_and_probed(&format!("chart, {what}"), &rendered(values));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_exactly_the_calls_the_code_makes() {
    let requests = record_operator_calls(&[]).await;
    let docs = rendered(json!({}));
    assert!(find(&docs, "ClusterRole", RELEASE).is_some());
    assert!(watched(&docs).is_empty());
    check_rbac("chart, defaults", &docs, &requests);
    // Leader election alone does not change the grants.
    check_rbac(
        "chart, replicaCount: 2",
        &rendered(json!({"replicaCount": 2})),
        &requests,
    );
}

fn watched(docs: &[Value]) -> Vec<String> {
    common::deploy_checks::watched_namespaces(&args(docs))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_namespaces_get_roles_that_allow_exactly_the_calls_the_code_makes() {
    let namespaces = [USER_NS, "team-b"];
    let requests = record_operator_calls(&namespaces).await;
    let docs = rendered(json!({"watchNamespaces": namespaces}));
    let k = kinds(&docs);
    assert!(!k.contains("ClusterRole") && !k.contains("ClusterRoleBinding"), "{k:?}");
    assert!(args(&docs).contains(&format!("--namespace={USER_NS},team-b")));
    assert_eq!(watched(&docs), namespaces);
    for ns in namespaces {
        let in_ns = |kind: &str| {
            of_kind(&docs, kind)
                .into_iter()
                .filter(|d| d["metadata"]["namespace"] == ns)
                .count()
        };
        assert_eq!((in_ns("Role"), in_ns("RoleBinding")), (1, 1), "{ns}");
    }
    check_rbac("chart, watchNamespaces", &docs, &requests);
}

#[test]
fn rbac_rules_are_deploy_base_rules() {
    let base = kustomize(".");
    let kust_rules = &find(&base, "ClusterRole", "matrix-user-operator").unwrap()["rules"];
    let docs = rendered(json!({}));
    assert_eq!(&find(&docs, "ClusterRole", RELEASE).unwrap()["rules"], kust_rules);
    let docs = rendered(json!({"watchNamespaces": ["a", "b", "c"]}));
    let roles: Vec<&Value> = of_kind(&docs, "Role")
        .into_iter()
        .filter(|r| r["metadata"]["namespace"] != RELEASE_NS)
        .collect();
    assert_eq!(roles.len(), 3);
    for role in roles {
        assert_eq!(&role["rules"], kust_rules, "{}", role["metadata"]["namespace"]);
    }
    let lease = |docs: &[Value]| {
        of_kind(docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["namespace"] == OPERATOR_NS)
            .unwrap()["rules"]
            .clone()
    };
    assert_eq!(lease(&docs), lease(&base));
}

/// The comment lines of deploy/base/rbac.yaml's ClusterRole rules, in order.
fn base_rule_comments() -> Vec<String> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/base/rbac.yaml")).unwrap();
    let cluster_role = text.split("\n---\n").next().unwrap();
    let rules = &cluster_role[cluster_role.find("rules:").unwrap()..];
    rules
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_rbac_rule_keeps_its_comment() {
    let comments = base_rule_comments();
    assert!(comments.len() >= 5, "{comments:?}");
    for values in [json!({}), json!({"watchNamespaces": ["a"]})] {
        let files = render_files(&values).unwrap();
        let rbac = &files["matrix-user-operator/templates/rbac.yaml"];
        // Each Role or ClusterRole with the watched resources' rules carries
        // the comments of deploy/base/rbac.yaml in the same order.
        let docs: Vec<&str> = rbac.split("\n---\n").filter(|d| d.contains("matrixusers")).collect();
        assert!(!docs.is_empty());
        for doc in docs {
            let lines: Vec<&str> = doc.lines().map(str::trim).collect();
            let mut at = 0;
            for c in &comments {
                let found = lines[at..].iter().position(|l| l == c);
                assert!(
                    found.is_some(),
                    "{values}: the rendered rule lacks the comment {c:?}:\n{doc}"
                );
                at += found.unwrap() + 1;
            }
        }
        assert!(rbac.contains("# Read, create on first start, renew / take over / release by update."));
    }
}

#[test]
fn every_variant_ships_the_secrets_policy_unless_turned_off() {
    for (what, values) in variants() {
        check_secrets_policy(&format!("chart, {what}"), &rendered(values));
    }
    let docs = rendered(json!({"fullnameOverride": "mxo"}));
    check_secrets_policy("chart, fullnameOverride", &docs);
    let off = rendered(json!({"secretsPolicy": {"enabled": false}}));
    assert!(of_kind(&off, "ValidatingAdmissionPolicy").is_empty());
    assert!(of_kind(&off, "ValidatingAdmissionPolicyBinding").is_empty());
}

#[test]
fn two_replicas_elect_a_leader_and_keep_one_up() {
    let docs = rendered(json!({"replicaCount": 2}));
    assert_eq!(deployment(&docs)["spec"]["replicas"], 2);
    assert!(args(&docs).contains(&"--leader-election=on".to_string()));
    let pdb = find(&docs, "PodDisruptionBudget", RELEASE).expect("a PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pod(&docs)["topologySpreadConstraints"].is_array());
    // As overlays/ha does.
    let ha = kustomize("overlays/ha");
    assert_eq!(
        pod(&docs)["topologySpreadConstraints"][0]["topologyKey"],
        pod(&ha)["topologySpreadConstraints"][0]["topologyKey"]
    );
    let one = rendered(json!({"replicaCount": 1}));
    assert!(args(&one).contains(&"--leader-election=auto".to_string()));
    assert!(!kinds(&one).contains("PodDisruptionBudget"));
    assert!(pod(&one).get("topologySpreadConstraints").is_none());
}

#[test]
fn service_monitor_when_asked() {
    let docs = rendered(json!({"serviceMonitor": {"enabled": true, "interval": "15s",
                                                  "labels": {"release": "prometheus"}}}));
    let sm = find(&docs, "ServiceMonitor", RELEASE).expect("a ServiceMonitor");
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(sm["spec"]["namespaceSelector"]["matchNames"], json!([RELEASE_NS]));
    let plain = rendered(json!({"serviceMonitor": {"enabled": true}}));
    assert!(
        find(&plain, "ServiceMonitor", RELEASE).unwrap()["spec"]["endpoints"][0]
            .get("interval")
            .is_none()
    );
}

#[test]
fn network_policy_can_be_turned_off() {
    assert!(kinds(&rendered(json!({}))).contains("NetworkPolicy"));
    let docs = rendered(json!({"networkPolicy": {"enabled": false}}));
    assert!(!kinds(&docs).contains("NetworkPolicy"), "{:?}", kinds(&docs));
    let np = rendered(json!({}));
    let np = of_kind(&np, "NetworkPolicy")[0];
    let base = kustomize(".");
    let kust = find(&base, "NetworkPolicy", "matrix-user-operator").unwrap();
    assert_eq!(np["spec"]["ingress"], kust["spec"]["ingress"]);
    assert_eq!(np["spec"]["policyTypes"], kust["spec"]["policyTypes"]);
}

#[test]
fn image_values_reach_the_pod() {
    let docs = rendered(
        json!({"image": {"repository": "registry.example/team/mxo", "tag": "1.2.3-rc1",
                                         "pullPolicy": "Always", "pullSecrets": ["regcred", "other"]}}),
    );
    let c = container(&docs);
    assert_eq!(c["image"], "registry.example/team/mxo:1.2.3-rc1");
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(
        pod(&docs)["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": "other"}])
    );
    // Only the repository: the tag stays the chart's appVersion.
    let docs = rendered(json!({"image": {"repository": "r.example/mxo"}}));
    assert_eq!(
        container(&docs)["image"],
        format!("r.example/mxo:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(container(&docs)["imagePullPolicy"], "IfNotPresent");
    assert!(pod(&docs).get("imagePullSecrets").is_none());
}

#[test]
fn pod_values_reach_the_pod() {
    let resources = json!({"requests": {"cpu": "100m", "memory": "128Mi"},
                           "limits": {"cpu": "1", "memory": "512Mi"}});
    let docs = rendered(json!({
        "resources": resources,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms":
            [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}]}}},
        "podAnnotations": {"example.org/owner": "platform"},
        "podLabels": {"team": "platform"},
        "priorityClassName": "system-cluster-critical",
        "resyncInterval": "5m", "concurrency": 2, "requestTimeout": "10s", "reconcileTimeout": "3m",
        "log": {"format": "text", "level": "debug"},
    }));
    let p = pod(&docs);
    assert_eq!(container(&docs)["resources"], resources);
    assert_eq!(p["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(p["tolerations"][0]["key"], "dedicated");
    assert_eq!(
        p["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
            [0]["key"],
        "pool"
    );
    let meta = &deployment(&docs)["spec"]["template"]["metadata"];
    assert_eq!(meta["annotations"]["example.org/owner"], "platform");
    assert_eq!(meta["labels"]["team"], "platform");
    assert_eq!(p["priorityClassName"], "system-cluster-critical");
    let a = args(&docs);
    for expected in [
        "--resync-interval=5m",
        "--concurrency=2",
        "--request-timeout=10s",
        "--reconcile-timeout=3m",
        "--log-format=text",
        "--log-level=debug",
    ] {
        assert!(a.contains(&expected.to_string()), "{expected} in {a:?}");
    }
    // Left out: none of these keys, and the operator's own default
    // deadline (4 x --request-timeout).
    let plain = rendered(json!({}));
    assert!(!args(&plain).iter().any(|a| a.starts_with("--reconcile-timeout")));
    for key in ["nodeSelector", "tolerations", "affinity", "priorityClassName"] {
        assert!(pod(&plain).get(key).is_none(), "{key}");
    }
    assert!(
        deployment(&plain)["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none()
    );
}

#[test]
fn schema_accepts_the_defaults_and_every_variant() {
    validate(&json!({})).unwrap();
    validate(&info()["values"]).unwrap();
    for (what, values) in variants() {
        validate(&values).unwrap_or_else(|e| panic!("{what}: {e:?}"));
    }
}

#[test]
fn schema_refuses_bad_values_naming_the_field() {
    let cases = [
        (json!({"replicaCount": "2"}), "/replicaCount", "want integer"),
        (json!({"replicaCount": 0}), "/replicaCount", "minimum"),
        (json!({"concurrency": 0}), "/concurrency", "minimum"),
        (json!({"watchNamespaces": "chat"}), "/watchNamespaces", "want array"),
        (json!({"watchNamespaces": ["Chat_NS"]}), "/watchNamespaces/0", "pattern"),
        (json!({"log": {"format": "xml"}}), "/log/format", "'json', 'text'"),
        (json!({"log": {"colour": true}}), "/log", "'colour' not allowed"),
        (
            json!({"image": {"pullPolicy": "Sometimes"}}),
            "/image/pullPolicy",
            "'Always'",
        ),
        (
            json!({"image": {"pullSecrets": [{"name": "x"}]}}),
            "/image/pullSecrets/0",
            "want string",
        ),
        (json!({"image": {"repository": ""}}), "/image/repository", "minLength"),
        (json!({"resyncInterval": "10 minutes"}), "/resyncInterval", "pattern"),
        (json!({"requestTimeout": 30}), "/requestTimeout", "want string"),
        (json!({"reconcileTimeout": "2 minutes"}), "/reconcileTimeout", "pattern"),
        (
            json!({"networkPolicy": {"enabled": "no"}}),
            "/networkPolicy/enabled",
            "want boolean",
        ),
        (
            json!({"serviceMonitor": {"enabled": 1}}),
            "/serviceMonitor/enabled",
            "want boolean",
        ),
        (json!({"crds": {"install": "yes"}}), "/crds/install", "want boolean"),
        (json!({"replicas": 2}), "'replicas' not allowed", ""),
        (json!({"resources": {"request": {}}}), "'request' not allowed", ""),
        (
            json!({"resources": {"limits": {"memory": "lots"}}}),
            "/resources/limits/memory",
            "pattern",
        ),
        (json!({"podLabels": {"n": 1}}), "/podLabels/n", "want string"),
    ];
    for (values, field, detail) in cases {
        for (how, result) in [
            ("validate_schema", validate(&values)),
            ("render", render(&values).map(|_| ())),
        ] {
            let e = result.expect_err(&format!("{how} accepted {values}"));
            assert_eq!(e.kind, "HelmValuesError", "{how} {values}: {e:?}");
            assert!(
                e.message.contains(field) && e.message.contains(detail),
                "{how} {values}: the message should name {field} ({detail}): {}",
                e.message
            );
        }
    }
}
