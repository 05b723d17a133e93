//! End-to-end suite: the built operator binary against a real Kubernetes
//! cluster and a real Synapse.
//!
//! Opt-in: it runs only when `KUBECONFIG` names a cluster (kind, k3d, a real
//! one), and is skipped with one line saying so otherwise. When `KUBECONFIG`
//! is set but the cluster cannot be reached, the suite fails.
//!
//! What it does:
//! - applies `crds/crds.yaml` (server-side apply, field manager
//!   `matrix-user-operator-e2e`) and waits until both CRDs are Established.
//!   The CRDs are left installed at the end: other runs (or a deployed
//!   operator) may be using them, and deleting a CRD deletes every object of
//!   its kind in the cluster;
//! - creates a namespace `mxu-e2e-<pid>-<unix seconds>` for this run, and two
//!   more next to it: `<namespace>-b`, which `namespace_deletion_runs_deletion_policies`
//!   deletes, and `<namespace>-c`, the second namespace of
//!   `ownership_across_namespaces`;
//! - starts a real Synapse on 127.0.0.1 (the test harness in
//!   `testkit/src/synapse.rs`) and the operator binary as a local child
//!   process (`run --namespace <ns>,<ns>-b,<ns>-c --resync-interval 5s
//!   --health-addr 0`), which reaches Synapse at its 127.0.0.1 URL; the
//!   operator's output goes to `target/tmp/<namespace>-operator.log`, printed
//!   on failure;
//! - runs the scenarios in order, checking both the Kubernetes side (status,
//!   Events, Secrets) and Synapse (admin API, logins). One of them,
//!   `changes_after_apiserver_restart`, runs only when `E2E_RESTART_APISERVER`
//!   holds a shell command that restarts the cluster's API server (say
//!   `docker restart kind-control-plane`); otherwise it is reported as skipped;
//! - deletes the MatrixUsers of all three namespaces (with the operator still
//!   running, so their finalizers run), then the namespaces (the operator
//!   still running, so the Homeservers' and admin Secrets' finalizers let
//!   go), stops the operator, removes any finalizer of the operator's still
//!   left (so no namespace hangs in Terminating, also after a failed
//!   scenario), and waits for the namespaces to go — also when a scenario
//!   failed or the run is interrupted with Ctrl-C (then without the first two
//!   steps). The operator is killed on every exit (a Drop guard, and the
//!   kernel's parent-death signal when this process is killed).
//!
//! RBAC: everything is done as the `KUBECONFIG` user, assumed to be a
//! cluster admin (it installs CRDs and creates namespaces; the operator,
//! running with the same credentials, watches Secrets and writes Events).
//!
//! No other operator may watch the run's namespaces: an instance deployed in
//! the cluster that watches all namespaces would fight this one (and cannot
//! reach the test Synapse on this machine's loopback). Scale it to zero
//! first, as `.github/workflows/ci.yml` does.
//!
//! Run: `KUBECONFIG=~/.kube/config cargo test --test e2e`, with
//! `E2E_RESTART_APISERVER='docker restart kind-control-plane'` (for kind) to
//! include the API server restart.

use matrix_user_operator_testkit as common;

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt::Debug;
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::SynapseServer;
use common::synapse::panic_message;
use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use k8s_openapi::{ByteString, NamespaceResourceScope};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use matrix_user_operator::api::{Homeserver, MatrixUser, STALLED, is_true, ready_condition};
use matrix_user_operator::controller::{ADMIN_TOKEN_FINALIZER, FINALIZER, HOMESERVER_FINALIZER};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const SKIP_LINE: &str =
    "e2e: skipped: KUBECONFIG is not set (the end-to-end suite needs a Kubernetes cluster; see README)";
const FIELD_MANAGER: &str = "matrix-user-operator-e2e";
const API_VERSION: &str = "matrix-operator.io/v1alpha1";

/// How often every wait polls.
const POLL: Duration = Duration::from_millis(500);
/// The default deadline of a wait: reconciles triggered by a watch event.
const WAIT: Duration = Duration::from_secs(60);
/// Changes the operator only sees at a resync (5 s, at most 7.5 s after a change) or through a
/// Secret watch must show within this.
const RESYNC_WAIT: Duration = Duration::from_secs(20);
/// A scenario that takes longer than this fails (a backstop: every wait has
/// its own deadline).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

/// How long a deleted namespace may take to go: the namespace controller
/// looks again every few seconds while finalizers hold its content.
const NAMESPACE_GONE: Duration = Duration::from_secs(120);

/// The environment variable with the shell command that restarts the
/// cluster's API server, for `changes_after_apiserver_restart`.
const RESTART_ENV: &str = "E2E_RESTART_APISERVER";
/// Limits of that scenario: the command, the API server's return after it,
/// and the scenario as a whole.
const RESTART_COMMAND_TIMEOUT: Duration = Duration::from_secs(240);
const API_BACK_WAIT: Duration = Duration::from_secs(240);
const RESTART_SCENARIO_TIMEOUT: Duration = Duration::from_secs(600);
/// A spec change made after the restart reaches Synapse within this of the
/// API server answering again (issue 7).
const AFTER_RESTART: Duration = Duration::from_secs(30);
/// One probe of the API server while it restarts.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The API server is back once it answered every probe for this long; the
/// [`AFTER_RESTART`] count starts at the first of those answers.
const STEADY: Duration = Duration::from_secs(3);

/// The Homeserver every MatrixUser of the suite uses, and its admin Secret.
const HS: &str = "synapse";
const ADMIN_SECRET: &str = "synapse-admin";
/// The MatrixUser that scenarios 3 to 7 create and change.
const ALICE: &str = "alice";
const ALICE_SECRET: &str = "alice-password";
const ALICE_RENAMED: &str = "Alice Renamed";

