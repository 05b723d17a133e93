//! A real Synapse homeserver for integration tests.
//!
//! # What it needs
//!
//! - Linux (the server is tied to the test process with `prctl(PR_SET_PDEATHSIG)`).
//! - Python >= 3.10 with the `venv` module and pip (`apt-get install python3
//!   python3-venv`). The interpreter is `$SYNAPSE_PYTHON`, or `python3` from `PATH`.
//! - On the first run only: network access to PyPI (or a wheel cache through
//!   pip's usual settings such as `PIP_FIND_LINKS` / `PIP_INDEX_URL`). The first
//!   run installs `matrix-synapse==SYNAPSE_VERSION` (a prebuilt wheel, nothing is
//!   compiled; ≈40 s, ≈250 MB) into `<target>/synapse-venv-<version>/`, where
//!   `<target>` is `$CARGO_TARGET_DIR` or `<crate>/target`. Later runs reuse it
//!   (a marker file records a finished install; a file lock serialises test
//!   binaries that install at the same time; the pip output is kept in
//!   `<target>/synapse-venv-<version>.install.log`).
//!
//! Nothing is skipped: if any of this is missing, every test that calls
//! [`synapse()`] panics with a message naming what is missing.
//!
//! # What it does
//!
//! [`synapse()`] starts one Synapse per test process on first use and shares it
//! between all tests of that binary: SQLite, a fresh data directory
//! `<target>/synapse-runs/<pid>-<n>/` (generated `homeserver.yaml` plus an
//! `overrides.yaml` for tests; Synapse's log is `homeserver.log` there, its
//! stdout/stderr `synapse.out`), one plain-HTTP `client` listener on a free
//! `127.0.0.1` port, `bcrypt_rounds: 4`, relaxed `rc_login` (all other rate
//! limits stay at their defaults). It waits for `/health`, then for the
//! database's background updates to finish, then registers an admin through the
//! shared-secret registration API.
//!
//! Synapse is stopped (SIGTERM, then waited for) by an `atexit` handler when
//! the test binary exits; as a backstop for abnormal exits it is spawned with
//! `PR_SET_PDEATHSIG = SIGTERM` from a thread that never exits, so it dies with
//! the test process even if that is killed. Data
//! directories of dead test processes older than 15 minutes are removed by the
//! next run.

use std::fs::{self, File};
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

use super::venv::{self, LOG_TAIL_LINES, announce, die_with_parent, output_text, tail, target_dir};

/// The Synapse release every test runs against.
pub const SYNAPSE_VERSION: &str = "1.163.2";
/// The `server_name` of the test homeserver.
pub const SERVER_NAME: &str = "example.test";

const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);
const BACKGROUND_UPDATES_TIMEOUT: Duration = Duration::from_secs(60);
const ADMIN_LOCALPART: &str = "harness-admin";
const ADMIN_PASSWORD: &str = "harness-admin-password";
/// How many times to retry when another process grabbed the free port first.
const START_ATTEMPTS: u32 = 3;

/// A running Synapse, shared by all tests of one test binary.
#[derive(Debug)]
pub struct SynapseServer {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    /// Always [`SERVER_NAME`].
    pub server_name: String,
    /// Full user ID of the harness's admin account.
    pub admin_user_id: String,
    /// Access token of the admin account.
    pub admin_token: String,
    /// Data directory (database, config, logs).
    pub data_dir: PathBuf,
    /// `registration_shared_secret` from the generated config.
    pub registration_shared_secret: String,
    /// Process ID of the Synapse process.
    pub pid: u32,
}

static SERVER: OnceLock<Result<SynapseServer, String>> = OnceLock::new();
static LOCALPART_COUNTER: AtomicU64 = AtomicU64::new(0);
static RUN_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The shared Synapse of this test process, started (blocking) on first use.
///
/// Safe to call from plain `#[test]`s and from inside any tokio runtime: the
/// startup runs on a separate thread. Panics with the reason if Synapse cannot
/// be started; once startup failed, every later call panics with the same
/// message without trying again.
pub fn synapse() -> &'static SynapseServer {
    match SERVER.get_or_init(|| start_on_keeper_thread(DEFAULT_BCRYPT_ROUNDS)) {
        Ok(server) => server,
        Err(message) => panic!("{message}"),
    }
}

