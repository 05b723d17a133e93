//! An in-process stand-in for the Matrix Authentication Service (MAS 1.22),
//! in front of a real Synapse started in MAS mode.
//!
//! CI has no MAS. The stand-in answers where the operator's logic depends
//! on MAS: `POST /oauth2/token` (`client_credentials`, 5-minute `mat_…`
//! tokens), the admin API `/api/admin/v1/…` (users, emails, upstream links
//! and providers, personal sessions), the compatibility password login
//! `/_matrix/client/v3/login`, and for Synapse `/.well-known/openid-configuration`
//! and `/oauth2/introspect`. Synapse stays real: the stand-in provisions
//! accounts on it as MAS does, through `/_synapse/mas/*` with the shared
//! secret. Behaviour follows /work/shared/mas/README.md (measured on MAS
//! 1.22.0), the OpenAPI document MAS serves, and Synapse's MAS client code;
//! guesses are marked `// Guess:` in server.rs.
//!
//! Knobs (on [`MasStandIn`]), for what only a stand-in can make happen:
//! - [`MasStandIn::expire_admin_tokens`] / [`MasStandIn::expire_admin_token`]:
//!   admin tokens expire now instead of after 300 s (admin API: 401);
//! - [`MasStandIn::set_synapse_job_delay`] / [`MasStandIn::set_synapse_job_delay_for`]:
//!   MAS's Synapse jobs run late, in the background (default: before the
//!   admin API answers); [`MasStandIn::wait_for_synapse_jobs`];
//! - [`MasStandIn::set_down`] (connections dropped) and
//!   [`MasStandIn::set_unavailable`] (503);
//! - [`MasStandIn::requests`] / [`MasStandIn::clear_requests`]: the request
//!   log (no bodies, no secrets);
//! - [`MasStandIn::synapse_job_errors`]: Synapse calls that failed;
//! - [`MasStandIn::issue_compatibility_token`].
//!
//! [`mas_standin()`] starts one stand-in and its Synapse per test binary
//! (the Synapse is separate from [`super::synapse()`]'s, same venv). Test
//! code should go through [`MasTarget`] (HTTP only), so the same suite can
//! run against a real MAS with [`MasTarget::from_env`]; the knobs on
//! [`MasStandIn`] are for tests of failure modes only the stand-in can make.

mod client;
mod server;
pub mod util;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

#[allow(unused_imports)] // not every test binary uses every item
pub use client::{MasAdminClient, MasLink, MasTarget, MasUser};
#[allow(unused_imports)]
pub use server::{
    ADMIN_TOKEN_LIFETIME_SECS, MAS_VERSION, MIN_PASSWORD_CLASSES, MIN_PASSWORD_LEN, MasRequest, OAuthClient,
    SCOPE_MAS_ADMIN, SCOPE_MATRIX_API, SCOPE_SYNAPSE_ADMIN, STRONG_PASSWORD, UpstreamProvider, WEAK_PASSWORD,
    password_is_strong, username_valid,
};
use server::{Shared, State};

use super::synapse::{SERVER_NAME, SynapseProcess, log_tails, run_on_keeper_thread, start_synapse_process};
use super::venv::LOG_TAIL_LINES;

/// The localpart of the stand-in's startup admin (MAS `admin: true`), whose
/// compatibility token is the Synapse admin token.
pub const ADMIN_LOCALPART: &str = "mas-admin";
/// The device of that compatibility token.
pub const ADMIN_DEVICE_ID: &str = "MASADMINDEVICE";
/// `human_name` of the enabled upstream provider.
pub const PROVIDER_NAME: &str = "Keycloak";
/// `human_name` of a second provider, disabled (for `filter[enabled]`).
pub const DISABLED_PROVIDER_NAME: &str = "Legacy LDAP bridge";

/// The stand-in and its MAS-mode Synapse.
pub struct MasStandIn {
    shared: Arc<Shared>,
    /// The admin client (`policy.data.admin_clients`).
    admin_client: OAuthClient,
    /// A client MAS knows but not as an admin client.
    other_client: OAuthClient,
    synapse: SynapseProcess,
    synapse_admin_token: String,
    admin_user_id: String,
    provider_id: String,
    disabled_provider_id: String,
}

impl std::fmt::Debug for MasStandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasStandIn")
            .field("mas_url", &self.url())
            .field("synapse_url", &self.synapse.base_url)
            .finish_non_exhaustive()
    }
}

/// The target of a MAS test suite: a real MAS when `MAS_URL` is set (see
/// [`MasTarget::from_env`]), else the stand-in (started on first use).
pub fn mas_target() -> MasTarget {
    MasTarget::from_env().unwrap_or_else(|| mas_standin().target())
}

static STANDIN: OnceLock<Result<MasStandIn, String>> = OnceLock::new();