fn main() -> ExitCode {
    // With `harness = false` the binary gets libtest's arguments; listing
    // (IDEs, `cargo test -- --list`) must not run the suite.
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) else {
        println!("{SKIP_LINE}");
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            println!("e2e: FAILED: cannot start a tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ok = runtime.block_on(run(kubeconfig));
    // Drop the runtime before exiting so no task outlives `main`.
    drop(runtime);
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

/// The whole suite; `true` when every scenario passed.
async fn run(kubeconfig: OsString) -> bool {
    matrix_user_operator::tls::install_crypto_provider();
    let client = match connect(&kubeconfig).await {
        Ok(c) => c,
        Err(e) => {
            println!("e2e: FAILED: {e}");
            return false;
        }
    };
    let synapse = match start_synapse().await {
        Ok(s) => s,
        Err(e) => {
            println!("e2e: FAILED: cannot start Synapse: {e}");
            return false;
        }
    };
    println!("e2e: Synapse {} at {}", common::SYNAPSE_VERSION, synapse.base_url);
    if let Err(e) = install_crds(&client).await {
        println!("e2e: FAILED: installing the CRDs: {e}");
        return false;
    }
    let ns = namespace_name();
    if let Err(e) = create_namespace(&client, &ns).await {
        println!("e2e: FAILED: creating namespace {ns}: {e}");
        return false;
    }
    println!("e2e: namespace {ns}");
    let log_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{ns}-operator.log"));
    let env = Env {
        client,
        doomed_ns: format!("{ns}-b"),
        other_ns: format!("{ns}-c"),
        ns,
        synapse,
        log_path,
        operator: Mutex::new(None),
        passed: Mutex::new(HashSet::new()),
        alice: Mutex::new(None),
        secrets: Mutex::new(Vec::new()),
        notes: Mutex::new(Vec::new()),
    };

    let mut tally = Tally::default();
    let interrupted = tokio::select! {
        () = suite(&env, &mut tally) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if tally.failed > 0 {
        env.print_logs();
    }
    if interrupted {
        println!("\ne2e: interrupted: cleaning up (Ctrl-C again to quit at once)");
        tally.failed += 1;
        // The first Ctrl-C is ours now; a second one exits right away (the
        // operator dies with this process, the namespace is left behind).
        tokio::spawn(async {
            let _ = tokio::signal::ctrl_c().await;
            println!("e2e: interrupted twice: exiting without cleanup");
            std::process::exit(130);
        });
    }
    cleanup(&env, interrupted).await;
    println!(
        "e2e: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.skipped
    );
    tally.failed == 0
}

/// A client for the cluster of `KUBECONFIG`, checked to answer.
async fn connect(kubeconfig: &OsString) -> Result<Client, String> {
    let shown = kubeconfig.to_string_lossy();
    // What `Client::try_default` does, keeping the URL for the messages.
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("KUBECONFIG is set ({shown}) but no Kubernetes client can be made from it: {e}"))?;
    let url = config.cluster_url.clone();
    let client = Client::try_from(config)
        .map_err(|e| format!("KUBECONFIG is set ({shown}) but no Kubernetes client can be made from it: {e}"))?;
    let version = tokio::time::timeout(Duration::from_secs(30), client.apiserver_version())
        .await
        .map_err(|_| format!("KUBECONFIG is set ({shown}) but its cluster at {url} did not answer within 30s"))?
        .map_err(|e| format!("KUBECONFIG is set ({shown}) but its cluster at {url} cannot be reached: {e}"))?;
    println!(
        "e2e: cluster of KUBECONFIG={shown}: {url}, Kubernetes {}",
        version.git_version
    );
    Ok(client)
}

/// The harness's Synapse. Its startup blocks (and may install Synapse on a
/// first run), and it panics on failure: run it off the async threads and
/// turn a panic into an error.
async fn start_synapse() -> Result<&'static SynapseServer, String> {
    tokio::task::spawn_blocking(|| std::panic::catch_unwind(common::synapse))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|panic| panic_message(panic.as_ref()))
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn namespace_name() -> String {
    format!("mxu-e2e-{}-{}", std::process::id(), unix_seconds())
}

/// A value no one else uses (passwords, tokens).
fn unique_value(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every [`POLL`] until it returns `Ok`, or fails after
/// `timeout` with what the last check saw. A check that hangs is cut off at
/// the deadline too.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    wait_unless(timeout, what, || None, check).await
}

/// [`wait_for`] that gives up at once when `abort` says why.
async fn wait_unless<T, A, F, Fut>(timeout: Duration, what: &str, mut abort: A, mut check: F) -> Result<T, String>
where
    A: FnMut() -> Option<String>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(why) = abort() {
            return Err(format!("{what}: gave up: {why}"));
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(POLL);
        let last = match tokio::time::timeout(left, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(seen)) => seen,
            Err(_) => "the check itself did not finish".to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!("{what}: not within {}s (last seen: {last})", timeout.as_secs()));
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Setup and teardown
// ---------------------------------------------------------------------------

async fn install_crds(client: &Client) -> Result<(), String> {
    use serde::Deserialize;
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/crds.yaml");
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))?;
    let mut crds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| format!("{path}: {e}"))?;
        if value.is_null() {
            continue; // an empty document
        }
        let crd: CustomResourceDefinition = serde_yaml::from_value(value).map_err(|e| format!("{path}: {e}"))?;
        crds.push(crd);
    }
    let names: BTreeSet<String> = crds.iter().map(|c| c.name_any()).collect();
    let expected: BTreeSet<String> = [Homeserver::crd_name(), MatrixUser::crd_name()]
        .into_iter()
        .map(str::to_string)
        .collect();
    if names != expected {
        return Err(format!("{path} holds the CRDs {names:?}, expected {expected:?}"));
    }

    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for crd in &crds {
        let name = crd.name_any();
        api.patch(&name, &params, &Patch::Apply(crd))
            .await
            .map_err(|e| format!("applying CRD {name}: {e}"))?;
    }
    for name in &names {
        let api = &api;
        wait_for(WAIT, &format!("CRD {name} Established"), || async move {
            let crd = api.get(name).await.map_err(|e| e.to_string())?;
            let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
            let established = conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                Ok(())
            } else {
                Err(format!("conditions {conditions:?}"))
            }
        })
        .await?;
    }
    println!("e2e: CRDs applied and Established: {names:?}");
    Ok(())
}

async fn create_namespace(client: &Client, name: &str) -> Result<(), String> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/created-by".to_string(),
                FIELD_MANAGER.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    api.create(&PostParams::default(), &ns)
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Best effort, never fails the run, in the run's namespaces. MatrixUsers
/// first, while the operator runs, so their finalizers apply the deletion
/// policy; then, if they went, the namespaces, the operator still running,
/// so the Homeservers' finalizers (which wait for their MatrixUsers) and the
/// admin Secrets' let go. Both are skipped after a Ctrl-C, which may have
/// stopped Synapse too. Then the operator is stopped, whatever of its
/// finalizers is left — after a failed scenario, say a namespace stuck in
/// Terminating — is removed, and the namespaces are deleted.
async fn cleanup(env: &Env, interrupted: bool) {
    let namespaces = env.namespaces();
    if !interrupted && delete_matrix_users(env, &namespaces).await {
        delete_namespaces(env, &namespaces, true).await;
    }
    // Stopped before finalizers are removed: it would add them back.
    drop(lock(&env.operator).take());
    for ns in &namespaces {
        remove_finalizers(env, ns).await;
    }
    delete_namespaces(env, &namespaces, false).await;
}

/// Deletes every MatrixUser of `namespaces` and waits until they are gone;
/// `true` if they went. Gives up at once when the operator is gone.
async fn delete_matrix_users(env: &Env, namespaces: &[&str]) -> bool {
    for ns in namespaces {
        let users: Api<MatrixUser> = env.api_in(ns);
        match users.list(&ListParams::default()).await {
            Ok(list) => {
                for u in &list.items {
                    let _ = users.delete(&u.name_any(), &DeleteParams::default()).await;
                }
            }
            Err(e) => println!("e2e: cleanup: cannot list the MatrixUsers of {ns}: {e}"),
        }
    }
    let gone = env
        .wait_for(WAIT, "MatrixUsers deleted", || async {
            let mut left = Vec::new();
            for ns in namespaces {
                let users: Api<MatrixUser> = env.api_in(ns);
                let list = users.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
                left.extend(list.items.iter().map(|u| format!("{ns}/{}", u.name_any())));
            }
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("{left:?} left"))
            }
        })
        .await;
    match gone {
        Ok(()) => true,
        Err(e) => {
            println!("e2e: cleanup: {e}");
            false
        }
    }
}

/// Deletes `namespaces` (those already gone or going are fine) and waits
/// until they are gone; with `operator_running`, gives up at once when the
/// operator is gone.
async fn delete_namespaces(env: &Env, namespaces: &[&str], operator_running: bool) {
    let api: Api<Namespace> = Api::all(env.client.clone());
    for ns in namespaces {
        match api.delete(ns, &DeleteParams::background()).await {
            // 404: gone already (or never made); 409: being deleted.
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => println!("e2e: cleanup: cannot delete namespace {ns}: {e}"),
        }
    }
    let what = format!("namespaces {namespaces:?} gone");
    let check = || async {
        let mut left = Vec::new();
        for ns in namespaces {
            match api.get_opt(ns).await {
                Ok(None) => {}
                Ok(Some(n)) => left.push(format!("{ns} ({:?})", n.status.and_then(|s| s.phase))),
                Err(e) => return Err(e.to_string()),
            }
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left: {}", left.join(", ")))
        }
    };
    let gone = if operator_running {
        env.wait_for(WAIT, &what, check).await
    } else {
        wait_for(WAIT, &what, check).await
    };
    if let Err(e) = gone {
        if operator_running {
            println!("e2e: cleanup: {e}; removing the operator's finalizers");
        } else {
            println!("e2e: cleanup: {e} (their deletion goes on in the cluster)");
        }
    }
}

/// Takes every finalizer off the MatrixUsers and Homeservers of `ns`, and
/// the operator's off its Secrets, so that nothing holds the namespace once
/// the operator is stopped.
async fn remove_finalizers(env: &Env, ns: &str) {
    remove_all_finalizers(&env.api_in::<MatrixUser>(ns), ns).await;
    remove_all_finalizers(&env.api_in::<Homeserver>(ns), ns).await;
    let secrets: Api<Secret> = env.api_in(ns);
    let Ok(list) = secrets.list_metadata(&ListParams::default()).await else {
        return;
    };
    for secret in &list.items {
        if !secret.finalizers().iter().any(|f| f == ADMIN_TOKEN_FINALIZER) {
            continue;
        }
        let name = secret.name_any();
        println!("e2e: cleanup: removing {ADMIN_TOKEN_FINALIZER} from Secret {ns}/{name}");
        let kept: Vec<&String> = secret
            .finalizers()
            .iter()
            .filter(|f| *f != ADMIN_TOKEN_FINALIZER)
            .collect();
        let patch = json!({"metadata": {"finalizers": kept}});
        let _ = secrets
            .patch_metadata(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
    }
}

async fn remove_all_finalizers<K>(api: &Api<K>, ns: &str)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let Ok(list) = api.list(&ListParams::default()).await else {
        return;
    };
    let held: Vec<String> = list
        .items
        .iter()
        .filter(|o| !o.finalizers().is_empty())
        .map(|o| o.name_any())
        .collect();
    if held.is_empty() {
        return;
    }
    println!(
        "e2e: cleanup: removing the finalizers of the {}s {held:?} in {ns}",
        K::kind(&())
    );
    for name in &held {
        let patch = json!({"metadata": {"finalizers": null}});
        let _ = api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await;
    }
}

