//! Secrets must not leak through what a homeserver URL answers: error pages
//! and JSON errors that echo the request, redirects that would re-send it,
//! and URLs that are not a Synapse at all. Each misbehaving server here is a
//! hand-rolled HTTP/1.1 server on 127.0.0.1; no Synapse is needed.

use matrix_user_operator_testkit as common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use common::fake_kube::FakeApiServer;
use kube::runtime::reflector::store::Writer;
use matrix_user_operator::api::{Homeserver, MatrixUser};
use matrix_user_operator::backend::mas::{MasClient, MasConfig};
use matrix_user_operator::controller::{Config, Context, HOMESERVER_FINALIZER, reconcile_homeserver};
use matrix_user_operator::metrics::Metrics;
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::synapse::{
    ClientConfig, ErrorClass, Registration, SynapseClient, SynapseError, UserId, UserUpdate,
};
use serde_json::json;

const TOKEN: &str = "admin-token-that-must-not-leak";
const PASSWORD: &str = "password-that-must-not-leak";
/// Needs escaping in JSON: an echo of the JSON body carries it as `pa\"ss\\…`.
const QUOTED_PASSWORD: &str = r#"pa"ss\word-that-must-not-leak"#;

// ---------------------------------------------------------------------------
// A local HTTP server
// ---------------------------------------------------------------------------

/// A hand-rolled HTTP/1.1 server on 127.0.0.1, one request per connection:
/// each request is read whole (head and body), recorded, and answered with
/// the bytes `answer` makes of it.
struct LocalServer {
    url: String,
    received: Arc<Mutex<Vec<String>>>,
}

impl LocalServer {
    fn start(answer: impl Fn(&Request) -> Vec<u8> + Send + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let received = Arc::new(Mutex::new(Vec::new()));
        let recording = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(request) = read_request(&mut stream) else {
                    continue;
                };
                recording.lock().unwrap().push(request.whole());
                let _ = stream.write_all(&answer(&request));
            }
        });
        Self { url, received }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().unwrap().clone()
    }
}

struct Request {
    /// Request line and headers.
    head: String,
    body: String,
}

impl Request {
    fn whole(&self) -> String {
        format!("{}\r\n\r\n{}", self.head, self.body)
    }

    /// The request with its body first, as an echo that puts the most
    /// telling part on top: anything keeping the first few hundred bytes
    /// keeps the password and the token.
    fn echo(&self) -> String {
        format!("{}\n{}", self.body, self.head)
    }
}

fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        bytes.extend_from_slice(&chunk[..n]);
        if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = bytes[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn response(status: u16, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} Whatever\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

/// A web server's page, echoing the request as some debug error pages do.
fn echo_page(status: u16) -> impl Fn(&Request) -> Vec<u8> {
    move |r| {
        let page = format!(
            "<html><head><title>{status}</title></head><body><h1>Error {status}</h1><pre>{}</pre></body></html>",
            r.echo()
        );
        response(status, &[("Content-Type", "text/html; charset=utf-8")], &page)
    }
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn client_of(url: &str) -> SynapseClient {
    SynapseClient::new(ClientConfig::new(url, SecretString::new(TOKEN))).expect("a client")
}

fn alice() -> UserId {
    UserId::new("alice", "example.test").unwrap()
}

fn with_password(password: &str) -> UserUpdate {
    UserUpdate {
        password: Some(SecretString::new(password)),
        displayname: Some("Alice".into()),
        ..Default::default()
    }
}

/// The forms a secret can take in an echo of the request: as it is (the
/// Authorization header) and JSON-escaped (the body).
fn forms_of(secret: &str) -> Vec<String> {
    let escaped = serde_json::to_string(secret).unwrap();
    vec![secret.to_string(), escaped[1..escaped.len() - 1].to_string()]
}

fn assert_leaks_nothing(e: &SynapseError, password: &str) {
    for text in [e.to_string(), format!("{e:?}")] {
        for secret in forms_of(TOKEN).into_iter().chain(forms_of(password)) {
            assert!(!text.contains(&secret), "{secret:?} leaked into {text}");
        }
        assert!(!text.contains('<'), "page markup in {text}");
    }
}

// ---------------------------------------------------------------------------
// Error pages and JSON errors that echo the request
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_error_page_echoing_the_request_leaks_neither_password_nor_token() {
    for status in [502, 400] {
        let proxy = LocalServer::start(echo_page(status));
        let e = client_of(&proxy.url)
            .put_user(&alice(), &with_password(PASSWORD))
            .await
            .expect_err("an error page is an error");
        assert!(proxy.received()[0].contains(PASSWORD), "the page did echo the password");
        assert_leaks_nothing(&e, PASSWORD);
        let text = e.to_string();
        assert!(text.contains(&format!("HTTP {status}")), "{text}");
        assert!(
            text.contains("text/html"),
            "the content type describes the body: {text}"
        );
        // A proxy's 5xx page while Synapse restarts is retried; a 4xx page
        // says the URL is not Synapse's API.
        assert_eq!(e.is_transient(), status >= 500, "{e:?}");
        if status < 500 {
            assert_eq!(e.class(), ErrorClass::NotSynapse, "{e:?}");
        }
    }
}

#[tokio::test]
async fn a_json_error_echoing_the_request_is_redacted() {
    // Synapse's `error`, then the errcode itself, echoing the request.
    let in_error = |r: &Request| {
        let body = json!({"errcode": "M_BAD_JSON", "error": format!("cannot parse {}", r.echo())});
        response(400, &[("Content-Type", "application/json")], &body.to_string())
    };
    let in_errcode = |r: &Request| {
        let body = json!({"errcode": r.echo(), "error": "bad request"});
        response(400, &[("Content-Type", "application/json")], &body.to_string())
    };
    for password in [PASSWORD, QUOTED_PASSWORD] {
        let proxy = LocalServer::start(in_error);
        let e = client_of(&proxy.url)
            .put_user(&alice(), &with_password(password))
            .await
            .expect_err("a 400");
        assert_leaks_nothing(&e, password);
        let text = e.to_string();
        assert!(text.contains("M_BAD_JSON") && text.contains("cannot parse"), "{text}");
        assert!(text.contains("***"), "the secrets' places are marked: {text}");
        assert!(text.len() < 400, "bounded: {} bytes", text.len());

        let proxy = LocalServer::start(in_errcode);
        let e = client_of(&proxy.url)
            .put_user(&alice(), &with_password(password))
            .await
            .expect_err("a 400");
        assert_leaks_nothing(&e, password);
    }
}

#[tokio::test]
async fn a_registration_error_echoing_the_request_leaks_neither_password_nor_mac() {
    // A nonce, then a JSON error quoting the registration request.
    let server = LocalServer::start(|r: &Request| {
        if r.head.starts_with("GET ") {
            return response(200, &[("Content-Type", "application/json")], r#"{"nonce": "n0nce"}"#);
        }
        let body = json!({"errcode": "M_UNKNOWN", "error": format!("cannot register {}", r.echo())});
        response(400, &[("Content-Type", "application/json")], &body.to_string())
    });
    let mut config = ClientConfig::new(&server.url, SecretString::new(TOKEN));
    config.registration_shared_secret = Some(SecretString::new("shared-secret-that-must-not-leak"));
    let client = SynapseClient::new(config).expect("a client");
    for password in [PASSWORD, QUOTED_PASSWORD] {
        let value = SecretString::new(password);
        let registration = Registration {
            localpart: "alice",
            password: &value,
            displayname: Some("Alice"),
            admin: false,
            user_type: None,
        };
        let e = client.register(&registration).await.expect_err("a 400");
        let posted = server.received().last().cloned().unwrap();
        let body: serde_json::Value = serde_json::from_str(posted.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        let mac = body["mac"].as_str().expect("the request was signed").to_string();
        assert_eq!(body["password"], password, "the request carried the password");
        assert_leaks_nothing(&e, password);
        let text = format!("{e} {e:?}");
        assert!(!text.contains(&mac), "the mac leaked into {text}");
        assert!(!text.contains("shared-secret-that-must-not-leak"), "{text}");
        assert!(text.contains("cannot register"), "{text}");
    }
}

// ---------------------------------------------------------------------------
// MatrixAccessToken calls: a bot's token and the managed password never
// leak from an answer that echoes the request
// ---------------------------------------------------------------------------

const BOT_TOKEN: &str = "syt_bot-token-that-must-not-leak";

fn assert_no_bot_secret(text: &str, password: &str) {
    for secret in forms_of(TOKEN)
        .into_iter()
        .chain(forms_of(BOT_TOKEN))
        .chain(forms_of(password))
    {
        assert!(!text.contains(&secret), "{secret:?} leaked into {text}");
    }
}

#[tokio::test]
async fn token_calls_echoed_back_leak_neither_the_bots_token_nor_the_password() {
    let in_error = |r: &Request| {
        let body = json!({"errcode": "M_UNKNOWN", "error": format!("cannot {}", r.echo())});
        response(400, &[("Content-Type", "application/json")], &body.to_string())
    };
    for password in [PASSWORD, QUOTED_PASSWORD] {
        for answer in [0, 1] {
            let server = if answer == 0 {
                LocalServer::start(in_error)
            } else {
                LocalServer::start(echo_page(502))
            };
            let client = client_of(&server.url);
            let bot = SecretString::new(BOT_TOKEN);
            let errors = [
                client.token_whoami(&bot).await.expect_err("whoami").to_string(),
                client.logout(&bot).await.expect_err("logout").to_string(),
                client
                    .password_login("alice", &SecretString::new(password), "BOT1", Some("Bot"))
                    .await
                    .expect_err("login")
                    .to_string(),
                client
                    .admin_login(&alice(), Some(1))
                    .await
                    .expect_err("admin login")
                    .to_string(),
            ];
            let received = server.received().join("\n");
            assert!(received.contains(BOT_TOKEN) && received.contains(&forms_of(password)[1]));
            for text in errors {
                assert_no_bot_secret(&text, password);
            }
        }
    }
}

#[tokio::test]
async fn a_token_an_answer_carries_in_an_unfit_place_is_not_taken() {
    // A whoami that names the token as the user, and a login whose device
    // ID is the password: neither goes anywhere (status, Secret), nor into
    // the error.
    let whoami = LocalServer::start(|_: &Request| {
        let body = json!({"user_id": BOT_TOKEN, "device_id": PASSWORD});
        response(200, &[("Content-Type", "application/json")], &body.to_string())
    });
    let e = client_of(&whoami.url)
        .token_whoami(&SecretString::new(BOT_TOKEN))
        .await
        .expect_err("the token is no user ID");
    assert_no_bot_secret(&format!("{e} {e:?}"), PASSWORD);
    let login = LocalServer::start(|_: &Request| {
        let body = json!({"access_token": "syt_new", "device_id": PASSWORD, "user_id": "@alice:example.test"});
        response(200, &[("Content-Type", "application/json")], &body.to_string())
    });
    let e = client_of(&login.url)
        .password_login("alice", &SecretString::new(PASSWORD), "BOT1", None)
        .await
        .expect_err("the password is no device ID");
    assert_no_bot_secret(&format!("{e} {e:?}"), PASSWORD);
}

// ---------------------------------------------------------------------------
// Room calls (spec.rooms): neither the admin token nor the user's
// short-lived token leaks from an answer that echoes the request, nor does
// an answer that names a secret as a room
// ---------------------------------------------------------------------------

#[tokio::test]
async fn room_calls_echoed_back_leak_neither_the_admin_token_nor_the_users_token() {
    let in_error = |r: &Request| {
        let body = json!({"errcode": "M_FORBIDDEN", "error": format!("not in room {}", r.echo())});
        response(403, &[("Content-Type", "application/json")], &body.to_string())
    };
    for answer in [0, 1] {
        let server = if answer == 0 {
            LocalServer::start(in_error)
        } else {
            LocalServer::start(echo_page(502))
        };
        let client = client_of(&server.url);
        let user = SecretString::new(BOT_TOKEN);
        let mut errors = vec![
            client
                .joined_rooms(&alice())
                .await
                .expect_err("joined_rooms")
                .to_string(),
            client
                .resolve_alias("#general:example.test")
                .await
                .expect_err("alias")
                .to_string(),
            client
                .join_room("!room:example.test", &alice())
                .await
                .expect_err("join")
                .to_string(),
        ];
        // A 403 "not in room" to the leave is a room left already; any
        // other answer is an error, without the token.
        if let Err(e) = client.leave_room(&user, "!room:example.test").await {
            errors.push(e.to_string());
        }
        let received = server.received().join("\n");
        assert!(received.contains(TOKEN) && received.contains(BOT_TOKEN), "{received}");
        for text in errors {
            assert_no_bot_secret(&text, PASSWORD);
        }
    }
}

#[tokio::test]
async fn a_room_id_that_names_a_secret_is_not_taken() {
    let server = LocalServer::start(|r: &Request| {
        let body = if r.head.contains("joined_rooms") {
            json!({"joined_rooms": [TOKEN, "!ok:example.test"], "total": 2})
        } else {
            json!({"room_id": TOKEN, "servers": []})
        };
        response(200, &[("Content-Type", "application/json")], &body.to_string())
    });
    let client = client_of(&server.url);
    let rooms = client.joined_rooms(&alice()).await.expect("the rooms");
    assert_eq!(rooms, vec!["!ok:example.test".to_string()]);
    let e = client
        .resolve_alias("#general:example.test")
        .await
        .expect_err("the token is no room ID");
    assert_no_bot_secret(&format!("{e} {e:?}"), PASSWORD);
}

// ---------------------------------------------------------------------------
// MAS answers that echo the request
// ---------------------------------------------------------------------------

const MAS_CLIENT_SECRET: &str = "mas-client-secret-that-must-not-leak";
const MAS_TOKEN: &str = "mas-access-token-that-must-not-leak";

/// A MAS that grants a token, then answers every admin call with an error
/// whose title echoes the request (head and body); with `token_echo`, its
/// token endpoint refuses with an OAuth error echoing the request instead.
fn echoing_mas(token_echo: bool) -> LocalServer {
    LocalServer::start(move |r: &Request| {
        let json = [("Content-Type", "application/json")];
        if r.head.starts_with("POST /oauth2/token") {
            if token_echo {
                let body = json!({"error": r.echo(), "error_description": r.echo()});
                return response(401, &json, &body.to_string());
            }
            let body = json!({"access_token": MAS_TOKEN, "token_type": "Bearer", "expires_in": 300});
            return response(200, &json, &body.to_string());
        }
        let body = json!({"errors": [{"title": format!("bad request {}", r.echo())}]});
        response(400, &json, &body.to_string())
    })
}

fn assert_mas_leaks_nothing(text: &str, password: &str) {
    // The Basic credentials of the token request, as the echo carries them.
    let basic = common::mas::util::base64_encode(format!("mxu:{MAS_CLIENT_SECRET}").as_bytes());
    for secret in forms_of(password)
        .into_iter()
        .chain(forms_of(MAS_CLIENT_SECRET))
        .chain(forms_of(MAS_TOKEN))
        .chain([basic])
    {
        assert!(!text.contains(&secret), "{secret:?} leaked into {text}");
    }
}

#[tokio::test]
async fn a_mas_error_echoing_the_request_leaks_neither_password_nor_token_nor_client_secret() {
    for password in [PASSWORD, QUOTED_PASSWORD] {
        let mas = echoing_mas(false);
        let client = MasClient::new(MasConfig::new(&mas.url, "mxu", SecretString::new(MAS_CLIENT_SECRET)))
            .expect("a MAS client");
        let e = client
            .set_password("01JUSER", &SecretString::new(password))
            .await
            .expect_err("a 400");
        let posted = mas.received().last().cloned().unwrap();
        assert!(posted.contains(MAS_TOKEN), "the call carried the token");
        let text = format!("{e} {e:?}");
        assert!(text.contains("bad request"), "{text}");
        assert_mas_leaks_nothing(&text, password);
    }
}

#[tokio::test]
async fn a_mas_personal_session_error_echoing_the_request_leaks_nothing() {
    let mas = echoing_mas(false);
    let client =
        MasClient::new(MasConfig::new(&mas.url, "mxu", SecretString::new(MAS_CLIENT_SECRET))).expect("a MAS client");
    let errors = [
        client
            .create_personal_session("01JUSER", "bot", "urn:matrix:client:api:*", Some(60))
            .await
            .expect_err("a 400")
            .to_string(),
        client
            .revoke_personal_session("01JSESSION")
            .await
            .expect_err("a 400")
            .to_string(),
        client
            .personal_session("01JSESSION")
            .await
            .expect_err("a 400")
            .to_string(),
    ];
    for text in errors {
        assert!(text.contains("bad request"), "{text}");
        assert_mas_leaks_nothing(&text, PASSWORD);
    }
}

#[tokio::test]
async fn a_mas_token_error_echoing_the_request_leaks_no_client_secret() {
    let mas = echoing_mas(true);
    let client =
        MasClient::new(MasConfig::new(&mas.url, "mxu", SecretString::new(MAS_CLIENT_SECRET))).expect("a MAS client");
    let e = client.version().await.expect_err("no token");
    assert!(
        mas.received()[0].to_lowercase().contains("authorization: basic"),
        "the token request carried the client's credentials"
    );
    assert_mas_leaks_nothing(&format!("{e} {e:?}"), PASSWORD);
}

// ---------------------------------------------------------------------------
// Redirects
// ---------------------------------------------------------------------------

#[tokio::test]
async fn redirects_are_not_followed() {
    for status in [307, 308] {
        // Where the redirect points: it would receive the PUT body again.
        let elsewhere = LocalServer::start(|_| {
            let user = json!({"name": "@alice:example.test"});
            response(200, &[("Content-Type", "application/json")], &user.to_string())
        });
        let location = format!("{}/_synapse/admin/v2/users/@alice:example.test", elsewhere.url);
        let redirecting = LocalServer::start(move |_| response(status, &[("Location", &location)], ""));

        let e = client_of(&redirecting.url)
            .put_user(&alice(), &with_password(PASSWORD))
            .await
            .expect_err("a redirect is an error");
        assert_eq!(redirecting.received().len(), 1);
        assert_eq!(elsewhere.received(), Vec::<String>::new(), "HTTP {status} was followed");
        let text = e.to_string();
        assert!(text.contains("redirect") && text.contains("not followed"), "{text}");
        assert!(text.contains(&format!("HTTP {status}")), "{text}");
        let port = elsewhere.url.rsplit(':').next().unwrap();
        assert!(!text.contains(port), "the Location stays out: {text}");
        assert_leaks_nothing(&e, PASSWORD);
        // It waits for another spec.url.
        assert_eq!(e.class(), ErrorClass::NotSynapse, "{e:?}");
        assert!(!e.is_transient());
    }
}

// ---------------------------------------------------------------------------
// A URL that is not a Synapse
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_404_page_is_not_an_absent_account() {
    let server = LocalServer::start(echo_page(404));
    let c = client_of(&server.url);
    // Only Synapse's own M_NOT_FOUND says an account or a binding is absent.
    let e = c.get_user(&alice()).await.expect_err("a web server's 404");
    assert_eq!(e.class(), ErrorClass::NotSynapse, "{e:?}");
    assert_leaks_nothing(&e, PASSWORD);
    let e = c
        .threepid_owner("email", "alice@example.test")
        .await
        .expect_err("a web server's 404");
    assert_eq!(e.class(), ErrorClass::NotSynapse, "{e:?}");
    let e = c
        .external_id_owner("oidc", "alice")
        .await
        .expect_err("a web server's 404");
    assert_eq!(e.class(), ErrorClass::NotSynapse, "{e:?}");
}

const NS: &str = "chat";
const HOMESERVER_PATH: &str = "/apis/matrix-operator.io/v1alpha1/namespaces/chat/homeservers/hs";

/// Reconciles a Homeserver whose spec.url is `url`; its Ready condition's
/// reason and message, and whether the reconcile asks to be retried.
async fn homeserver_against(url: &str) -> (String, String, bool) {
    let (client, fake) = FakeApiServer::start();
    let hs = json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "Homeserver",
        "metadata": {"name": "hs", "namespace": NS, "generation": 1, "finalizers": [HOMESERVER_FINALIZER]},
        "spec": {"url": url, "adminTokenSecretRef": {"name": "admin", "key": "token"}, "policy": {}},
    });
    fake.put(hs.clone());
    fake.put(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "admin", "namespace": NS},
        "stringData": {"token": TOKEN},
    }));
    let ctx = Arc::new(Context::new(
        client,
        Config::default(),
        Writer::<MatrixUser>::default().as_reader(),
        Metrics::new(),
    ));
    let result = reconcile_homeserver(Arc::new(serde_json::from_value(hs).unwrap()), ctx).await;
    let stored: Homeserver = serde_json::from_value(fake.get(HOMESERVER_PATH).expect("stored")).unwrap();
    let status = stored.status.expect("a status");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("Ready");
    assert_eq!(ready.status, "False");
    (ready.reason.clone(), ready.message.clone(), result.is_err())
}

