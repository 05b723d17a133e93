//! A slow homeserver must not stall the others: each Homeserver gets only
//! its share of the MatrixUser controller's reconcile slots, and a pass's
//! work with a homeserver has a deadline — which never costs an ownership
//! record. Against the fake API server and a real Synapse, the slow one
//! being a proxy on 127.0.0.1 in front of it that holds some calls.

use matrix_user_operator_testkit as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{
    account, cluster_in, condition_of, context_with, homeserver_in, matrix_user_in, run_operator, stored_user,
    wait_until,
};
use common::synapse;
use http_body_util::{BodyExt, Full};
use matrix_user_operator::api::MatrixUser;
use matrix_user_operator::controller::{Config, Error, reconcile_user};
use serde_json::{Value, json};
use tokio::sync::MutexGuard;

const NS: &str = "chat";

/// One test at a time; the operator's logs go to the test's output.
async fn serial() -> MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_test_writer()
        .try_init();
    LOCK.lock().await
}

// ---------------------------------------------------------------------------
// A proxy that holds some calls
// ---------------------------------------------------------------------------

/// How the proxy treats one call.
#[derive(Clone, Copy, Debug)]
enum Hold {
    /// Forwarded at once.
    None,
    /// Forwarded after this long (a homeserver slow to act).
    Request(Duration),
    /// Forwarded at once, its answer sent after this long (a homeserver
    /// that acted and is slow to say so).
    Answer(Duration),
}

/// Decides, from the method, the path and the body, how a call is held.
type Rule = Arc<dyn Fn(&str, &str, &str) -> Hold + Send + Sync>;

/// An HTTP proxy on 127.0.0.1 in front of the test Synapse, holding the
/// calls its rule says; it counts the calls held.
struct SlowProxy {
    url: String,
    held: Arc<Held>,
}

#[derive(Default)]
struct Held {
    now: AtomicUsize,
    most: AtomicUsize,
    total: AtomicUsize,
}

/// Counts one held call while it lasts (a caller that gives up ends it).
struct Holding(Arc<Held>);