/// The operator binary as a child process; killed when dropped.
struct OperatorProcess {
    child: Child,
}

impl OperatorProcess {
    /// Watching `namespaces` (comma-separated).
    fn spawn(namespaces: &str, log_path: &Path) -> Result<Self, String> {
        let log = File::create(log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"));
        cmd.args([
            "run",
            "--namespace",
            namespaces,
            "--resync-interval",
            "5s",
            "--health-addr",
            "0",
        ])
        .env("RUST_LOG", "info,matrix_user_operator=debug")
        .env("NO_COLOR", "1")
        // Without these the operator cannot take itself for an in-cluster
        // replica (leader election on by default there), even when this
        // suite runs inside a pod: it must act at once and alone on this
        // run's namespaces, with the KUBECONFIG credentials.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: a Ctrl-C in the terminal reaches this
        // suite only, which then cleans up while the operator still runs.
        .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("starting the operator binary: {e}"))?;
        Ok(Self { child })
    }

    /// `Some(how it ended)` once the process is gone.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(None) => None,
            Ok(Some(status)) => Some(status.to_string()),
            Err(e) => Some(format!("cannot be waited for: {e}")),
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // SIGTERM first, so it logs its shutdown; SIGKILL if it lingers.
        // SAFETY: a signal to our own child, which is not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child gets SIGKILL when the spawning thread dies — this is the main
/// thread (`block_on` runs the suite's future on it), so when this process
/// dies in a way that runs no destructor (killed, `process::exit`).
fn die_with_parent(command: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls (prctl, getppid), no allocation
    // between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// A shell command (`sh -c`) in a process group of its own, its output in a
/// file; the group is killed when dropped before the command ended (a
/// timeout, or the suite interrupted).
struct ShellCommand {
    child: Child,
    ended: bool,
}

impl ShellCommand {
    fn spawn(command: &str, output: &Path) -> Result<Self, String> {
        let out = File::create(output).map_err(|e| format!("creating {}: {e}", output.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|e| format!("starting `sh -c {command:?}`: {e}"))?;
        Ok(Self { child, ended: false })
    }

    /// `Some(status)` once the command ended.
    fn exited(&mut self) -> Result<Option<ExitStatus>, String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                self.ended = true;
                Ok(Some(status))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(format!("the command cannot be waited for: {e}")),
        }
    }
}

impl Drop for ShellCommand {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // SAFETY: a signal to the process group of our own child, which is
        // not reaped yet (so its id, the group's, is not reused).
        unsafe {
            libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The run's shared state and helpers
// ---------------------------------------------------------------------------

struct Env {
    client: Client,
    /// The run's namespace, where most scenarios work.
    ns: String,
    /// Watched too: `<ns>-b`, which `namespace_deletion_runs_deletion_policies`
    /// deletes, and `<ns>-c`, the second namespace of
    /// `ownership_across_namespaces`.
    doomed_ns: String,
    other_ns: String,
    synapse: &'static SynapseServer,
    log_path: PathBuf,
    operator: Mutex<Option<OperatorProcess>>,
    /// Names of the scenarios that passed, for those that build on them.
    passed: Mutex<HashSet<&'static str>>,
    /// The account of [`ALICE`], once `create_user` made it.
    alice: Mutex<Option<Alice>>,
    /// Secret values the operator must never show (label, value).
    secrets: Mutex<Vec<(String, String)>>,
    /// What the running scenario observed beyond pass or fail, printed with
    /// its outcome.
    notes: Mutex<Vec<String>>,
}

#[derive(Clone, Debug)]
struct Alice {
    localpart: String,
    user_id: String,
    email: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Env {
    /// Every namespace of the run, which the operator watches.
    fn namespaces(&self) -> [&str; 3] {
        [&self.ns, &self.doomed_ns, &self.other_ns]
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        self.api_in(&self.ns)
    }

    fn api_in<K>(&self, ns: &str) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), ns)
    }

    fn note(&self, note: impl Into<String>) {
        lock(&self.notes).push(note.into());
    }

    fn needs(&self, scenarios: &[&str]) -> Result<(), String> {
        let passed = lock(&self.passed);
        match scenarios.iter().find(|s| !passed.contains(**s)) {
            Some(missing) => Err(format!("not run: needs {missing}, which did not pass")),
            None => Ok(()),
        }
    }

    fn alice(&self) -> Result<Alice, String> {
        lock(&self.alice)
            .clone()
            .ok_or_else(|| "not run: needs create_user, which did not pass".to_string())
    }

    fn remember_secret(&self, label: impl Into<String>, value: &str) {
        lock(&self.secrets).push((label.into(), value.to_string()));
    }

    /// Like [`wait_for`], and fails at once when the operator is gone.
    async fn wait_for<T, F, Fut>(&self, timeout: Duration, what: &str, check: F) -> Result<T, String>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let operator_gone = || {
            lock(&self.operator)
                .as_mut()
                .and_then(|o| o.exited())
                .map(|status| format!("the operator exited ({status}); see its log"))
        };
        wait_unless(timeout, what, operator_gone, check).await
    }

    async fn create<K>(&self, obj: &K) -> Result<K, String>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    {
        self.create_in(&self.ns, obj).await
    }

    async fn create_in<K>(&self, ns: &str, obj: &K) -> Result<K, String>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    {
        let name = obj.meta().name.clone().unwrap_or_default();
        self.api_in::<K>(ns)
            .create(&PostParams::default(), obj)
            .await
            .map_err(|e| format!("creating {} {ns}/{name}: {e}", K::kind(&())))
    }

    async fn merge_patch<K>(&self, name: &str, patch: Value) -> Result<K, String>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned,
    {
        self.api::<K>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("patching {} {name}: {e}", K::kind(&())))
    }

    /// Waits until the object's `Ready` condition has `status` and `reason`
    /// and its status describes the current generation.
    async fn wait_ready<K>(&self, name: &str, status: &str, reason: &str) -> Result<K, String>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned + Conditioned,
    {
        self.wait_ready_in(&self.ns, name, status, reason).await
    }

    /// [`Env::wait_ready`] in namespace `ns`.
    async fn wait_ready_in<K>(&self, ns: &str, name: &str, status: &str, reason: &str) -> Result<K, String>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + Debug + DeserializeOwned + Conditioned,
    {
        let api = self.api_in::<K>(ns);
        let api = &api;
        let shown = if ns == self.ns {
            name.to_string()
        } else {
            format!("{ns}/{name}")
        };
        let what = format!("{} {shown} Ready={status} reason={reason}", K::kind(&()));
        self.wait_for(WAIT, &what, || async move {
            let obj = api.get(name).await.map_err(|e| e.to_string())?;
            let (conditions, observed) = obj.ready_state();
            let Some(c) = ready_condition(conditions) else {
                return Err("no Ready condition yet".to_string());
            };
            let current = observed.is_some() && observed == obj.meta().generation;
            if c.status == status && c.reason == reason && current {
                Ok(obj)
            } else {
                Err(format!(
                    "Ready={} reason={} message={:?}, observedGeneration {:?} of generation {:?}",
                    c.status,
                    c.reason,
                    c.message,
                    observed,
                    obj.meta().generation
                ))
            }
        })
        .await
    }

    /// The reasons of the Events about `kind`/`name`.
    async fn event_reasons(&self, kind: &str, name: &str) -> Result<Vec<String>, String> {
        self.event_reasons_in(&self.ns, kind, name).await
    }

    async fn event_reasons_in(&self, ns: &str, kind: &str, name: &str) -> Result<Vec<String>, String> {
        let events = self
            .api_in::<Event>(ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing Events: {e}"))?;
        Ok(events
            .items
            .into_iter()
            .filter(|e| {
                e.regarding
                    .as_ref()
                    .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
            })
            .filter_map(|e| e.reason)
            .collect())
    }

    async fn wait_event(&self, kind: &str, name: &str, reason: &str) -> Result<(), String> {
        let what = format!("an Event {reason} about {kind} {name}");
        self.wait_for(WAIT, &what, || async move {
            let reasons = self.event_reasons(kind, name).await?;
            if reasons.iter().any(|r| r == reason) {
                Ok(())
            } else {
                Err(format!("reasons {reasons:?}"))
            }
        })
        .await
    }

    /// The value of `key` in the Secret `name`.
    async fn secret_value(&self, name: &str, key: &str) -> Result<String, String> {
        let secret = self
            .api::<Secret>()
            .get(name)
            .await
            .map_err(|e| format!("reading Secret {name}: {e}"))?;
        let value = secret.data.unwrap_or_default().remove(key);
        let ByteString(bytes) = value.ok_or_else(|| format!("Secret {name} has no key {key}"))?;
        String::from_utf8(bytes).map_err(|_| format!("key {key} of Secret {name} is not UTF-8"))
    }

    /// The account as Synapse's admin API shows it.
    async fn account(&self, user_id: &str) -> Result<Value, String> {
        let (code, body) = self
            .synapse
            .admin_get(&format!("/_synapse/admin/v2/users/{user_id}"))
            .await;
        if code == 200 {
            Ok(body)
        } else {
            Err(format!("GET {user_id} from Synapse: {code} {body}"))
        }
    }

    async fn login(&self, localpart: &str, password: &str) -> Result<(), String> {
        self.synapse
            .login(localpart, password)
            .await
            .map(|_| ())
            .map_err(|code| format!("login of {localpart} answered {code}"))
    }

    fn print_logs(&self) {
        println!(
            "--- last {LOG_LINES} lines of the operator log {} ---",
            self.log_path.display()
        );
        match std::fs::read(&self.log_path) {
            Ok(bytes) => println!("{}", tail(&String::from_utf8_lossy(&bytes), LOG_LINES)),
            Err(e) => println!("({e})"),
        }
        println!("--- Synapse ---\n{}", self.synapse.log_tail(60));
    }
}

