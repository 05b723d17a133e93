//! MatrixAccessToken: a token of a managed account, issued into a Secret
//! the bot's pods mount, rotated before it expires (or on the
//! `matrix-operator.io/rotate` annotation) and revoked when it goes.
//!
//! The Secret is the record of what was issued: the token, and in its
//! annotations when it was issued, when it expires, its MAS session and a
//! replaced token still in its grace period (whose value, on Synapse, stays
//! in the key `previousAccessToken` until it is revoked: revoking it needs
//! it). Writing the Secret is the one step that commits an issue; a token
//! the Secret could not take is revoked at once. The status mirrors the
//! Secret, without any token. A finalizer on the Secret keeps it (and so
//! the tokens to revoke) until they are revoked, a namespace deletion
//! included.
//!
//! How each server issues and revokes (see the backends): Synapse's admin
//! login API (no device) or the client login with the managed password (a
//! device), ended with `/logout` using the token itself; MAS's personal
//! sessions, ended by revoking the session.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, instrument, warn};

use super::homeserver::ready_status;
use super::{Context, Error, MANAGER, SKIP_CLEANUP, api_for, contained, log_outcome, patch_status, watch};
use crate::api::{
    Homeserver, MatrixAccessToken, MatrixAccessTokenStatus, MatrixUser, Ready, RetiringToken, STALLED, Standing,
    set_condition,
};
use crate::backend::mas::{MasBackend, PersonalSession, bot_scope, is_id};
use crate::backend::{Backend, ErrorClass};
use crate::secret::SecretString;
use crate::synapse::{ErrCode, SynapseError, UserId};

/// Put on every MatrixAccessToken so its tokens are revoked before it goes.
pub const TOKEN_FINALIZER: &str = "matrix-operator.io/revoke-token";
/// Put on the token's Secret until the tokens in it are revoked.
pub const TOKEN_SECRET_FINALIZER: &str = "matrix-operator.io/access-token";
/// A new value rotates the token.
pub const ROTATE_ANNOTATION: &str = "matrix-operator.io/rotate";

/// How long a replaced token keeps working, unless the spec says: the
/// kubelet brings a changed Secret into mounted volumes within about a
/// minute or two (its sync period plus its cache), a Deployment restarted
/// on the change rolls over within minutes, and a MAS-mode Synapse keeps
/// accepting a revoked token for up to 2 minutes anyway (its introspection
/// cache). Ten minutes covers that with room, and keeps a leaked old token
/// short-lived.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(600);

/// How old a token must be before the operator replaces it on its own
/// (dead, another's, due for renewal). A token refused, or due, moments
/// after it was issued says the server will do the same to the next one (a
/// user locked behind the operator's back, a client API that does not take
/// the server's tokens, an expiry shorter than `renewBefore`): issuing at
/// once would loop, each Secret write triggering the next pass.
pub const MIN_TOKEN_AGE: Duration = Duration::from_secs(60);

// The Secret's keys, for the bot.
const KEY_TOKEN: &str = "accessToken";
const KEY_USER_ID: &str = "userId";
const KEY_DEVICE_ID: &str = "deviceId";
const KEY_URL: &str = "homeserverUrl";
/// A replaced token in its grace period (Synapse), to revoke it.
const KEY_PREVIOUS: &str = "previousAccessToken";

// The Secret's annotations: the record of what was issued (no secret).
const ANN_ISSUED_AT: &str = "matrix-operator.io/issued-at";
const ANN_EXPIRES_AT: &str = "matrix-operator.io/expires-at";
const ANN_SESSION: &str = "matrix-operator.io/session-id";
const ANN_ROTATION: &str = "matrix-operator.io/rotation";
const ANN_HOMESERVER: &str = "matrix-operator.io/homeserver";
const ANN_VALID_FOR: &str = "matrix-operator.io/valid-for";
const ANN_PREVIOUS_REVOKE_AT: &str = "matrix-operator.io/previous-revoke-at";
const ANN_PREVIOUS_SESSION: &str = "matrix-operator.io/previous-session-id";
const ANN_PREVIOUS_DEVICE: &str = "matrix-operator.io/previous-device-id";

#[instrument(skip_all, fields(token = %token.name_any(), namespace = token.namespace().unwrap_or_default()))]
pub async fn reconcile_token(token: Arc<MatrixAccessToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let api: Api<MatrixAccessToken> = Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    let result = finalizer(&api, TOKEN_FINALIZER, token, |event| async {
        match event {
            Finalizer::Apply(token) => apply(token, &ctx).await,
            Finalizer::Cleanup(token) => cleanup(token, &ctx).await,
        }
    })
    .await
    .map_err(Error::from);
    let outcome = if result.is_ok() { "success" } else { "error" };
    ctx.metrics.reconciled("MatrixAccessToken", outcome, started.elapsed());
    result
}

pub fn error_policy(token: Arc<MatrixAccessToken>, error: &Error, ctx: Arc<Context>) -> Action {
    Action::requeue(ctx.backoff(token.as_ref(), error))
}

/// A replaced token in its grace period, as the Secret records it.
#[derive(Clone, Debug)]
struct Previous {
    token: Option<SecretString>,
    session_id: Option<String>,
    device_id: Option<String>,
    revoke_at: Timestamp,
}

/// What the Secret holds: the token issued last and its record.
#[derive(Clone, Debug)]
struct Held {
    token: SecretString,
    user_id: String,
    device_id: Option<String>,
    issued_at: Option<Timestamp>,
    expires_at: Option<Timestamp>,
    session_id: Option<String>,
    rotation: Option<String>,
    homeserver: Option<String>,
    valid_for: Option<String>,
    previous: Option<Previous>,
}

/// The Secret as read: absent, another's, or this resource's (with what
/// it holds, if anything).
enum SecretState {
    Absent,
    Foreign,
    Owned {
        secret: Box<Secret>,
        held: Option<Box<Held>>,
    },
}

fn value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|ByteString(b)| String::from_utf8(b.clone()).ok())
        .filter(|v| !v.is_empty())
}

fn annotation(secret: &Secret, key: &str) -> Option<String> {
    secret.annotations().get(key).cloned().filter(|v| !v.is_empty())
}

fn timestamp(secret: &Secret, key: &str) -> Option<Timestamp> {
    annotation(secret, key).and_then(|v| v.parse().ok())
}

fn held_in(secret: &Secret) -> Option<Held> {
    let previous = timestamp(secret, ANN_PREVIOUS_REVOKE_AT).map(|revoke_at| Previous {
        token: value(secret, KEY_PREVIOUS).map(SecretString::new),
        session_id: annotation(secret, ANN_PREVIOUS_SESSION),
        device_id: annotation(secret, ANN_PREVIOUS_DEVICE),
        revoke_at,
    });
    match (value(secret, KEY_TOKEN), value(secret, KEY_USER_ID)) {
        (Some(token), Some(user_id)) => Some(Held {
            token: SecretString::new(token),
            user_id,
            device_id: value(secret, KEY_DEVICE_ID),
            issued_at: timestamp(secret, ANN_ISSUED_AT),
            expires_at: timestamp(secret, ANN_EXPIRES_AT),
            session_id: annotation(secret, ANN_SESSION),
            rotation: annotation(secret, ANN_ROTATION),
            homeserver: annotation(secret, ANN_HOMESERVER),
            valid_for: annotation(secret, ANN_VALID_FOR),
            previous,
        }),
        // Only a replaced token left (its successor was revoked): keep
        // it to revoke.
        _ => previous.map(|p| Held {
            token: SecretString::new(String::new()),
            user_id: String::new(),
            device_id: None,
            issued_at: None,
            expires_at: None,
            session_id: None,
            rotation: None,
            homeserver: annotation(secret, ANN_HOMESERVER),
            valid_for: None,
            previous: Some(p),
        }),
    }
}

