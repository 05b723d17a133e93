//! Hostile servers: each test puts a small HTTP server on 127.0.0.1 in
//! front of the real Synapse (or the MAS stand-in) that forwards every
//! request except the misbehaviour under test — a body without end, a
//! Content-Length above the limit, a token that never expires, a listing
//! whose cursor never moves, a wait of millions of years, a version or user
//! ID that echoes a secret. The clients must stop at their bounds with an
//! error naming them, never panic, and keep no secret.

use matrix_user_operator_testkit as common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use matrix_user_operator::backend::mas::{MasClient, MasConfig};
use matrix_user_operator::backend::{MAX_BODY_BYTES, MAX_RETRY_AFTER, MAX_VERSION_BYTES};
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::synapse::{ClientConfig, ErrorClass, SynapseClient, UserId};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A guard against a client that never returns (the defects under test):
/// far longer than any answer here takes.
const GUARD: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// A forwarding server
// ---------------------------------------------------------------------------

/// A request as the hostile server received it.
#[derive(Clone, Debug)]
struct Request {
    method: String,
    /// Path and query.
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// A change to an upstream's JSON answer.
type JsonRewrite = Box<dyn FnOnce(&mut Value) + Send>;

/// What the hostile server does with a request.
enum Reply {
    /// Forward it to the upstream and answer what it answered.
    Forward,
    /// Forward it, and answer the upstream's JSON body as `rewrite` changes it.
    Rewrite(JsonRewrite),
    /// Answer these bytes (a whole response).
    Raw(Vec<u8>),
    /// Answer 200 with a chunked JSON body that never ends: it streams up to
    /// `bytes`, then holds the connection open. The bytes written before the
    /// client hung up are counted in `sent`.
    Endless { bytes: usize, sent: Arc<AtomicUsize> },
}

/// A server on 127.0.0.1 that answers each request as `decide` says,
/// forwarding to `upstream`, and counts the requests it got.
struct Hostile {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Hostile {
    async fn start(upstream: String, decide: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = requests.clone();
        let decide = Arc::new(decide);
        let http = common::synapse::http_client();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (decide, recorded, http, upstream) =
                    (decide.clone(), recorded.clone(), http.clone(), upstream.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &upstream, &http, &*decide, &recorded).await;
                });
            }
        });
        Self { url, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    fn count(&self, pred: impl Fn(&Request) -> bool) -> usize {
        self.requests().iter().filter(|r| pred(r)).count()
    }
}

/// Serves the requests of one connection until it closes.
async fn serve(
    mut stream: TcpStream,
    upstream: &str,
    http: &reqwest::Client,
    decide: &(dyn Fn(&Request) -> Reply + Send + Sync),
    recorded: &Mutex<Vec<Request>>,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer).await? else {
            return Ok(());
        };
        recorded.lock().unwrap().push(request.clone());
        let reply = decide(&request);
        let bytes = match reply {
            Reply::Raw(bytes) => bytes,
            Reply::Endless { bytes, sent } => {
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
                    )
                    .await?;
                let chunk = vec![b'a'; 64 * 1024];
                let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
                framed.extend_from_slice(&chunk);
                framed.extend_from_slice(b"\r\n");
                stream.write_all(b"e\r\n{\"version\": \"a\r\n").await?;
                while sent.load(Ordering::SeqCst) < bytes {
                    stream.write_all(&framed).await?;
                    stream.flush().await?;
                    sent.fetch_add(chunk.len(), Ordering::SeqCst);
                }
                // Never ends: the client must give up by itself.
                tokio::time::sleep(GUARD * 2).await;
                return Ok(());
            }
            Reply::Forward => forward(http, upstream, &request, None).await,
            Reply::Rewrite(rewrite) => forward(http, upstream, &request, Some(rewrite)).await,
        };
        stream.write_all(&bytes).await?;
    }
}

async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Option<Request>> {
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + 4 + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[head_end + 4..head_end + 4 + length].to_vec();
    buffer.drain(..head_end + 4 + length);
    Ok(Some(Request {
        method,
        target,
        headers,
        body,
    }))
}

