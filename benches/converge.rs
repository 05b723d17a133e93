//! Convergence and steady-state cost of the operator, against a real
//! Synapse and the in-process FAKE Kubernetes API server
//! (testkit/src/fake_kube), with the operator binary as a process of its
//! own (so its RSS and CPU time are its own):
//!
//!   cargo bench --bench converge                       # bcrypt 4 and 12, N = 100 and 1,000
//!   cargo bench --bench converge -- --bcrypt 4 --n 50  # a quick look
//!   cargo bench --bench converge -- --10k              # also N = 10,000
//!
//! Flags (or the environment variable in brackets): `--bcrypt 4,12`
//! [CONVERGE_BCRYPT], `--n 100,1000` [CONVERGE_N], `--10k` [CONVERGE_10K=1],
//! `--concurrency 16` [CONVERGE_CONCURRENCY] (the operator's `--concurrency`;
//! a list runs each), `--max-requests M` [CONVERGE_MAX_REQUESTS] (the
//! Homeserver's `maxConcurrentRequests`; default: the CRD's), `--resync S`
//! [CONVERGE_RESYNC_SECS] (the resync interval of the resync phase; default
//! max(20, N/25) s), `--creation register,put` [CONVERGE_CREATION] (how
//! the operator creates accounts: with the Homeserver's
//! `registrationSharedSecretRef`, or without; each runs in turn),
//! `--apply server|client` [CONVERGE_APPLY] (how the bench creates the
//! objects, as a user would: `kubectl apply --server-side`, the default, or
//! client-side `kubectl apply` with its last-applied-configuration
//! annotation; either way the fake API server returns managedFields as a
//! real one does), [CONVERGE_OPERATOR] (another operator binary to run,
//! e.g. a copy built from an older commit, for a before/after).
//!
//! Admin API calls are counted by a counting HTTP proxy in front of Synapse
//! (both the operator and the baseline script go through it), Kubernetes
//! calls by the fake API server's request log: neither trusts the
//! operator's own metrics. Nothing about time is asserted: the machine may
//! be shared and noisy; every process (Synapse, the operator, this one with
//! the fake API server and the proxy) shares its cores.

use matrix_user_operator_testkit as common;
#[path = "converge/mas.rs"]
mod mas;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake_kube::{FakeApiServer, KUBECTL, Recorded};
use common::synapse::{SynapseServer, start_synapse};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::synapse::{ClientConfig, Registration, SynapseClient};
use serde_json::{Value, json};

const NS: &str = "bench";

// ---------------------------------------------------------------------------
// Options

struct Options {
    bcrypt: Vec<u32>,
    sizes: Vec<usize>,
    concurrency: Vec<u16>,
    max_requests: Option<u32>,
    resync_secs: Option<u64>,
    /// Only the converge and the script: no changes, no resyncs.
    converge_only: bool,
    /// How the operator creates accounts, each run in turn.
    creation: Vec<Creation>,
    /// How the bench creates objects.
    apply: Apply,
    /// Which account stores the Homeserver uses, each run in turn.
    backends: Vec<Backend>,
}

/// Where the Homeserver's accounts live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Synapse's admin API.
    Synapse,
    /// MAS (`spec.mas`), with the profile in Synapse.
    Mas,
}

fn backends(text: &str) -> Vec<Backend> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim() {
            "synapse" => Backend::Synapse,
            "mas" => Backend::Mas,
            other => panic!("backend: {other:?} is neither synapse nor mas"),
        })
        .collect()
}

/// How the bench creates the objects a user creates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Apply {
    /// `kubectl apply --server-side` (field manager `kubectl`).
    Server,
    /// Client-side `kubectl apply`: the whole object also in the
    /// `kubectl.kubernetes.io/last-applied-configuration` annotation.
    Client,
}

fn apply_of(text: &str) -> Apply {
    match text.trim() {
        "server" => Apply::Server,
        "client" => Apply::Client,
        other => panic!("apply: {other:?} is neither server nor client"),
    }
}

/// Creates `obj` as a user would.
fn create_as_user(fake: &FakeApiServer, apply: Apply, obj: Value) {
    match apply {
        Apply::Server => {
            fake.apply(KUBECTL, obj);
        }
        Apply::Client => fake.apply_client_side(obj),
    }
}

/// How the operator creates accounts: with the Homeserver's
/// `registrationSharedSecretRef` (shared-secret registration, one call), or
/// without it (the empty-body create, then a PUT of the fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Creation {
    Register,
    Put,
}

fn creations(text: &str) -> Vec<Creation> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| match s.trim() {
            "register" => Creation::Register,
            "put" => Creation::Put,
            other => panic!("creation: {other:?} is neither register nor put"),
        })
        .collect()
}

fn list<T: std::str::FromStr>(text: &str, what: &str) -> Vec<T> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .unwrap_or_else(|_| panic!("{what}: {s:?} is not a number"))
        })
        .collect()
}