impl Holding {
    fn new(held: &Arc<Held>) -> Self {
        let now = held.now.fetch_add(1, Ordering::SeqCst) + 1;
        held.most.fetch_max(now, Ordering::SeqCst);
        held.total.fetch_add(1, Ordering::SeqCst);
        Holding(held.clone())
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

impl SlowProxy {
    /// Serves on the caller's runtime until it ends.
    async fn start(rule: Rule) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let held = Arc::new(Held::default());
        let counting = held.clone();
        let client = synapse::http_client();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (rule, held, client) = (rule.clone(), counting.clone(), client.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        forward(request, rule.clone(), held.clone(), client.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        SlowProxy { url, held }
    }

    fn held_now(&self) -> usize {
        self.held.now.load(Ordering::SeqCst)
    }

    /// The most calls held at once.
    fn held_most(&self) -> usize {
        self.held.most.load(Ordering::SeqCst)
    }

    fn held_total(&self) -> usize {
        self.held.total.load(Ordering::SeqCst)
    }
}

async fn forward(
    request: hyper::Request<hyper::body::Incoming>,
    rule: Rule,
    held: Arc<Held>,
    client: reqwest::Client,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let hold = rule(parts.method.as_str(), &path, &String::from_utf8_lossy(&body));
    let _holding = (!matches!(hold, Hold::None)).then(|| Holding::new(&held));
    if let Hold::Request(d) = hold {
        tokio::time::sleep(d).await;
    }
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut upstream = client.request(method, format!("{}{path}", synapse().base_url));
    for name in ["authorization", "content-type"] {
        if let Some(v) = parts.headers.get(name) {
            upstream = upstream.header(name, v.as_bytes());
        }
    }
    let answer = upstream.body(body).send().await.expect("the test Synapse answers");
    let status = answer.status().as_u16();
    let content_type = answer.headers().get("content-type").cloned();
    let bytes = answer.bytes().await.unwrap_or_default();
    if let Hold::Answer(d) = hold {
        tokio::time::sleep(d).await;
    }
    let mut response = hyper::Response::builder().status(status);
    if let Some(ct) = content_type {
        response = response.header("content-type", ct.as_bytes());
    }
    Ok(response.body(Full::new(bytes)).unwrap())
}

/// Holds every call about an account whose localpart starts with `prefix`
/// (the Homeserver's own check goes through at once) this long.
fn users_starting_with(prefix: &'static str, hold: Duration) -> Rule {
    Arc::new(move |_, path, _| {
        if path.contains(&format!("/users/%40{prefix}")) || path.contains(&format!("/users/@{prefix}")) {
            Hold::Request(hold)
        } else {
            Hold::None
        }
    })
}

// ---------------------------------------------------------------------------
// The world
// ---------------------------------------------------------------------------

/// The fake API server with a Homeserver `hs` for the test Synapse and a
/// Homeserver `slow` for the same Synapse behind `proxy`, both ready.
fn with_slow_homeserver(proxy: &SlowProxy) -> (kube::Client, FakeApiServer) {
    let (client, fake) = cluster_in(&[NS], json!({}));
    let mut slow = homeserver_in(NS, "slow", json!({}));
    slow["spec"]["url"] = json!(proxy.url);
    fake.put(slow);
    (client, fake)
}

fn user_of(homeserver: &str, name: &str, localpart: &str) -> Value {
    matrix_user_in(
        NS,
        name,
        json!({"homeserverRef": {"name": homeserver}, "localpart": localpart}),
        Value::Null,
    )
}

/// The Ready condition's `(status, reason, message)`, if a pass wrote one.
fn ready_of(fake: &FakeApiServer, obj: &Value) -> Option<(String, String, String)> {
    fake.get(&path_of(obj))
        .and_then(|v| serde_json::from_value::<MatrixUser>(v).ok())
        .and_then(|u| condition_of(&u, "Ready"))
}

fn in_sync(fake: &FakeApiServer, obj: &Value) -> bool {
    ready_of(fake, obj).is_some_and(|c| c.1 == "InSync")
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Eight MatrixUsers of a Homeserver whose user calls take 25 s, with four
/// reconcile slots, once held all four: the three MatrixUsers of a healthy
/// Homeserver applied then waited for the slow passes to end.
#[tokio::test]
async fn a_slow_homeserver_holds_at_most_its_share_and_the_others_converge_meanwhile() {
    let _serial = serial().await;
    let s = synapse();
    let proxy = SlowProxy::start(users_starting_with("slow", Duration::from_secs(25))).await;
    let (_client, fake) = with_slow_homeserver(&proxy);
    let config = Config {
        namespaces: vec![NS.to_string()],
        concurrency: 4,
        ..Config::default()
    };
    let stop = run_operator(&fake, config);
    let slow: Vec<Value> = (0..8)
        .map(|i| user_of("slow", &format!("slow-{i}"), &s.unique_localpart("slow")))
        .collect();
    for u in &slow {
        fake.put(u.clone());
    }
    // The slow Homeserver's passes are under way before the others come.
    wait_until(Duration::from_secs(60), "slow calls held", || async {
        proxy.held_now() >= 3
    })
    .await;

    let healthy: Vec<Value> = (0..3)
        .map(|i| user_of("hs", &format!("healthy-{i}"), &s.unique_localpart("healthy")))
        .collect();
    for u in &healthy {
        fake.put(u.clone());
    }
    wait_until(
        Duration::from_secs(240),
        "the healthy Homeserver's users InSync",
        || async { healthy.iter().all(|u| in_sync(&fake, u)) },
    )
    .await;

    // None of the slow Homeserver's passes has ended yet: the healthy ones
    // did not wait for them.
    let slow_conditions: Vec<_> = slow.iter().filter_map(|u| ready_of(&fake, u)).collect();
    assert!(
        slow_conditions.is_empty(),
        "the healthy users converged only after slow passes ended: {slow_conditions:?}"
    );
    assert!(
        proxy.held_most() <= 3,
        "the slow Homeserver held {} of 4 slots at once",
        proxy.held_most()
    );
    for u in &healthy {
        let user = stored_user(&fake, u);
        let id = user.status.unwrap().user_id.expect("owned");
        assert_eq!(account(&id).await.0, 200, "{id} exists");
    }
    drop(stop);
}

/// A pass against a homeserver slower than the deadline once took as long
/// as the homeserver liked, holding its slot (here the only one).
#[tokio::test]
async fn a_pass_over_its_deadline_ends_transient_and_the_operator_goes_on() {
    let _serial = serial().await;
    let s = synapse();
    let proxy = SlowProxy::start(users_starting_with("late", Duration::from_secs(25))).await;
    let (_client, fake) = with_slow_homeserver(&proxy);
    let config = Config {
        namespaces: vec![NS.to_string()],
        concurrency: 1,
        reconcile_timeout: Duration::from_secs(3),
        ..Config::default()
    };
    let stop = run_operator(&fake, config);
    let late = user_of("slow", "late", &s.unique_localpart("late"));
    fake.put(late.clone());
    wait_until(Duration::from_secs(90), "a pass of the slow user ends", || async {
        ready_of(&fake, &late).is_some()
    })
    .await;
    let (status, reason, message) = ready_of(&fake, &late).unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "TooSlow"), "{message}");
    assert!(
        message.contains("answered too slowly") && message.contains("deadline of 3s"),
        "{message}"
    );
    let u = stored_user(&fake, &late);
    assert_eq!(condition_of(&u, "Reconciling").map(|c| c.0).as_deref(), Some("True"));
    assert_eq!(condition_of(&u, "Stalled").map(|c| c.0).as_deref(), Some("False"));

    // The one slot is not held: another Homeserver's user converges, and
    // the slow one is retried.
    let healthy = user_of("hs", "healthy", &s.unique_localpart("healthy"));
    fake.put(healthy.clone());
    wait_until(Duration::from_secs(60), "the healthy user InSync", || async {
        in_sync(&fake, &healthy)
    })
    .await;
    wait_until(Duration::from_secs(60), "the slow user retried", || async {
        proxy.held_total() >= 2
    })
    .await;
    assert_eq!(ready_of(&fake, &late).unwrap().1, "TooSlow");
    drop(stop);
}

/// Reconciles the stored copy of `obj` once with `config`.
async fn reconcile_once(
    fake: &FakeApiServer,
    client: &kube::Client,
    obj: &Value,
    config: &Config,
) -> Result<(), Error> {
    let user = stored_user(fake, obj);
    reconcile_user(Arc::new(user), context_with(client.clone(), config.clone(), &[]))
        .await
        .map(|_| ())
}

/// Whatever the deadline cuts, no account the operator created is left
/// without its record: a create whose answer is cut off keeps the pending
/// creation (and is recognised by the next pass), and a pass cut off after
/// its create was answered records the account as the MatrixUser's own.
#[tokio::test]
async fn a_deadline_never_loses_the_record_of_an_account_it_created() {
    let _serial = serial().await;
    let s = synapse();
    let (unanswered, cut_after) = (s.unique_localpart("unanswered"), s.unique_localpart("cutafter"));
    // Each held once: the first create of one, the first update of the other.
    let first = Arc::new(Mutex::new((true, true)));
    let rule: Rule = {
        let first = first.clone();
        Arc::new(move |method, path, body| {
            let mut first = first.lock().unwrap();
            if method == "PUT" && path.contains("unanswered") && first.0 {
                first.0 = false;
                return Hold::Answer(Duration::from_secs(25));
            }
            if method == "PUT" && path.contains("cutafter") && body.contains("displayname") && first.1 {
                first.1 = false;
                return Hold::Request(Duration::from_secs(25));
            }
            Hold::None
        })
    };
    let proxy = SlowProxy::start(rule).await;
    let (client, fake) = with_slow_homeserver(&proxy);
    let config = Config {
        reconcile_timeout: Duration::from_secs(3),
        ..Config::default()
    };

    // A create sent, its answer cut off: the account exists.
    let a = user_of("slow", "unanswered", &unanswered);
    fake.put(a.clone());
    let e = reconcile_once(&fake, &client, &a, &config).await.unwrap_err();
    assert_eq!(e.reason(), "TooSlow", "{e}");
    let id = s.user_id(&unanswered);
    wait_until(Duration::from_secs(10), "the account created", || async {
        account(&id).await.0 == 200
    })
    .await;
    let stored = stored_user(&fake, &a);
    assert_eq!(
        stored.pending_creation().as_ref().map(|p| p.user_id.as_str()),
        Some(id.as_str()),
        "{:?}",
        stored.metadata
    );
    reconcile_once(&fake, &client, &a, &config)
        .await
        .expect("the next pass");
    let u = stored_user(&fake, &a);
    let status = u.status.clone().unwrap();
    assert_eq!(status.user_id.as_deref(), Some(id.as_str()), "{status:?}");
    assert!(status.account_creation_ts.is_some() && u.pending_creation().is_none());
    assert!(fake.event_reasons().contains(&"Created".to_string()));

    // Created, then cut off in the update that follows.
    let mut b = user_of("slow", "cutafter", &cut_after);
    b["spec"]["displayName"] = json!("Cut After");
    fake.put(b.clone());
    let e = reconcile_once(&fake, &client, &b, &config).await.unwrap_err();
    assert_eq!(e.reason(), "TooSlow", "{e}");
    let id = s.user_id(&cut_after);
    let status = stored_user(&fake, &b).status.unwrap();
    assert_eq!(status.user_id.as_deref(), Some(id.as_str()), "{status:?}");
    assert!(status.account_creation_ts.is_some(), "{status:?}");
    reconcile_once(&fake, &client, &b, &config)
        .await
        .expect("the next pass");
    assert!(in_sync(&fake, &b));
    assert_eq!(account(&id).await.1["displayname"], "Cut After");
}
