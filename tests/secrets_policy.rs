//! The ValidatingAdmissionPolicy on the operator's Secret writes
//! (deploy/secrets-policy/, the chart's copy is checked equal in
//! tests/deploy.rs and tests/helm.rs): its CEL, evaluated client-side by
//! kube-cel against admission requests shaped as the API server builds them
//! (`object`, `oldObject`, `request`), admits the writes the operator makes
//! and refuses the others.

use matrix_user_operator_testkit as common;

use common::deploy_checks::reference_secrets_policy;
use kube::core::cel::{KubeCelExt, cel};
use matrix_user_operator::controller::{ADMIN_TOKEN_FINALIZER, TOKEN_SECRET_FINALIZER};
use serde_json::{Value, json};

const OPERATOR: &str = "system:serviceaccount:matrix-user-operator:matrix-user-operator";

/// The `request` variable of an admission of a Secret in `chat`.
fn request(operation: &str, username: &str) -> Value {
    json!({
        "operation": operation, "name": "x", "namespace": "chat", "dryRun": false,
        "kind": {"group": "", "version": "v1", "kind": "Secret"},
        "resource": {"group": "", "version": "v1", "resource": "secrets"},
        "userInfo": {"username": username, "uid": "u", "groups": ["system:serviceaccounts"]},
    })
}

/// Evaluates one expression with the admission variables bound, on the
/// `cel` crate with Kubernetes' functions (kube-cel's). Not through
/// kube-cel's `VapEvaluator`: it escapes every object key as CRD rules
/// escape declared field names (`app.kubernetes.io/managed-by` becomes
/// `app__dot__kubernetes__dot__io__slash__managed__dash__by`), while the
/// API server leaves map keys, such as label names, as they are; a Secret's
/// declared fields need no escaping. An error is `Err` (with
/// `failurePolicy: Fail`, a refusal).
fn evaluate(expression: &str, object: &Value, old: &Value, request: &Value) -> Result<bool, String> {
    let mut ctx = cel::Context::default().with_all();
    ctx.add_variable("object", object).map_err(|e| e.to_string())?;
    ctx.add_variable("oldObject", old).map_err(|e| e.to_string())?;
    ctx.add_variable("request", request).map_err(|e| e.to_string())?;
    let program = cel::Program::compile(expression).map_err(|e| format!("{expression}: {e}"))?;
    match program.execute(&ctx) {
        Ok(cel::Value::Bool(b)) => Ok(b),
        Ok(other) => Err(format!("{expression}: not a bool: {other:?}")),
        Err(e) => Err(format!("{expression}: {e}")),
    }
}

/// Whether the policy applies to the request (its matchConditions).
fn matches(request: &Value, object: &Value) -> bool {
    let policy = reference_secrets_policy();
    policy["spec"]["matchConditions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| evaluate(c["expression"].as_str().unwrap(), object, &Value::Null, request).expect("a match condition"))
}

/// The messages of the validations that refuse the operator's request;
/// empty when admitted. An expression that fails to evaluate refuses too
/// (with `failurePolicy: Fail`), with the error as its message.
fn refusals(operation: &str, object: Option<&Value>, old: Option<&Value>) -> Vec<String> {
    let policy = reference_secrets_policy();
    let (object, old) = (
        object.cloned().unwrap_or(Value::Null),
        old.cloned().unwrap_or(Value::Null),
    );
    let request = request(operation, OPERATOR);
    policy["spec"]["validations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(
            |v| match evaluate(v["expression"].as_str().unwrap(), &object, &old, &request) {
                Ok(true) => None,
                Ok(false) => Some(v["message"].as_str().unwrap().to_string()),
                Err(e) => Some(e),
            },
        )
        .collect()
}

/// The Secret `generated_password` creates (src/controller/secrets.rs).
fn generated() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": "alice-credentials", "namespace": "chat",
            "labels": {"app.kubernetes.io/managed-by": "matrix-user-operator"},
            "ownerReferences": [{"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "name": "alice", "uid": "00000000-0000-4000-8000-000000000001",
                "controller": true, "blockOwnerDeletion": true}],
        },
        "data": {"password": "cHc=", "username": "YWxpY2U=", "userId": "QGFsaWNlOmV4YW1wbGUub3Jn",
                 "homeserverUrl": "aHR0cDovL3N5bmFwc2U="},
    })
}

