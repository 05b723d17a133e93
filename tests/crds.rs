//! The CRDs: `crds/` is what the binary prints, and the schema's CEL rules
//! accept and reject what they should (evaluated client-side by kube-cel,
//! as an apiserver would).

use kube::core::cel::{validate_cel, validate_cel_update};
use matrix_user_operator::api::{MatrixAccessToken, MatrixUser};
use serde_json::{Value, json};

#[test]
fn crds_dir_matches_the_binary_output() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"))
        .arg("crd")
        .output()
        .expect("run matrix-user-operator crd");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8(out.stdout).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/crds.yaml");
    assert!(
        printed == committed,
        "crds/crds.yaml is stale: run `cargo run -- crd > crds/crds.yaml` and commit it"
    );
    let docs: Vec<&str> = printed.split("---\n").filter(|d| !d.trim().is_empty()).collect();
    assert_eq!(docs.len(), 3);
    for doc in docs {
        let crd: Value = serde_yaml::from_str(doc).expect("each document parses");
        assert_eq!(crd["spec"]["group"], "matrix-operator.io");
        assert_eq!(crd["spec"]["versions"][0]["name"], "v1alpha1");
        assert_eq!(crd["spec"]["names"]["categories"][0], "matrix");
    }
}

#[test]
fn crd_schema_carries_grammar_enums_and_columns() {
    let crd = serde_json::to_value(<MatrixUser as kube::CustomResourceExt>::crd()).unwrap();
    let version = &crd["spec"]["versions"][0];
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["localpart"]["pattern"], "^[a-z0-9._=/+-]+$");
    assert_eq!(spec["avatarUrl"]["pattern"], r"^(mxc://[^/\s]+/[^/\s]+)?$");
    assert_eq!(spec["deletionPolicy"]["enum"], json!(["Deactivate", "Erase", "Retain"]));
    assert_eq!(spec["deletionPolicy"]["default"], "Deactivate");
    assert_eq!(spec["userType"]["enum"], json!(["bot", "support"]));
    assert_eq!(
        spec["threepids"]["items"]["properties"]["medium"]["enum"],
        json!(["email", "msisdn"])
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Ready", "User ID", "Homeserver", "Rooms", "Reason", "Age"]);
    // Rooms: bounded, one entry per room, each an ID or an alias.
    assert_eq!(spec["rooms"]["maxItems"], 50);
    assert_eq!(spec["rooms"]["x-kubernetes-list-type"], "set");
    assert_eq!(spec["rooms"]["items"]["maxLength"], 255);
    assert_eq!(spec["rooms"]["items"]["pattern"], r"^(![^\s]+|#[^:\s]+:[^\s]+)$");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["mxu"]));
}

fn user(name: &str, spec: Value) -> MatrixUser {
    serde_json::from_value(json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
        "metadata": {"name": name, "namespace": "chat"},
        "spec": spec,
    }))
    .expect("a MatrixUser")
}

fn base() -> Value {
    json!({"homeserverRef": {"name": "hs"}})
}

fn with(mut v: Value, field: &str, value: Value) -> Value {
    v[field] = value;
    v
}

#[test]
fn cel_accepts_a_full_spec() {
    let spec = json!({
        "homeserverRef": {"name": "hs"}, "localpart": "alice", "displayName": "Alice",
        "avatarUrl": "mxc://example.org/abc", "admin": false, "deactivated": false, "locked": true,
        "userType": "bot", "password": {"secretRef": {"name": "pw", "key": "password"}, "logoutDevicesOnChange": true},
        "threepids": [{"medium": "email", "address": "alice@example.org"}],
        "externalIds": [{"authProvider": "oidc", "externalId": "1"}],
        "deletionPolicy": "Erase", "adopt": true
    });
    validate_cel(&user("alice", spec)).expect("valid");
    validate_cel(&user("alice", base())).expect("minimal");
}

