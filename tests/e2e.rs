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
//! - creates a namespace `mxu-e2e-<pid>-<unix seconds>` for this run;
//! - starts a real Synapse on 127.0.0.1 (the test harness in
//!   `tests/common/synapse.rs`) and the operator binary as a local child
//!   process (`run --namespace <ns> --resync-interval 5s --health-addr 0`),
//!   which reaches Synapse at its 127.0.0.1 URL; the operator's output goes
//!   to `target/tmp/<namespace>-operator.log`, printed on failure;
//! - runs the scenarios in order, checking both the Kubernetes side (status,
//!   Events, Secrets) and Synapse (admin API, logins);
//! - deletes the MatrixUsers (with the operator still running, so their
//!   finalizers run), stops the operator, and deletes the namespace — also
//!   when a scenario failed or the run is interrupted with Ctrl-C. The
//!   operator is killed on every exit (a Drop guard, and the kernel's
//!   parent-death signal when this process is killed).
//!
//! RBAC: everything is done as the `KUBECONFIG` user, assumed to be a
//! cluster admin (it installs CRDs and creates namespaces; the operator,
//! running with the same credentials, watches Secrets and writes Events).
//!
//! No other operator may watch the run's namespace: an instance deployed in
//! the cluster that watches all namespaces would fight this one (and cannot
//! reach the test Synapse on this machine's loopback). Scale it to zero
//! first, as `.github/workflows/ci.yml` does.
//!
//! Run: `KUBECONFIG=~/.kube/config cargo test --test e2e`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fmt::Debug;
use std::fs::File;
use std::future::Future;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
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
use matrix_user_operator::api::{Homeserver, MatrixUser, ready_condition};
use matrix_user_operator::controller::FINALIZER;
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
/// Changes the operator only sees at a resync (5 s ±10%) or through a
/// Secret watch must show within this.
const RESYNC_WAIT: Duration = Duration::from_secs(20);
/// A scenario that takes longer than this fails (a backstop: every wait has
/// its own deadline).
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(300);

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
        ns,
        synapse,
        log_path,
        operator: Mutex::new(None),
        passed: Mutex::new(HashSet::new()),
        alice: Mutex::new(None),
        secrets: Mutex::new(Vec::new()),
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
    println!("e2e: {} passed, {} failed", tally.passed, tally.failed);
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

/// Best effort, never fails the run. MatrixUsers first, while the operator
/// runs, so their finalizers apply the deletion policy (skipped after a
/// Ctrl-C, which may have stopped Synapse too); then the operator is
/// stopped, the finalizers of any MatrixUser left are removed (so the
/// namespace cannot hang in Terminating), and the namespace is deleted.
async fn cleanup(env: &Env, interrupted: bool) {
    let users: Api<MatrixUser> = env.api();
    let names = |list: &kube::api::ObjectList<MatrixUser>| list.items.iter().map(|u| u.name_any()).collect::<Vec<_>>();
    if !interrupted {
        match users.list(&ListParams::default()).await {
            Ok(list) => {
                for name in names(&list) {
                    let _ = users.delete(&name, &DeleteParams::default()).await;
                }
                // Gives up at once when the operator is gone.
                let gone = env
                    .wait_for(WAIT, "MatrixUsers deleted", || async {
                        match users.list(&ListParams::default()).await {
                            Ok(l) if l.items.is_empty() => Ok(()),
                            Ok(l) => Err(format!("{:?} left", names(&l))),
                            Err(e) => Err(e.to_string()),
                        }
                    })
                    .await;
                if let Err(e) = gone {
                    println!("e2e: cleanup: {e}");
                }
            }
            Err(e) => println!("e2e: cleanup: cannot list MatrixUsers: {e}"),
        }
    }

    // Stopped before finalizers are removed: it would add them back.
    drop(lock(&env.operator).take());
    if let Ok(list) = users.list(&ListParams::default()).await {
        if !list.items.is_empty() {
            println!("e2e: cleanup: removing the finalizers of {:?}", names(&list));
        }
        for name in names(&list) {
            let patch = json!({"metadata": {"finalizers": null}});
            let _ = users.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await;
        }
    }

    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    match namespaces.delete(&env.ns, &DeleteParams::default()).await {
        Ok(_) => {
            let ns = env.ns.as_str();
            let gone = wait_for(WAIT, &format!("namespace {ns} gone"), || async {
                match namespaces.get_opt(ns).await {
                    Ok(None) => Ok(()),
                    Ok(Some(n)) => Err(format!("phase {:?}", n.status.and_then(|s| s.phase))),
                    Err(e) => Err(e.to_string()),
                }
            })
            .await;
            if let Err(e) = gone {
                println!("e2e: cleanup: {e} (its deletion goes on in the cluster)");
            }
        }
        Err(e) => println!("e2e: cleanup: cannot delete namespace {}: {e}", env.ns),
    }
}