const LOG_LINES: usize = 300;

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The parts of a status every wait looks at.
trait Conditioned {
    fn ready_state(&self) -> (&[Condition], Option<i64>);
}

impl Conditioned for Homeserver {
    fn ready_state(&self) -> (&[Condition], Option<i64>) {
        match &self.status {
            Some(s) => (&s.conditions, s.observed_generation),
            None => (&[], None),
        }
    }
}

impl Conditioned for MatrixUser {
    fn ready_state(&self) -> (&[Condition], Option<i64>) {
        match &self.status {
            Some(s) => (&s.conditions, s.observed_generation),
            None => (&[], None),
        }
    }
}

fn secret(name: &str, key: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_string(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        type_: Some("Opaque".to_string()),
        ..Secret::default()
    }
}

fn homeserver(name: &str, url: &str, secret: &str) -> Result<Homeserver, String> {
    homeserver_with_policy(name, url, secret, json!({}))
}

fn homeserver_with_policy(name: &str, url: &str, secret: &str, policy: Value) -> Result<Homeserver, String> {
    serde_json::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": "Homeserver",
        "metadata": {"name": name},
        "spec": {"url": url, "adminTokenSecretRef": {"name": secret, "key": "token"}, "policy": policy},
    }))
    .map_err(|e| format!("building Homeserver {name}: {e}"))
}

fn matrix_user(name: &str, spec: Value) -> Result<MatrixUser, String> {
    serde_json::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": "MatrixUser",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .map_err(|e| format!("building MatrixUser {name}: {e}"))
}

fn has_email(account: &Value, email: &str) -> bool {
    account["threepids"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(|t| t["medium"] == "email" && t["address"] == email))
}

fn check(ok: bool, message: impl FnOnce() -> String) -> Result<(), String> {
    if ok { Ok(()) } else { Err(message()) }
}

// ---------------------------------------------------------------------------
// Running the scenarios
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    /// Scenarios not run because what they need was not given (neither
    /// passed nor failed).
    skipped: usize,
}