async fn read_secret(ctx: &Context, token: &MatrixAccessToken) -> Result<SecretState, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    let Some(secret) = api.get_opt(&token.secret_name()).await? else {
        return Ok(SecretState::Absent);
    };
    let owned = token
        .uid()
        .is_some_and(|uid| secret.owner_references().iter().any(|o| o.uid == uid));
    if !owned {
        return Ok(SecretState::Foreign);
    }
    let mut held = held_in(&secret);
    if let Some(h) = held.as_mut() {
        trust_status_sessions(token, h);
    }
    let held = held.map(Box::new);
    Ok(SecretState::Owned {
        secret: Box::new(secret),
        held,
    })
}

/// The MAS sessions to act on are those the status records (only the
/// operator writes it): anyone who may patch Secrets in the namespace may
/// write the Secret's annotations. An annotation is only a hint, taken when
/// the status has none (its write after the Secret's was lost), and every
/// session is checked with MAS before it is revoked ([`revoke_session`]).
fn trust_status_sessions(token: &MatrixAccessToken, h: &mut Held) {
    let status = token.status.as_ref();
    let valid = |id: Option<String>| id.filter(|id| is_id(id));
    if let Some(id) = valid(status.and_then(|s| s.session_id.clone())) {
        h.session_id = Some(id);
    }
    h.session_id = valid(h.session_id.take());
    if let Some(p) = h.previous.as_mut() {
        if let Some(id) = valid(
            status
                .and_then(|s| s.retiring.as_ref())
                .and_then(|r| r.session_id.clone()),
        ) {
            p.session_id = Some(id);
        }
        p.session_id = valid(p.session_id.take());
    }
}

/// What a MAS session of this MatrixAccessToken looks like: its name, and
/// the MAS user it acts for when known.
struct Expected {
    human_name: String,
    actor: Option<String>,
}

impl Expected {
    fn of(token: &MatrixAccessToken, actor: Option<String>) -> Self {
        Self {
            human_name: session_name(token),
            actor,
        }
    }

    fn matches(&self, s: &PersonalSession) -> bool {
        s.human_name == self.human_name && self.actor.as_ref().is_none_or(|a| *a == s.actor_user_id)
    }
}

/// The name of the MAS personal sessions of `token`.
fn session_name(token: &MatrixAccessToken) -> String {
    format!(
        "matrix-user-operator: MatrixAccessToken {}/{}",
        token.namespace().unwrap_or_default(),
        token.name_any()
    )
}

/// Revokes the MAS session `id` if it is this MatrixAccessToken's (and
/// active): another's, named in a tampered Secret, is left alone.
async fn revoke_session(mas: &MasBackend, id: &str, expected: &Expected) -> Result<(), Error> {
    if !is_id(id) {
        return Ok(());
    }
    match mas.mas().personal_session(id).await? {
        None => {}
        Some(s) if !expected.matches(&s) => {
            warn!(
                session = id,
                "not revoking a MAS session the record names: it is not this MatrixAccessToken's"
            );
        }
        Some(s) if s.revoked_at.is_some() => {}
        Some(_) => {
            mas.mas().revoke_personal_session(id).await?;
        }
    }
    Ok(())
}

/// The spec's durations, checked.
struct Lifetimes {
    valid_for: Option<Duration>,
    renew_before: Duration,
    grace: Duration,
}

fn lifetimes(token: &MatrixAccessToken) -> Result<Lifetimes, Error> {
    let parse = |field: &str, v: &Option<String>| -> Result<Option<Duration>, Error> {
        v.as_deref()
            .map(|s| {
                humantime::parse_duration(s)
                    .map_err(|e| Error::InvalidSpec(format!("spec.{field} {s:?} is not a duration: {e}")))
            })
            .transpose()
    };
    let valid_for = parse("validFor", &token.spec.valid_for)?;
    let renew_before = parse("renewBefore", &token.spec.renew_before)?;
    let grace = parse("rotationGracePeriod", &token.spec.rotation_grace_period)?.unwrap_or(DEFAULT_GRACE_PERIOD);
    if valid_for.is_some_and(|v| v < Duration::from_secs(60)) {
        return Err(Error::InvalidSpec("spec.validFor must be at least 1m".into()));
    }
    // MAS takes the lifetime in seconds as a 32-bit number.
    if valid_for.is_some_and(|v| v.as_secs() > u64::from(u32::MAX)) {
        return Err(Error::InvalidSpec(
            "spec.validFor is longer than MAS accepts (136 years)".into(),
        ));
    }
    let renew_before = match (valid_for, renew_before) {
        (None, Some(_)) => return Err(Error::InvalidSpec("spec.renewBefore needs spec.validFor".into())),
        (Some(v), Some(r)) if r >= v => {
            return Err(Error::InvalidSpec(
                "spec.renewBefore must be shorter than spec.validFor".into(),
            ));
        }
        (Some(v), None) => v / 3,
        (_, r) => r.unwrap_or_default(),
    };
    Ok(Lifetimes {
        valid_for,
        renew_before,
        grace,
    })
}

/// The MatrixUser's account, if a token may be issued for it now.
struct Account {
    user_id: UserId,
    /// MAS's ID of the account (MAS only).
    mas_user_id: Option<String>,
    user: Arc<MatrixUser>,
}

/// Why no token may be held for the MatrixUser: revoke what is held.
enum Gone {
    NotFound,
    Deactivated,
}

async fn matrix_user(ctx: &Context, token: &MatrixAccessToken) -> Result<Option<MatrixUser>, Error> {
    let api: Api<MatrixUser> = Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    Ok(api.get_opt(&token.spec.user_ref.name).await?)
}

/// Whether a token may be issued for `user` now: `Err(Ok(gone))` when
/// tokens held must be revoked, `Err(Err(e))` when it must wait.
fn account_of(user: MatrixUser) -> Result<Account, Result<Gone, Error>> {
    let name = user.name_any();
    if user.meta().deletion_timestamp.is_some() {
        return Err(Ok(Gone::NotFound));
    }
    if user.spec.deactivated == Some(true) {
        return Err(Ok(Gone::Deactivated));
    }
    if user.spec.locked == Some(true) {
        return Err(Err(Error::UserLocked { name }));
    }
    let status = user.status.clone().unwrap_or_default();
    let ready = crate::api::ready_condition(&status.conditions);
    let not_ready = |state: String, waiting: bool| {
        Err(Err(Error::UserNotReady {
            name: name.clone(),
            state,
            waiting,
        }))
    };
    let Some(user_id) = status.user_id.clone() else {
        return not_ready("it owns no account yet (status.userId is empty)".into(), true);
    };
    match ready {
        Some(c) if c.status == "True" && status.observed_generation == user.metadata.generation => {}
        Some(c) if c.status == "True" => return not_ready("its latest spec is not applied yet".into(), true),
        Some(c) => {
            let stalled = crate::api::is_true(&status.conditions, STALLED);
            return not_ready(format!("{}: {}", c.reason, c.message), !stalled);
        }
        None => return not_ready("not reconciled yet".into(), true),
    }
    let parsed = user_id
        .strip_prefix('@')
        .and_then(|rest| rest.split_once(':'))
        .map(|(localpart, server)| UserId::new(localpart, server));
    let user_id = match parsed {
        Some(Ok(id)) => id,
        Some(Err(e)) => return Err(Err(Error::InvalidUserId(e))),
        None => return not_ready(format!("its status.userId {user_id:?} is no Matrix ID"), false),
    };
    Ok(Account {
        user_id,
        mas_user_id: status.mas_user_id.clone(),
        user: Arc::new(user),
    })
}