fn options() -> Options {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut o = Options {
        bcrypt: list(&env("CONVERGE_BCRYPT").unwrap_or("4,12".into()), "bcrypt"),
        sizes: list(&env("CONVERGE_N").unwrap_or("100,1000".into()), "n"),
        concurrency: list(&env("CONVERGE_CONCURRENCY").unwrap_or("16".into()), "concurrency"),
        max_requests: env("CONVERGE_MAX_REQUESTS").map(|v| list(&v, "max-requests")[0]),
        resync_secs: env("CONVERGE_RESYNC_SECS").map(|v| list(&v, "resync")[0]),
        converge_only: env("CONVERGE_ONLY").is_some_and(|v| v != "0"),
        creation: creations(&env("CONVERGE_CREATION").unwrap_or("register,put".into())),
        apply: apply_of(&env("CONVERGE_APPLY").unwrap_or("server".into())),
        backends: backends(&env("CONVERGE_BACKEND").unwrap_or("synapse".into())),
    };
    let mut ten_k = env("CONVERGE_10K").is_some_and(|v| v != "0");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--bcrypt" => o.bcrypt = list(&value(), "bcrypt"),
            "--n" => o.sizes = list(&value(), "n"),
            "--concurrency" => o.concurrency = list(&value(), "concurrency"),
            "--max-requests" => o.max_requests = Some(list(&value(), "max-requests")[0]),
            "--resync" => o.resync_secs = Some(list(&value(), "resync")[0]),
            "--10k" => ten_k = true,
            "--converge-only" => o.converge_only = true,
            "--creation" => o.creation = creations(&value()),
            "--apply" => o.apply = apply_of(&value()),
            "--backend" => o.backends = backends(&value()),
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            other => panic!("unknown argument {other:?} (see the top of benches/converge.rs)"),
        }
    }
    if ten_k && !o.sizes.contains(&10_000) {
        o.sizes.push(10_000);
    }
    o
}

// ---------------------------------------------------------------------------
// The counting proxy in front of Synapse

#[derive(Clone, Debug)]
struct Hit {
    /// When the answer was back from Synapse.
    at: Instant,
    method: http::Method,
    /// Percent-decoded path.
    path: String,
    /// The query string, as sent.
    query: String,
    status: u16,
    /// The request body of a write, for the spec-change latency.
    body: String,
    /// The answer, for requests to the watched path only.
    answer: String,
}

#[derive(Clone)]
struct Proxy {
    url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    /// A path whose answers are kept.
    watched: Arc<Mutex<Option<String>>>,
}

impl Proxy {
    fn hits_since(&self, since: Instant) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.at >= since)
            .cloned()
            .collect()
    }

    fn clear(&self) {
        self.hits.lock().unwrap().clear();
    }
}

fn decode(path: &str) -> String {
    path.replace("%40", "@").replace("%3A", ":").replace("%3a", ":")
}

fn http_client() -> reqwest::Client {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("rustls")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(120))
        .build()
        .expect("a reqwest client")
}

