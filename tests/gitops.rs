//! GitOps: deploy/examples/gitops/ parses and points at what exists, and
//! deploy/argocd/'s Argo CD health checks run for real with a Lua
//! interpreter from Debian's packages (`lua5.4`, `lua5.3`; `lua5.1` too when
//! installed, the dialect of Argo CD's gopher-lua) against recorded statuses
//! of every reason, the way Argo CD tests its own resource_customizations:
//! `<group>/<Kind>/health.lua`, `health_test.yaml` listing
//! `{healthStatus: {status, message}, inputPath}`, and `testdata/`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;

use matrix_user_operator_testkit as common;

const ARGOCD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/argocd");
const KINDS: [&str; 3] = ["MatrixUser", "Homeserver", "MatrixAccessToken"];

/// The Lua interpreters on this machine; fails when there is none.
fn interpreters() -> Vec<&'static str> {
    let found: Vec<&str> = ["lua5.4", "lua5.3", "lua5.1"]
        .into_iter()
        .filter(|lua| {
            Command::new(lua)
                .args(["-e", "os.exit(0)"])
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        found.iter().any(|l| *l != "lua5.1"),
        "no Lua 5.4 or 5.3 interpreter found (lua5.4, lua5.3 on PATH): install one, \
         e.g. `apt-get install lua5.4` (.ci/run does); found only {found:?}"
    );
    found
}