/// A Homeserver's admin token Secret, as a user made it.
fn admin_token() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "synapse-admin", "namespace": "chat", "resourceVersion": "7",
                     "labels": {"team": "chat"}, "finalizers": ["example.com/keep"],
                     "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
        "data": {"token": "c2VjcmV0"},
    })
}

/// `v` with the field at `pointer` set (its parent must exist).
fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    match v.pointer_mut(parent).unwrap_or_else(|| panic!("{parent}")) {
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = value,
        Value::Object(map) => {
            map.insert(key.to_string(), value);
        }
        other => panic!("{pointer}: {other}"),
    }
    v
}

fn without(mut v: Value, parent: &str, key: &str) -> Value {
    v.pointer_mut(parent).unwrap().as_object_mut().unwrap().remove(key);
    v
}

/// The token Secret after the operator's merge patch of its finalizers: the
/// finalizer added, a new resourceVersion and managedFields entry.
fn held(old: &Value) -> Value {
    let mut new = old.clone();
    new["metadata"]["finalizers"] = json!(["example.com/keep", ADMIN_TOKEN_FINALIZER]);
    new["metadata"]["resourceVersion"] = json!("8");
    new["metadata"]["managedFields"] = json!([{"manager": "kubectl"}, {"manager": "matrix-user-operator"}]);
    new
}

#[test]
fn it_applies_to_the_operators_service_account_only() {
    assert!(matches(&request("CREATE", OPERATOR), &generated()));
    for other in [
        "system:serviceaccount:kube-system:default",
        "system:serviceaccount:matrix-user-operator:other",
        "system:serviceaccount:other:matrix-user-operator",
        "kubernetes-admin",
    ] {
        assert!(!matches(&request("CREATE", other), &generated()), "{other}");
    }
}

#[test]
fn it_admits_the_writes_the_operator_makes() {
    assert_eq!(refusals("CREATE", Some(&generated()), None), Vec::<String>::new());
    // Holding and releasing the admin token.
    let old = admin_token();
    let new = held(&old);
    assert_eq!(refusals("UPDATE", Some(&new), Some(&old)), Vec::<String>::new());
    assert_eq!(refusals("UPDATE", Some(&old), Some(&new)), Vec::<String>::new());
    // On a Secret without labels or finalizers at all.
    let bare = without(without(admin_token(), "/metadata", "labels"), "/metadata", "finalizers");
    let mut bare_held = bare.clone();
    bare_held["metadata"]["finalizers"] = json!([ADMIN_TOKEN_FINALIZER]);
    assert_eq!(refusals("UPDATE", Some(&bare_held), Some(&bare)), Vec::<String>::new());
    assert_eq!(refusals("UPDATE", Some(&bare), Some(&bare_held)), Vec::<String>::new());
}