/// A proxy on 127.0.0.1 that forwards everything to `upstream` and records
/// each request, on a thread (and runtime) of its own.
fn start_proxy(upstream: &str) -> Proxy {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let hits: Arc<Mutex<Vec<Hit>>> = Arc::default();
    let watched: Arc<Mutex<Option<String>>> = Arc::default();
    let (recorded, upstream, kept) = (hits.clone(), upstream.to_string(), watched.clone());
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let client = http_client();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (client, upstream, hits, kept) = (client.clone(), upstream.clone(), recorded.clone(), kept.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let (client, upstream, hits, kept) =
                            (client.clone(), upstream.clone(), hits.clone(), kept.clone());
                        async move { Ok::<_, Infallible>(forward(&client, &upstream, &hits, &kept, request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
    Proxy { url, hits, watched }
}

async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    hits: &Mutex<Vec<Hit>>,
    watched: &Mutex<Option<String>>,
    request: http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path_and_query = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = client.request(parts.method.clone(), format!("{upstream}{path_and_query}"));
    for (name, value) in &parts.headers {
        if name != http::header::HOST && name != http::header::CONTENT_LENGTH {
            out = out.header(name, value);
        }
    }
    let (status, content_type, answer) = match out.body(body.clone()).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let content_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
            (status, content_type, response.bytes().await.unwrap_or_default())
        }
        Err(_) => (502, None, Bytes::new()),
    };
    let path = decode(parts.uri.path());
    let keep = watched.lock().unwrap().as_deref() == Some(path.as_str());
    hits.lock().unwrap().push(Hit {
        at: Instant::now(),
        method: parts.method.clone(),
        answer: if keep {
            String::from_utf8_lossy(&answer).into_owned()
        } else {
            String::new()
        },
        path,
        query: parts.uri.query().unwrap_or_default().to_string(),
        status,
        body: if parts.method == http::Method::GET {
            String::new()
        } else {
            String::from_utf8_lossy(&body).into_owned()
        },
    });
    let mut response = http::Response::builder().status(status);
    if let Some(ct) = content_type {
        response = response.header(http::header::CONTENT_TYPE, ct);
    }
    response.body(Full::new(answer)).unwrap()
}

// ---------------------------------------------------------------------------
// Counting

#[derive(Default)]
struct AdminCounts {
    user_gets: usize,
    user_writes: usize,
    other_gets: usize,
    other_writes: usize,
    /// Shared-secret registration nonces (GETs, kept in Synapse's memory only).
    nonces: usize,
    errors: usize,
}

fn admin_counts(hits: &[Hit]) -> AdminCounts {
    let mut c = AdminCounts::default();
    for h in hits {
        let on_user = (h.path.starts_with("/_synapse/admin/v2/users/") && !h.path.contains("harness-admin"))
            || h.path == "/_synapse/admin/v1/register";
        if h.path == "/_synapse/admin/v1/register" && h.method == http::Method::GET {
            c.nonces += 1;
            continue;
        }
        match (h.method == http::Method::GET, on_user) {
            (true, true) => c.user_gets += 1,
            (false, true) => c.user_writes += 1,
            (true, false) => c.other_gets += 1,
            (false, false) => c.other_writes += 1,
        }
        if h.status >= 400 && h.status != 404 {
            c.errors += 1;
        }
    }
    c
}

/// `verb resource[/subresource]` of a Kubernetes request.
fn verb_of(r: &Recorded) -> String {
    let segments: Vec<&str> = r.path.trim_matches('/').split('/').collect();
    let rest = match segments.first() {
        Some(&"api") => &segments[2.min(segments.len())..],
        Some(&"apis") => &segments[3.min(segments.len())..],
        _ => &segments[..],
    };
    let rest = if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        &rest[2..]
    } else {
        rest
    };
    let resource = match rest {
        [plural] | [plural, _] => plural.to_string(),
        [plural, _, sub, ..] => format!("{plural}/{sub}"),
        _ => r.path.clone(),
    };
    let collection = rest.len() == 1;
    let verb = match r.method.as_str() {
        "GET" if r.query.contains("watch=true") => "watch",
        "GET" if collection => "list",
        "GET" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        other => other,
    };
    format!("{verb} {resource}")
}

fn kube_counts(requests: &[Recorded]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for r in requests {
        *counts.entry(verb_of(r)).or_insert(0) += 1;
    }
    counts
}

fn per_account(counts: &BTreeMap<String, usize>, n: usize) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {:.2}", *v as f64 / n as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