/// The backend of the Homeserver `name` and its URL, once it is ready.
async fn backend_of(ctx: &Context, namespace: &str, name: &str) -> Result<(Backend, Arc<Homeserver>), Error> {
    let hs = ctx.homeserver(namespace, name).await?;
    ready_status(&hs).map_err(|not_ready| Error::HomeserverNotReady {
        name: hs.name_any(),
        message: not_ready.message,
        waiting: not_ready.waiting,
    })?;
    Ok((ctx.backend(&hs).await?, hs))
}

/// What a pass did, for the status and the Events.
#[derive(Default)]
struct Outcome {
    /// What the Secret holds at the end of the pass.
    held: Option<Held>,
    homeserver: Option<String>,
    /// Events to publish: (reason, note).
    notes: Vec<(&'static str, String)>,
    /// When to look again at the latest (a renewal, a grace period's end).
    next: Option<Timestamp>,
}

async fn apply(token: Arc<MatrixAccessToken>, ctx: &Context) -> Result<Action, Error> {
    let mut outcome = Outcome::default();
    let result = pass(&token, ctx, &mut outcome).await;
    let ready = match &result {
        Ok(()) => {
            let held = outcome.held.as_ref();
            let what = held.map(describe).unwrap_or_default();
            Ready::ok("Issued", format!("{what} is in Secret {:?}", token.secret_name()))
        }
        Err(e) => e.condition(e.to_string()),
    };
    let old = token.status.clone().unwrap_or_default();
    let status = status_after(&old, &outcome, &ready, token.metadata.generation);
    if status != old {
        let api: Api<MatrixAccessToken> = Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
        patch_status(&api, &token.name_any(), &status).await?;
    }
    for (reason, note) in outcome.notes.drain(..) {
        info!(reason, note, "token");
        ctx.publish(token.as_ref(), EventType::Normal, reason, note).await;
    }
    publish_failure(ctx, &token, &old, &ready).await;
    match result {
        Ok(()) => {
            ctx.reset_backoff(token.as_ref());
            let mut action = ctx.resync(token.as_ref());
            if let Some(next) = outcome.next {
                let wait = next.duration_since(Timestamp::now());
                let wait = Duration::try_from(wait).unwrap_or_default().max(Duration::from_secs(1));
                action = Action::requeue(wait.min(ctx.config.resync_interval));
            }
            Ok(action)
        }
        Err(e) if e.standing() == Standing::Reconciling => Err(e),
        Err(_) => {
            ctx.reset_backoff(token.as_ref());
            Ok(ctx.resync(token.as_ref()))
        }
    }
}

/// `@bot:example.org (device BOT1)`.
fn describe(held: &Held) -> String {
    match &held.device_id {
        Some(d) => format!("a token of {} (device {d})", held.user_id),
        None => format!("a token of {}", held.user_id),
    }
}

async fn publish_failure(ctx: &Context, token: &MatrixAccessToken, old: &MatrixAccessTokenStatus, ready: &Ready) {
    if ready.is_ready() || ready.reason == "HomeserverNotReady" || ready.reason == "UserNotReady" {
        return;
    }
    let before = crate::api::ready_condition(&old.conditions).map(|c| (c.status.as_str(), c.reason.as_str()));
    if before != Some(("False", ready.reason)) {
        warn!(reason = ready.reason, message = %ready.message, "token not ready");
        ctx.publish(token, EventType::Warning, ready.reason, ready.message.clone())
            .await;
    }
}

/// A time for the status, which keeps whole seconds (as the API server
/// serialises it): otherwise every pass would find it changed.
fn time(t: Timestamp) -> Time {
    Time(Timestamp::from_second(t.as_second()).unwrap_or(t))
}

fn status_after(
    base: &MatrixAccessTokenStatus,
    outcome: &Outcome,
    ready: &Ready,
    generation: Option<i64>,
) -> MatrixAccessTokenStatus {
    let mut status = base.clone();
    status.observed_generation = generation;
    let held = outcome.held.as_ref().filter(|h| !h.token.expose().is_empty());
    status.user_id = held.map(|h| h.user_id.clone());
    status.device_id = held.and_then(|h| h.device_id.clone());
    status.issued_at = held.and_then(|h| h.issued_at).map(time);
    status.expires_at = held.and_then(|h| h.expires_at).map(time);
    status.session_id = held.and_then(|h| h.session_id.clone());
    status.rotation = held.and_then(|h| h.rotation.clone());
    status.homeserver = outcome
        .held
        .as_ref()
        .and_then(|h| h.homeserver.clone())
        .or_else(|| outcome.homeserver.clone());
    status.retiring = outcome
        .held
        .as_ref()
        .and_then(|h| h.previous.as_ref())
        .map(|p| RetiringToken {
            revoke_at: time(p.revoke_at),
            session_id: p.session_id.clone(),
            device_id: p.device_id.clone(),
        });
    set_condition(&mut status.conditions, ready, generation, Time(Timestamp::now()));
    status
}

/// One pass: revoke what must go, issue or rotate what must come, and
/// record it all in the Secret (`out.held`).
async fn pass(token: &MatrixAccessToken, ctx: &Context, out: &mut Outcome) -> Result<(), Error> {
    let ns = token.namespace().unwrap_or_default();
    let mut expected = Expected::of(token, None);
    let (secret, mut held) = match read_secret(ctx, token).await? {
        SecretState::Foreign => {
            return Err(Error::TokenSecretNotOwned {
                name: token.secret_name(),
            });
        }
        SecretState::Absent => (None, None),
        SecretState::Owned { secret, held } => (Some(secret), held.map(|h| *h)),
    };
    out.held = held.clone();
    // Deleted by hand: revoke what it holds and let it go; a new one comes
    // at the next pass.
    if let Some(s) = &secret
        && s.meta().deletion_timestamp.is_some()
    {
        if let Some(h) = &held {
            revoke_held(ctx, &ns, h, &expected, out).await?;
        }
        release_secret(ctx, s).await?;
        out.held = None;
        out.next = Some(Timestamp::now());
        return Ok(());
    }
    let user = match matrix_user(ctx, token).await? {
        Some(user) => account_of(user),
        None => Err(Ok(Gone::NotFound)),
    };
    let account = match user {
        Ok(account) => account,
        Err(Ok(gone)) => {
            if let (Some(s), Some(h)) = (&secret, &held) {
                revoke_held(ctx, &ns, h, &expected, out).await?;
                clear_secret(ctx, s).await?;
                out.held = None;
            }
            let name = token.spec.user_ref.name.clone();
            return Err(match gone {
                Gone::NotFound => Error::UserNotFound { name },
                Gone::Deactivated => Error::UserDeactivated { name },
            });
        }
        Err(Err(e)) => return Err(e),
    };
    expected.actor = account.mas_user_id.clone();
    let lifetimes = lifetimes(token)?;
    out.homeserver = Some(account.user.spec.homeserver_ref.name.clone());
    let (backend, hs) = backend_of(ctx, &ns, &account.user.spec.homeserver_ref.name).await?;
    check_spec(token, &backend, &account)?;
    check_device_unshared(ctx, token, &backend).await?;
    let issuer = Issuer {
        ctx,
        token,
        ns,
        expected,
        account,
        backend,
        hs,
        lifetimes,
    };

    issuer.drop_misplaced(secret.as_deref(), &mut held, out).await?;
    let now = Timestamp::now();
    if issuer
        .retire_previous(secret.as_deref(), held.as_mut(), now, out)
        .await?
    {
        return Ok(());
    }
    let current = held.as_ref().filter(|h| !h.token.expose().is_empty());
    let decision = issuer.look_at(current, now).await?;
    too_young(&decision, current, now)?;
    let Some((why, keep_old)) = decision.replacement() else {
        renew_at(out, &issuer.lifetimes);
        return Ok(());
    };
    if keep_old {
        issuer.check_rotation(current, why)?;
    }
    issuer.replace(secret, held.as_ref(), (why, keep_old), now, out).await
}

/// What the steps of a pass work with once the account and its Homeserver
/// are known.
struct Issuer<'a> {
    ctx: &'a Context,
    token: &'a MatrixAccessToken,
    ns: String,
    expected: Expected,
    account: Account,
    backend: Backend,
    hs: Arc<Homeserver>,
    lifetimes: Lifetimes,
}