/// The stand-in of this test binary, with its MAS-mode Synapse, started
/// (blocking) on first use. Safe from plain `#[test]`s and inside any tokio
/// runtime. Panics with the reason if either cannot start (and every later
/// call panics with the same message).
pub fn mas_standin() -> &'static MasStandIn {
    match STANDIN.get_or_init(|| {
        run_on_keeper_thread("mas-standin-keeper", start)
            .map_err(|message| format!("MAS stand-in: could not start: {message}"))
    }) {
        Ok(standin) => standin,
        Err(message) => panic!("{message}"),
    }
}

fn start() -> Result<MasStandIn, String> {
    let started = Instant::now();
    // 1. Bind the stand-in first: Synapse's config needs its URL.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let admin_client = OAuthClient {
        client_id: util::ulid(),
        client_secret: util::random_alnum(32),
        admin: true,
    };
    let other_client = OAuthClient {
        client_id: util::ulid(),
        client_secret: util::random_alnum(32),
        admin: false,
    };
    let now = util::now_ms();
    let providers = vec![
        UpstreamProvider {
            id: util::ulid(),
            issuer: Some("https://keycloak.example.test/realms/matrix".to_owned()),
            human_name: Some(PROVIDER_NAME.to_owned()),
            brand_name: None,
            created_ms: now,
            disabled_ms: None,
        },
        UpstreamProvider {
            id: util::ulid(),
            issuer: Some("https://ldap-bridge.example.test".to_owned()),
            human_name: Some(DISABLED_PROVIDER_NAME.to_owned()),
            brand_name: None,
            created_ms: now,
            disabled_ms: Some(now),
        },
    ];
    let (provider_id, disabled_provider_id) = (providers[0].id.clone(), providers[1].id.clone());
    let shared = Arc::new(Shared {
        state: Mutex::new(State::with_providers(providers)),
        clients: Mutex::new(vec![admin_client.clone(), other_client.clone()]),
        shared_secret: util::random_alnum(40),
        server_name: SERVER_NAME.to_owned(),
        addr,
        down: AtomicBool::new(false),
        unavailable: AtomicBool::new(false),
        pending_jobs: AtomicUsize::new(0),
    });
    let serving = shared.clone();
    std::thread::Builder::new()
        .name(format!("mas-standin-{}", addr.port()))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the MAS stand-in");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                server::accept(listener, serving).await;
            });
        })
        .map_err(|e| format!("spawning the stand-in's thread: {e}"))?;

    // 2. Synapse, delegating to the stand-in.
    let synapse = start_synapse_process(
        "MAS stand-in",
        json!({
            "matrix_authentication_service": {
                "enabled": true,
                "endpoint": shared.base_url(),
                "secret": shared.shared_secret,
            },
            "password_config": {"enabled": false},
            "enable_registration": false,
        }),
    )?;
    shared.set_synapse(synapse.base_url.clone());

    // 3. The startup admin and its compatibility token, as `mas-cli manage
    // issue-compatibility-token mas-admin MASADMINDEVICE
    // --yes-i-want-to-grant-synapse-admin-privileges` makes.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a tokio runtime: {e}"))?;
    let data_dir = synapse.data_dir.clone();
    let fail = |message: String| format!("{message}\n{}", log_tails(&data_dir, LOG_TAIL_LINES));
    let (admin_user_id, synapse_admin_token) = runtime.block_on(async {
        let user = shared
            .create_user(ADMIN_LOCALPART, None, None, false)
            .await
            .map_err(|_| fail(format!("creating {ADMIN_LOCALPART} failed: {:?}", shared.job_errors())))?;
        shared.set_admin(&user.id, true);
        let (token, _) = shared
            .issue_compat_token(&user.id, Some(ADMIN_DEVICE_ID.to_owned()), None, true)
            .await
            .map_err(fail)?;
        Ok::<_, String>((user.id, token))
    })?;
    if let Some(errors) = Some(shared.job_errors()).filter(|e| !e.is_empty()) {
        return Err(fail(format!("Synapse refused the stand-in's provisioning: {errors:?}")));
    }
    let standin = MasStandIn {
        shared,
        admin_client,
        other_client,
        synapse,
        synapse_admin_token,
        admin_user_id,
        provider_id,
        disabled_provider_id,
    };
    // 4. Synapse must accept the compatibility token as an admin token.
    let check = runtime.block_on(
        standin
            .target()
            .synapse_admin_get(&format!("/_synapse/admin/v2/users/@{ADMIN_LOCALPART}:{SERVER_NAME}")),
    );
    if check.0 != 200 {
        return Err(fail(format!(
            "Synapse refused the compatibility admin token: {check:?}"
        )));
    }
    super::venv::announce(&format!(
        "MAS stand-in: MAS {MAS_VERSION} stand-in at {} with Synapse at {} ready in {:.1}s",
        standin.url(),
        standin.synapse.base_url,
        started.elapsed().as_secs_f64()
    ));
    Ok(standin)
}

impl MasStandIn {
    /// The personal sessions of the MAS user `actor`: `(human_name, revoked)`.
    pub fn personal_sessions_of(&self, actor: &str) -> Vec<(String, bool)> {
        self.shared.personal_sessions_of(actor)
    }