fn totals(counts: &BTreeMap<String, usize>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn reads(counts: &BTreeMap<String, usize>) -> usize {
    counts
        .iter()
        .filter(|(k, _)| k.starts_with("get ") || k.starts_with("list "))
        .map(|(_, v)| v)
        .sum()
}

// ---------------------------------------------------------------------------
// The operator process

struct Operator {
    child: Child,
}

/// `(VmHWM KiB, VmRSS KiB, CPU seconds)` of a process.
fn usage(pid: u32) -> (u64, u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: a plain sysconf query.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (field("VmHWM:"), field("VmRSS:"), ticks / per_second)
}

impl Operator {
    fn start(fake: &FakeApiServer, concurrency: u16, resync: Duration, log: &std::path::Path) -> Self {
        let dir = log.parent().unwrap();
        let out = std::fs::File::create(log).unwrap();
        let binary =
            std::env::var("CONVERGE_OPERATOR").unwrap_or_else(|_| env!("CARGO_BIN_EXE_matrix-user-operator").into());
        let child = Command::new(binary)
            .args([
                "run",
                "--namespace",
                NS,
                "--leader-election",
                "off",
                "--health-addr",
                "0",
            ])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--resync-interval", &format!("{}s", resync.as_secs().max(1))])
            // The Homeserver's account count (a cost of its own, measured in
            // tests/import.rs) would read every account the scripts made
            // in the same Synapse, once, during the converge measured here.
            .args(["--account-count-interval", "0"])
            .args(["--log-level", "warn"])
            .env("KUBECONFIG", fake.kubeconfig_file(dir))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start the operator binary");
        Operator { child }
    }

    fn usage(&self) -> (u64, u64, f64) {
        usage(self.child.id())
    }

    fn stop(mut self) -> (u64, u64, f64) {
        let used = self.usage();
        // SAFETY: SIGTERM to the child we started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        used
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// The world

/// The labels Flux puts on every object it applies (Argo CD and Helm put
/// theirs): the objects of the bench are as a GitOps tool leaves them.
fn gitops_labels() -> Value {
    json!({"kustomize.toolkit.fluxcd.io/name": "matrix-users", "kustomize.toolkit.fluxcd.io/namespace": "flux-system"})
}

fn user_name(i: usize) -> String {
    format!("u{i}")
}

fn user_path(i: usize) -> String {
    format!(
        "/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers/{}",
        user_name(i)
    )
}

fn in_sync(fake: &FakeApiServer, path: &str) -> bool {
    let Some(u) = fake.get(path) else { return false };
    let ready = u["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    ready && u["status"]["userId"].is_string() && u["status"]["observedGeneration"] == u["metadata"]["generation"]
}

/// Waits until every path is in sync, checking the oldest pending first
/// (they converge in about the order they were made).
async fn wait_in_sync(fake: &FakeApiServer, paths: Vec<String>, timeout: Duration) -> Result<Instant, usize> {
    let started = Instant::now();
    let mut pending: std::collections::VecDeque<String> = paths.into();
    loop {
        let mut checked = 0;
        let mut left = pending.len();
        while left > 0 && checked < 50 {
            let path = pending.pop_front().unwrap();
            if !in_sync(fake, &path) {
                pending.push_back(path);
                checked += 1;
            }
            left -= 1;
        }
        if pending.is_empty() {
            return Ok(Instant::now());
        }
        if started.elapsed() > timeout {
            return Err(pending.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_homeserver_ready(fake: &FakeApiServer) {
    let path = format!("/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/homeservers/hs");
    let started = Instant::now();
    loop {
        let hs = fake.get(&path).unwrap_or(Value::Null);
        let ready = hs["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "Homeserver not ready: {hs}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The users of one run: `(localpart, user ID)`.
fn users(s: &SynapseServer, prefix: &str, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let lp = format!("{prefix}-{i}");
            let id = s.user_id(&lp);
            (lp, id)
        })
        .collect()
}

/// What a baseline script does per new account, `concurrency` in flight.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    /// What a hand-written script does: GET, then one PUT with displayname
    /// and password (an upsert: it would write to an account that appeared
    /// after the GET).
    Plain,
    /// The operator's calls without a registration secret, without
    /// Kubernetes: GET, the empty-body create (which touches no account that
    /// appeared meanwhile), then the PUT with the fields.
    SafePut,
    /// The operator's calls with one: the shared-secret registration (nonce,
    /// then the create-only registration with the fields), by the library's
    /// own client, then the GET that tells when the account was made.
    Register,
}

async fn script(
    s: &SynapseServer,
    proxy: &Proxy,
    accounts: &[(String, String)],
    concurrency: usize,
    kind: Script,
) -> Duration {
    let token = s.admin_token.as_str();
    let client = http_client();
    let mut config = ClientConfig::new(&proxy.url, SecretString::new(token));
    config.registration_shared_secret = Some(SecretString::new(&s.registration_shared_secret));
    config.max_concurrent_requests = concurrency;
    let registering = SynapseClient::new(config).unwrap();
    let started = Instant::now();
    futures::stream::iter(accounts.iter().enumerate().map(|(i, (lp, id))| {
        let client = client.clone();
        let registering = &registering;
        let url = format!("{}/_synapse/admin/v2/users/{id}", proxy.url);
        async move {
            if kind == Script::Register {
                let password = SecretString::new(format!("password-{i}-of-the-script"));
                let displayname = format!("User {i}");
                let registration = Registration {
                    localpart: lp,
                    password: &password,
                    displayname: Some(&displayname),
                    admin: false,
                    user_type: None,
                };
                assert!(registering.register(&registration).await.unwrap(), "{id} exists already");
                let got = client.get(&url).bearer_auth(token).send().await.unwrap();
                assert_eq!(got.status().as_u16(), 200, "{id}");
                return;
            }
            let got = client.get(&url).bearer_auth(token).send().await.unwrap();
            assert_eq!(got.status().as_u16(), 404, "{id} exists already");
            let body = json!({"displayname": format!("User {i}"), "password": format!("password-{i}-of-the-script")});
            if kind == Script::SafePut {
                let create = client.put(&url).bearer_auth(token).json(&json!({})).send().await.unwrap();
                assert_eq!(create.status().as_u16(), 201, "{id}");
                let body = json!({"displayname": format!("User {i}"), "password": format!("password-{i}-of-the-script"), "logout_devices": false});
                let put = client.put(&url).bearer_auth(token).json(&body).send().await.unwrap();
                assert_eq!(put.status().as_u16(), 200, "{id}");
                return;
            }
            let put = client.put(&url).bearer_auth(token).json(&body).send().await.unwrap();
            assert_eq!(
                put.status().as_u16(),
                201,
                "{id}: {}",
                put.text().await.unwrap_or_default()
            );
        }
    }))
    .buffer_unordered(concurrency)
    .collect::<Vec<_>>()
    .await;
    started.elapsed()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

struct Row {
    bcrypt: u32,
    n: usize,
    concurrency: u16,
    creation: Creation,
    script: Duration,
    /// The operator's own admin calls for its creation, without Kubernetes.
    floor: Duration,
    operator: Duration,
}

/// The baselines of one (bcrypt, N, concurrency), each on accounts of its
/// own: the script, and the operator's own calls for each way of creating
/// that runs.
struct Baselines {
    script: Duration,
    safe_put: Duration,
    register: Duration,
}

/// A Synapse of its own for one phase, behind a proxy of its own: each
/// phase starts on an empty database, as a measurement with a fresh server
/// per phase does. Synapse slows as its user table grows: a Synapse shared
/// by the phases would charge each for the accounts of the ones before it.
async fn fresh_synapse(bcrypt: u32) -> (SynapseServer, Proxy) {
    tokio::task::spawn_blocking(move || {
        let s = start_synapse(bcrypt).unwrap_or_else(|e| panic!("{e}"));
        let proxy = start_proxy(&s.base_url);
        (s, proxy)
    })
    .await
    .expect("starting a Synapse")
}

/// Stops a phase's Synapse (the harness stops the others at exit).
fn stop_synapse(s: &SynapseServer) {
    let _ = Command::new("kill").arg(s.pid.to_string()).status();
}

async fn baselines(bcrypt: u32, tag: &str, n: usize, in_flight: usize, creation: &[Creation]) -> Baselines {
    let (s, proxy) = fresh_synapse(bcrypt).await;
    let script_accounts = users(&s, &format!("script-{tag}"), n);
    let script_time = script(&s, &proxy, &script_accounts, in_flight, Script::Plain).await;
    let script_counts = admin_counts(&proxy.hits_since(Instant::now() - Duration::from_secs(86_400)));
    stop_synapse(&s);
    println!(
        "script:   {n} accounts in {:.2} s ({:.1}/s), {} in flight; {:.2} admin GETs and {:.2} writes per account",
        script_time.as_secs_f64(),
        n as f64 / script_time.as_secs_f64(),
        in_flight,
        script_counts.user_gets as f64 / n as f64,
        script_counts.user_writes as f64 / n as f64
    );
    let floors = [
        (
            Script::SafePut,
            "safe",
            "GET, empty-body create, PUT of the fields: the operator's admin calls without a registration secret, without Kubernetes",
        ),
        (
            Script::Register,
            "register",
            "nonce, shared-secret registration with the fields, GET: the operator's admin calls with a registration secret, without Kubernetes",
        ),
    ];
    let mut times = Vec::new();
    for (kind, prefix, what) in floors {
        let wanted = match kind {
            Script::Register => Creation::Register,
            _ => Creation::Put,
        };
        if !creation.contains(&wanted) {
            times.push(Duration::ZERO);
            continue;
        }
        let (s, proxy) = fresh_synapse(bcrypt).await;
        let accounts = users(&s, &format!("{prefix}-{tag}"), n);
        let took = script(&s, &proxy, &accounts, in_flight, kind).await;
        stop_synapse(&s);
        println!(
            "{prefix} script ({what}): {n} accounts in {:.2} s; ratio to the script {:.2}",
            took.as_secs_f64(),
            took.as_secs_f64() / script_time.as_secs_f64()
        );
        times.push(took);
    }
    Baselines {
        script: script_time,
        safe_put: times[0],
        register: times[1],
    }
}

/// One run of the operator: N new users, then changes, then resyncs;
/// prints as it goes.
#[allow(clippy::too_many_arguments)]
async fn run_once(
    s: &SynapseServer,
    proxy: &Proxy,
    bcrypt: u32,
    n: usize,
    concurrency: u16,
    creation: Creation,
    base: &Baselines,
    o: &Options,
) -> Row {
    let tag = format!("b{bcrypt}-n{n}-c{concurrency}-{creation:?}-p{}", std::process::id()).to_lowercase();
    let max_requests = o.max_requests;
    let (script_time, floor) = match creation {
        Creation::Register => (base.script, base.register),
        Creation::Put => (base.script, base.safe_put),
    };
    println!();
    println!(
        "-- the operator, creating {}",
        match creation {
            Creation::Register => "with registrationSharedSecretRef (shared-secret registration)",
            Creation::Put => "without registrationSharedSecretRef (empty-body create, then a PUT)",
        }
    );

    // The operator, against a fake API server of its own.
    let (_, fake) = FakeApiServer::start();
    let dir = std::env::temp_dir().join(format!("mxu-converge-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec = json!({"url": proxy.url, "adminTokenSecretRef": {"name": "admin", "key": "token"}});
    if let Some(m) = max_requests {
        spec["maxConcurrentRequests"] = json!(m);
    }
    if creation == Creation::Register {
        spec["registrationSharedSecretRef"] = json!({"name": "registration", "key": "secret"});
        create_as_user(
            &fake,
            o.apply,
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "registration", "namespace": NS},
            "stringData": {"secret": s.registration_shared_secret}}),
        );
    }
    create_as_user(
        &fake,
        o.apply,
        json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": "hs", "namespace": NS}, "spec": spec}),
    );
    create_as_user(
        &fake,
        o.apply,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "admin", "namespace": NS},
        "stringData": {"token": s.admin_token}}),
    );
    let operator = Operator::start(
        &fake,
        concurrency,
        Duration::from_secs(600),
        &dir.join("operator-1.log"),
    );
    wait_homeserver_ready(&fake).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, idle_rss, idle_cpu) = operator.usage();

    let accounts = users(s, &format!("op-{tag}"), n);
    fake.clear_requests();
    proxy.clear();
    let started = Instant::now();
    for (i, (lp, _)) in accounts.iter().enumerate() {
        let name = user_name(i);
        create_as_user(
            &fake,
            o.apply,
            json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": format!("{name}-password"), "namespace": NS, "labels": gitops_labels()},
            "stringData": {"password": format!("password-{i}-of-{lp}")}}),
        );
        create_as_user(
            &fake,
            o.apply,
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
            "metadata": {"name": name, "namespace": NS, "labels": gitops_labels()},
            "spec": {"homeserverRef": {"name": "hs"}, "localpart": lp, "displayName": format!("User {i}"),
                     "password": {"secretRef": {"name": format!("{name}-password"), "key": "password"}}}}),
        );
    }
    let paths: Vec<String> = (0..n).map(user_path).collect();
    let timeout = Duration::from_secs(120 + n as u64 * if bcrypt >= 10 { 2 } else { 1 });
    let done = match wait_in_sync(&fake, paths.clone(), timeout).await {
        Ok(at) => at,
        Err(left) => {
            println!(
                "operator: {left} of {n} not in sync after {timeout:?}; see {}",
                dir.display()
            );
            Instant::now()
        }
    };
    let took = done - started;
    let (peak, rss, cpu) = operator.usage();
    let admin = admin_counts(&proxy.hits_since(started));
    let kube = kube_counts(&fake.requests());
    println!(
        "operator: {n} accounts in {:.2} s ({:.1}/s); ratio operator/script {:.2}, operator/its own calls without Kubernetes {:.2}",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        took.as_secs_f64() / script_time.as_secs_f64(),
        took.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "  admin API per new account (counted by the proxy): {:.2} GETs, {:.2} writes (user endpoints and \
         registrations; nonces {:.2}); other admin calls {} GETs, {} writes; answers >= 400 except 404: {}",
        admin.user_gets as f64 / n as f64,
        admin.user_writes as f64 / n as f64,
        admin.nonces as f64 / n as f64,
        admin.other_gets,
        admin.other_writes,
        admin.errors
    );
    println!(
        "  Kubernetes API per new account (fake API server's log): {}",
        per_account(&kube, n)
    );
    let writes: BTreeMap<String, usize> = kube
        .iter()
        .filter(|(k, _)| {
            ["create ", "update ", "patch ", "delete "]
                .iter()
                .any(|v| k.starts_with(v))
        })
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    println!(
        "  Kubernetes writes per new account, by kind: {:.2} in all: {} (each a Raft commit and a watch fan-out \
         on a real API server, which the fake cannot show: it costs nothing here)",
        writes.values().sum::<usize>() as f64 / n as f64,
        per_account(&writes, n)
    );
    println!(
        "  operator process: peak RSS {:.1} MiB (idle {:.1} MiB), RSS now {:.1} MiB, CPU {:.2} s for the converge",
        mib(peak),
        mib(idle_rss),
        mib(rss),
        cpu - idle_cpu
    );
    println!(
        "  per account: {:.1} KiB peak RSS above idle, {:.2} ms operator CPU (objects created {})",
        peak.saturating_sub(idle_rss) as f64 / n as f64,
        (cpu - idle_cpu) * 1e3 / n as f64,
        match o.apply {
            Apply::Server => "with server-side apply, managedFields as from a real API server",
            Apply::Client => "with client-side kubectl apply: managedFields and the last-applied annotation",
        }
    );

    if o.converge_only {
        let (peak1, _, cpu1) = operator.stop();
        println!("  operator peak RSS {:.1} MiB, CPU {:.2} s in all", mib(peak1), cpu1);
        let _ = std::fs::remove_dir_all(&dir);
        return Row {
            bcrypt,
            n,
            concurrency,
            creation,
            script: script_time,
            floor,
            operator: took,
        };
    }

    // One field of one user, 100 times: the change until Synapse answered
    // the PUT carrying it.
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        fake.client(),
        NS,
        &kube::api::ApiResource {
            group: "matrix-operator.io".into(),
            version: "v1alpha1".into(),
            api_version: "matrix-operator.io/v1alpha1".into(),
            kind: "MatrixUser".into(),
            plural: "matrixusers".into(),
        },
    );
    let target = format!("/_synapse/admin/v2/users/{}", accounts[0].1);
    *proxy.watched.lock().unwrap() = Some(target.clone());
    let mut rate_limited = 0;
    let mut latencies = Vec::new();
    for k in 0..100 {
        let name = format!("Change {k} of {tag}");
        let changed = Instant::now();
        let patch = json!({"spec": {"displayName": name}});
        api.patch(&user_name(0), &Default::default(), &kube::api::Patch::Merge(&patch))
            .await
            .unwrap();
        let seen = loop {
            // Synapse has it once it answered a PUT carrying it, or (a PUT
            // it answered 429 after applying part of it) a GET showing it.
            let hits = proxy.hits_since(changed);
            let hit = hits.into_iter().find(|h| {
                h.path == target
                    && ((h.method == http::Method::PUT && h.status < 300 && h.body.contains(&name))
                        || (h.method == http::Method::GET && h.status == 200 && h.answer.contains(&name)))
            });
            if let Some(hit) = hit {
                break Some(hit.at);
            }
            if changed.elapsed() > Duration::from_secs(30) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        match seen {
            Some(at) => latencies.push((at - changed).as_secs_f64() * 1e3),
            None => {
                let now = fake.get(&user_path(0)).unwrap_or(Value::Null);
                println!(
                    "  change {k}: not seen in Synapse within 30 s; the MatrixUser: generation {}, status {}",
                    now["metadata"]["generation"], now["status"]
                );
                let puts: Vec<String> = proxy
                    .hits_since(changed)
                    .iter()
                    .filter(|h| h.path == target)
                    .map(|h| format!("{} {} {}", h.method, h.status, h.body))
                    .collect();
                println!("    its admin calls since: {puts:?}");
            }
        }
        // Let the pass finish (status write) before the next change.
        let _ = wait_in_sync(&fake, vec![user_path(0)], Duration::from_secs(30)).await;
        rate_limited += proxy
            .hits_since(changed)
            .iter()
            .filter(|h| h.method == http::Method::PUT && h.path == target && h.status == 429)
            .count();
    }
    *proxy.watched.lock().unwrap() = None;
    latencies.sort_by(f64::total_cmp);
    println!(
        "  spec change of one field → Synapse, {} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
         (Synapse answered 429 to {rate_limited} of the PUTs, having applied them)",
        latencies.len(),
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN)
    );
    let (peak1, _, cpu1) = operator.stop();

    // A fresh operator with a short resync interval: its start-up pass goes
    // over N in-sync users at once, then their interval resyncs follow.
    let resync = Duration::from_secs(o.resync_secs.unwrap_or((n as u64 / 25).max(20)));
    fake.clear_requests();
    proxy.clear();
    let started = Instant::now();
    let operator = Operator::start(&fake, concurrency, resync, &dir.join("operator-2.log"));
    let user_targets: HashMap<String, usize> = accounts
        .iter()
        .enumerate()
        .map(|(i, (_, id))| (format!("/_synapse/admin/v2/users/{id}"), i))
        .collect();
    // The first GET of each user at or after `since`.
    let first_gets = |since: Instant| {
        let mut seen: HashMap<usize, Instant> = HashMap::new();
        for h in proxy.hits_since(since) {
            if h.method == http::Method::GET
                && let Some(i) = user_targets.get(&h.path)
            {
                seen.entry(*i).or_insert(h.at);
            }
        }
        seen
    };
    let deadline = Instant::now() + Duration::from_secs(120 + n as u64 / 10);
    while first_gets(started).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let startup = first_gets(started);
    let startup_end = startup.values().max().copied().unwrap_or(started);
    // What the start-up pass set off settles.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = admin_counts(&proxy.hits_since(started));
    let kube = kube_counts(&fake.requests());
    println!(
        "  start-up pass over {n} in-sync users (operator restarted): {} checked in {:.2} s from the process start; \
         admin {:.2} GETs and {} writes per user ({} other admin GETs); Kubernetes: {}",
        startup.len(),
        (startup_end - started).as_secs_f64(),
        admin.user_gets as f64 / n as f64,
        admin.user_writes,
        admin.other_gets,
        totals(&kube)
    );

    let mark = Instant::now();
    fake.clear_requests();
    let (_, _, cpu_before) = operator.usage();
    let deadline = mark + resync * 3 / 2 + Duration::from_secs(30);
    while first_gets(mark).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resynced = first_gets(mark);
    let (peak2, _, cpu_after) = operator.usage();
    let admin = admin_counts(&proxy.hits_since(mark));
    let kube = kube_counts(&fake.requests());
    let window = (Instant::now() - mark).as_secs_f64();
    println!(
        "  resync (interval {} s) of {n} in-sync users: {} resynced within {window:.1} s; {} admin GETs on their \
         accounts ({:.2} per user: a user may come twice, 0.5 to 1.5 intervals apart), {} writes \
         ({} other admin GETs: the Homeserver's check); Kubernetes reads {} ({}); operator CPU {:.3} s",
        resync.as_secs(),
        resynced.len(),
        admin.user_gets,
        admin.user_gets as f64 / n as f64,
        admin.user_writes + admin.other_writes,
        admin.other_gets,
        reads(&kube),
        totals(&kube),
        cpu_after - cpu_before
    );
    // The spread: when each user's resync came, after the start-up pass
    // checked them all within a few seconds.
    let mut offsets: Vec<f64> = resynced
        .values()
        .map(|at| at.saturating_duration_since(startup_end).as_secs_f64())
        .collect();
    offsets.sort_by(f64::total_cmp);
    if !offsets.is_empty() {
        let first = offsets[0].floor() as usize;
        let last = offsets[offsets.len() - 1].floor() as usize;
        let mut buckets = vec![0usize; last - first + 1];
        for off in &offsets {
            buckets[off.floor() as usize - first] += 1;
        }
        let mut sorted = buckets.clone();
        sorted.sort();
        println!(
            "  resync spread: from {:.1} s to {:.1} s after the start-up pass ended ({:.2} s): {} one-second \
             buckets, per second min {} / p50 {} / max {} (mean {:.1}); {} seconds without any",
            offsets[0],
            offsets[offsets.len() - 1],
            (startup_end - started).as_secs_f64(),
            buckets.len(),
            sorted[0],
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1],
            n as f64 / buckets.len() as f64,
            buckets.iter().filter(|b| **b == 0).count()
        );
        let bins = 15;
        let width = (last - first + 1).div_ceil(bins).max(1);
        let line: Vec<String> = buckets
            .chunks(width)
            .enumerate()
            .map(|(b, c)| format!("{}s:{}", first + b * width, c.iter().sum::<usize>()))
            .collect();
        println!("  resync histogram ({width}-s bins): {}", line.join(" "));
    }
    let (peak3, _, cpu3) = operator.stop();
    println!(
        "  operator peak RSS: {:.1} MiB (converge + changes), {:.1} MiB (restart + resyncs); CPU {:.2} s + {:.2} s",
        mib(peak1),
        mib(peak2.max(peak3)),
        cpu1,
        cpu3
    );
    if latencies.len() == 100 {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Row {
        bcrypt,
        n,
        concurrency,
        creation,
        script: script_time,
        floor,
        operator: took,
    }
}