#[test]
fn cel_rejects_bad_input() {
    let cases = [
        (
            "deactivated and locked",
            user(
                "a",
                with(with(base(), "deactivated", json!(true)), "locked", json!(true)),
            ),
            "cannot both be true",
        ),
        (
            "leading underscore",
            user("a", with(base(), "localpart", json!("_bridge"))),
            "may not start with '_'",
        ),
        (
            "all digits",
            user("a", with(base(), "localpart", json!("1234"))),
            "may not be all digits",
        ),
        (
            "password with both sources",
            user(
                "a",
                with(
                    base(),
                    "password",
                    json!({"secretRef": {"name": "p", "key": "k"}, "generate": true}),
                ),
            ),
            "exactly one of",
        ),
        (
            "password with no source",
            user("a", with(base(), "password", json!({"logoutDevicesOnChange": true}))),
            "exactly one of",
        ),
        (
            "email without @",
            user(
                "a",
                with(base(), "threepids", json!([{"medium": "email", "address": "nope"}])),
            ),
            "exactly one '@'",
        ),
        (
            "non-ASCII email",
            user(
                "a",
                with(
                    base(),
                    "threepids",
                    json!([{"medium": "email", "address": "straße@example.org"}]),
                ),
            ),
            "ASCII",
        ),
        (
            "two @ in an email",
            user(
                "a",
                with(
                    base(),
                    "threepids",
                    json!([{"medium": "email", "address": "a@b@example.org"}]),
                ),
            ),
            "exactly one '@'",
        ),
    ];
    for (case, u, expected) in cases {
        let err = validate_cel(&u).expect_err(case).to_string();
        assert!(err.contains(expected), "{case}: {err}");
    }
    // Each of the rules alone passes when the input is fine.
    // No rule looks at metadata.name (the apiserver's CEL cost budget): an
    // all-digit name as the default localpart is the operator's InvalidSpec.
    validate_cel(&user("1234", base())).expect("names are not checked here");
    validate_cel(&user("a", with(base(), "deactivated", json!(true)))).expect("deactivated alone");
    validate_cel(&user("a", with(base(), "password", json!({"generate": true})))).expect("generate alone");
    validate_cel(&user(
        "a",
        with(base(), "threepids", json!([{"medium": "msisdn", "address": "4477"}])),
    ))
    .expect("msisdn");
}

#[test]
fn cel_keeps_the_matrix_id_immutable() {
    let old = user("alice", with(base(), "localpart", json!("alice")));
    validate_cel_update(&old.clone(), &old).expect("unchanged");
    let renamed = user("alice", with(base(), "localpart", json!("alice2")));
    assert!(validate_cel_update(&renamed, &old).is_err(), "localpart change");
    let defaulted = user("alice", base());
    assert!(validate_cel_update(&defaulted, &old).is_err(), "removing the localpart");
    let old_default = user("bob", base());
    validate_cel_update(&old_default.clone(), &old_default).expect("unchanged, defaulted");
    let added = user("bob", with(base(), "localpart", json!("bob")));
    assert!(validate_cel_update(&added, &old_default).is_err(), "adding a localpart");
    let moved = user(
        "alice",
        with(
            with(base(), "localpart", json!("alice")),
            "homeserverRef",
            json!({"name": "other"}),
        ),
    );
    assert!(validate_cel_update(&moved, &old).is_err(), "homeserverRef change");
}

fn access_token(spec: Value) -> MatrixAccessToken {
    serde_json::from_value(json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixAccessToken",
        "metadata": {"name": "notifier", "namespace": "chat"},
        "spec": spec,
    }))
    .expect("a MatrixAccessToken")
}

#[test]
fn cel_keeps_a_tokens_user_and_secret_immutable() {
    let old = access_token(json!({"userRef": {"name": "bot"}, "validFor": "720h"}));
    validate_cel(&old).expect("valid");
    let rotated = access_token(json!({"userRef": {"name": "bot"}, "validFor": "24h", "deviceId": "BOT1"}));
    validate_cel_update(&rotated, &old).expect("lifetime and device may change");
    let moved = access_token(json!({"userRef": {"name": "other"}, "validFor": "720h"}));
    assert!(validate_cel_update(&moved, &old).is_err(), "userRef change");
    let renamed = access_token(json!({"userRef": {"name": "bot"}, "secretName": "x", "validFor": "720h"}));
    assert!(validate_cel_update(&renamed, &old).is_err(), "secretName added");
    let named = access_token(json!({"userRef": {"name": "bot"}, "secretName": "x"}));
    validate_cel_update(&named.clone(), &named).expect("unchanged");
    let other = access_token(json!({"userRef": {"name": "bot"}, "secretName": "y"}));
    assert!(validate_cel_update(&other, &named).is_err(), "secretName change");
}

#[test]
fn the_token_crd_has_its_columns_and_short_name() {
    let crd = serde_json::to_value(<MatrixAccessToken as kube::CustomResourceExt>::crd()).unwrap();
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["mxat"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(columns, ["Ready", "User", "Device", "Expires", "Reason", "Age"]);
    // kubectl renders a `date` column as the time since it, which is
    // `<invalid>` for a time to come: the expiry is shown as it is.
    let expires = &version["additionalPrinterColumns"][3];
    assert_eq!(expires["type"], "string", "{expires}");
    assert!(!version["subresources"]["status"].is_null());
    let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
    for field in [
        "userId",
        "deviceId",
        "issuedAt",
        "expiresAt",
        "observedGeneration",
        "conditions",
        "sessionId",
    ] {
        assert!(status[field].is_object(), "status.{field}");
    }
}
