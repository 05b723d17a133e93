//! deploy/: every manifest and overlay renders with `kubectl kustomize`, the
//! Deployment is locked down and passes only flags the binary has, and the
//! RBAC allows exactly the API calls the code makes (recorded from the code
//! running against the fake API server, not listed by hand). The checks are
//! in `testkit/src/deploy_checks.rs`, shared with the Helm chart's tests.

use matrix_user_operator_testkit as common;

use std::collections::BTreeSet;

use common::deploy_checks::{
    DEPLOY, OPERATOR_NS, USER_NS, args, check_args, check_locked_down_and_probed, check_rbac, check_secrets_policy,
    deployment, find, kinds, kustomize, parse_docs, record_operator_calls,
};
use matrix_user_operator::api::{Homeserver, MatrixAccessToken, MatrixUser};
use serde_json::Value;

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

#[test]
fn deployment_args_exist_in_run_help() {
    for dir in [".", "overlays/ha", "overlays/single-namespace"] {
        check_args(
            env!("CARGO_BIN_EXE_matrix-user-operator"),
            &format!("deploy/{dir}"),
            &args(&kustomize(dir)),
        );
    }
}

#[test]
fn deployment_is_locked_down_and_probed() {
    for dir in [".", "overlays/ha", "overlays/single-namespace"] {
        check_locked_down_and_probed(&format!("deploy/{dir}"), &kustomize(dir));
    }
}

#[test]
fn every_variant_ships_the_secrets_policy_for_its_service_account() {
    for dir in [".", "overlays/ha", "overlays/single-namespace"] {
        check_secrets_policy(&format!("deploy/{dir}"), &kustomize(dir));
    }
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
    let mut tokens = 0;
    for file in ["homeserver.yaml", "matrixusers.yaml", "bot.yaml"] {
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
                "MatrixAccessToken" => {
                    let t: MatrixAccessToken = serde_json::from_value(doc.clone()).expect("a MatrixAccessToken");
                    kube::core::cel::validate_cel(&t).unwrap_or_else(|e| panic!("{file}: {e}"));
                    tokens += 1;
                }
                "Deployment" => {
                    let _: k8s_openapi::api::apps::v1::Deployment =
                        serde_json::from_value(doc.clone()).expect("a Deployment");
                }
                "Secret" | "Namespace" => {}
                other => panic!("{file}: unexpected {other}"),
            }
        }
    }
    assert!(users >= 3);
    assert_eq!(tokens, 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_allows_exactly_the_calls_the_code_makes() {
    let requests = record_operator_calls(&[]).await;
    let docs = kustomize(".");
    assert!(find(&docs, "ClusterRole", "matrix-user-operator").is_some());
    let leader_role = find(&docs, "Role", "matrix-user-operator-leader-election").unwrap();
    assert_eq!(leader_role["metadata"]["namespace"], OPERATOR_NS);
    check_rbac("deploy/", &docs, &requests);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_namespace_rbac_allows_exactly_the_calls_the_code_makes() {
    let requests = record_operator_calls(&[USER_NS]).await;
    check_rbac(
        "deploy/overlays/single-namespace",
        &kustomize("overlays/single-namespace"),
        &requests,
    );
}

/// The image deploy/ runs is the crate's version: a release bumps both.
#[test]
fn kustomize_image_tag_is_the_crate_version() {
    let text = std::fs::read_to_string(format!("{DEPLOY}/base/kustomization.yaml")).unwrap();
    let k: Value = serde_yaml::from_str(&text).unwrap();
    let image = k["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "matrix-user-operator")
        .expect("an images: entry for matrix-user-operator");
    assert_eq!(
        image["newTag"],
        env!("CARGO_PKG_VERSION"),
        "deploy/base/kustomization.yaml's images: newTag must be Cargo.toml's version"
    );
}

/// The README's bot example is deploy/examples/bot.yaml, verbatim: the
/// token's Secret is the one the Deployment mounts, and its MatrixUser is
/// a bot whose password the operator manages.
#[test]
fn the_readme_bot_example_is_the_example_file() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("## Bot tokens: MatrixAccessToken").expect("the section");
    let block = &readme[start..];
    let block = &block[block.find("```yaml\n").unwrap() + 8..];
    let block = &block[..block.find("```\n").unwrap()];
    let file = std::fs::read_to_string(format!("{DEPLOY}/examples/bot.yaml")).unwrap();
    assert!(
        file.ends_with(block),
        "deploy/examples/bot.yaml is the README's example"
    );
    let docs = parse_docs(block);
    let token = docs.iter().find(|d| d["kind"] == "MatrixAccessToken").unwrap();
    let user = docs.iter().find(|d| d["kind"] == "MatrixUser").unwrap();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(token["spec"]["userRef"]["name"], user["metadata"]["name"]);
    assert_eq!(user["spec"]["userType"], "bot");
    assert_eq!(user["spec"]["password"]["generate"], true);
    let t: MatrixAccessToken = serde_json::from_value(token.clone()).unwrap();
    let volumes = &deployment["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["secret"]["secretName"].as_str(),
        Some(t.secret_name().as_str())
    );
}