/// The `bcrypt_rounds` of the shared test Synapse.
pub const DEFAULT_BCRYPT_ROUNDS: u32 = 4;

/// A Synapse of its own (not the shared one), set up as [`synapse()`]'s
/// but hashing passwords with `bcrypt_rounds` (Synapse's default is 12):
/// for benchmarks. Stopped when the process exits.
pub fn start_synapse(bcrypt_rounds: u32) -> Result<SynapseServer, String> {
    start_on_keeper_thread(bcrypt_rounds)
}

impl SynapseServer {
    /// `@localpart:example.test`.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// A localpart no other call in this process returns:
    /// `<prefix>-<counter>-p<pid>`. The prefix must be a valid localpart piece
    /// (`a-z 0-9 . _ = - /`).
    pub fn unique_localpart(&self, prefix: &str) -> String {
        assert!(
            !prefix.is_empty() && prefix.bytes().all(is_localpart_byte),
            "unique_localpart: prefix {prefix:?} may only hold a-z 0-9 . _ = - /"
        );
        let n = LOCALPART_COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{n}-p{}", std::process::id())
    }

    /// Registers `localpart` through the shared-secret registration API and
    /// returns its access token. Panics if Synapse refuses.
    pub async fn register_user(&self, localpart: &str, password: &str, admin: bool) -> String {
        let base = self.base_url.clone();
        let secret = self.registration_shared_secret.clone();
        match shared_secret_register(&base, &secret, localpart, password, admin).await {
            Ok((token, _user_id)) => token,
            Err(message) => panic!("register_user({localpart:?}): {message}"),
        }
    }

    /// `m.login.password` login. `Ok(access token)` on 200, else `Err(status)`.
    pub async fn login(&self, localpart: &str, password: &str) -> Result<String, u16> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
            "initial_device_display_name": "synapse test harness",
        });
        let (status, body) = self
            .request(reqwest::Method::POST, "/_matrix/client/v3/login", None, Some(body))
            .await;
        if status != 200 {
            return Err(status);
        }
        match body["access_token"].as_str() {
            Some(token) => Ok(token.to_owned()),
            None => panic!("login({localpart:?}): 200 without access_token: {body}"),
        }
    }

    /// Status code of `GET /_matrix/client/v3/account/whoami` with this token.
    pub async fn whoami_status(&self, access_token: &str) -> u16 {
        self.request(
            reqwest::Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(access_token),
            None,
        )
        .await
        .0
    }

    /// `GET base_url + path` with the admin token.
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        self.admin_request(reqwest::Method::GET, path, None).await
    }

    /// `PUT base_url + path` with the admin token and a JSON body.
    pub async fn admin_put(&self, path: &str, body: Value) -> (u16, Value) {
        self.admin_request(reqwest::Method::PUT, path, Some(body)).await
    }

    /// `POST base_url + path` with the admin token and a JSON body.
    pub async fn admin_post(&self, path: &str, body: Value) -> (u16, Value) {
        self.admin_request(reqwest::Method::POST, path, Some(body)).await
    }

    /// Any method with the admin token. The response body is parsed as JSON;
    /// an empty body is `Value::Null`, a non-JSON body a `Value::String`.
    pub async fn admin_request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        self.request(method, path, Some(&self.admin_token), body).await
    }

    /// Any request to this server, optionally with a bearer token and JSON body.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        access_token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base_url);
        let mut request = http_client().request(method.clone(), &url);
        if let Some(token) = access_token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => panic!("{method} {url}: {err}\n{}", log_tails(&self.data_dir, LOG_TAIL_LINES)),
        };
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .unwrap_or_else(|err| panic!("{method} {url}: reading the body: {err}"));
        (status, parse_body(&text))
    }

    /// The last `lines` lines of Synapse's log and of its stdout/stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tails(&self.data_dir, lines)
    }
}

fn is_localpart_byte(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/')
}

pub fn parse_body(text: &str) -> Value {
    if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
    }
}