/// The key of the password digests (src/controller/digest_key.rs): made by
/// the operator in its own namespace, and nowhere else.
#[test]
fn it_admits_the_digest_key_in_the_operators_namespace_only() {
    let key = |ns: &str| {
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": "matrix-user-operator-digest-key", "namespace": ns,
                "labels": {"app.kubernetes.io/managed-by": "matrix-user-operator"}},
            "data": {"key": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="},
        })
    };
    let refused_in = |ns: &str, object: &Value| -> Vec<String> {
        let mut request = request("CREATE", OPERATOR);
        request["namespace"] = json!(ns);
        reference_secrets_policy()["spec"]["validations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| evaluate(v["expression"].as_str().unwrap(), object, &Value::Null, &request) != Ok(true))
            .map(|v| v["message"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        refused_in("matrix-user-operator", &key("matrix-user-operator")),
        Vec::<String>::new()
    );
    assert_eq!(
        refused_in("kube-system", &key("kube-system")).len(),
        1,
        "another namespace"
    );
    let mut other_name = key("matrix-user-operator");
    other_name["metadata"]["name"] = json!("anything-else");
    assert_eq!(refused_in("matrix-user-operator", &other_name).len(), 1, "another name");
    let mut token = key("matrix-user-operator");
    token["type"] = json!("kubernetes.io/service-account-token");
    assert_eq!(refused_in("matrix-user-operator", &token).len(), 1, "another type");
}

#[test]
fn it_refuses_the_creates_the_operator_does_not_make() {
    let creates = [
        (
            "a service-account token Secret",
            with(
                with(generated(), "/type", json!("kubernetes.io/service-account-token")),
                "/metadata/annotations",
                json!({"kubernetes.io/service-account.name": "default"}),
            ),
        ),
        ("without the label", without(generated(), "/metadata", "labels")),
        (
            "with another manager's label",
            with(
                generated(),
                "/metadata/labels",
                json!({"app.kubernetes.io/managed-by": "Helm"}),
            ),
        ),
        ("without an owner", without(generated(), "/metadata", "ownerReferences")),
        (
            "owned by something else",
            with(generated(), "/metadata/ownerReferences/0/kind", json!("Homeserver")),
        ),
        (
            "owned by another group's MatrixUser",
            with(
                generated(),
                "/metadata/ownerReferences/0/apiVersion",
                json!("example.com/v1"),
            ),
        ),
        (
            "not the controller",
            without(generated(), "/metadata/ownerReferences/0", "controller"),
        ),
        (
            "of another type",
            with(generated(), "/type", json!("kubernetes.io/dockerconfigjson")),
        ),
    ];
    for (what, object) in creates {
        let refused = refusals("CREATE", Some(&object), None);
        assert_eq!(refused.len(), 1, "{what}: {refused:?}");
        assert!(
            refused[0].starts_with("the operator creates only Opaque Secrets"),
            "{what}: {refused:?}"
        );
    }
}

#[test]
fn it_refuses_every_change_but_the_admin_token_finalizer() {
    let old = admin_token();
    let updates = [
        (
            "a patch of data on a foreign Secret",
            with(old.clone(), "/data/token", json!("b3duZWQ=")),
        ),
        (
            "a finalizer patch that also changes data",
            with(held(&old), "/data/token", json!("b3duZWQ=")),
        ),
        ("added data", with(held(&old), "/data/more", json!("eA=="))),
        ("a label", with(old.clone(), "/metadata/labels/team", json!("other"))),
        ("labels dropped", without(held(&old), "/metadata", "labels")),
        (
            "an annotation",
            with(
                held(&old),
                "/metadata/annotations",
                json!({"kubernetes.io/service-account.name": "default"}),
            ),
        ),
        ("an owner", {
            let mut v = held(&old);
            v["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}]);
            v
        }),
        (
            "the type",
            with(old.clone(), "/type", json!("kubernetes.io/service-account-token")),
        ),
        ("made immutable", {
            let mut v = held(&old);
            v["immutable"] = json!(true);
            v
        }),
    ];
    for (what, new) in updates {
        let refused = refusals("UPDATE", Some(&new), Some(&old));
        assert_eq!(
            refused,
            [
                "the operator changes nothing of a Secret but its finalizer, and the data and annotations of a MatrixAccessToken's own Secret"
            ],
            "{what}"
        );
    }
    let finalizers = [
        ("another finalizer removed", json!([ADMIN_TOKEN_FINALIZER])),
        (
            "another finalizer added",
            json!(["example.com/keep", "example.com/new"]),
        ),
        ("every finalizer dropped", json!([])),
    ];
    for (what, list) in finalizers {
        let new = with(held(&old), "/metadata/finalizers", list);
        let refused = refusals("UPDATE", Some(&new), Some(&old));
        assert_eq!(
            refused,
            [
                "the operator adds or removes no finalizer but matrix-operator.io/admin-token and matrix-operator.io/access-token"
            ],
            "{what}"
        );
    }
}

#[test]
fn it_refuses_every_delete() {
    let refused = refusals("DELETE", None, Some(&generated()));
    assert_eq!(refused, ["the operator never deletes a Secret"]);
}

/// A MatrixAccessToken's Secret as the operator creates it
/// (src/controller/accesstoken.rs).
fn token_secret() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {
            "name": "notifier-token", "namespace": "chat", "resourceVersion": "3",
            "labels": {"app.kubernetes.io/managed-by": "matrix-user-operator"},
            "annotations": {"matrix-operator.io/issued-at": "2026-01-01T00:00:00Z"},
            "finalizers": [TOKEN_SECRET_FINALIZER],
            "ownerReferences": [{"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixAccessToken",
                "name": "notifier", "uid": "00000000-0000-4000-8000-000000000002", "controller": true}],
        },
        "data": {"accessToken": "b2xk", "userId": "QGJvdDpleGFtcGxlLm9yZw==", "deviceId": "",
                 "homeserverUrl": "aHR0cDovL3N5bmFwc2U="},
    })
}

