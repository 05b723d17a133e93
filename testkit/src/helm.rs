//! Helm's own SDK for the chart's tests: the PyPI package `helm-python-sdk`
//! (import name `helm_python`) bundles Helm v4's Go SDK as a shared library,
//! so chart loading, rendering, lint and values-schema validation are
//! Helm's, with no helm binary.
//!
//! # What it needs
//!
//! Python >= 3.10 with `venv` and pip (`$HELM_SDK_PYTHON`, else `python3`)
//! and, on the first run only, PyPI: `helm-python-sdk==HELM_SDK_VERSION` (a
//! prebuilt wheel; nothing is compiled) is installed into
//! `<target>/helm-sdk-venv-<version>/` once, as the Synapse harness installs
//! Synapse (`testkit/src/venv.rs`: lock, marker, install log). Nothing is
//! skipped: if any of this is missing, every test that renders panics with a
//! message naming what is missing.
//!
//! Each call runs `testkit/src/helm_sdk.py` with one JSON request.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use serde_json::{Value, json};

use super::deploy_checks::parse_docs;
use super::venv::{self, output_text, target_dir};

/// The helm-python-sdk release the tests use (it bundles Helm v4).
pub const HELM_SDK_VERSION: &str = "0.2.2";

/// The chart under test.
/// (`CARGO_MANIFEST_DIR` is the kit's directory, `testkit/` in the repository.)
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/helm/matrix-user-operator");

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/helm_sdk.py");

static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The venv's interpreter, with helm-python-sdk installed (once).
fn python() -> &'static Path {
    let result = PYTHON.get_or_init(|| {
        venv::ensure_venv(
            &target_dir(),
            &venv::Venv {
                harness: "helm sdk",
                dir: &format!("helm-sdk-venv-{HELM_SDK_VERSION}"),
                requirement: &format!("helm-python-sdk=={HELM_SDK_VERSION}"),
                needs: &format!("helm-python-sdk {HELM_SDK_VERSION}"),
                python_env: "HELM_SDK_PYTHON",
                min_python: (3, 10),
                duration: "≈10 s",
            },
        )
        .map(|venv| venv.join("bin").join("python"))
        .map_err(|e| format!("helm sdk: could not install helm-python-sdk {HELM_SDK_VERSION}: {e}"))
    });
    match result {
        Ok(python) => python,
        Err(message) => panic!("{message}"),
    }
}

/// A Helm error: its `helm_python` exception type and message.
#[derive(Debug)]
pub struct HelmError {
    pub kind: String,
    pub message: String,
}

/// Runs one request of `testkit/src/helm_sdk.py`.
fn call(request: Value) -> Result<Value, HelmError> {
    let python = python();
    let mut child = Command::new(python)
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{SCRIPT} {request}: {}\n{}",
        output.status,
        output_text(&output)
    );
    let answer: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{SCRIPT}: not JSON ({e}): {}", output_text(&output)));
    match answer.get("error") {
        Some(e) => Err(HelmError {
            kind: e["type"].as_str().unwrap().to_string(),
            message: e["message"].as_str().unwrap().to_string(),
        }),
        None => Ok(answer["ok"].clone()),
    }
}

/// The release every rendering uses, as the README installs it.
pub const RELEASE: &str = "matrix-user-operator";
pub const RELEASE_NS: &str = "matrix-user-operator";

/// `helm template` of the chart: template path → rendered text.
pub fn render_files(values: &Value) -> Result<BTreeMap<String, String>, HelmError> {
    let files = call(json!({"op": "render", "chart": CHART, "values": values,
                             "name": RELEASE, "namespace": RELEASE_NS}))?;
    Ok(serde_json::from_value(files).expect("template path -> manifest"))
}

/// The rendered documents (NOTES.txt left out), in template path order.
pub fn render(values: &Value) -> Result<Vec<Value>, HelmError> {
    Ok(render_files(values)?
        .iter()
        .filter(|(path, _)| !path.ends_with("NOTES.txt"))
        .flat_map(|(_, text)| parse_docs(text))
        .collect())
}

/// [`render`] that must succeed.
pub fn rendered(values: Value) -> Vec<Value> {
    render(&values).unwrap_or_else(|e| panic!("rendering the chart with {values}: {e:?}"))
}

/// `helm lint --strict --with-subcharts`.
pub fn lint(values: &Value) -> Value {
    call(json!({"op": "lint", "chart": CHART, "values": values})).unwrap_or_else(|e| panic!("lint: {e:?}"))
}

/// The chart's values.schema.json against `values`.
pub fn validate(values: &Value) -> Result<(), HelmError> {
    call(json!({"op": "validate", "chart": CHART, "values": values})).map(|_| ())
}

/// The loaded chart: metadata, values, schema, crds, dependencies.
pub fn info() -> Value {
    call(json!({"op": "info", "chart": CHART})).unwrap_or_else(|e| panic!("loading the chart: {e:?}"))
}