/// A fresh client per call: every `#[tokio::test]` has its own runtime, and a
/// pooled connection must not outlive the runtime that opened it.
///
/// The crate's reqwest has `rustls-no-provider`; instead of installing a
/// process-wide default crypto provider (which would hide a missing install in
/// the code under test) the client gets a rustls config with an explicit
/// provider. Only plain http is used, so the empty root store never matters.
pub fn http_client() -> reqwest::Client {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("rustls: default protocol versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("building a reqwest client")
}

/// Shared-secret registration: `Ok((access_token, user_id))`.
pub async fn shared_secret_register(
    base_url: &str,
    secret: &str,
    localpart: &str,
    password: &str,
    admin: bool,
) -> Result<(String, String), String> {
    let url = format!("{base_url}/_synapse/admin/v1/register");
    let client = http_client();
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|err| format!("GET {url}: {err}"))?;
    let status = response.status().as_u16();
    let body = parse_body(&response.text().await.map_err(|e| e.to_string())?);
    let nonce = match (status, body["nonce"].as_str()) {
        (200, Some(nonce)) => nonce.to_owned(),
        _ => return Err(format!("GET {url}: {status} {body}")),
    };
    let mac = registration_mac(secret, &nonce, localpart, password, admin);
    let request = json!({
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": admin,
        "mac": mac,
    });
    let response = client
        .post(&url)
        .json(&request)
        .send()
        .await
        .map_err(|err| format!("POST {url}: {err}"))?;
    let status = response.status().as_u16();
    let body = parse_body(&response.text().await.map_err(|e| e.to_string())?);
    match (status, body["access_token"].as_str(), body["user_id"].as_str()) {
        (200, Some(token), Some(user_id)) => Ok((token.to_owned(), user_id.to_owned())),
        _ => Err(format!("POST {url}: {status} {body}")),
    }
}

/// Hex HMAC-SHA1 over `nonce\0username\0password\0admin|notadmin`.
fn registration_mac(secret: &str, nonce: &str, user: &str, password: &str, admin: bool) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret.as_bytes());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(nonce.as_bytes());
    ctx.update(b"\0");
    ctx.update(user.as_bytes());
    ctx.update(b"\0");
    ctx.update(password.as_bytes());
    ctx.update(b"\0");
    ctx.update(if admin { b"admin" as &[u8] } else { b"notadmin" });
    ctx.sign().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Startup
// ---------------------------------------------------------------------------

/// Runs the startup on a thread that stays alive for the whole process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not
/// the process: spawning from a test thread (which ends with its test) would
/// kill Synapse under the other tests. So the spawning thread parks forever and
/// only dies with the process, taking Synapse with it.
fn start_on_keeper_thread(bcrypt_rounds: u32) -> Result<SynapseServer, String> {
    run_on_keeper_thread("synapse-keeper", move || start_server(bcrypt_rounds))
        .map_err(|message| format!("synapse harness: could not start Synapse {SYNAPSE_VERSION}: {message}"))
}

/// Runs `start` on a thread that parks forever once `start` succeeded, so
/// that children it spawned with `PR_SET_PDEATHSIG` live as long as the
/// test process (see [`start_on_keeper_thread`]). A panic in `start` is an
/// `Err` with the panic's message.
pub fn run_on_keeper_thread<T: Send + 'static>(
    name: &str,
    start: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(start))
            .unwrap_or_else(|panic| Err(panic_message(panic.as_ref())));
        let ok = result.is_ok();
        let _ = tx.send(result);
        if ok {
            loop {
                std::thread::park();
            }
        }
    });
    if let Err(err) = spawned {
        return Err(format!("cannot spawn the keeper thread {name}: {err}"));
    }
    rx.recv()
        .unwrap_or_else(|_| Err(format!("keeper thread {name} ended without a result")))
}

/// The text of a panic's payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

enum StartError {
    /// Synapse could not bind the port we picked: pick another and retry.
    PortTaken(String),
    Fatal(String),
}

impl From<String> for StartError {
    fn from(message: String) -> Self {
        StartError::Fatal(message)
    }
}