/// The operator binary as a child process; killed when dropped.
struct OperatorProcess {
    child: Child,
}

impl OperatorProcess {
    fn spawn(ns: &str, log_path: &Path) -> Result<Self, String> {
        let log = File::create(log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_matrix-user-operator"));
        cmd.args([
            "run",
            "--namespace",
            ns,
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
        // run's namespace, with the KUBECONFIG credentials.
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

// ---------------------------------------------------------------------------
// The run's shared state and helpers
// ---------------------------------------------------------------------------

struct Env {
    client: Client,
    ns: String,
    synapse: &'static SynapseServer,
    log_path: PathBuf,
    operator: Mutex<Option<OperatorProcess>>,
    /// Names of the scenarios that passed, for those that build on them.
    passed: Mutex<HashSet<&'static str>>,
    /// The account of [`ALICE`], once `create_user` made it.
    alice: Mutex<Option<Alice>>,
    /// Secret values the operator must never show (label, value).
    secrets: Mutex<Vec<(String, String)>>,
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
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
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
        let name = obj.meta().name.clone().unwrap_or_default();
        self.api::<K>()
            .create(&PostParams::default(), obj)
            .await
            .map_err(|e| format!("creating {} {name}: {e}", K::kind(&())))
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
        let api = self.api::<K>();
        let api = &api;
        let what = format!("{} {name} Ready={status} reason={reason}", K::kind(&()));
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
        let events = self
            .api::<Event>()
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
    serde_json::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": "Homeserver",
        "metadata": {"name": name},
        "spec": {"url": url, "adminTokenSecretRef": {"name": secret, "key": "token"}},
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
    match OperatorProcess::spawn(&env.ns, &env.log_path) {
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
    scenario(env, tally, "no_secret_leaks", no_secret_leaks(env)).await;
}

/// Runs one scenario with a deadline, a panic turned into a failure.
async fn scenario(env: &Env, tally: &mut Tally, name: &'static str, body: impl Future<Output = Result<(), String>>) {
    print!("e2e: {name} ... ");
    let _ = std::io::stdout().flush();
    let outcome = tokio::time::timeout(SCENARIO_TIMEOUT, AssertUnwindSafe(body).catch_unwind())
        .await
        .unwrap_or_else(|_| Ok(Err(format!("did not finish within {}s", SCENARIO_TIMEOUT.as_secs()))))
        .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(panic.as_ref()))));
    match outcome {
        Ok(()) => {
            println!("ok");
            lock(&env.passed).insert(name);
            tally.passed += 1;
        }
        Err(reason) => {
            println!("FAILED: {reason}");
            tally.failed += 1;
        }
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

/// No token or password the suite handed to the operator shows in its log,
/// in an Event, or in an object of the run.
async fn no_secret_leaks(env: &Env) -> Result<(), String> {
    let secrets = lock(&env.secrets).clone();
    let log = std::fs::read(&env.log_path).map_err(|e| format!("reading {}: {e}", env.log_path.display()))?;
    let log = String::from_utf8_lossy(&log);
    let events = env
        .api::<Event>()
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Events: {e}"))?;
    let users = env
        .api::<MatrixUser>()
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing MatrixUsers: {e}"))?;
    let homeservers = env
        .api::<Homeserver>()
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing Homeservers: {e}"))?;
    let objects = serde_json::to_string(&(events.items, users.items, homeservers.items)).map_err(|e| e.to_string())?;
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