/// The upstream's answer to `request`, as a whole response (its JSON body
/// rewritten when asked).
async fn forward(http: &reqwest::Client, upstream: &str, request: &Request, rewrite: Option<JsonRewrite>) -> Vec<u8> {
    let method = reqwest::Method::from_bytes(request.method.as_bytes()).unwrap();
    let mut outgoing = http.request(method, format!("{upstream}{}", request.target));
    for (name, value) in &request.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "connection") {
            outgoing = outgoing.header(name, value);
        }
    }
    let answer = outgoing
        .body(request.body.clone())
        .send()
        .await
        .expect("the upstream answers");
    let status = answer.status().as_u16();
    let content_type = answer
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_string());
    let mut body = answer.bytes().await.expect("the upstream's body").to_vec();
    if let Some(rewrite) = rewrite {
        let mut value: Value = serde_json::from_slice(&body).expect("a JSON answer to rewrite");
        rewrite(&mut value);
        body = serde_json::to_vec(&value).unwrap();
    }
    let mut out = format!("HTTP/1.1 {status} Forwarded\r\nContent-Length: {}\r\n", body.len());
    if let Some(content_type) = content_type {
        out.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(&body);
    out
}

fn json_response(status: u16, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status} Hostile\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---------------------------------------------------------------------------
// Clients of the real servers, through a hostile one
// ---------------------------------------------------------------------------

fn synapse_client(url: &str) -> SynapseClient {
    let s = common::synapse();
    SynapseClient::new(ClientConfig::new(url, SecretString::new(s.admin_token.as_str()))).expect("a client")
}

fn mas_client(url: &str) -> MasClient {
    let target = common::mas::mas_standin().target();
    MasClient::new(MasConfig::new(
        url,
        target.client_id.as_str(),
        SecretString::new(target.client_secret.as_str()),
    ))
    .expect("a MAS client")
}

async fn guarded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {GUARD:?}"))
}

fn names_the_limit(text: &str) {
    assert!(text.contains("exceeds 1 MiB"), "the error names the limit: {text}");
    assert_eq!(MAX_BODY_BYTES, 1024 * 1024, "the messages say 1 MiB");
}

// ---------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_body_without_end_is_given_up_at_the_limit() {
    let s = common::synapse();
    let sent = Arc::new(AtomicUsize::new(0));
    let streaming = sent.clone();
    // 64 MiB, then the connection stays open: endless to a client that reads
    // it whole (and small enough not to hurt the machine if one does).
    let hostile = Hostile::start(s.base_url.clone(), move |r| {
        if r.path().ends_with("/server_version") {
            Reply::Endless {
                bytes: 64 * 1024 * 1024,
                sent: streaming.clone(),
            }
        } else {
            Reply::Forward
        }
    })
    .await;
    let client = synapse_client(&hostile.url);
    // The other calls still go through.
    let admin = guarded("whoami", client.whoami()).await.expect("whoami, forwarded");
    assert_eq!(admin, s.admin_user_id);

    let e = guarded("server_version", client.server_version())
        .await
        .expect_err("an endless body is an error");
    names_the_limit(&e.to_string());
    assert_eq!(e.class(), ErrorClass::Transient, "{e:?}");
    // The client stopped reading near the limit: the server's writes stall
    // (or fail) once the socket buffers are full, long before 64 MiB.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let streamed = sent.load(Ordering::SeqCst);
    assert!(
        streamed < 16 * 1024 * 1024,
        "the client read on past the limit: {streamed} bytes streamed"
    );
}

#[tokio::test]
async fn a_content_length_above_the_limit_is_refused_without_reading() {
    let s = common::synapse();
    let hostile = Hostile::start(s.base_url.clone(), |r| {
        if r.path().contains("/_synapse/admin/v2/users/") {
            // The head only: a client that waits for the body waits for ever.
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{",
                MAX_BODY_BYTES + 1
            );
            Reply::Raw(head.into_bytes())
        } else {
            Reply::Forward
        }
    })
    .await;
    let mut config = ClientConfig::new(&hostile.url, SecretString::new(s.admin_token.as_str()));
    // Before the fix the client waited for the promised body until this.
    config.timeout = Duration::from_secs(20);
    let client = SynapseClient::new(config).unwrap();
    let user = UserId::new("hostile-cl", common::SERVER_NAME).unwrap();
    let e = guarded("get_user", client.get_user(&user))
        .await
        .expect_err("a body above the limit is an error");
    names_the_limit(&e.to_string());
    assert_eq!(e.class(), ErrorClass::Transient, "{e:?}");
    assert_eq!(hostile.count(|r| r.path().contains("/users/")), 1);
}