async fn suite(env: &Env, tally: &mut Tally) {
    // The CRDs are Established; make sure their API is served before the
    // operator starts watching it (it appears shortly after).
    let users: Api<MatrixUser> = env.api();
    let homeservers: Api<Homeserver> = env.api();
    let served = wait_for(WAIT, "the matrix-operator.io API served", || async {
        let lp = ListParams::default().limit(1);
        users.list(&lp).await.map_err(|e| e.to_string())?;
        homeservers.list(&lp).await.map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
    if let Err(e) = served {
        println!("e2e: setup FAILED: {e}");
        tally.failed += 1;
        return;
    }
    // Before the operator starts, so that it watches namespaces that exist.
    for ns in [&env.doomed_ns, &env.other_ns] {
        if let Err(e) = create_namespace(&env.client, ns).await {
            println!("e2e: setup FAILED: creating namespace {ns}: {e}");
            tally.failed += 1;
            return;
        }
    }
    println!("e2e: namespaces {} and {} too", env.doomed_ns, env.other_ns);
    match OperatorProcess::spawn(&env.namespaces().join(","), &env.log_path) {
        Ok(p) => *lock(&env.operator) = Some(p),
        Err(e) => {
            println!("e2e: setup FAILED: {e}");
            tally.failed += 1;
            return;
        }
    }
    println!("e2e: operator started, log in {}", env.log_path.display());

    scenario(env, tally, "homeserver_connects", homeserver_connects(env)).await;
    scenario(env, tally, "bad_admin_token", bad_admin_token(env)).await;
    scenario(env, tally, "create_user", create_user(env)).await;
    scenario(env, tally, "modify_user", modify_user(env)).await;
    scenario(env, tally, "password_rotation", password_rotation(env)).await;
    scenario(env, tally, "drift_repair", drift_repair(env)).await;
    scenario(env, tally, "deactivate_reactivate", deactivate_reactivate(env)).await;
    scenario(env, tally, "deletion_policies", deletion_policies(env)).await;
    scenario(env, tally, "generated_password", generated_password(env)).await;
    scenario(env, tally, "adoption_refused", adoption_refused(env)).await;
    scenario(
        env,
        tally,
        "namespace_deletion_runs_deletion_policies",
        namespace_deletion_runs_deletion_policies(env),
    )
    .await;
    scenario(
        env,
        tally,
        "ownership_across_namespaces",
        ownership_across_namespaces(env),
    )
    .await;
    scenario(env, tally, "no_secret_leaks", no_secret_leaks(env)).await;
    // Last: it takes the whole cluster's API away for a while.
    let name = "changes_after_apiserver_restart";
    match restart_command() {
        Some(command) => {
            let body = changes_after_apiserver_restart(env, &command);
            scenario_within(env, tally, name, RESTART_SCENARIO_TIMEOUT, body).await;
        }
        None => {
            println!(
                "e2e: {name} ... skipped: {RESTART_ENV} is not set (a shell command that restarts the cluster's API server, such as 'docker restart kind-control-plane'; see README)"
            );
            tally.skipped += 1;
        }
    }
}

/// The command of [`RESTART_ENV`], if it holds one.
fn restart_command() -> Option<String> {
    std::env::var(RESTART_ENV).ok().filter(|c| !c.trim().is_empty())
}

/// Runs one scenario with a deadline, a panic turned into a failure.
async fn scenario(env: &Env, tally: &mut Tally, name: &'static str, body: impl Future<Output = Result<(), String>>) {
    scenario_within(env, tally, name, SCENARIO_TIMEOUT, body).await;
}

/// [`scenario`] with a deadline of its own.
async fn scenario_within(
    env: &Env,
    tally: &mut Tally,
    name: &'static str,
    timeout: Duration,
    body: impl Future<Output = Result<(), String>>,
) {
    print!("e2e: {name} ... ");
    let _ = std::io::stdout().flush();
    lock(&env.notes).clear();
    let outcome = tokio::time::timeout(timeout, AssertUnwindSafe(body).catch_unwind())
        .await
        .unwrap_or_else(|_| Ok(Err(format!("did not finish within {}s", timeout.as_secs()))))
        .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(panic.as_ref()))));
    let notes = std::mem::take(&mut *lock(&env.notes));
    match &outcome {
        Ok(()) if notes.is_empty() => println!("ok"),
        Ok(()) => println!("ok ({})", notes.join("; ")),
        Err(reason) => println!("FAILED: {reason}"),
    }
    if outcome.is_ok() {
        lock(&env.passed).insert(name);
        tally.passed += 1;
    } else {
        for note in &notes {
            println!("e2e:   {note}");
        }
        tally.failed += 1;
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// A Homeserver with a good admin token becomes Ready=True Connected and
/// shows the server's name and version.
async fn homeserver_connects(env: &Env) -> Result<(), String> {
    let s = env.synapse;
    env.remember_secret("the harness's admin token", &s.admin_token);
    env.create(&secret(ADMIN_SECRET, "token", &s.admin_token)).await?;
    env.create(&homeserver(HS, &s.base_url, ADMIN_SECRET)?).await?;
    let hs: Homeserver = env.wait_ready(HS, "True", "Connected").await?;
    let status = hs.status.unwrap_or_default();
    check(status.server_name.as_deref() == Some(common::SERVER_NAME), || {
        format!(
            "status.serverName is {:?}, expected {:?}",
            status.server_name,
            common::SERVER_NAME
        )
    })?;
    check(status.server_version.as_deref().is_some_and(|v| !v.is_empty()), || {
        format!("status.serverVersion is {:?}", status.server_version)
    })
}

/// A wrong admin token is Ready=False Unauthorized, and the token shows
/// nowhere in the object or its Events.
async fn bad_admin_token(env: &Env) -> Result<(), String> {
    let token = unique_value("e2e-wrong-token");
    env.remember_secret("the wrong admin token", &token);
    env.create(&secret("wrong-admin", "token", &token)).await?;
    env.create(&homeserver("wrong-token", &env.synapse.base_url, "wrong-admin")?)
        .await?;
    let hs: Homeserver = env.wait_ready("wrong-token", "False", "Unauthorized").await?;
    let shown = serde_json::to_string(&hs).map_err(|e| e.to_string())?;
    check(!shown.contains(&token), || {
        "the wrong token shows in the Homeserver (status or elsewhere)".to_string()
    })?;
    let events = env
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Events: {e}"))?;
    let shown = serde_json::to_string(&events.items).map_err(|e| e.to_string())?;
    check(!shown.contains(&token), || {
        "the wrong token shows in an Event".to_string()
    })
}

/// A MatrixUser with a display name, an email and a password from a Secret
/// creates the account in Synapse, and its status records it.
async fn create_user(env: &Env) -> Result<(), String> {
    env.needs(&["homeserver_connects"])?;
    let s = env.synapse;
    let localpart = s.unique_localpart("e2e-alice");
    let user_id = s.user_id(&localpart);
    let email = format!("{localpart}@example.org");
    let password = unique_value("alice-first");
    env.remember_secret("alice's first password", &password);
    env.create(&secret(ALICE_SECRET, "password", &password)).await?;
    env.create(&matrix_user(
        ALICE,
        json!({
            "homeserverRef": {"name": HS},
            "localpart": localpart,
            "displayName": "Alice E2E",
            "threepids": [{"medium": "email", "address": email}],
            "password": {"secretRef": {"name": ALICE_SECRET, "key": "password"}},
        }),
    )?)
    .await?;

    let user: MatrixUser = env.wait_ready(ALICE, "True", "InSync").await?;
    let status = user.status.clone().unwrap_or_default();
    check(status.user_id.as_deref() == Some(user_id.as_str()), || {
        format!("status.userId is {:?}, expected {user_id}", status.user_id)
    })?;
    check(user.finalizers().iter().any(|f| f == FINALIZER), || {
        format!("finalizers {:?} lack {FINALIZER}", user.finalizers())
    })?;
    let account = env.account(&user_id).await?;
    check(account["displayname"] == "Alice E2E", || {
        format!("Synapse displayname is {}", account["displayname"])
    })?;
    check(has_email(&account, &email), || {
        format!("Synapse threepids {} lack {email}", account["threepids"])
    })?;
    env.login(&localpart, &password).await?;
    env.wait_event("MatrixUser", ALICE, "Created").await?;
    *lock(&env.alice) = Some(Alice {
        localpart,
        user_id,
        email,
    });
    Ok(())
}

/// A spec change reaches Synapse, and the status describes the new
/// generation.
async fn modify_user(env: &Env) -> Result<(), String> {
    let alice = env.alice()?;
    let patched: MatrixUser = env
        .merge_patch(ALICE, json!({"spec": {"displayName": ALICE_RENAMED}}))
        .await?;
    let generation = patched.metadata.generation;
    let user_id = alice.user_id.as_str();
    env.wait_for(WAIT, "the new displayname in Synapse", || async move {
        let account = env.account(user_id).await?;
        if account["displayname"] == ALICE_RENAMED {
            Ok(())
        } else {
            Err(format!("displayname {}", account["displayname"]))
        }
    })
    .await?;
    let user: MatrixUser = env.wait_ready(ALICE, "True", "InSync").await?;
    let observed = user.status.as_ref().and_then(|s| s.observed_generation);
    check(observed == user.metadata.generation && observed >= generation, || {
        format!(
            "status.observedGeneration {observed:?}, metadata.generation {:?} (the patch made {generation:?})",
            user.metadata.generation
        )
    })
}

/// A new password in the Secret is applied: it logs in, the old one no
/// longer does.
async fn password_rotation(env: &Env) -> Result<(), String> {
    let alice = env.alice()?;
    let old = env.secret_value(ALICE_SECRET, "password").await?;
    let new = unique_value("alice-second");
    env.remember_secret("alice's second password", &new);
    let data = serde_json::to_value(ByteString(new.as_bytes().to_vec())).map_err(|e| e.to_string())?;
    let _: Secret = env
        .merge_patch(ALICE_SECRET, json!({"data": {"password": data}}))
        .await?;
    let (lp, old, new) = (alice.localpart.as_str(), old.as_str(), new.as_str());
    env.wait_for(RESYNC_WAIT, "the new password in Synapse", || async move {
        let with_new = env.synapse.login(lp, new).await;
        let with_old = env.synapse.login(lp, old).await;
        match (&with_new, &with_old) {
            (Ok(_), Err(403)) => Ok(()),
            _ => Err(format!(
                "login with the new password: {:?}, with the old one: {:?}",
                with_new.as_ref().map(|_| "ok"),
                with_old.as_ref().map(|_| "ok")
            )),
        }
    })
    .await
}

/// A change made in Synapse behind the operator's back is put back at the
/// next resync.
async fn drift_repair(env: &Env) -> Result<(), String> {
    env.needs(&["modify_user"])?;
    let alice = env.alice()?;
    let user_id = alice.user_id.as_str();
    let (code, body) = env
        .synapse
        .admin_put(
            &format!("/_synapse/admin/v2/users/{user_id}"),
            json!({"displayname": "Tampered With"}),
        )
        .await;
    check(code == 200, || {
        format!("changing the displayname in Synapse: {code} {body}")
    })?;
    env.wait_for(RESYNC_WAIT, "the displayname put back", || async move {
        let account = env.account(user_id).await?;
        if account["displayname"] == ALICE_RENAMED {
            Ok(())
        } else {
            Err(format!("displayname {}", account["displayname"]))
        }
    })
    .await
}

/// `deactivated: true` deactivates the account (no more login); `false`
/// re-activates it with its password and email.
async fn deactivate_reactivate(env: &Env) -> Result<(), String> {
    let alice = env.alice()?;
    let (user_id, lp) = (alice.user_id.as_str(), alice.localpart.as_str());
    // What the Secret holds now (password_rotation may have changed it).
    let password = env.secret_value(ALICE_SECRET, "password").await?;
    let (password, email) = (password.as_str(), alice.email.as_str());

    let _: MatrixUser = env.merge_patch(ALICE, json!({"spec": {"deactivated": true}})).await?;
    env.wait_for(WAIT, "the account deactivated", || async move {
        let account = env.account(user_id).await?;
        if account["deactivated"] == true {
            Ok(())
        } else {
            Err(format!("deactivated {}", account["deactivated"]))
        }
    })
    .await?;
    let _: MatrixUser = env.wait_ready(ALICE, "True", "InSync").await?;
    check(env.login(lp, password).await.is_err(), || {
        "a deactivated account still logs in".to_string()
    })?;

    let _: MatrixUser = env.merge_patch(ALICE, json!({"spec": {"deactivated": false}})).await?;
    env.wait_for(
        WAIT,
        "the account re-activated with its password and email",
        || async move {
            let account = env.account(user_id).await?;
            if account["deactivated"] != false {
                return Err(format!("deactivated {}", account["deactivated"]));
            }
            if !has_email(&account, email) {
                return Err(format!("threepids {}", account["threepids"]));
            }
            env.login(lp, password).await
        },
    )
    .await?;
    let _: MatrixUser = env.wait_ready(ALICE, "True", "InSync").await?;
    Ok(())
}

/// Deleting a MatrixUser does what its deletionPolicy says, then lets the
/// object go.
async fn deletion_policies(env: &Env) -> Result<(), String> {
    env.needs(&["homeserver_connects"])?;
    let s = env.synapse;
    let cases: Vec<(&str, String, String)> = ["Deactivate", "Erase", "Retain"]
        .into_iter()
        .map(|policy| {
            let lower = policy.to_lowercase();
            let lp = s.unique_localpart(&format!("e2e-del-{lower}"));
            (policy, format!("del-{lower}"), lp)
        })
        .collect();
    for (policy, name, lp) in &cases {
        env.create(&matrix_user(
            name,
            json!({
                "homeserverRef": {"name": HS},
                "localpart": lp,
                "displayName": "Doomed",
                "deletionPolicy": policy,
            }),
        )?)
        .await?;
    }
    for (_, name, lp) in &cases {
        let user: MatrixUser = env.wait_ready(name, "True", "InSync").await?;
        let recorded = user.status.and_then(|s| s.user_id);
        check(recorded.as_deref() == Some(s.user_id(lp).as_str()), || {
            format!("{name}: status.userId {recorded:?}")
        })?;
    }
    let users: Api<MatrixUser> = env.api();
    for (_, name, _) in &cases {
        users
            .delete(name, &DeleteParams::default())
            .await
            .map_err(|e| format!("deleting MatrixUser {name}: {e}"))?;
    }
    for (_, name, _) in &cases {
        let users = &users;
        let name = name.as_str();
        env.wait_for(WAIT, &format!("MatrixUser {name} gone"), || async move {
            match users.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(u)) => Err(format!(
                    "still there, finalizers {:?}, Ready {:?}",
                    u.finalizers(),
                    u.ready_state().0
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await?;
    }
    for (policy, name, lp) in &cases {
        let account = env.account(&s.user_id(lp)).await?;
        let (deactivated, erased) = (&account["deactivated"], &account["erased"]);
        let (want, event) = match *policy {
            "Deactivate" => ((true, false), "Deactivated"),
            "Erase" => ((true, true), "Erased"),
            _ => ((false, false), "Retained"),
        };
        check(*deactivated == want.0 && *erased == want.1, || {
            format!("{policy}: Synapse shows deactivated={deactivated} erased={erased}, expected {want:?}")
        })?;
        if *policy == "Retain" {
            check(account["displayname"] == "Doomed", || {
                format!("Retain: displayname {}", account["displayname"])
            })?;
        }
        env.wait_event("MatrixUser", name, event).await?;
    }
    Ok(())
}

/// `password: {generate: true}` puts a password into an owned Secret
/// `<name>-credentials`, and it logs in.
async fn generated_password(env: &Env) -> Result<(), String> {
    env.needs(&["homeserver_connects"])?;
    let s = env.synapse;
    let name = "gen";
    let lp = s.unique_localpart("e2e-gen");
    env.create(&matrix_user(
        name,
        json!({
            "homeserverRef": {"name": HS},
            "localpart": lp,
            "password": {"generate": true},
        }),
    )?)
    .await?;
    let user: MatrixUser = env.wait_ready(name, "True", "InSync").await?;
    let secret_name = format!("{name}-credentials");
    let secret = env
        .api::<Secret>()
        .get(&secret_name)
        .await
        .map_err(|e| format!("reading Secret {secret_name}: {e}"))?;
    let data: BTreeMap<String, String> = secret
        .data
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, ByteString(v))| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    if let Some(p) = data.get("password") {
        env.remember_secret("the generated password", p);
    }
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = ["username", "password", "userId", "homeserverUrl"].into();
    check(keys == expected, || {
        format!("Secret {secret_name} has keys {keys:?}, expected {expected:?}")
    })?;
    let owners = secret.owner_references();
    let uid = user.uid().unwrap_or_default();
    check(
        owners.iter().any(|o| {
            o.kind == "MatrixUser"
                && o.api_version == API_VERSION
                && o.name == name
                && o.uid == uid
                && o.controller == Some(true)
        }),
        || format!("Secret {secret_name} ownerReferences {owners:?}, expected the MatrixUser {name} (uid {uid})"),
    )?;
    let expected_values = [
        ("username", lp.clone()),
        ("userId", s.user_id(&lp)),
        ("homeserverUrl", s.base_url.clone()),
    ];
    for (key, want) in &expected_values {
        check(data.get(*key) == Some(want), || {
            format!("Secret {secret_name}: {key} is {:?}, expected {want:?}", data.get(*key))
        })?;
    }
    let password = data.get("password").cloned().unwrap_or_default();
    check(!password.is_empty(), || "the generated password is empty".to_string())?;
    env.login(&lp, &password).await
}

/// An account that exists in Synapse and was not made for the MatrixUser is
/// refused without `adopt`, and left untouched.
async fn adoption_refused(env: &Env) -> Result<(), String> {
    env.needs(&["homeserver_connects"])?;
    let s = env.synapse;
    let name = "squatter";
    let lp = s.unique_localpart("e2e-taken");
    let user_id = s.user_id(&lp);
    let their_password = unique_value("someone-elses");
    s.register_user(&lp, &their_password, false).await;
    let before = env.account(&user_id).await?["displayname"].clone();
    env.create(&matrix_user(
        name,
        json!({
            "homeserverRef": {"name": HS},
            "localpart": lp,
            "displayName": "Taken Over",
        }),
    )?)
    .await?;
    let user: MatrixUser = env.wait_ready(name, "False", "AdoptionRefused").await?;
    let recorded = user.status.and_then(|st| st.user_id);
    check(recorded.is_none(), || {
        format!("status.userId is {recorded:?}: the account was recorded as owned")
    })?;
    let after = env.account(&user_id).await?["displayname"].clone();
    check(after == before, || {
        format!("the displayname changed from {before} to {after}")
    })?;
    env.wait_event("MatrixUser", name, "AdoptionRefused").await
}

/// How many MatrixUsers `namespace_deletion_runs_deletion_policies` makes,
/// and which of them have `deletionPolicy: Erase` (the others Deactivate).
const DOOMED_USERS: usize = 10;
const DOOMED_ERASED: [usize; 2] = [3, 7];
/// The Secret with their passwords, one key per MatrixUser.
const DOOMED_PASSWORDS: &str = "doomed-passwords";

/// Deleting a whole namespace — its Homeserver, admin Secret and
/// MatrixUsers at once, as `kubectl delete namespace` or a GitOps prune does
/// — still runs every MatrixUser's deletion policy before the namespace is
/// gone: the Homeserver stays (Terminating) while MatrixUsers remain, and
/// holds its admin token Secret until then.
async fn namespace_deletion_runs_deletion_policies(env: &Env) -> Result<(), String> {
    let s = env.synapse;
    let ns = env.doomed_ns.as_str();
    env.create_in(ns, &secret(ADMIN_SECRET, "token", &s.admin_token))
        .await?;
    env.create_in(ns, &homeserver(HS, &s.base_url, ADMIN_SECRET)?).await?;
    let hs: Homeserver = env.wait_ready_in(ns, HS, "True", "Connected").await?;
    check(hs.finalizers().iter().any(|f| f == HOMESERVER_FINALIZER), || {
        format!(
            "Homeserver {ns}/{HS}: finalizers {:?} lack {HOMESERVER_FINALIZER}",
            hs.finalizers()
        )
    })?;
    let held = hs.status.as_ref().and_then(|st| st.held_secret.clone());
    check(held.as_deref() == Some(ADMIN_SECRET), || {
        format!("Homeserver {ns}/{HS}: status.heldSecret is {held:?}, expected {ADMIN_SECRET:?}")
    })?;
    // The operator puts the finalizer on before it records heldSecret.
    let token = env
        .api_in::<Secret>(ns)
        .get_metadata(ADMIN_SECRET)
        .await
        .map_err(|e| format!("reading Secret {ns}/{ADMIN_SECRET}: {e}"))?;
    check(token.finalizers().iter().any(|f| f == ADMIN_TOKEN_FINALIZER), || {
        format!(
            "Secret {ns}/{ADMIN_SECRET}: finalizers {:?} lack {ADMIN_TOKEN_FINALIZER}",
            token.finalizers()
        )
    })?;

    struct Doomed {
        name: String,
        localpart: String,
        password: String,
        erase: bool,
    }
    let doomed: Vec<Doomed> = (0..DOOMED_USERS)
        .map(|i| Doomed {
            name: format!("doomed-{i}"),
            localpart: s.unique_localpart("e2e-nsdel"),
            password: unique_value("doomed"),
            erase: DOOMED_ERASED.contains(&i),
        })
        .collect();
    let policy = |d: &Doomed| if d.erase { "Erase" } else { "Deactivate" };
    for d in &doomed {
        env.remember_secret(format!("the password of {ns}/{}", d.name), &d.password);
    }
    let passwords = Secret {
        metadata: ObjectMeta {
            name: Some(DOOMED_PASSWORDS.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(
            doomed
                .iter()
                .map(|d| (d.name.clone(), ByteString(d.password.as_bytes().to_vec())))
                .collect(),
        ),
        type_: Some("Opaque".to_string()),
        ..Secret::default()
    };
    env.create_in(ns, &passwords).await?;
    for d in &doomed {
        env.create_in(
            ns,
            &matrix_user(
                &d.name,
                json!({
                    "homeserverRef": {"name": HS},
                    "localpart": d.localpart,
                    "displayName": "Doomed Namespace",
                    "password": {"secretRef": {"name": DOOMED_PASSWORDS, "key": d.name}},
                    "deletionPolicy": policy(d),
                }),
            )?,
        )
        .await?;
    }
    for d in &doomed {
        let user: MatrixUser = env.wait_ready_in(ns, &d.name, "True", "InSync").await?;
        let recorded = user.status.as_ref().and_then(|st| st.user_id.clone());
        let expected = s.user_id(&d.localpart);
        check(recorded.as_deref() == Some(expected.as_str()), || {
            format!("{ns}/{}: status.userId {recorded:?}, expected {expected}", d.name)
        })?;
        check(user.finalizers().iter().any(|f| f == FINALIZER), || {
            format!("{ns}/{}: finalizers {:?} lack {FINALIZER}", d.name, user.finalizers())
        })?;
    }
    for d in &doomed {
        env.login(&d.localpart, &d.password).await?;
    }

    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let started = Instant::now();
    // What kubectl does: background propagation.
    namespaces
        .delete(ns, &DeleteParams::background())
        .await
        .map_err(|e| format!("deleting namespace {ns}: {e}"))?;
    let (hs_api, users_api, secrets_api): (Api<Homeserver>, Api<MatrixUser>, Api<Secret>) =
        (env.api_in(ns), env.api_in(ns), env.api_in(ns));
    // What the polls saw: the most MatrixUsers left while the Homeserver was
    // Terminating, and MatrixUsers left once it was gone.
    let most_left_while_terminating = Cell::new(0usize);
    let left_after_homeserver: Mutex<Option<String>> = Mutex::new(None);
    let (namespaces, hs_api, users_api, secrets_api) = (&namespaces, &hs_api, &users_api, &secrets_api);
    let (most, early) = (&most_left_while_terminating, &left_after_homeserver);
    let gone = env.wait_for(NAMESPACE_GONE, &format!("namespace {ns} gone"), || async move {
        // The Homeserver first: no MatrixUser can be added to a namespace
        // being deleted, so those listed after it was seen gone were there
        // when it went.
        let hs = hs_api.get_opt(HS).await.map_err(|e| e.to_string())?;
        let left = users_api
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items;
        match &hs {
            None if !left.is_empty() => {
                let names: Vec<String> = left.iter().map(|u| u.name_any()).collect();
                lock(early).get_or_insert_with(|| format!("{names:?}"));
            }
            Some(h) if h.meta().deletion_timestamp.is_some() => most.set(most.get().max(left.len())),
            _ => {}
        }
        let Some(namespace) = namespaces.get_opt(ns).await.map_err(|e| e.to_string())? else {
            return Ok(());
        };
        // Still there: what holds it.
        let phase = namespace.status.and_then(|st| st.phase);
        let homeserver = match &hs {
            None => "gone".to_string(),
            Some(h) => format!(
                "{}finalizers {:?}",
                if h.meta().deletion_timestamp.is_some() { "Terminating, " } else { "" },
                h.finalizers()
            ),
        };
        let users: Vec<String> = left
            .iter()
            .take(3)
            .map(|u| {
                let ready = u.status.as_ref().and_then(|st| ready_condition(&st.conditions));
                match ready {
                    Some(c) => format!("{}: {} {}: {}", u.name_any(), c.status, c.reason, c.message),
                    None => format!("{}: no Ready condition", u.name_any()),
                }
            })
            .collect();
        let held_secrets: Vec<String> = secrets_api
            .list_metadata(&ListParams::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|x| !x.finalizers().is_empty())
                    .map(|x| format!("{} {:?}", x.name_any(), x.finalizers()))
                    .collect()
            })
            .unwrap_or_default();
        Err(format!(
            "namespace {phase:?}; Homeserver {homeserver}; {} MatrixUsers left, first {users:?}; Secrets with finalizers {held_secrets:?}",
            left.len()
        ))
    })
    .await;
    let took = started.elapsed();
    if let Some(names) = lock(&left_after_homeserver).take() {
        return Err(format!(
            "the Homeserver was gone while MatrixUsers {names} were still there: their deletion policies could not reach Synapse{}",
            gone.err().map(|e| format!("; {e}")).unwrap_or_default()
        ));
    }
    gone?;
    env.note(format!("namespace gone {:.1}s after its deletion", took.as_secs_f64()));
    env.note(match most_left_while_terminating.get() {
        0 => {
            "the Homeserver was never seen Terminating with MatrixUsers left (they went between two polls)".to_string()
        }
        n => format!("the Homeserver was seen Terminating while {n} MatrixUsers were left"),
    });

    let mut wrong = Vec::new();
    for d in &doomed {
        let user_id = s.user_id(&d.localpart);
        let account = env.account(&user_id).await?;
        let (deactivated, erased) = (&account["deactivated"], &account["erased"]);
        if *deactivated != true || *erased != d.erase {
            wrong.push(format!(
                "{user_id} ({}): deactivated={deactivated} erased={erased}",
                policy(d)
            ));
        } else if env.login(&d.localpart, &d.password).await.is_ok() {
            wrong.push(format!("{user_id} ({}): still logs in", policy(d)));
        }
    }
    check(wrong.is_empty(), || {
        format!(
            "{} of {DOOMED_USERS} accounts not as their deletionPolicy says after the namespace went: {}",
            wrong.len(),
            wrong.join("; ")
        )
    })
}

/// The display name of the owner in `ownership_across_namespaces`.
const OWNER_NAME: &str = "Owner In A";

/// One Matrix ID, one owner, across the watched namespaces: a MatrixUser in
/// another namespace, with `adopt: true` and a Homeserver (same Synapse,
/// same token) that allows adoption, is refused with Conflict and writes
/// nothing; deleting it leaves the account as the owner has it.
async fn ownership_across_namespaces(env: &Env) -> Result<(), String> {
    env.needs(&["homeserver_connects"])?;
    let s = env.synapse;
    let (home, other) = (env.ns.as_str(), env.other_ns.as_str());
    let owner = "owner";
    let lp = s.unique_localpart("e2e-owned");
    let user_id = s.user_id(&lp);
    let password = unique_value("owner");
    env.remember_secret("the owner's password", &password);
    env.create(&secret("owner-password", "password", &password)).await?;
    env.create(&matrix_user(
        owner,
        json!({
            "homeserverRef": {"name": HS},
            "localpart": lp,
            "displayName": OWNER_NAME,
            "password": {"secretRef": {"name": "owner-password", "key": "password"}},
        }),
    )?)
    .await?;
    let owned: MatrixUser = env.wait_ready(owner, "True", "InSync").await?;
    let recorded = owned.status.and_then(|st| st.user_id);
    check(recorded.as_deref() == Some(user_id.as_str()), || {
        format!("{owner}: status.userId {recorded:?}, expected {user_id}")
    })?;

    env.create_in(other, &secret(ADMIN_SECRET, "token", &s.admin_token))
        .await?;
    env.create_in(
        other,
        &homeserver_with_policy(HS, &s.base_url, ADMIN_SECRET, json!({"allowAdoption": true}))?,
    )
    .await?;
    let _: Homeserver = env.wait_ready_in(other, HS, "True", "Connected").await?;
    let rival = "intruder";
    env.create_in(
        other,
        &matrix_user(
            rival,
            json!({
                "homeserverRef": {"name": HS},
                "localpart": lp,
                "displayName": "Intruder In C",
                "adopt": true,
                "deletionPolicy": "Deactivate",
            }),
        )?,
    )
    .await?;
    let untouched = || async {
        let account = env.account(&user_id).await?;
        check(account["displayname"] == OWNER_NAME, || {
            format!(
                "Synapse displayname is {}, expected {OWNER_NAME:?}",
                account["displayname"]
            )
        })?;
        check(account["deactivated"] == false, || {
            "the account is deactivated".to_string()
        })
    };
    let refused = |user: &MatrixUser| {
        let status = user.status.clone().unwrap_or_default();
        let ready = ready_condition(&status.conditions).cloned();
        check(
            ready
                .as_ref()
                .is_some_and(|c| c.status == "False" && c.reason == "Conflict"),
            || format!("{other}/{rival}: Ready {ready:?}, expected False Conflict"),
        )?;
        check(is_true(&status.conditions, STALLED), || {
            format!("{other}/{rival}: Stalled is not True: {:?}", status.conditions)
        })?;
        let message = ready.map(|c| c.message).unwrap_or_default();
        check(message.contains(&format!("{home}/{owner}")), || {
            format!("{other}/{rival}: the Conflict message {message:?} does not name {home}/{owner}")
        })?;
        check(status.user_id.is_none(), || {
            format!("{other}/{rival}: status.userId is {:?}", status.user_id)
        })
    };
    let first: MatrixUser = env.wait_ready_in(other, rival, "False", "Conflict").await?;
    refused(&first)?;
    untouched().await?;
    // Still so after two resyncs of both (5 s each).
    tokio::time::sleep(Duration::from_secs(11)).await;
    let rivals: Api<MatrixUser> = env.api_in(other);
    let later = rivals
        .get(rival)
        .await
        .map_err(|e| format!("reading {other}/{rival}: {e}"))?;
    refused(&later)?;
    untouched().await?;
    let reasons = env.event_reasons_in(other, "MatrixUser", rival).await?;
    let writes = ["Created", "Adopted", "Updated", "PasswordChanged", "Deactivated"];
    check(!reasons.iter().any(|r| writes.contains(&r.as_str())), || {
        format!("{other}/{rival} has Events {reasons:?}: it wrote to the account")
    })?;

    rivals
        .delete(rival, &DeleteParams::default())
        .await
        .map_err(|e| format!("deleting {other}/{rival}: {e}"))?;
    let rivals = &rivals;
    env.wait_for(WAIT, &format!("MatrixUser {other}/{rival} gone"), || async move {
        match rivals.get_opt(rival).await {
            Ok(None) => Ok(()),
            Ok(Some(u)) => Err(format!(
                "still there, finalizers {:?}, Ready {:?}",
                u.finalizers(),
                u.ready_state().0
            )),
            Err(e) => Err(e.to_string()),
        }
    })
    .await?;
    untouched().await?;
    env.login(&lp, &password).await?;
    let kept: MatrixUser = env.wait_ready(owner, "True", "InSync").await?;
    let recorded = kept.status.and_then(|st| st.user_id);
    check(recorded.as_deref() == Some(user_id.as_str()), || {
        format!("{owner}: status.userId {recorded:?} after {other}/{rival} went, expected {user_id}")
    })
}

/// The display name `changes_after_apiserver_restart` sets after the restart.
const AFTER_RESTART_NAME: &str = "Changed After The Restart";

/// After the API server restarts (the command of [`RESTART_ENV`]), a spec
/// change reaches Synapse within [`AFTER_RESTART`] of the API server
/// answering again: the operator's watches relist when their
/// resourceVersion expired, each on its own.
async fn changes_after_apiserver_restart(env: &Env, command: &str) -> Result<(), String> {
    env.needs(&["homeserver_connects"])?;
    let s = env.synapse;
    let name = "restarted";
    let lp = s.unique_localpart("e2e-restart");
    let user_id = s.user_id(&lp);
    env.create(&matrix_user(
        name,
        json!({"homeserverRef": {"name": HS}, "localpart": lp, "displayName": "Before The Restart"}),
    )?)
    .await?;
    let _: MatrixUser = env.wait_ready(name, "True", "InSync").await?;

    let users: Api<MatrixUser> = env.api();
    let users = &users;
    // The API server answers when the MatrixUser API (a CRD's, the last to
    // come back) does.
    let answers = || async move {
        match tokio::time::timeout(PROBE_TIMEOUT, users.list(&ListParams::default().limit(1))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
        }
    };
    let answers = &answers;
    let log_offset = std::fs::metadata(&env.log_path).map(|m| m.len()).unwrap_or(0);
    let output = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-restart.log", env.ns));
    let output_tail = || {
        let text = std::fs::read(&output).unwrap_or_default();
        tail(&String::from_utf8_lossy(&text), 20)
    };
    let first_down: Cell<Option<Instant>> = Cell::new(None);
    let first_down = &first_down;
    let mark_down = || {
        if first_down.get().is_none() {
            first_down.set(Some(Instant::now()));
        }
    };

    let started = Instant::now();
    let mut restart = ShellCommand::spawn(command, &output)?;
    let status = loop {
        if let Some(status) = restart.exited()? {
            break status;
        }
        if started.elapsed() > RESTART_COMMAND_TIMEOUT {
            drop(restart);
            return Err(format!(
                "the command of {RESTART_ENV} ({command:?}) did not finish within {}s and was killed; its output:\n{}",
                RESTART_COMMAND_TIMEOUT.as_secs(),
                output_tail()
            ));
        }
        if answers().await.is_err() {
            mark_down();
        }
        tokio::time::sleep(POLL).await;
    };
    check(status.success(), || {
        format!(
            "the command of {RESTART_ENV} ({command:?}) failed ({status}); its output:\n{}",
            output_tail()
        )
    })?;
    // Back once it answers every probe for a while (a control plane that
    // starts again may answer once, then restart a component): the time
    // of the first answer of that streak.
    let streak: Cell<Option<Instant>> = Cell::new(None);
    let streak = &streak;
    let back = env
        .wait_for(API_BACK_WAIT, "the API server answering again", || async move {
            match answers().await {
                Ok(()) => {
                    let since = streak.get().unwrap_or_else(Instant::now);
                    streak.set(Some(since));
                    if since.elapsed() >= STEADY {
                        Ok(since)
                    } else {
                        Err(format!("answering for {:.1}s", since.elapsed().as_secs_f64()))
                    }
                }
                Err(e) => {
                    streak.set(None);
                    mark_down();
                    Err(e)
                }
            }
        })
        .await?;
    // Noted now, so that a failure below shows them too.
    env.note(match first_down.get() {
        Some(down) => format!(
            "the API server did not answer for {:.1}s",
            back.duration_since(down).as_secs_f64()
        ),
        None => "the API server answered every probe: did the command restart it?".to_string(),
    });
    let note_watch_errors = || {
        let log = std::fs::read(&env.log_path).unwrap_or_default();
        let since = String::from_utf8_lossy(log.get(log_offset as usize..).unwrap_or_default());
        env.note(format!(
            "operator log since the restart: {} watch errors, {} relists",
            since.matches("watch error").count(),
            since.matches("listing again").count()
        ));
    };

    let deadline = back + AFTER_RESTART;
    let left = || deadline.saturating_duration_since(Instant::now());
    let patch = json!({"spec": {"displayName": AFTER_RESTART_NAME}});
    let patch = &patch;
    let _: MatrixUser = env
        .wait_for(left(), "the displayName change accepted", || async move {
            env.merge_patch(name, patch.clone()).await
        })
        .await?;
    let what = format!(
        "the new displayname in Synapse within {}s of the API server answering again",
        AFTER_RESTART.as_secs()
    );
    let user_id = user_id.as_str();
    let reached = env
        .wait_for(left(), &what, || async move {
            let account = env.account(user_id).await?;
            if account["displayname"] == AFTER_RESTART_NAME {
                Ok(())
            } else {
                Err(format!("displayname {}", account["displayname"]))
            }
        })
        .await;
    let took = back.elapsed();
    note_watch_errors();
    reached?;
    env.note(format!(
        "the change reached Synapse {:.1}s after the API server answered again",
        took.as_secs_f64()
    ));
    let _: MatrixUser = env.wait_ready(name, "True", "InSync").await?;
    Ok(())
}

/// No token or password the suite handed to the operator shows in its log,
/// in an Event, or in an object of the run.
async fn no_secret_leaks(env: &Env) -> Result<(), String> {
    let secrets = lock(&env.secrets).clone();
    let log = std::fs::read(&env.log_path).map_err(|e| format!("reading {}: {e}", env.log_path.display()))?;
    let log = String::from_utf8_lossy(&log);
    let mut objects = String::new();
    for ns in env.namespaces() {
        let events = env
            .api_in::<Event>(ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing the Events of {ns}: {e}"))?;
        let users = env
            .api_in::<MatrixUser>(ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing the MatrixUsers of {ns}: {e}"))?;
        let homeservers = env
            .api_in::<Homeserver>(ns)
            .list(&ListParams::default())
            .await
            .map_err(|e| format!("listing the Homeservers of {ns}: {e}"))?;
        objects +=
            &serde_json::to_string(&(events.items, users.items, homeservers.items)).map_err(|e| e.to_string())?;
    }
    let mut leaks = Vec::new();
    for (label, value) in &secrets {
        if log.contains(value.as_str()) {
            leaks.push(format!("{label} in the operator log"));
        }
        if objects.contains(value.as_str()) {
            leaks.push(format!("{label} in an Event, MatrixUser or Homeserver"));
        }
    }
    check(!secrets.is_empty(), || "no secret values were recorded".to_string())?;
    check(leaks.is_empty(), || leaks.join("; "))
}