fn assert_clean_message(message: &str) {
    assert!(!message.contains('<'), "page markup in {message}");
    assert!(!message.contains(TOKEN), "the token in {message}");
}

#[tokio::test]
async fn a_homeserver_url_that_is_not_a_synapse_gets_its_own_reason() {
    let wrong_shape = |_: &Request| response(200, &[("Content-Type", "application/json")], r#"{"hello":"world"}"#);
    let servers = [
        ("a page", LocalServer::start(echo_page(200))),
        ("a 404 page", LocalServer::start(echo_page(404))),
        ("JSON of another shape", LocalServer::start(wrong_shape)),
    ];
    for (what, server) in servers {
        let (reason, message, retried) = homeserver_against(&server.url).await;
        assert_eq!(reason, "NotSynapse", "{what}: {message}");
        assert!(
            message.starts_with("spec.url does not answer like a Synapse homeserver"),
            "{what}: {message}"
        );
        assert_clean_message(&message);
        assert!(!retried, "{what}: waits for a change of spec.url");
    }
    let (_, message, _) = homeserver_against(&LocalServer::start(echo_page(200)).url).await;
    assert!(
        message.contains("HTTP 200") && message.contains("text/html"),
        "{message}"
    );
}

#[tokio::test]
async fn a_proxy_error_page_while_synapse_restarts_is_retried() {
    let proxy = LocalServer::start(echo_page(502));
    let (reason, message, retried) = homeserver_against(&proxy.url).await;
    assert_eq!(reason, "SynapseError", "{message}");
    assert!(message.contains("HTTP 502"), "{message}");
    assert_clean_message(&message);
    assert!(retried, "a 5xx is retried with backoff");
}

// ---------------------------------------------------------------------------
// Echoes in other encodings
// ---------------------------------------------------------------------------

/// A password with every character the encodings below change.
const ODD_PASSWORD: &str = "pass+word/that=must&not leak<\"é>";

/// A way a server may re-encode what it echoes.
type Encoding = fn(&str) -> String;

/// The ways a server may re-encode what it echoes, each with its name.
fn encodings() -> Vec<(&'static str, Encoding)> {
    vec![
        ("upper-cased", |s| s.to_uppercase()),
        ("form-encoded", |s| {
            url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
        }),
        ("percent-encoded, %20 for a space", |s| {
            url::form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        }),
        ("\\u-escaped", |s| {
            s.encode_utf16().map(|u| format!("\\u{u:04x}")).collect()
        }),
        ("HTML-escaped", |s| {
            s.chars()
                .map(|c| match c {
                    '&' => "&amp;".to_string(),
                    '<' => "&lt;".to_string(),
                    '>' => "&gt;".to_string(),
                    '"' => "&quot;".to_string(),
                    c if c.is_ascii_alphanumeric() => c.to_string(),
                    c => format!("&#x{:X};", c as u32),
                })
                .collect()
        }),
    ]
}

/// Whether `text` shows the first 8 characters of `secret` in any of the
/// encodings (ignoring case): a prefix cut at the end of a message leaks too.
fn shows(text: &str, secret: &str) -> Option<String> {
    let prefix: String = secret.chars().take(8).collect();
    let text = text.to_lowercase();
    std::iter::once(prefix.clone())
        .chain(encodings().into_iter().map(|(_, encode)| encode(&prefix)))
        .find(|form| text.contains(&form.to_lowercase()))
}

#[tokio::test]
async fn an_echo_in_any_encoding_leaks_neither_password_nor_token() {
    for (name, encode) in encodings() {
        let server = LocalServer::start(move |r: &Request| {
            // The echo, encoded, as Synapse's error text: the body first.
            let body = json!({"errcode": "M_BAD_JSON", "error": format!("cannot parse {}", encode(&r.echo()))});
            response(400, &[("Content-Type", "application/json")], &body.to_string())
        });
        let e = client_of(&server.url)
            .put_user(&alice(), &with_password(ODD_PASSWORD))
            .await
            .expect_err("a 400");
        let text = format!("{e} {e:?}");
        assert!(text.contains("cannot parse"), "{name}: {text}");
        for secret in [TOKEN, ODD_PASSWORD] {
            assert_eq!(shows(&text, secret), None, "{name}: {secret:?} leaked into {text}");
        }
        assert!(text.contains("***"), "{name}: the secrets' places are marked: {text}");
    }
}

#[tokio::test]
async fn a_mas_echo_of_the_basic_credential_without_its_scheme_is_redacted() {
    // The token endpoint refuses, quoting the credential alone, then each
    // encoding of it.
    for (name, encode) in std::iter::once(("as it is", (|s: &str| s.to_string()) as Encoding)).chain(encodings()) {
        let mas = LocalServer::start(move |r: &Request| {
            let credential = r
                .head
                .lines()
                .find_map(|l| l.strip_prefix("authorization: Basic "))
                .unwrap_or("MISSING");
            let body = json!({"error": format!("bad {}", encode(credential))});
            response(401, &[("Content-Type", "application/json")], &body.to_string())
        });
        let client = MasClient::new(MasConfig::new(&mas.url, "mxu", SecretString::new(MAS_CLIENT_SECRET)))
            .expect("a MAS client");
        let e = client.version().await.expect_err("no token");
        let basic = common::mas::util::base64_encode(format!("mxu:{MAS_CLIENT_SECRET}").as_bytes());
        assert!(mas.received()[0].contains(&basic), "the request carried the credential");
        let text = format!("{e} {e:?}");
        assert!(text.contains("bad ") && !text.contains("MISSING"), "{name}: {text}");
        assert_eq!(shows(&text, &basic), None, "{name}: the credential leaked into {text}");
        assert_mas_leaks_nothing(&text, PASSWORD);
    }
}