    /// What a MAS test suite codes against.
    pub fn target(&self) -> MasTarget {
        let provider = self.shared.lock().providers[0].clone();
        MasTarget {
            mas_url: self.url(),
            client_id: self.admin_client.client_id.clone(),
            client_secret: self.admin_client.client_secret.clone(),
            synapse_url: self.synapse.base_url.clone(),
            synapse_admin_token: self.synapse_admin_token.clone(),
            server_name: SERVER_NAME.to_owned(),
            upstream_provider_id: provider.id,
            upstream_provider_name: provider.human_name.unwrap_or_default(),
            weak_password: WEAK_PASSWORD.to_owned(),
        }
    }

    /// `http://127.0.0.1:PORT` of the stand-in.
    pub fn url(&self) -> String {
        self.shared.base_url()
    }

    /// `http://127.0.0.1:PORT` of its Synapse.
    pub fn synapse_url(&self) -> &str {
        &self.synapse.base_url
    }

    /// ULID of the startup admin (`mas-admin`, MAS `admin: true`).
    pub fn admin_user_id(&self) -> &str {
        &self.admin_user_id
    }

    /// A client MAS knows that is not an admin client: its
    /// `client_credentials` request for `urn:mas:admin` gets 403.
    pub fn non_admin_client(&self) -> (String, String) {
        (
            self.other_client.client_id.clone(),
            self.other_client.client_secret.clone(),
        )
    }

    /// ULID of the disabled upstream provider.
    pub fn disabled_provider_id(&self) -> &str {
        &self.disabled_provider_id
    }

    /// The enabled provider's ULID (also in [`MasTarget`]).
    pub fn provider_id(&self) -> &str {
        &self.provider_id
    }

    /// Makes every admin token issued so far expired at once: the admin
    /// API answers 401 for them, introspection calls them inactive. Tokens
    /// issued afterwards live the usual 300 s.
    pub fn expire_admin_tokens(&self) {
        self.shared.expire_admin_tokens();
    }

    /// Expires one admin token (as if its 300 s were over), leaving other
    /// tests' tokens alone. Panics if `token` is no admin token of this
    /// stand-in.
    pub fn expire_admin_token(&self, token: &str) {
        assert!(
            self.shared.expire_admin_token(token),
            "expire_admin_token: not an admin token of the stand-in"
        );
    }

    /// Every request received, oldest first.
    pub fn requests(&self) -> Vec<MasRequest> {
        self.shared.requests()
    }

    pub fn clear_requests(&self) {
        self.shared.clear_requests();
    }

    /// While down, connections are dropped unanswered (Synapse's
    /// introspection too, so Synapse answers 503 for MAS tokens it has not
    /// cached).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// While set, every request is answered 503 `Service Unavailable`
    /// (plain text, as a reverse proxy in front of a dead MAS would).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// MAS runs its Synapse calls as queued jobs. `None` (the default): the
    /// stand-in runs them before the admin API answers (Synapse follows "at
    /// once"). `Some(d)`: each request's jobs run in the background `d`
    /// later, so e.g. a repeated deactivate's `delete_user` can land after
    /// a later reactivate, as measured. See [`Self::wait_for_synapse_jobs`].
    pub fn set_synapse_job_delay(&self, delay: Option<Duration>) {
        self.shared.set_job_delay(delay);
    }

    /// As [`Self::set_synapse_job_delay`], for the jobs of one user only
    /// (`Some(delay)` or `None` = at once), so tests running in parallel
    /// are not affected. [`Self::clear_synapse_job_delay_for`] returns the
    /// user to the global setting.
    pub fn set_synapse_job_delay_for(&self, username: &str, delay: Option<Duration>) {
        self.shared.set_user_job_delay(username, delay);
    }

    pub fn clear_synapse_job_delay_for(&self, username: &str) {
        self.shared.clear_user_job_delay(username);
    }

    /// Waits until no delayed Synapse job is pending (panics after `timeout`).
    pub async fn wait_for_synapse_jobs(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.shared.pending_jobs.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < deadline,
                "Synapse jobs still pending after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Synapse calls that failed (MAS would retry them), as text without
    /// secrets. Tests can assert it is empty.
    pub fn synapse_job_errors(&self) -> Vec<String> {
        self.shared.job_errors()
    }

    /// A compatibility token for `localpart` (as `mas-cli manage
    /// issue-compatibility-token`), optionally with Synapse admin rights.
    /// Returns `(access_token, device_id)`.
    pub async fn issue_compatibility_token(&self, localpart: &str, synapse_admin: bool) -> (String, String) {
        let user_id = self
            .shared
            .lock()
            .user_by_username(localpart)
            .map(|u| u.id.clone())
            .unwrap_or_else(|| panic!("issue_compatibility_token: no MAS user {localpart:?}"));
        self.shared
            .issue_compat_token(&user_id, None, None, synapse_admin)
            .await
            .unwrap_or_else(|message| panic!("issue_compatibility_token({localpart:?}): {message}"))
    }
}