impl Issuer<'_> {
    fn homeserver_name(&self) -> &str {
        &self.account.user.spec.homeserver_ref.name
    }

    /// A token held for another account or Homeserver (the MatrixUser was
    /// replaced) goes at once.
    async fn drop_misplaced(
        &self,
        secret: Option<&Secret>,
        held: &mut Option<Held>,
        out: &mut Outcome,
    ) -> Result<(), Error> {
        if let Some(h) = held.as_ref()
            && (h.user_id != self.account.user_id.as_str() || h.homeserver.as_deref() != Some(self.homeserver_name()))
            && !h.token.expose().is_empty()
        {
            revoke_held(self.ctx, &self.ns, h, &self.expected, out).await?;
            if let Some(s) = secret {
                clear_secret(self.ctx, s).await?;
            }
            *held = None;
            out.held = None;
        }
        Ok(())
    }

    /// Revokes the replaced token once its grace is over, which is then the
    /// whole pass (true); otherwise looks again when it is.
    async fn retire_previous(
        &self,
        secret: Option<&Secret>,
        held: Option<&mut Held>,
        now: Timestamp,
        out: &mut Outcome,
    ) -> Result<bool, Error> {
        let Some((h, p)) = held.and_then(|h| h.previous.clone().map(|p| (h, p))) else {
            return Ok(false);
        };
        if p.revoke_at > now {
            out.next = Some(p.revoke_at);
            return Ok(false);
        }
        revoke_previous(&self.backend, &p, &self.expected).await?;
        h.previous = None;
        let s = secret.expect("held comes from the Secret");
        write_secret(self.ctx, self.token, Some(s), h, &self.hs.spec.url).await?;
        out.held = Some(h.clone());
        out.notes.push((
            "Revoked",
            "revoked the replaced token: its grace period is over".to_string(),
        ));
        out.next = None;
        renew_at(out, &self.lifetimes);
        Ok(true)
    }

    /// What to do with the working token held (`current`): asks the server
    /// whether it still takes it, and for whom.
    async fn look_at(&self, current: Option<&Held>, now: Timestamp) -> Result<Decision, Error> {
        let Some(h) = current else {
            return Ok(Decision::Issue("issued"));
        };
        // MAS answers at once whether the session was revoked; a MAS-mode
        // Synapse may accept its token for two more minutes (its cache).
        if let (Backend::Mas(mas), Some(session)) = (&self.backend, h.session_id.as_deref())
            && mas
                .mas()
                .personal_session(session)
                .await?
                .is_none_or(|s| s.revoked_at.is_some() || !self.expected.matches(&s))
        {
            return Ok(Decision::Reissue(
                "MAS says the token's session was revoked or is gone (out of band): issued anew",
            ));
        }
        let user_locked = || Error::UserLocked {
            name: self.token.spec.user_ref.name.clone(),
        };
        Ok(match self.backend.synapse().token_whoami(&h.token).await {
            Ok(owner) if owner.user_id != h.user_id || owner.device_id != h.device_id => {
                Decision::Replace("the server says the token is another's; replaced")
            }
            Ok(_) => {
                let wanted_rotation = self.token.annotations().get(ROTATE_ANNOTATION);
                due(self.token, h, &self.lifetimes, wanted_rotation.map(String::as_str), now)
            }
            Err(SynapseError::Api {
                errcode: ErrCode::UserLocked,
                ..
            }) => return Err(user_locked()),
            Err(e) if e.class() == ErrorClass::Unauthorized => {
                // MAS issues sessions to a user an admin locked in MAS,
                // whose tokens it then refuses: say so, keep the token.
                if let Backend::Mas(mas) = &self.backend
                    && mas_locked(mas, &self.account).await?
                {
                    return Err(user_locked());
                }
                Decision::Reissue(
                    "the server no longer accepts the token (revoked or expired out of band): issued anew",
                )
            }
            Err(e) => return Err(e.into()),
        })
    }

    /// Synapse cannot rotate the token of a device it keeps.
    fn check_rotation(&self, current: Option<&Held>, why: &str) -> Result<(), Error> {
        if let Backend::Synapse(_) = self.backend
            && let Some(h) = current
            && h.device_id.is_some()
            && h.device_id.as_deref() == self.token.spec.device_id.as_deref()
        {
            return Err(Error::RotationUnsupported(format!(
                "a rotation is due ({why}), but Synapse cannot end one token of device {} without deleting the device and its encryption keys: on Synapse, leave validFor out when deviceId is set, and replace the token by deleting and re-creating the MatrixAccessToken (which re-creates the device), or use MAS",
                h.device_id.as_deref().unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Issues a new token into the Secret (created first if missing),
    /// revoking what it replaces: the held token at once unless `keep_old`
    /// gives it a grace period.
    async fn replace(
        &self,
        secret: Option<Box<Secret>>,
        held: Option<&Held>,
        (why, keep_old): (&str, bool),
        now: Timestamp,
        out: &mut Outcome,
    ) -> Result<(), Error> {
        let (ctx, token, backend, expected) = (self.ctx, self.token, &self.backend, &self.expected);
        let current = held.filter(|h| !h.token.expose().is_empty());
        // A token two rotations old goes now: only one is ever in its grace.
        // So does a replaced token whose successor was taken out of the
        // Secret: the write below records no previous token, so it would be
        // forgotten and stay valid.
        if let Some(p) = held.and_then(|h| h.previous.as_ref()) {
            revoke_previous(backend, p, expected).await?;
        }
        if !keep_old && let Some(h) = current {
            // Not in use any more (dead, or another's): revoke what is left.
            revoke_token(backend, h, expected).await?;
        }
        // The Secret exists before the token does: one that cannot be made
        // (a quota, an admission policy, a name too long) gets no token
        // issued and revoked at every pass.
        let secret = match secret {
            Some(s) => s,
            None => Box::new(create_secret(ctx, token, BTreeMap::new(), BTreeMap::new()).await?),
        };
        let issued = issue(ctx, token, backend, &self.account, &self.lifetimes).await?;
        let mut new = Held {
            token: issued.token,
            user_id: self.account.user_id.to_string(),
            device_id: issued.device_id,
            issued_at: Some(now),
            expires_at: issued.expires_at,
            session_id: issued.session_id,
            rotation: token.annotations().get(ROTATE_ANNOTATION).cloned(),
            homeserver: Some(self.homeserver_name().to_string()),
            valid_for: token.spec.valid_for.clone(),
            previous: None,
        };
        if keep_old && let Some(h) = current {
            new.previous = Some(Previous {
                token: matches!(backend, Backend::Synapse(_)).then(|| h.token.clone()),
                session_id: h.session_id.clone(),
                device_id: h.device_id.clone(),
                revoke_at: now + span(self.lifetimes.grace),
            });
        }
        if let Err(e) = write_secret(ctx, token, Some(&secret), &new, &self.hs.spec.url).await {
            // Not recorded anywhere: it must not live on.
            if let Err(revoke) = revoke_token(backend, &new, expected).await {
                warn!(error = %revoke, "cannot revoke a token the Secret did not take");
            }
            return Err(e);
        }
        out.notes.push((
            if keep_old { "Rotated" } else { "Issued" },
            match &new.previous {
                Some(p) => format!(
                    "{why}: {} written to Secret {:?}; the replaced one is revoked at {}",
                    describe(&new),
                    token.secret_name(),
                    p.revoke_at
                ),
                None => format!("{why}: {} written to Secret {:?}", describe(&new), token.secret_name()),
            },
        ));
        if let Some(p) = &new.previous {
            out.next = Some(p.revoke_at);
        }
        out.held = Some(new);
        renew_at(out, &self.lifetimes);
        Ok(())
    }
}

/// Refuses to replace, on its own, a token younger than [`MIN_TOKEN_AGE`].
fn too_young(decision: &Decision, current: Option<&Held>, now: Timestamp) -> Result<(), Error> {
    if let (Some(why), Some(h)) = (decision.premature(), current)
        && let Some(issued_at) = h.issued_at
        && let Ok(age) = Duration::try_from(now.duration_since(issued_at))
        && age < MIN_TOKEN_AGE
    {
        return Err(Error::TokenRejected { age, why: why.into() });
    }
    Ok(())
}

/// Looks again at the held token's renewal, if that comes before the next
/// look already planned (the end of a grace period).
fn renew_at(out: &mut Outcome, lifetimes: &Lifetimes) {
    if let Some(h) = &out.held
        && let Some(expires) = h.expires_at
    {
        let renew = expires - span(lifetimes.renew_before);
        out.next = Some(out.next.map_or(renew, |n| n.min(renew)));
    }
}

fn span(d: Duration) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::try_from(d).unwrap_or(k8s_openapi::jiff::SignedDuration::MAX)
}

enum Decision {
    Keep,
    /// Nothing held.
    Issue(&'static str),
    /// The held token is dead.
    Reissue(&'static str),
    /// The held token is not what it should be: replace it without grace.
    Replace(&'static str),
    /// Replace it, the old one in its grace period.
    Rotate(&'static str),
    /// Rotate it: it expires within `renewBefore`.
    Renew(&'static str),
}

impl Decision {
    /// Why the held token is replaced before its time, if it is.
    fn premature(&self) -> Option<&'static str> {
        match self {
            Decision::Reissue(_) => Some("refused by the server (or its MAS session ended)"),
            Decision::Replace(_) => Some("said by the server to be another's"),
            Decision::Renew(_) => Some("due for renewal (it expires within renewBefore)"),
            Decision::Keep | Decision::Issue(_) | Decision::Rotate(_) => None,
        }
    }

    /// Why a token is issued, and whether the held one keeps a grace
    /// period; `None`: the held one stays.
    fn replacement(&self) -> Option<(&'static str, bool)> {
        match *self {
            Decision::Keep => None,
            Decision::Issue(why) | Decision::Reissue(why) | Decision::Replace(why) => Some((why, false)),
            Decision::Rotate(why) | Decision::Renew(why) => Some((why, true)),
        }
    }
}

/// Whether the held (working) token is due for a rotation.
fn due(token: &MatrixAccessToken, h: &Held, l: &Lifetimes, rotation: Option<&str>, now: Timestamp) -> Decision {
    if h.rotation.as_deref() != rotation {
        return Decision::Rotate("rotated on the annotation matrix-operator.io/rotate");
    }
    if h.device_id.as_deref() != token.spec.device_id.as_deref() {
        return Decision::Rotate("spec.deviceId changed");
    }
    if h.valid_for != token.spec.valid_for {
        return Decision::Rotate("spec.validFor changed");
    }
    if let Some(expires) = h.expires_at
        && expires - span(l.renew_before) <= now
    {
        return Decision::Renew("renewed before it expires");
    }
    Decision::Keep
}

/// What the spec asks that this backend cannot do.
fn check_spec(token: &MatrixAccessToken, backend: &Backend, account: &Account) -> Result<(), Error> {
    let secret_name = token.secret_name();
    if secret_name.len() > 253 {
        return Err(Error::InvalidSpec(format!(
            "the Secret's name {secret_name:?} is longer than 253 characters: set a shorter spec.secretName"
        )));
    }
    if let (Backend::Synapse(_), Some(_)) = (backend, &token.spec.device_id) {
        if token.spec.valid_for.is_some() {
            return Err(Error::InvalidSpec(
                "on Synapse, a token with a deviceId comes from a login as the user, which cannot be given an expiry, and cannot be rotated without deleting the device: leave validFor out, or use MAS".into(),
            ));
        }
        if account.user.spec.password.is_none() {
            return Err(Error::InvalidSpec(format!(
                "on Synapse, a token with a deviceId needs a login as the user, with the password the operator manages: MatrixUser {:?} has no spec.password (set password.generate: true, or leave deviceId out)",
                account.user.name_any()
            )));
        }
    }
    Ok(())
}

/// On Synapse, one device is one MatrixAccessToken's: the `/logout` that
/// revokes a device's token deletes the device and every token of it, so
/// two MatrixAccessTokens of a device would end each other's. The oldest
/// (then the first by name) keeps it; the others are a Conflict.
async fn check_device_unshared(ctx: &Context, token: &MatrixAccessToken, backend: &Backend) -> Result<(), Error> {
    let (Backend::Synapse(_), Some(device)) = (backend, &token.spec.device_id) else {
        return Ok(());
    };
    let api: Api<MatrixAccessToken> = Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    let key = |t: &MatrixAccessToken| (t.metadata.creation_timestamp.clone().map(|t| t.0), t.name_any());
    let mine = key(token);
    let first = api
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|t| {
            t.name_any() != token.name_any()
                && t.meta().deletion_timestamp.is_none()
                && t.spec.user_ref == token.spec.user_ref
                && t.spec.device_id.as_deref() == Some(device.as_str())
        })
        .map(|t| key(&t))
        .filter(|other| *other < mine)
        .min();
    match first {
        Some((_, other)) => Err(Error::DeviceTaken {
            device: device.clone(),
            other,
        }),
        None => Ok(()),
    }
}

/// A token just issued.
struct Issued {
    token: SecretString,
    device_id: Option<String>,
    expires_at: Option<Timestamp>,
    session_id: Option<String>,
}

async fn issue(
    ctx: &Context,
    token: &MatrixAccessToken,
    backend: &Backend,
    account: &Account,
    l: &Lifetimes,
) -> Result<Issued, Error> {
    let now = Timestamp::now();
    let expires_at = l.valid_for.map(|v| now + span(v));
    match backend {
        Backend::Synapse(synapse) => match &token.spec.device_id {
            None => {
                let until = expires_at.map(|e| e.as_millisecond());
                let t = synapse
                    .admin_login(&account.user_id, until)
                    .await
                    .map_err(refused_synapse)?;
                Ok(Issued {
                    token: t,
                    device_id: None,
                    expires_at,
                    session_id: None,
                })
            }
            Some(device) => {
                let password = managed_password(ctx, &account.user).await?;
                let login = synapse
                    .password_login(
                        account.user_id.localpart(),
                        &password,
                        device,
                        token.spec.device_display_name.as_deref(),
                    )
                    .await
                    .map_err(refused_synapse)?;
                Ok(Issued {
                    token: login.access_token,
                    device_id: Some(login.device_id),
                    expires_at: None,
                    session_id: None,
                })
            }
        },
        Backend::Mas(mas) => issue_mas(token, mas, account, l).await,
    }
}

async fn issue_mas(
    token: &MatrixAccessToken,
    mas: &MasBackend,
    account: &Account,
    l: &Lifetimes,
) -> Result<Issued, Error> {
    let actor = match &account.mas_user_id {
        Some(id) => id.clone(),
        None => mas
            .mas()
            .user_by_username(account.user_id.localpart())
            .await?
            .map(|u| u.id)
            .ok_or_else(|| Error::UserNotReady {
                name: token.spec.user_ref.name.clone(),
                state: "MAS has no such account".into(),
                waiting: true,
            })?,
    };
    let human_name = session_name(token);
    let expires_in = l.valid_for.map(|v| v.as_secs().min(u64::from(u32::MAX)) as u32);
    let scope = bot_scope(token.spec.device_id.as_deref());
    let issued = mas
        .mas()
        .create_personal_session(&actor, &human_name, &scope, expires_in)
        .await
        .map_err(|e| match &e {
            crate::backend::mas::MasError::Api {
                status: 400 | 403 | 404 | 405 | 410 | 422,
                ..
            } => Error::TokenRefused(e.to_string()),
            _ => Error::from(e),
        })?;
    let expires_at = issued
        .expires_at
        .as_deref()
        .and_then(|e| e.parse::<Timestamp>().ok())
        .or_else(|| l.valid_for.map(|v| Timestamp::now() + span(v)));
    Ok(Issued {
        token: issued.access_token,
        device_id: token.spec.device_id.clone(),
        expires_at,
        session_id: Some(issued.id),
    })
}

/// Whether MAS says the account is locked.
async fn mas_locked(mas: &MasBackend, account: &Account) -> Result<bool, Error> {
    Ok(mas
        .mas()
        .user_by_username(account.user_id.localpart())
        .await?
        .is_some_and(|u| u.attributes.locked_at.is_some()))
}

/// A refusal of Synapse to issue (the admin's own account, an API turned
/// off, a wrong password) stalls; anything else is as usual.
fn refused_synapse(e: SynapseError) -> Error {
    match &e {
        SynapseError::Api {
            status: 400 | 403 | 404,
            errcode,
            ..
        } if *errcode != ErrCode::LimitExceeded => Error::TokenRefused(e.to_string()),
        _ => Error::from(e),
    }
}

/// The MatrixUser's password, as the operator applies it.
async fn managed_password(ctx: &Context, user: &MatrixUser) -> Result<SecretString, Error> {
    let ns = user.namespace().unwrap_or_default();
    let password = user
        .spec
        .password
        .as_ref()
        .ok_or_else(|| Error::InvalidSpec(format!("MatrixUser {:?} has no spec.password", user.name_any())))?;
    let r = match &password.secret_ref {
        Some(r) => r.clone(),
        None => crate::api::SecretKeyRef {
            name: super::secrets::credentials_secret_name(user),
            key: "password".into(),
        },
    };
    ctx.secret_value(&ns, &r).await
}

/// Revokes a held token (without its predecessor).
async fn revoke_token(backend: &Backend, h: &Held, expected: &Expected) -> Result<(), Error> {
    match (backend, &h.session_id) {
        (Backend::Mas(mas), Some(session)) => {
            revoke_session(mas, session, expected).await?;
        }
        _ if h.token.expose().is_empty() => {}
        _ => {
            backend.synapse().logout(&h.token).await?;
        }
    }
    Ok(())
}

async fn revoke_previous(backend: &Backend, p: &Previous, expected: &Expected) -> Result<(), Error> {
    match (backend, &p.session_id, &p.token) {
        (Backend::Mas(mas), Some(session), _) => {
            revoke_session(mas, session, expected).await?;
        }
        (_, _, Some(t)) => {
            backend.synapse().logout(t).await?;
        }
        _ => {}
    }
    Ok(())
}

/// Revokes every token the Secret holds, on the Homeserver it records.
async fn revoke_held(
    ctx: &Context,
    namespace: &str,
    h: &Held,
    expected: &Expected,
    out: &mut Outcome,
) -> Result<(), Error> {
    let Some(hs) = &h.homeserver else {
        return Ok(());
    };
    let (backend, _) = backend_of(ctx, namespace, hs).await?;
    if let Some(p) = &h.previous {
        revoke_previous(&backend, p, expected).await?;
    }
    revoke_token(&backend, h, expected).await?;
    if !h.token.expose().is_empty() {
        out.notes.push(("Revoked", format!("revoked {}", describe(h))));
    }
    Ok(())
}

/// The Secret's data and annotations for `held`.
fn contents(held: &Held, url: &str) -> (BTreeMap<String, ByteString>, BTreeMap<String, String>) {
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        data.insert(k.to_string(), ByteString(v.as_bytes().to_vec()));
    };
    put(KEY_TOKEN, held.token.expose());
    put(KEY_USER_ID, &held.user_id);
    put(KEY_DEVICE_ID, held.device_id.as_deref().unwrap_or_default());
    put(KEY_URL, url);
    if let Some(t) = held.previous.as_ref().and_then(|p| p.token.as_ref()) {
        put(KEY_PREVIOUS, t.expose());
    }
    let mut annotations = BTreeMap::new();
    let mut note = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            annotations.insert(k.to_string(), v);
        }
    };
    note(ANN_ISSUED_AT, held.issued_at.map(|t| t.to_string()));
    note(ANN_EXPIRES_AT, held.expires_at.map(|t| t.to_string()));
    note(ANN_SESSION, held.session_id.clone());
    note(ANN_ROTATION, held.rotation.clone());
    note(ANN_HOMESERVER, held.homeserver.clone());
    note(ANN_VALID_FOR, held.valid_for.clone());
    if let Some(p) = &held.previous {
        note(ANN_PREVIOUS_REVOKE_AT, Some(p.revoke_at.to_string()));
        note(ANN_PREVIOUS_SESSION, p.session_id.clone());
        note(ANN_PREVIOUS_DEVICE, p.device_id.clone());
    }
    (data, annotations)
}

/// The operator's annotations on a token Secret.
const RECORD: [&str; 9] = [
    ANN_ISSUED_AT,
    ANN_EXPIRES_AT,
    ANN_SESSION,
    ANN_ROTATION,
    ANN_HOMESERVER,
    ANN_VALID_FOR,
    ANN_PREVIOUS_REVOKE_AT,
    ANN_PREVIOUS_SESSION,
    ANN_PREVIOUS_DEVICE,
];

/// Creates the Secret with `held`, or writes it over what `existing` holds
/// (at its resourceVersion: a concurrent change is a conflict, retried).
async fn write_secret(
    ctx: &Context,
    token: &MatrixAccessToken,
    existing: Option<&Secret>,
    held: &Held,
    url: &str,
) -> Result<Secret, Error> {
    let ns = token.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let (data, annotations) = contents(held, url);
    let written = match existing {
        Some(existing) => {
            // A merge patch at the copy read: the keys and annotations of
            // the record are set or removed (null), others' are kept.
            let mut data_patch = serde_json::Map::new();
            for key in [KEY_TOKEN, KEY_USER_ID, KEY_DEVICE_ID, KEY_URL, KEY_PREVIOUS] {
                data_patch.insert(key.into(), serde_json::to_value(data.get(key)).unwrap_or_default());
            }
            let annotations_patch: serde_json::Map<String, serde_json::Value> = RECORD
                .iter()
                .map(|k| {
                    (
                        k.to_string(),
                        serde_json::to_value(annotations.get(*k)).unwrap_or_default(),
                    )
                })
                .collect();
            let mut finalizers = existing.finalizers().to_vec();
            if !finalizers.iter().any(|f| f == TOKEN_SECRET_FINALIZER) {
                finalizers.push(TOKEN_SECRET_FINALIZER.into());
            }
            let patch = serde_json::json!({
                "metadata": {
                    "resourceVersion": existing.resource_version(),
                    "annotations": annotations_patch,
                    "finalizers": finalizers,
                },
                "data": data_patch,
            });
            api.patch(&existing.name_any(), &patch_params(), &Patch::Merge(&patch))
                .await?
        }
        None => create_secret(ctx, token, data, annotations).await?,
    };
    Ok(written)
}

/// Creates the Secret, owned by `token`, with its finalizer.
async fn create_secret(
    ctx: &Context,
    token: &MatrixAccessToken,
    data: BTreeMap<String, ByteString>,
    annotations: BTreeMap<String, String>,
) -> Result<Secret, Error> {
    let ns = token.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    let owner = token
        .controller_owner_ref(&())
        .ok_or_else(|| Error::InvalidSpec("the MatrixAccessToken has no uid".into()))?;
    let mut secret = Secret {
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    secret.metadata.name = Some(token.secret_name());
    secret.metadata.namespace = Some(ns);
    secret.metadata.owner_references = Some(vec![owner]);
    secret.metadata.annotations = Some(annotations);
    secret.metadata.finalizers = Some(vec![TOKEN_SECRET_FINALIZER.into()]);
    secret.metadata.labels = Some(BTreeMap::from([(
        super::secrets::GENERATED_LABEL.0.to_string(),
        super::secrets::GENERATED_LABEL.1.to_string(),
    )]));
    Ok(api.create(&params, &secret).await?)
}

/// Takes every token out of the Secret (they were revoked); its
/// finalizer stays until the MatrixAccessToken goes ([`release_secret`]).
async fn clear_secret(ctx: &Context, secret: &Secret) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &secret.namespace().unwrap_or_default());
    let annotations: serde_json::Map<String, serde_json::Value> = RECORD
        .iter()
        .filter(|k| **k != ANN_HOMESERVER)
        .map(|k| (k.to_string(), serde_json::Value::Null))
        .collect();
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": secret.resource_version(), "annotations": annotations},
        "data": {KEY_TOKEN: null, KEY_PREVIOUS: null, KEY_DEVICE_ID: null},
    });
    api.patch(&secret.name_any(), &patch_params(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    }
}

/// Takes the finalizer off the Secret (the tokens in it are revoked).
async fn release_secret(ctx: &Context, secret: &Secret) -> Result<(), Error> {
    if !secret.finalizers().iter().any(|f| f == TOKEN_SECRET_FINALIZER) {
        return Ok(());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &secret.namespace().unwrap_or_default());
    let finalizers: Vec<String> = secret
        .finalizers()
        .iter()
        .filter(|f| *f != TOKEN_SECRET_FINALIZER)
        .cloned()
        .collect();
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": secret.resource_version()}
    });
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..Default::default()
    };
    api.patch_metadata(&secret.name_any(), &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The MatrixAccessToken is being deleted: revoke its tokens, then let its
/// Secret go (the garbage collector deletes it with its owner).
async fn cleanup(token: Arc<MatrixAccessToken>, ctx: &Context) -> Result<Action, Error> {
    let ns = token.namespace().unwrap_or_default();
    let skip = token.annotations().get(SKIP_CLEANUP).map(String::as_str) == Some("true");
    let result: Result<(), Error> = async {
        let SecretState::Owned { secret, held } = read_secret(ctx, &token).await? else {
            return Ok(());
        };
        let mut out = Outcome::default();
        if let Some(h) = &held
            && !skip
        {
            // The MAS user the sessions act for, if the MatrixUser says.
            let actor = matrix_user(ctx, &token)
                .await?
                .and_then(|u| u.status.and_then(|s| s.mas_user_id));
            revoke_held(ctx, &ns, h, &Expected::of(&token, actor), &mut out).await?;
        }
        release_secret(ctx, &secret).await?;
        for (reason, note) in out.notes {
            info!(reason, note, "token");
            ctx.publish(token.as_ref(), EventType::Normal, reason, note).await;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            ctx.reset_backoff(token.as_ref());
            Ok(Action::await_change())
        }
        Err(e) => {
            warn!(error = %e, "cannot revoke the tokens; the MatrixAccessToken stays until they are (annotate it with {SKIP_CLEANUP}: \"true\" to let it go without)");
            let old = token.status.clone().unwrap_or_default();
            if crate::api::ready_condition(&old.conditions).map(|c| c.reason.as_str()) != Some(e.reason()) {
                ctx.publish(
                    token.as_ref(),
                    EventType::Warning,
                    e.reason(),
                    format!("revoking the tokens: {e}"),
                )
                .await;
            }
            Err(e)
        }
    }
}

/// What a reconcile of a MatrixAccessToken acts on (not its status).
fn acted_on(token: &MatrixAccessToken) -> Option<u64> {
    super::acted_on(token)
}

/// The MatrixAccessTokens of one scope, reconciled on their own changes,
/// their MatrixUsers' and their Secrets'.
pub(super) fn controller<S>(
    client: &Client,
    ctx: &Arc<Context>,
    namespace: Option<&str>,
    (store, writer): (Store<MatrixAccessToken>, reflector::store::Writer<MatrixAccessToken>),
    // The tokens of MatrixUsers and Secrets that changed or went, from the
    // MatrixUser controller's watches of them (see `controllers_for`).
    triggered: tokio::sync::mpsc::UnboundedReceiver<ObjectRef<MatrixAccessToken>>,
    shutdown: S,
) -> futures::future::BoxFuture<'static, ()>
where
    S: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let tokens_api: Api<MatrixAccessToken> = api_for(client, namespace);
    let tokens = watch::objects_only(
        watch::events(tokens_api, watcher::Config::default())
            .reflect(writer)
            .applied_objects(),
        "MatrixAccessToken",
    )
    .predicate_filter(acted_on, kube::runtime::PredicateConfig::default());
    Controller::for_stream(tokens, store)
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency))
        .reconcile_on(futures::stream::unfold(triggered, |mut triggered| async move {
            triggered.recv().await.map(|token| (token, triggered))
        }))
        .graceful_shutdown_on(shutdown)
        .run(
            |token, ctx| contained(reconcile_token(token.clone(), ctx), "MatrixAccessToken", token),
            error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move { log_outcome("MatrixAccessToken", result) })
        .boxed()
}