/// A Lua table constructor for a JSON value (null: nil, as Argo CD passes
/// objects). Strings are escaped byte by byte (`\ddd`), which every Lua
/// version reads.
fn lua(v: &Value) -> String {
    match v {
        Value::Null => "nil".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let mut out = String::from("\"");
            for b in s.bytes() {
                if b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ' {
                    out.push(b as char);
                } else {
                    out.push_str(&format!("\\{b:03}"));
                }
            }
            out.push('"');
            out
        }
        Value::Array(items) => format!("{{{}}}", items.iter().map(lua).collect::<Vec<_>>().join(", ")),
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("[{}] = {}", lua(&Value::String(k.clone())), lua(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs `script` with the global `obj` as Argo CD does; returns
/// `(status, message)` of the `hs` it returns.
fn health(interpreter: &str, script: &Path, obj: &Value) -> (String, String) {
    let program = format!(
        "obj = {}\nlocal check = assert(loadfile({}))\nlocal hs = check()\n\
         assert(type(hs) == 'table', 'the script returns no table')\n\
         io.write(tostring(hs.status), '\\0', tostring(hs.message))\n",
        lua(obj),
        lua(&Value::String(script.display().to_string()))
    );
    let mut child = Command::new(interpreter)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {interpreter}: {e}"));
    child.stdin.take().unwrap().write_all(program.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{interpreter} {}: {}\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (status, message) = text.split_once('\0').expect("status and message");
    (status.to_string(), message.to_string())
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(input, expected status, expected message)` of a kind's health_test.yaml.
fn cases(kind: &str) -> Vec<(Value, String, String, String)> {
    let dir = Path::new(ARGOCD).join("matrix-operator.io").join(kind);
    let tests = yaml(&dir.join("health_test.yaml"));
    tests["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let input = t["inputPath"].as_str().unwrap().to_string();
            let obj = yaml(&dir.join(&input));
            assert_eq!(obj["kind"], kind, "{input}");
            assert_eq!(obj["apiVersion"], "matrix-operator.io/v1alpha1", "{input}");
            let status = t["healthStatus"]["status"].as_str().unwrap().to_string();
            let message = t["healthStatus"]["message"].as_str().unwrap().to_string();
            (obj, input, status, message)
        })
        .collect()
}

#[test]
fn health_checks_give_the_recorded_health() {
    let interpreters = interpreters();
    let mut ran = 0;
    for kind in KINDS {
        let script = Path::new(ARGOCD)
            .join("matrix-operator.io")
            .join(kind)
            .join("health.lua");
        for (obj, input, status, message) in cases(kind) {
            for lua in &interpreters {
                let got = health(lua, &script, &obj);
                assert_eq!(got, (status.clone(), message.clone()), "{lua}: {kind} {input}");
                ran += 1;
            }
        }
    }
    assert!(ran >= 40, "{ran}");
}

/// The reasons each status of the contract may carry, all recorded.
#[test]
fn testdata_covers_every_reason_and_every_health() {
    let waiting = [
        "InvalidSpec",
        "AdoptionRefused",
        "AdminNotAllowed",
        "Conflict",
        "SecretNotFound",
        "HomeserverNotFound",
        "Unauthorized",
        "NotAdmin",
        "ServerNameMismatch",
        "NotSynapse",
        "DelegatesToMAS",
        "RegistrationRefused",
        "PasswordRejected",
        "NotMAS",
    ];
    let homeserver_waiting = [
        "InvalidSpec",
        "SecretNotFound",
        "Unauthorized",
        "NotAdmin",
        "ServerNameMismatch",
        "NotSynapse",
        "DelegatesToMAS",
        "NotDelegatingToMAS",
        "NotMAS",
        "InvalidCABundle",
    ];
    let token_waiting = [
        "UserNotFound",
        "UserDeactivated",
        "UserLocked",
        "Conflict",
        "TokenRefused",
        "RotationUnsupported",
        "InvalidSpec",
    ];
    let expect: [(&str, &str, Vec<&str>, Vec<&str>); 3] = [
        (
            "MatrixUser",
            "InSync",
            vec![
                "Progressing",
                "Unreachable",
                "SynapseError",
                "KubernetesError",
                "HomeserverNotReady",
            ],
            waiting.to_vec(),
        ),
        (
            "Homeserver",
            "Connected",
            vec!["Progressing", "Unreachable", "SynapseError", "KubernetesError"],
            homeserver_waiting.to_vec(),
        ),
        (
            "MatrixAccessToken",
            "Issued",
            vec![
                "UserNotReady",
                "HomeserverNotReady",
                "Unreachable",
                "SynapseError",
                "KubernetesError",
            ],
            token_waiting.to_vec(),
        ),
    ];
    for (kind, converged, transient, stalled) in expect {
        let cases = cases(kind);
        let with = |ready: &str, reconciling: Option<&str>, stalled: Option<&str>| -> BTreeSet<String> {
            cases
                .iter()
                .filter_map(|(obj, _, _, _)| {
                    let conditions = obj["status"]["conditions"].as_array()?;
                    let get = |t: &str| conditions.iter().find(|c| c["type"] == t);
                    let r = get("Ready")?;
                    let matches = |c: Option<&Value>, want: Option<&str>| match (c, want) {
                        (None, None) => true,
                        (Some(c), Some(w)) => c["status"] == w,
                        _ => false,
                    };
                    (r["status"] == ready
                        && matches(get("Reconciling"), reconciling)
                        && matches(get("Stalled"), stalled)
                        && obj["metadata"].get("deletionTimestamp").is_none())
                    .then(|| r["reason"].as_str().unwrap().to_string())
                })
                .collect()
        };
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert!(with("True", Some("False"), Some("False")).contains(converged), "{kind}");
        assert_eq!(
            with("False", Some("True"), Some("False")),
            set(&transient),
            "{kind}: in flight"
        );
        assert_eq!(
            with("False", Some("False"), Some("True")),
            set(&stalled),
            "{kind}: stalled"
        );
        // Statuses of older operators, Ready alone.
        assert!(!with("True", None, None).is_empty(), "{kind}");
        let old = with("False", None, None);
        assert!(old.iter().any(|r| stalled.contains(&r.as_str())), "{kind}: {old:?}");
        assert!(old.iter().any(|r| !stalled.contains(&r.as_str())), "{kind}: {old:?}");
        let healths: BTreeSet<&str> = cases.iter().map(|(_, _, s, _)| s.as_str()).collect();
        assert_eq!(
            healths,
            BTreeSet::from(["Degraded", "Healthy", "Progressing"]),
            "{kind}"
        );
        assert!(
            cases.iter().any(|(o, ..)| o.get("status").is_none()),
            "{kind}: no status"
        );
        assert!(
            cases
                .iter()
                .any(|(_, _, _, m)| m.starts_with("waiting for the operator: generation")),
            "{kind}: an older generation"
        );
    }
    let deleting = cases("MatrixUser")
        .into_iter()
        .filter(|(o, ..)| o["metadata"].get("deletionTimestamp").is_some())
        .count();
    assert!(deleting >= 3);
}

#[test]
fn a_broken_script_fails_the_test_harness() {
    let dir = std::env::temp_dir().join(format!("argocd-health-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("health.lua");
    std::fs::write(
        &script,
        "local hs = {}\nhs.status = obj.status.nothing.here\nreturn hs\n",
    )
    .unwrap();
    let lua = interpreters()[0];
    let result = std::panic::catch_unwind(|| health(lua, &script, &serde_json::json!({"status": {}})));
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(result.is_err(), "a script error must fail");
}

/// argocd-cm.yaml and argo-cd-values.yaml carry the .lua files verbatim.
#[test]
fn snippets_carry_the_scripts_verbatim() {
    let cm = yaml(&Path::new(ARGOCD).join("argocd-cm.yaml"));
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "argocd-cm");
    let values = yaml(&Path::new(ARGOCD).join("argo-cd-values.yaml"));
    for kind in KINDS {
        let script = std::fs::read_to_string(
            Path::new(ARGOCD)
                .join("matrix-operator.io")
                .join(kind)
                .join("health.lua"),
        )
        .unwrap();
        let key = format!("resource.customizations.health.matrix-operator.io_{kind}");
        assert!(
            cm["data"][&key].as_str() == Some(script.as_str()),
            "argocd-cm.yaml's {key} differs from matrix-operator.io/{kind}/health.lua"
        );
        assert!(
            values["configs"]["cm"][&key].as_str() == Some(script.as_str()),
            "argo-cd-values.yaml's {key} differs from matrix-operator.io/{kind}/health.lua"
        );
    }
}

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// `path` inside this repository, as a GitOps source names it.
fn exists_here(path: &str) -> bool {
    Path::new(REPO).join(path.trim_start_matches("./")).exists()
}

#[test]
fn gitops_examples_parse_and_point_at_this_repository() {
    let dir = Path::new(REPO).join("deploy/examples/gitops");
    let mut seen = BTreeSet::new();
    for file in [
        "argocd-application.yaml",
        "flux-kustomization.yaml",
        "flux-helmrelease.yaml",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        for doc in common::deploy_checks::parse_docs(&text) {
            let api = doc["apiVersion"].as_str().unwrap_or_else(|| panic!("{file}: {doc}"));
            let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: {doc}"));
            let name = doc["metadata"]["name"]
                .as_str()
                .unwrap_or_else(|| panic!("{file}: no name"));
            let what = format!("{file}: {kind}/{name}");
            let spec = &doc["spec"];
            let ours = |url: &Value| url.as_str().is_some_and(|u| u.ends_with("/matrix-user-operator.git"));
            match (api, kind) {
                ("argoproj.io/v1alpha1", "Application") => {
                    let source = &spec["source"];
                    if ours(&source["repoURL"]) {
                        let path = source["path"].as_str().unwrap();
                        assert!(exists_here(path), "{what}: {path}");
                        if path == "deploy/helm/matrix-user-operator" {
                            let values = &source["helm"]["valuesObject"];
                            common::helm::validate(values).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                        }
                    }
                    assert!(spec["destination"]["namespace"].is_string(), "{what}");
                }
                ("source.toolkit.fluxcd.io/v1", "GitRepository") => assert!(spec["url"].is_string(), "{what}"),
                ("kustomize.toolkit.fluxcd.io/v1", "Kustomization") => {
                    if spec["sourceRef"]["name"] == "matrix-user-operator" {
                        let path = spec["path"].as_str().unwrap();
                        assert!(exists_here(path), "{what}: {path}");
                    } else {
                        // The users: kstatus health of every object applied.
                        assert_eq!(spec["wait"], true, "{what}");
                    }
                }
                ("helm.toolkit.fluxcd.io/v2", "HelmRelease") => {
                    let chart = spec["chart"]["spec"]["chart"].as_str().unwrap();
                    assert!(exists_here(chart), "{what}: {chart}");
                    common::helm::validate(&spec["values"]).unwrap_or_else(|e| panic!("{what}: {e:?}"));
                    assert_eq!(spec["install"]["crds"], "Create", "{what}");
                }
                other => panic!("{what}: unexpected {other:?}"),
            }
            seen.insert(kind.to_string());
        }
    }
    let expected = ["Application", "GitRepository", "HelmRelease", "Kustomization"];
    assert_eq!(seen, expected.iter().map(|s| s.to_string()).collect());
}

/// The statuses the operator itself writes — its conditions for every kind
/// of outcome, built by the code that writes them — get the health their
/// standing promises: the Lua and the Rust side agree on the contract.
#[test]
fn the_operators_own_conditions_get_the_health_of_their_standing() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use matrix_user_operator::api::{Ready, Standing, set_condition};
    use matrix_user_operator::controller::Error;

    let errors = [
        Error::InvalidSpec("the email address is not ASCII".into()),
        Error::SecretNotFound {
            name: "pw".into(),
            key: "password".into(),
        },
        Error::HomeserverNotFound { name: "hs".into() },
        Error::HomeserverNotReady {
            name: "hs".into(),
            message: "not checked yet".into(),
            waiting: true,
        },
        Error::DuplicateUser {
            user_id: "@a:example.org".into(),
            other: "chat/b".into(),
        },
        Error::NotSettling("displayname".into()),
        Error::Stale,
        Error::UserNotFound { name: "bot".into() },
        Error::UserNotReady {
            name: "bot".into(),
            state: "not reconciled yet".into(),
            waiting: true,
        },
        Error::UserNotReady {
            name: "bot".into(),
            state: "InvalidSpec: bad".into(),
            waiting: false,
        },
        Error::UserDeactivated { name: "bot".into() },
        Error::UserLocked { name: "bot".into() },
        Error::TokenSecretNotOwned {
            name: "bot-token".into(),
        },
        Error::TokenRefused("admin_login: HTTP 400 M_UNKNOWN: Cannot use admin API to login as self".into()),
        Error::RotationUnsupported("Synapse cannot end one token of a device".into()),
        Error::Rooms {
            reason: "RoomNotJoinable",
            message: "1 of the rooms not in line (the others are joined): !x (cannot join: join_room: HTTP 403 M_FORBIDDEN: @admin:example.org not in room !x.)".into(),
            transient: false,
        },
        Error::Rooms {
            reason: "RoomNotLeft",
            message: "1 of the rooms not in line (the others are in line): !x (cannot leave: leave_room: cannot reach the homeserver)".into(),
            transient: true,
        },
        Error::InvalidCaBundle {
            name: "synapse-tls".into(),
            key: "ca.crt".into(),
            problem: matrix_user_operator::tls::CaBundleError::NoCertificate,
        },
        Error::Drifted {
            user_id: "@a:example.org".into(),
            fields: vec!["displayname", "threepids"],
        },
        Error::NotFound {
            user_id: "@a:example.org".into(),
        },
    ];
    let outcomes = [
        Ready::ok("InSync", "@a:example.org is in line with the spec"),
        Ready::ok("Connected", "connected to example.org (1.163.2)"),
        Ready::ok("Issued", "a token of @bot:example.org is in Secret \"bot-token\""),
    ]
    .into_iter()
    .chain(errors.iter().map(|e| e.condition(e.to_string())));
    let interpreters = interpreters();
    for ready in outcomes {
        let mut conditions = Vec::new();
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        set_condition(&mut conditions, &ready, Some(3), now);
        let expected = match ready.standing {
            Standing::Ready => "Healthy",
            Standing::Reconciling => "Progressing",
            Standing::Stalled => "Degraded",
        };
        for kind in KINDS {
            let obj = serde_json::json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": kind,
                "metadata": {"name": "x", "namespace": "chat", "generation": 3},
                "status": {"observedGeneration": 3, "conditions": conditions},
            });
            let script = Path::new(ARGOCD)
                .join("matrix-operator.io")
                .join(kind)
                .join("health.lua");
            for lua in &interpreters {
                let (status, message) = health(lua, &script, &obj);
                assert_eq!(status, expected, "{lua} {kind} {ready:?}");
                assert!(message.contains(&ready.message), "{lua} {kind}: {message}");
            }
        }
    }
}