#[test]
fn it_admits_a_tokens_secret_its_rotation_and_release() {
    let created = token_secret();
    assert_eq!(refusals("CREATE", Some(&created), None), Vec::<String>::new());
    // A rotation: the new token, the old one kept for its grace, the record.
    let mut rotated = with(created.clone(), "/data/accessToken", json!("bmV3"));
    rotated["data"]["previousAccessToken"] = json!("b2xk");
    rotated["metadata"]["annotations"]["matrix-operator.io/previous-revoke-at"] = json!("2026-01-01T00:10:00Z");
    assert_eq!(refusals("UPDATE", Some(&rotated), Some(&created)), Vec::<String>::new());
    // The finalizer taken off once the tokens are revoked.
    let released = with(created.clone(), "/metadata/finalizers", json!([]));
    assert_eq!(
        refusals("UPDATE", Some(&released), Some(&created)),
        Vec::<String>::new()
    );
}

#[test]
fn a_tokens_secret_keeps_its_type_labels_owner_and_others_finalizers() {
    let old = token_secret();
    let message = "the operator changes nothing of a Secret but its finalizer, and the data and annotations of a MatrixAccessToken's own Secret";
    for (what, new) in [
        (
            "the type",
            with(old.clone(), "/type", json!("kubernetes.io/service-account-token")),
        ),
        ("a label", with(old.clone(), "/metadata/labels/team", json!("x"))),
        ("the owner", {
            let mut v = old.clone();
            v["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "Pod", "name": "p", "uid": "u"}]);
            v
        }),
    ] {
        let refused = refusals("UPDATE", Some(&new), Some(&old));
        assert!(refused.iter().any(|r| r == message), "{what}: {refused:?}");
    }
    // Data of a Secret a MatrixUser owns (the generated password) stays.
    let generated = with(generated(), "/metadata/resourceVersion", json!("1"));
    let changed = with(generated.clone(), "/data/password", json!("eA=="));
    assert_eq!(refusals("UPDATE", Some(&changed), Some(&generated)), [message]);
    // A MatrixAccessToken's owner reference alone, without the operator's
    // label, gives no licence either.
    let unlabelled = without(old.clone(), "/metadata", "labels");
    let changed = with(unlabelled.clone(), "/data/accessToken", json!("eA=="));
    assert_eq!(refusals("UPDATE", Some(&changed), Some(&unlabelled)), [message]);
    let other = with(
        old.clone(),
        "/metadata/finalizers",
        json!([TOKEN_SECRET_FINALIZER, "example.com/x"]),
    );
    assert_eq!(
        refusals("UPDATE", Some(&other), Some(&old)),
        [
            "the operator adds or removes no finalizer but matrix-operator.io/admin-token and matrix-operator.io/access-token"
        ]
    );
}
