//! A hostile server for the tests: an HTTP proxy on 127.0.0.1 in front of a
//! real one (the test Synapse, the MAS stand-in) that forwards every request
//! except where the test's rule makes it misbehave.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// A request as the rule sees it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// How many requests to this path (query left out) came before this one.
    pub earlier: usize,
    /// The bearer token it carries, if any (to tell the admin's requests
    /// from a user's).
    pub bearer: Option<String>,
}

/// What the proxy does with one request.
pub enum Misbehave {
    /// Forward it and its answer unchanged.
    Forward,
    /// Forward it after a pause.
    Delay(Duration),
    /// Answer in place of the upstream server.
    Respond {
        status: u16,
        content_type: &'static str,
        body: Vec<u8>,
    },
    /// Answer with a body that never ends (chunks of zeros, until the
    /// client goes away).
    Endless { status: u16, content_type: &'static str },
    /// Forward it, then change the answer's body (the status is kept).
    Rewrite(Box<dyn FnOnce(Vec<u8>) -> Vec<u8> + Send>),
}

type Rule = Arc<dyn Fn(&Seen) -> Misbehave + Send + Sync>;
type ProxyBody = BoxBody<Bytes, std::io::Error>;

pub struct Proxy {
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Proxy {
    /// Starts a proxy to `upstream` (a base URL) that does what `rule` says
    /// with each request.
    pub async fn start(upstream: &str, rule: impl Fn(&Seen) -> Misbehave + Send + Sync + 'static) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rule: Rule = Arc::new(rule);
        let upstream = upstream.trim_end_matches('/').to_string();
        let http = super::synapse::http_client();
        let recording = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (rule, upstream, http, recording) =
                    (rule.clone(), upstream.clone(), http.clone(), recording.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let (rule, upstream, http, recording) =
                            (rule.clone(), upstream.clone(), http.clone(), recording.clone());
                        async move { Ok::<_, Infallible>(handle(req, &rule, &upstream, &http, &recording).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { url, seen }
    }

    /// Every request so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests went to paths starting with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        self.seen().iter().filter(|s| s.path.starts_with(prefix)).count()
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    rule: &Rule,
    upstream: &str,
    http: &reqwest::Client,
    recording: &Mutex<Vec<Seen>>,
) -> Response<ProxyBody> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let seen = {
        let mut all = recording.lock().unwrap();
        let bare = path.split('?').next().unwrap_or_default();
        let earlier = all.iter().filter(|s| s.path.split('?').next() == Some(bare)).count();
        let bearer = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let seen = Seen {
            method: req.method().to_string(),
            path: path.clone(),
            earlier,
            bearer,
        };
        all.push(seen.clone());
        seen
    };
    let (rewrite, delay) = match rule(&seen) {
        Misbehave::Forward => (None, None),
        Misbehave::Delay(d) => (None, Some(d)),
        Misbehave::Rewrite(f) => (Some(f), None),
        Misbehave::Respond {
            status,
            content_type,
            body,
        } => return answer(status, content_type, full(body)),
        Misbehave::Endless { status, content_type } => {
            let zeros = Bytes::from(vec![b'0'; 64 * 1024]);
            let endless = futures::stream::repeat(zeros).map(|b| Ok::<_, std::io::Error>(Frame::data(b)));
            return answer(status, content_type, BodyExt::boxed(StreamBody::new(endless)));
        }
    };
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let mut forwarded = http.request(parts.method, format!("{upstream}{path}")).body(body);
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            forwarded = forwarded.header(name, value);
        }
    }
    let Ok(reply) = forwarded.send().await else {
        return answer(502, "text/plain", full(b"upstream unreachable".to_vec()));
    };
    let status = reply.status().as_u16();
    let content_type = reply
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let mut body = reply.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    if let Some(f) = rewrite {
        body = f(body);
    }
    let mut response = Response::new(full(body));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    response
}

fn full(body: Vec<u8>) -> ProxyBody {
    BodyExt::boxed(Full::new(Bytes::from(body)).map_err(|never: Infallible| match never {}))
}

fn answer(status: u16, content_type: &str, body: ProxyBody) -> Response<ProxyBody> {
    let mut response = Response::new(body);
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert(http::header::CONTENT_TYPE, content_type.parse().unwrap());
    response
}