fn start_server(bcrypt_rounds: u32) -> Result<SynapseServer, String> {
    let process = start_synapse_process("synapse harness", json!({ "bcrypt_rounds": bcrypt_rounds }))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
    // Admin account.
    let (admin_token, admin_user_id) = runtime
        .block_on(shared_secret_register(
            &process.base_url,
            &process.registration_shared_secret,
            ADMIN_LOCALPART,
            ADMIN_PASSWORD,
            true,
        ))
        .map_err(|message| {
            format!(
                "registering the admin failed: {message}\n{}",
                log_tails(&process.data_dir, LOG_TAIL_LINES)
            )
        })?;
    Ok(SynapseServer {
        base_url: process.base_url,
        server_name: SERVER_NAME.to_owned(),
        admin_user_id,
        admin_token,
        data_dir: process.data_dir,
        registration_shared_secret: process.registration_shared_secret,
        pid: process.pid,
    })
}

/// A Synapse process started by [`start_synapse_process`]: `/health`
/// answers, the database's background updates are done. No account exists.
#[derive(Debug)]
pub struct SynapseProcess {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub base_url: String,
    /// Data directory (database, config, logs).
    pub data_dir: PathBuf,
    /// `registration_shared_secret` from the generated config.
    pub registration_shared_secret: String,
    /// Process ID of the Synapse process.
    pub pid: u32,
}

/// Installs the venv if needed and starts one Synapse with the harness's
/// config plus `extra_overrides` (top-level keys replace the harness's own
/// overrides, as a later `-c` file does). Stopped when the test process
/// exits. Call it from a thread that outlives the tests (see
/// [`run_on_keeper_thread`]): the child dies with the thread that spawned
/// it. `harness` prefixes the progress line.
pub fn start_synapse_process(harness: &str, extra_overrides: Value) -> Result<SynapseProcess, String> {
    let started = Instant::now();
    let target = target_dir();
    let venv = ensure_venv(&target)?;
    let venv_time = started.elapsed();
    let runs = target.join("synapse-runs");
    fs::create_dir_all(&runs).map_err(|e| format!("creating {}: {e}", runs.display()))?;
    prune_old_runs(&runs);

    let mut last_error = String::new();
    for _ in 0..START_ATTEMPTS {
        match start_once(&venv, &runs, &extra_overrides) {
            Ok(server) => {
                announce(&format!(
                    "{harness}: Synapse {SYNAPSE_VERSION} ready at {} in {:.1}s \
                     (venv {:.1}s), data dir {}",
                    server.base_url,
                    started.elapsed().as_secs_f64(),
                    venv_time.as_secs_f64(),
                    server.data_dir.display()
                ));
                return Ok(server);
            }
            Err(StartError::PortTaken(message)) => last_error = message,
            Err(StartError::Fatal(message)) => return Err(message),
        }
    }
    Err(format!(
        "the port was taken by another process {START_ATTEMPTS} times in a row; last: {last_error}"
    ))
}