#[tokio::test]
async fn a_mas_body_above_the_limit_is_an_error_naming_it() {
    let mas = common::mas::mas_standin();
    let hostile = Hostile::start(mas.url(), |r| {
        if r.path().ends_with("/api/admin/v1/version") {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                10 * MAX_BODY_BYTES
            );
            Reply::Raw(head.into_bytes())
        } else {
            Reply::Forward
        }
    })
    .await;
    let e = guarded("version", mas_client(&hostile.url).version())
        .await
        .expect_err("too large");
    names_the_limit(&e.to_string());
}

// ---------------------------------------------------------------------------
// Numbers meeting the clock
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_token_that_never_expires_neither_panics_nor_is_renewed_within_the_hour() {
    let mas = common::mas::mas_standin();
    let hostile = Hostile::start(mas.url(), |r| {
        if r.path() == "/oauth2/token" {
            Reply::Rewrite(Box::new(|v: &mut Value| v["expires_in"] = json!(u64::MAX)))
        } else {
            Reply::Forward
        }
    })
    .await;
    let client = mas_client(&hostile.url);
    // Each in a task of its own: a panic there is a JoinError, not this test's.
    for round in 0..3 {
        let c = client.clone();
        let version = guarded("version", tokio::spawn(async move { c.version().await }))
            .await
            .unwrap_or_else(|e| panic!("round {round}: the client panicked: {e}"))
            .expect("MAS answers through the proxy");
        assert_eq!(version, common::mas::MAS_VERSION);
    }
    let c = client.clone();
    let found = tokio::spawn(async move { c.user_by_username("nobody-hostile").await })
        .await
        .expect("no panic")
        .expect("a lookup");
    assert!(found.is_none());
    assert_eq!(
        hostile.count(|r| r.path() == "/oauth2/token"),
        1,
        "the token is kept (at most an hour) and reused"
    );
}

