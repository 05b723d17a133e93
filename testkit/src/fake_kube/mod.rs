//! A fake Kubernetes API server for controller tests, served over HTTP on
//! loopback so that both in-process kube clients and the operator binary
//! (through a kubeconfig) can use it. It answers as a kube-apiserver does
//! where the operator depends on it: resourceVersions and optimistic
//! concurrency, the status subresource, server-side apply with field
//! ownership, watches with history and 410 Gone, metadata-only requests,
//! finalizers, owner-reference garbage collection and namespace
//! termination. It records every request so tests can assert on exactly
//! what was sent.

mod fields;
mod managed;
mod resource;
mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::Value;
use tokio::sync::{oneshot, watch};

use store::{Reply, Store};

/// The field manager of `kubectl apply --server-side`.
pub const KUBECTL: &str = "kubectl";
/// The field manager of client-side `kubectl apply`.
pub const KUBECTL_CLIENT_SIDE: &str = "kubectl-client-side-apply";
/// Where client-side `kubectl apply` keeps what it applied.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    /// The query string, `""` when there is none.
    pub query: String,
    /// Whether it asked for metadata only (PartialObjectMetadata).
    pub metadata_only: bool,
    pub body: Value,
}

impl Recorded {
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
    /// `GET /api/v1/namespaces/ns/secrets/x` style, for readable assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The REST path of an object.
pub fn path_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let name = obj["metadata"]["name"].as_str().expect("name");
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    let resource = resource::Resource {
        prefix,
        plural: resource::plural(kind),
    };
    resource.key(obj["metadata"]["namespace"].as_str(), name)
}

struct Shared {
    store: Mutex<Store>,
    /// While set, connections are dropped unanswered.
    down: AtomicBool,
    /// Bumped to drop every open connection (and so every watch).
    cuts: watch::Sender<u64>,
    addr: SocketAddr,
}

/// The fake API server. Cheap to clone; clones share the server, which
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    /// Dropped with the last clone, which stops the serving thread.
    _stop: Arc<oneshot::Sender<()>>,
}

/// The error that makes hyper drop a connection without an answer.
#[derive(Debug)]
struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the fake API server is down")
    }
}