fn start_once(venv: &Path, runs: &Path, extra_overrides: &Value) -> Result<SynapseProcess, StartError> {
    let python = venv.join("bin").join("python");
    let n = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
    let data_dir = runs.join(format!("{}-{n}", std::process::id()));
    if data_dir.exists() {
        let _ = fs::remove_dir_all(&data_dir);
    }
    fs::create_dir_all(&data_dir).map_err(|e| format!("creating {}: {e}", data_dir.display()))?;
    let homeserver_yaml = data_dir.join("homeserver.yaml");
    let overrides_yaml = data_dir.join("overrides.yaml");

    // 1. Generate the config (SQLite, signing key, secrets, log config).
    let mut generate = Command::new(&python);
    generate
        .args([
            "-m",
            "synapse.app.homeserver",
            "--server-name",
            SERVER_NAME,
            "--config-path",
        ])
        .arg(&homeserver_yaml)
        .arg("--data-directory")
        .arg(&data_dir)
        .args(["--generate-config", "--report-stats=no"])
        .current_dir(&data_dir)
        .stdin(Stdio::null());
    die_with_parent(&mut generate, libc::SIGKILL);
    let output = generate
        .output()
        .map_err(|e| format!("running {} -m synapse.app.homeserver: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!(
            "generating the Synapse config failed ({}):\n{}",
            output.status,
            output_text(&output)
        )
        .into());
    }
    let registration_shared_secret = read_shared_secret(&homeserver_yaml)?;

    // 2. Test overrides: later `-c` files win per top-level key.
    let port = free_port()?;
    let mut overrides = json!({
        "listeners": [{
            "port": port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": false,
            "x_forwarded": false,
            "resources": [{"names": ["client"], "compress": false}],
        }],
        "trusted_key_servers": [],
        "enable_registration": false,
        "bcrypt_rounds": DEFAULT_BCRYPT_ROUNDS,
        "background_updates": {"sleep_enabled": false},
        "rc_login": {
            "address": {"per_second": 1000, "burst_count": 1000},
            "account": {"per_second": 1000, "burst_count": 1000},
            "failed_attempts": {"per_second": 1000, "burst_count": 1000},
        },
        "report_stats": false,
    });
    if let (Some(base), Some(extra)) = (overrides.as_object_mut(), extra_overrides.as_object()) {
        base.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let overrides_text = serde_yaml::to_string(&overrides).map_err(|e| e.to_string())?;
    fs::write(
        &overrides_yaml,
        format!("# Test overrides written by testkit/src/synapse.rs\n{overrides_text}"),
    )
    .map_err(|e| format!("writing {}: {e}", overrides_yaml.display()))?;

    // 3. Start it.
    let out_path = data_dir.join("synapse.out");
    let out = File::create(&out_path).map_err(|e| format!("creating {}: {e}", out_path.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut command = Command::new(&python);
    command
        .args(["-m", "synapse.app.homeserver", "-c"])
        .arg(&homeserver_yaml)
        .arg("-c")
        .arg(&overrides_yaml)
        .current_dir(&data_dir)
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    die_with_parent(&mut command, libc::SIGTERM);
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting {} -m synapse.app.homeserver: {e}", python.display()))?;

    let base_url = format!("http://127.0.0.1:{port}");
    let result = wait_until_ready(&mut child, &python, &base_url, &data_dir);
    match result {
        Ok(()) => {
            stop_at_exit(child.id());
            Ok(SynapseProcess {
                base_url,
                data_dir,
                registration_shared_secret,
                pid: child.id(),
            })
        }
        Err(error) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(error)
        }
    }
}

fn wait_until_ready(child: &mut Child, python: &Path, base_url: &str, data_dir: &Path) -> Result<(), StartError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;

    // /health
    let deadline = Instant::now() + HEALTH_TIMEOUT;
    let health_url = format!("{base_url}/health");
    loop {
        check_alive(child, data_dir)?;
        let answer = runtime.block_on(async {
            let response = http_client()
                .get(&health_url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?;
            let status = response.status().as_u16();
            Some((status, response.text().await.unwrap_or_default()))
        });
        if let Some((200, body)) = &answer
            && body.trim() == "OK"
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "GET {health_url} did not answer 200 OK within {}s (last answer: {answer:?})\n{}",
                HEALTH_TIMEOUT.as_secs(),
                log_tails(data_dir, LOG_TAIL_LINES)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Background updates (re-activating a user fails with 500 until they finish).
    let db = data_dir.join("homeserver.db");
    let deadline = Instant::now() + BACKGROUND_UPDATES_TIMEOUT;
    loop {
        check_alive(child, data_dir)?;
        let last = match pending_background_updates(python, &db) {
            Ok(0) => break,
            Ok(n) => format!("{n} pending"),
            Err(message) => message,
        };
        if Instant::now() > deadline {
            return Err(format!(
                "background updates in {} not done within {}s ({last})\n{}",
                db.display(),
                BACKGROUND_UPDATES_TIMEOUT.as_secs(),
                log_tails(data_dir, LOG_TAIL_LINES)
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }

    Ok(())
}

fn check_alive(child: &mut Child, data_dir: &Path) -> Result<(), StartError> {
    match child.try_wait() {
        Ok(None) => Ok(()),
        Ok(Some(status)) => {
            let tails = log_tails(data_dir, LOG_TAIL_LINES);
            let message = format!("Synapse exited during startup ({status})\n{tails}");
            if tails.contains("Address already in use") {
                Err(StartError::PortTaken(message))
            } else {
                Err(StartError::Fatal(message))
            }
        }
        Err(e) => Err(StartError::Fatal(format!("waiting for Synapse: {e}"))),
    }
}

fn pending_background_updates(python: &Path, db: &Path) -> Result<u64, String> {
    const SCRIPT: &str = "import pathlib, sqlite3, sys\n\
        uri = pathlib.Path(sys.argv[1]).as_uri() + '?mode=ro'\n\
        conn = sqlite3.connect(uri, uri=True, timeout=5)\n\
        print(conn.execute('SELECT COUNT(*) FROM background_updates').fetchone()[0])\n";
    let output = Command::new(python)
        .args(["-c", SCRIPT])
        .arg(db)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    if !output.status.success() {
        return Err(format!("counting background updates: {}", output_text(&output)));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .parse()
        .map_err(|_| format!("counting background updates: unexpected output {text:?}"))
}

fn read_shared_secret(homeserver_yaml: &Path) -> Result<String, String> {
    let text =
        fs::read_to_string(homeserver_yaml).map_err(|e| format!("reading {}: {e}", homeserver_yaml.display()))?;
    let config: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("parsing {}: {e}", homeserver_yaml.display()))?;
    config["registration_shared_secret"]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| format!("no registration_shared_secret in {}", homeserver_yaml.display()))
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding 127.0.0.1:0: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    drop(listener);
    Ok(port)
}

/// Removes data directories of test processes that are gone, once they are
/// older than 15 minutes (recent ones are kept for a look at their logs).
fn prune_old_runs(runs: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        if pid_alive(pid) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age > Duration::from_secs(15 * 60));
        if old {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

static RUNNING_PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static AT_EXIT: Once = Once::new();

/// Stops every Synapse this process started when the test binary exits
/// normally (libtest returns from `main` or calls `process::exit`), and
/// waits for them, so no Synapse is left running once `cargo test` returns.
/// `PR_SET_PDEATHSIG` covers the abnormal exits (killed, aborted) where
/// `atexit` handlers do not run.
fn stop_at_exit(pid: u32) {
    RUNNING_PIDS.lock().unwrap_or_else(|p| p.into_inner()).push(pid as i32);
    AT_EXIT.call_once(|| {
        // SAFETY: registers a plain `extern "C"` function.
        unsafe {
            libc::atexit(stop_synapses);
        }
    });
}

extern "C" fn stop_synapses() {
    let pids = std::mem::take(&mut *RUNNING_PIDS.lock().unwrap_or_else(|p| p.into_inner()));
    // SAFETY: plain syscalls on children we spawned and never reaped.
    unsafe {
        for &pid in &pids {
            libc::kill(pid, libc::SIGTERM);
        }
        for pid in pids {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut status = 0;
            while libc::waitpid(pid, &mut status, libc::WNOHANG) == 0 {
                if Instant::now() > deadline {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn pid_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub fn log_tails(data_dir: &Path, lines: usize) -> String {
    let mut text = String::new();
    for name in ["homeserver.log", "synapse.out"] {
        let path = data_dir.join(name);
        let body = match fs::read(&path) {
            Ok(bytes) => tail(&String::from_utf8_lossy(&bytes), lines),
            Err(e) => format!("({e})"),
        };
        text.push_str(&format!("--- last {lines} lines of {} ---\n{body}\n", path.display()));
    }
    text
}

// ---------------------------------------------------------------------------
// Installation
// ---------------------------------------------------------------------------

/// Makes sure `<target>/synapse-venv-<version>/` holds `matrix-synapse==<version>`.
fn ensure_venv(target: &Path) -> Result<PathBuf, String> {
    venv::ensure_venv(
        target,
        &venv::Venv {
            harness: "synapse harness",
            dir: &format!("synapse-venv-{SYNAPSE_VERSION}"),
            requirement: &format!("matrix-synapse=={SYNAPSE_VERSION}"),
            needs: &format!("Synapse {SYNAPSE_VERSION}"),
            python_env: "SYNAPSE_PYTHON",
            min_python: (3, 10),
            duration: "≈40 s",
        },
    )
}