/// The MatrixAccessTokens of `user`.
pub(super) fn tokens_of_user(store: &Store<MatrixAccessToken>, user: &MatrixUser) -> Vec<ObjectRef<MatrixAccessToken>> {
    let ns = user.meta().namespace.as_deref();
    let name = user.meta().name.as_deref().unwrap_or_default();
    store
        .state_filter(|t| t.meta().namespace.as_deref() == ns && t.spec.user_ref.name == name)
        .iter()
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The MatrixAccessToken that owns `secret`, if one does.
pub(super) fn token_of_secret(secret: &kube::core::PartialObjectMeta<Secret>) -> Vec<ObjectRef<MatrixAccessToken>> {
    let ns = secret.namespace();
    secret
        .owner_references()
        .iter()
        .filter(|o| o.kind == "MatrixAccessToken")
        .map(|o| {
            let r = ObjectRef::<MatrixAccessToken>::new(&o.name);
            match &ns {
                Some(ns) => r.within(ns),
                None => r,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(spec: serde_json::Value) -> MatrixAccessToken {
        serde_json::from_value(
            json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixAccessToken",
            "metadata": {"name": "bot", "namespace": "chat"}, "spec": spec}),
        )
        .unwrap()
    }

    #[test]
    fn a_token_is_replaced_on_its_own_only_once_a_minute_old() {
        let now = Timestamp::now();
        let held = |age: i64| Held {
            token: SecretString::new("syt_token"),
            user_id: "@bot:example.org".into(),
            device_id: None,
            issued_at: Some(now - k8s_openapi::jiff::SignedDuration::from_secs(age)),
            expires_at: None,
            session_id: None,
            rotation: None,
            homeserver: None,
            valid_for: None,
            previous: None,
        };
        let (young, old) = (held(30), held(120));
        // (decision, the replacement keeps the held token in its grace,
        // refused for a young token)
        let cases = [
            (Decision::Keep, None, false),
            (Decision::Issue("issued"), Some(false), false),
            (Decision::Reissue("dead"), Some(false), true),
            (Decision::Replace("another's"), Some(false), true),
            (Decision::Rotate("on the annotation"), Some(true), false),
            (Decision::Renew("expires soon"), Some(true), true),
        ];
        for (decision, keeps_old, waits) in cases {
            let why = decision.replacement().map(|(why, _)| why).unwrap_or("kept");
            assert_eq!(decision.replacement().map(|(_, k)| k), keeps_old, "{why}");
            let refused = too_young(&decision, Some(&young), now);
            assert_eq!(refused.is_err(), waits, "{why}");
            if let Err(e) = refused {
                assert_eq!(e.reason(), "TokenRejected", "{why}");
            }
            assert!(too_young(&decision, Some(&old), now).is_ok(), "{why}");
            assert!(too_young(&decision, None, now).is_ok(), "{why}");
        }
    }

    #[test]
    fn lifetimes_default_and_refuse_what_cannot_work() {
        let l = lifetimes(&token(json!({"userRef": {"name": "u"}, "validFor": "720h"}))).unwrap();
        assert_eq!(l.valid_for, Some(Duration::from_secs(720 * 3600)));
        assert_eq!(l.renew_before, Duration::from_secs(240 * 3600));
        assert_eq!(l.grace, DEFAULT_GRACE_PERIOD);
        let l = lifetimes(&token(json!({"userRef": {"name": "u"}}))).unwrap();
        assert_eq!(l.valid_for, None);
        for bad in [
            json!({"userRef": {"name": "u"}, "renewBefore": "1h"}),
            json!({"userRef": {"name": "u"}, "validFor": "1h", "renewBefore": "1h"}),
            json!({"userRef": {"name": "u"}, "validFor": "30s"}),
        ] {
            let e = lifetimes(&token(bad.clone())).err().unwrap_or_else(|| panic!("{bad}"));
            assert_eq!(e.reason(), "InvalidSpec", "{bad}");
        }
    }

    #[test]
    fn a_token_is_renewed_renew_before_its_expiry_and_not_before() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let t = token(json!({"userRef": {"name": "u"}, "validFor": "90m", "renewBefore": "30m"}));
        let l = lifetimes(&t).unwrap();
        let held = |expires_in: u64| Held {
            token: SecretString::new("syt_x"),
            user_id: "@bot:example.org".into(),
            device_id: None,
            issued_at: Some(now),
            expires_at: Some(now + span(Duration::from_secs(expires_in))),
            session_id: None,
            rotation: None,
            homeserver: Some("hs".into()),
            valid_for: Some("90m".into()),
            previous: None,
        };
        assert!(matches!(due(&t, &held(31 * 60), &l, None, now), Decision::Keep));
        assert!(matches!(due(&t, &held(30 * 60), &l, None, now), Decision::Renew(_)));
        assert!(matches!(due(&t, &held(60), &l, None, now), Decision::Renew(_)));
        assert!(matches!(
            due(&t, &held(31 * 60), &l, Some("1"), now),
            Decision::Rotate(_)
        ));
    }

    #[test]
    fn the_secret_records_what_was_issued_and_reads_back_the_same() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let held = Held {
            token: SecretString::new("syt_new"),
            user_id: "@bot:example.org".into(),
            device_id: Some("BOT1".into()),
            issued_at: Some(now),
            expires_at: Some(now + span(Duration::from_secs(3600))),
            session_id: Some("01ARZ3NDEKTSV4RRFFQ69G5FAV".into()),
            rotation: Some("2".into()),
            homeserver: Some("hs".into()),
            valid_for: Some("1h".into()),
            previous: Some(Previous {
                token: Some(SecretString::new("syt_old")),
                session_id: None,
                device_id: None,
                revoke_at: now + span(Duration::from_secs(600)),
            }),
        };
        let (data, annotations) = contents(&held, "http://synapse");
        let mut secret = Secret {
            data: Some(data),
            ..Secret::default()
        };
        secret.metadata.annotations = Some(annotations.clone());
        assert!(
            annotations.values().all(|v| !v.contains("syt_")),
            "no token in annotations: {annotations:?}"
        );
        let back = held_in(&secret).unwrap();
        assert_eq!(back.token.expose(), "syt_new");
        assert_eq!(back.device_id.as_deref(), Some("BOT1"));
        assert_eq!(back.expires_at, held.expires_at);
        assert_eq!(back.rotation.as_deref(), Some("2"));
        let p = back.previous.unwrap();
        assert_eq!(p.token.unwrap().expose(), "syt_old");
        assert_eq!(p.revoke_at, now + span(Duration::from_secs(600)));
    }
}