#[tokio::test]
async fn a_wait_of_millions_of_years_is_bounded() {
    let s = common::synapse();
    for retry_after in [json!(u64::MAX), json!(1e300), json!(-5), json!("soon")] {
        let answer =
            json!({"errcode": "M_LIMIT_EXCEEDED", "error": "Too Many Requests", "retry_after_ms": retry_after});
        let hostile = Hostile::start(s.base_url.clone(), move |r| {
            if r.path().contains("/_synapse/admin/v2/users/") {
                Reply::Raw(json_response(429, &answer))
            } else {
                Reply::Forward
            }
        })
        .await;
        let client = synapse_client(&hostile.url);
        let user = UserId::new("hostile-wait", common::SERVER_NAME).unwrap();
        let e = guarded("get_user", client.get_user(&user))
            .await
            .expect_err("rate limited");
        // Synapse's error is still read, and the wait is at most the
        // controller's longest backoff.
        assert!(e.to_string().contains("M_LIMIT_EXCEEDED"), "{retry_after}: {e}");
        match e.class() {
            ErrorClass::RateLimited(wait) => {
                assert!(
                    wait.is_none_or(|w| w <= MAX_RETRY_AFTER),
                    "{retry_after}: a wait of {wait:?}"
                );
                if retry_after.is_u64() || retry_after.is_f64() && retry_after.as_f64().unwrap() > 0.0 {
                    assert_eq!(wait, Some(MAX_RETRY_AFTER), "{retry_after}");
                }
            }
            other => panic!("{retry_after}: {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Listings
// ---------------------------------------------------------------------------

/// A page of `n` upstream providers whose IDs start at `first`.
fn providers_page(first: usize, n: usize) -> Value {
    let data: Vec<Value> = (first..first + n)
        .map(|i| json!({"type": "upstream-oauth-provider", "id": format!("01HOSTILE{i:017}"), "attributes": {}}))
        .collect();
    json!({"meta": {"count": 1_000_000}, "data": data})
}

fn is_provider_listing(r: &Request) -> bool {
    r.path() == "/api/admin/v1/upstream-oauth-providers"
}

#[tokio::test]
async fn a_listing_whose_cursor_never_moves_ends_with_an_error() {
    let mas = common::mas::mas_standin();
    // page[after] ignored: always the first page, full.
    let hostile = Hostile::start(mas.url(), |r| {
        if is_provider_listing(r) {
            Reply::Raw(json_response(200, &providers_page(0, 100)))
        } else {
            Reply::Forward
        }
    })
    .await;
    let e = guarded("providers", mas_client(&hostile.url).providers())
        .await
        .expect_err("a listing that never ends");
    let text = e.to_string();
    assert!(text.contains("cursor") && text.contains("does not move"), "{text}");
    assert_eq!(hostile.count(is_provider_listing), 2, "the second page gave it away");
}

#[tokio::test]
async fn a_listing_without_end_stops_at_the_page_limit() {
    let mas = common::mas::mas_standin();
    // A new full page each time: the cursor moves, the listing never ends.
    let pages = Arc::new(AtomicUsize::new(0));
    let hostile = Hostile::start(mas.url(), move |r| {
        if is_provider_listing(r) {
            let n = pages.fetch_add(1, Ordering::SeqCst);
            Reply::Raw(json_response(200, &providers_page(n * 100, 100)))
        } else {
            Reply::Forward
        }
    })
    .await;
    let e = guarded("providers", mas_client(&hostile.url).providers())
        .await
        .expect_err("a listing that never ends");
    let text = e.to_string();
    assert!(text.contains("50 pages"), "{text}");
    assert_eq!(hostile.count(is_provider_listing), 50);
}

// ---------------------------------------------------------------------------
// What goes into status
// ---------------------------------------------------------------------------

#[tokio::test]
async fn versions_and_the_admin_id_are_scrubbed_and_bounded_where_they_are_read() {
    let s = common::synapse();
    let token = s.admin_token.clone();
    let hostile = Hostile::start(s.base_url.clone(), move |r| {
        if r.path().ends_with("/server_version") {
            // The token, upper-cased and HTML-escaped, with a new line, a
            // bidi override and 10,000 bytes more.
            let version = format!(
                "1.163.2 {}\n\u{202E}{}",
                token.to_uppercase().replace('_', "&#95;"),
                "x".repeat(10_000)
            );
            Reply::Raw(json_response(200, &json!({"server_version": version})))
        } else {
            Reply::Forward
        }
    })
    .await;
    let client = synapse_client(&hostile.url);
    let version = guarded("server_version", client.server_version())
        .await
        .expect("a version");
    // The new line and the override are `?`.
    let shown: String = version.chars().take(200).collect();
    assert!(version.starts_with("1.163.2 ***??x"), "{shown}");
    assert!(version.len() <= MAX_VERSION_BYTES, "{} bytes", version.len());
    assert!(version.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "{shown:?}");
    assert!(!version.to_lowercase().contains(&s.admin_token.to_lowercase()[..8]));

    // A whoami that echoes the token is not a user ID.
    let token = s.admin_token.clone();
    let hostile = Hostile::start(s.base_url.clone(), move |r| {
        if r.path().ends_with("/account/whoami") {
            Reply::Raw(json_response(
                200,
                &json!({"user_id": format!("@{token}:{}", common::SERVER_NAME)}),
            ))
        } else {
            Reply::Forward
        }
    })
    .await;
    let e = guarded("whoami", synapse_client(&hostile.url).whoami())
        .await
        .expect_err("not a user ID to keep");
    assert!(!format!("{e} {e:?}").contains(&s.admin_token), "{e:?}");
    assert_eq!(e.class(), ErrorClass::NotSynapse, "{e:?}");

    // MAS's version, echoing the client secret the token request carried.
    let mas = common::mas::mas_standin();
    let secret = mas.target().client_secret;
    let hostile = Hostile::start(mas.url(), move |r| {
        if r.path().ends_with("/api/admin/v1/version") {
            let version = format!("1.22.0+{}", secret.to_uppercase());
            Reply::Raw(json_response(200, &json!({"version": version})))
        } else {
            Reply::Forward
        }
    })
    .await;
    let version = guarded("mas version", mas_client(&hostile.url).version())
        .await
        .expect("a version");
    assert_eq!(version, "1.22.0+***");
}