impl std::error::Error for Down {}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl FakeApiServer {
    /// A new server on a free port of 127.0.0.1, and a kube client for it.
    /// It serves from a thread of its own, so it goes on answering whatever
    /// the caller's runtime does; call this inside a tokio runtime (the
    /// client needs one).
    pub fn start() -> (kube::Client, FakeApiServer) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the listener's address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            down: AtomicBool::new(false),
            cuts: watch::Sender::new(0),
            addr,
        });
        let serving = shared.clone();
        std::thread::Builder::new()
            .name(format!("fake-kube-{}", addr.port()))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the fake API server");
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept(listener, serving) => {}
                    }
                });
            })
            .expect("a thread for the fake API server");
        let server = FakeApiServer {
            shared,
            _stop: Arc::new(stop),
        };
        (server.client(), server)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Another kube client for this server (no authentication).
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("a URL"));
        kube::Client::try_from(config).expect("a kube client")
    }

    /// Writes a kubeconfig for this server into `dir`, for a process run
    /// with `KUBECONFIG` set to the returned path.
    pub fn kubeconfig_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{}", self.shared.addr.port()));
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(&path, kubeconfig).expect("write the kubeconfig");
        path
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an object (any kind) as an update would: stamped with a uid,
    /// creationTimestamp and generation (1) where it has none, and a new
    /// resourceVersion; watches see it.
    pub fn put(&self, obj: Value) {
        let key = path_of(&obj);
        let Some(resource::Target::Object { resource, .. }) = resource::parse(&key) else {
            panic!("{key} is no object path");
        };
        self.store().put(obj, key, resource);
    }

    /// Creates or changes an object with server-side apply by `manager`,
    /// as a user does (`kubectl apply --server-side`: manager
    /// [`KUBECTL`]; Argo CD and Flux too, under their names): the object
    /// then carries `managedFields` as from a real apiserver. Not recorded
    /// as a request. Panics if the apiserver would refuse it.
    pub fn apply(&self, manager: &str, obj: Value) -> Value {
        let key = path_of(&obj);
        self.store()
            .apply_as(manager, obj, &key)
            .unwrap_or_else(|refused| panic!("apply of {key} refused: {refused}"))
    }

    /// Creates or changes an object as client-side `kubectl apply` does: an
    /// update by manager `kubectl-client-side-apply` that also stores the
    /// whole object, as JSON, in the `kubectl.kubernetes.io/last-applied-configuration`
    /// annotation. Not recorded as a request.
    pub fn apply_client_side(&self, mut obj: Value) {
        let mut applied = obj.clone();
        if let Some(meta) = applied["metadata"].as_object_mut() {
            meta.remove("managedFields");
        }
        let text = format!("{}\n", serde_json::to_string(&applied).expect("JSON"));
        obj["metadata"]["annotations"][LAST_APPLIED] = Value::String(text);
        let key = path_of(&obj);
        let Some(resource::Target::Object { resource, .. }) = resource::parse(&key) else {
            panic!("{key} is no object path");
        };
        self.store().put_as(KUBECTL_CLIENT_SIDE, obj, key, resource);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.store().get(path)
    }

    /// Every status the object at `path` had, oldest first (each change
    /// once).
    pub fn status_history(&self, path: &str) -> Vec<Value> {
        self.store().status_history(path)
    }

    /// Deletes a namespace as `DELETE /api/v1/namespaces/NAME` does.
    pub fn delete_namespace(&self, name: &str) {
        self.store().delete_namespace(name);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.store().requests.clone()
    }

    pub fn writes(&self) -> Vec<Recorded> {
        self.requests().into_iter().filter(Recorded::is_write).collect()
    }

    /// The reasons of the Events posted, in order.
    pub fn event_reasons(&self) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| r.method == Method::POST && r.path.ends_with("/events"))
            .map(|r| r.body["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    pub fn clear_requests(&self) {
        self.store().requests.clear();
    }

    /// While down, the server drops every connection unanswered, open
    /// watches included.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.cut_connections();
        }
    }

    /// As after an apiserver restart: every connection (and watch) is cut
    /// and the watch history is gone.
    pub fn restart(&self) {
        self.cut_connections();
        self.compact();
    }

    /// Forgets the watch history (as etcd compaction does): a watch from an
    /// older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        self.store().compact();
    }

    fn cut_connections(&self) {
        self.store().cut_watches();
        self.shared.cuts.send_modify(|n| *n += 1);
    }
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        if shared.down.load(Ordering::SeqCst) {
            continue;
        }
        let mut cut = shared.cuts.subscribe();
        let serving = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| respond(serving.clone(), request));
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A client that goes away mid-watch only ends this connection.
            tokio::select! {
                _ = connection => {}
                _ = cut.changed() => {}
            }
        });
    }
}

async fn respond(shared: Arc<Shared>, request: Request<Incoming>) -> Result<Response<Body>, Down> {
    if shared.down.load(Ordering::SeqCst) {
        return Err(Down);
    }
    let (parts, body) = request.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    // Apply patches are YAML (kube sends JSON, which is YAML too).
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .or_else(|_| serde_yaml::from_slice(&bytes))
            .unwrap_or(Value::Null)
    };
    let header = |name: http::header::HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let request = store::Request {
        metadata_only: header(http::header::ACCEPT).contains("as=PartialObjectMetadata"),
        content_type: header(http::header::CONTENT_TYPE),
        method: parts.method,
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        body,
    };
    let reply = shared.store.lock().unwrap_or_else(|p| p.into_inner()).handle(request);
    let response = Response::builder().header(http::header::CONTENT_TYPE, "application/json");
    Ok(match reply {
        Reply::Json(code, value) => response
            .status(code)
            .body(Full::new(Bytes::from(serde_json::to_vec(&value).expect("JSON"))).boxed_unsync()),
        Reply::Watch {
            events,
            timeout,
            bookmark,
        } => {
            let deadline = tokio::time::Instant::now() + timeout;
            let frames = futures::stream::unfold((events, bookmark), move |(mut events, bookmark)| {
                let shared = shared.clone();
                async move {
                    match tokio::time::timeout_at(deadline, events.recv()).await {
                        Ok(line) => Some((Ok(Frame::data(line?)), (events, bookmark))),
                        Err(_) => {
                            let store = shared.store.lock().unwrap_or_else(|p| p.into_inner());
                            let line = store.bookmark_line(&bookmark?);
                            Some((Ok(Frame::data(line)), (events, None)))
                        }
                    }
                }
            });
            response.body(StreamBody::new(frames).boxed_unsync())
        }
    }
    .expect("a response"))
}