fn main() {
    let o = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if o.backends.contains(&Backend::Synapse) {
        synapse_mode(&o, &runtime);
    }
    if o.backends.contains(&Backend::Mas) {
        mas::run(&o, &runtime);
    }
}

/// The Homeserver without `spec.mas`: accounts in Synapse's admin API.
fn synapse_mode(o: &Options, runtime: &tokio::runtime::Runtime) {
    println!(
        "converge: Synapse {} (SQLite) on 127.0.0.1 behind a counting proxy; Kubernetes is the in-process FAKE \
         API server (testkit/src/fake_kube), the operator the real binary against it; {} CPUs shared by all",
        common::SYNAPSE_VERSION,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("each phase (script, script of the operator's calls, operator) runs against a fresh Synapse");
    let mut rows = Vec::new();
    for &bcrypt in &o.bcrypt {
        for &n in &o.sizes {
            for &c in &o.concurrency {
                let in_flight = o.max_requests.map_or(c as usize, |m| (m as usize).min(c as usize));
                println!();
                println!(
                    "== bcrypt_rounds {bcrypt}, N = {n}, --concurrency {c}, maxConcurrentRequests {}",
                    o.max_requests.map_or("default (8)".to_string(), |m| m.to_string())
                );
                let tag = format!("b{bcrypt}-n{n}-c{c}-p{}", std::process::id());
                let base = runtime.block_on(baselines(bcrypt, &tag, n, in_flight, &o.creation));
                for &creation in &o.creation {
                    let (s, proxy) = runtime.block_on(fresh_synapse(bcrypt));
                    rows.push(runtime.block_on(run_once(&s, &proxy, bcrypt, n, c, creation, &base, o)));
                    stop_synapse(&s);
                }
            }
        }
    }
    println!();
    println!(
        "| bcrypt | N | concurrency | creation | script | its calls w/o Kubernetes | operator | operator/script | operator/its calls |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.2} s | {:.2} s | {:.2} s | {:.2}× | {:.2}× |",
            r.bcrypt,
            r.n,
            r.concurrency,
            match r.creation {
                Creation::Register => "registration",
                Creation::Put => "create + PUT",
            },
            r.script.as_secs_f64(),
            r.floor.as_secs_f64(),
            r.operator.as_secs_f64(),
            r.operator.as_secs_f64() / r.script.as_secs_f64(),
            r.operator.as_secs_f64() / r.floor.as_secs_f64()
        );
    }
}
