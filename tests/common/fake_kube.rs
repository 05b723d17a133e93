//! An in-process Kubernetes API server for controller tests: the kube-rs
//! `tower-test` pattern, answering from an in-memory object store and
//! recording every request so tests can assert on exactly what was sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};

/// One request the controller made.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    /// The query string, `""` when there is none.
    pub query: String,
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

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    next_uid: u64,
}

/// The fake API server. Cheap to clone; clones share the store.
#[derive(Clone, Default)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

fn plural(kind: &str) -> String {
    match kind {
        "Secret" => "secrets".into(),
        "Homeserver" => "homeservers".into(),
        "MatrixUser" => "matrixusers".into(),
        "Event" => "events".into(),
        other => format!("{}s", other.to_lowercase()),
    }
}

/// Whether a path names a collection (`.../secrets`), not one object.
fn is_collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // api/v1/R, api/v1/namespaces/NS/R, apis/G/V/R, apis/G/V/namespaces/NS/R
    let rest = match segments.first() {
        Some(&"api") => &segments[2.min(segments.len())..],
        Some(&"apis") => &segments[3.min(segments.len())..],
        _ => return false,
    };
    matches!(rest, [_] | ["namespaces", _, _])
}

/// The REST path of an object.
pub fn path_of(obj: &Value) -> String {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let ns = obj["metadata"]["namespace"].as_str().expect("namespace");
    let name = obj["metadata"]["name"].as_str().expect("name");
    let prefix = if api_version.contains('/') {
        format!("/apis/{api_version}")
    } else {
        format!("/api/{api_version}")
    };
    format!("{prefix}/namespaces/{ns}/{}/{name}", plural(kind))
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code})
}

impl FakeApiServer {
    /// A kube client talking to a new fake server, served on the current
    /// tokio runtime.
    pub fn start() -> (kube::Client, FakeApiServer) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let server = FakeApiServer::default();
        let serving = server.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let (parts, body) = request.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let query = parts.uri.query().unwrap_or_default().to_string();
                if query.split('&').any(|q| q == "watch=true" || q == "watch=1") {
                    // A watch: record it and hold it open (no events come),
                    // as an apiserver does until its timeout.
                    serving.record(parts.method, parts.uri.path().to_string(), query, Value::Null);
                    tokio::spawn(async move {
                        tokio::time::sleep(std::time::Duration::from_secs(300)).await;
                        drop(send);
                    });
                    continue;
                }
                let (status, reply) = serving.handle(parts.method, parts.uri.path().to_string(), query, body);
                let response = Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap();
                send.send_response(response);
            }
        });
        (kube::Client::new(service, "default"), server)
    }

    /// Stores an object (any kind), as if it had been created.
    pub fn put(&self, mut obj: Value) {
        let mut state = self.state.lock().unwrap();
        if obj["metadata"]["uid"].is_null() {
            state.next_uid += 1;
            obj["metadata"]["uid"] = json!(format!("uid-{}", state.next_uid));
        }
        if obj["metadata"]["creationTimestamp"].is_null() {
            obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        state.objects.insert(path_of(&obj), obj);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
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
        self.state.lock().unwrap().requests.clear();
    }

    fn record(&self, method: Method, path: String, query: String, body: Value) {
        self.state.lock().unwrap().requests.push(Recorded {
            method,
            path,
            query,
            body,
        });
    }

    fn handle(&self, method: Method, path: String, query: String, body: Value) -> (StatusCode, Value) {
        let mut state = self.state.lock().unwrap();
        state.requests.push(Recorded {
            query,
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
        });
        let not_found = || {
            (
                StatusCode::NOT_FOUND,
                status_body(404, "NotFound", &format!("{path} not found")),
            )
        };
        match method {
            Method::GET => match state.objects.get(&path) {
                Some(obj) => (StatusCode::OK, obj.clone()),
                // A collection: list what is stored under it.
                None if is_collection(&path) => {
                    let prefix = format!("{path}/");
                    let items: Vec<Value> = state
                        .objects
                        .iter()
                        .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
                        .map(|(_, o)| o.clone())
                        .collect();
                    (
                        StatusCode::OK,
                        json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": items}),
                    )
                }
                None => not_found(),
            },
            Method::POST => {
                let mut obj = body;
                if obj["metadata"]["name"].is_null() {
                    state.next_uid += 1;
                    let generated = format!("generated-{}", state.next_uid);
                    obj["metadata"]["name"] = json!(generated);
                }
                let full = format!("{path}/{}", obj["metadata"]["name"].as_str().unwrap_or_default());
                if state.objects.contains_key(&full) {
                    return (
                        StatusCode::CONFLICT,
                        status_body(409, "AlreadyExists", "already exists"),
                    );
                }
                state.next_uid += 1;
                obj["metadata"]["uid"] = json!(format!("uid-{}", state.next_uid));
                obj["metadata"]["resourceVersion"] = json!("1");
                state.objects.insert(full, obj.clone());
                (StatusCode::CREATED, obj)
            }
            Method::PATCH => {
                if let Some(object_path) = path.strip_suffix("/status") {
                    let Some(obj) = state.objects.get_mut(object_path) else {
                        return not_found();
                    };
                    obj["status"] = body["status"].clone();
                    return (StatusCode::OK, obj.clone());
                }
                let Some(obj) = state.objects.get_mut(&path) else {
                    return not_found();
                };
                if let Value::Array(ops) = body {
                    // The apiserver passes a test of a missing path for null
                    // (kube's finalizer helper relies on it); json_patch fails it.
                    let ops: Vec<Value> = ops
                        .into_iter()
                        .filter(|op| {
                            !(op["op"] == "test"
                                && op["value"].is_null()
                                && op["path"].as_str().is_some_and(|p| obj.pointer(p).is_none()))
                        })
                        .collect();
                    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).expect("a JSON patch");
                    if let Err(e) = json_patch::patch(obj, &patch) {
                        return (
                            StatusCode::UNPROCESSABLE_ENTITY,
                            status_body(422, "Invalid", &e.to_string()),
                        );
                    }
                } else {
                    json_patch::merge(obj, &body);
                }
                let reply = obj.clone();
                let gone = !reply["metadata"]["deletionTimestamp"].is_null()
                    && reply["metadata"]["finalizers"].as_array().is_none_or(|f| f.is_empty());
                if gone {
                    state.objects.remove(&path);
                }
                (StatusCode::OK, reply)
            }
            Method::PUT => {
                let Some(existing) = state.objects.get(&path) else {
                    return not_found();
                };
                // Optimistic concurrency, as the apiserver does it.
                if !body["metadata"]["resourceVersion"].is_null()
                    && body["metadata"]["resourceVersion"] != existing["metadata"]["resourceVersion"]
                {
                    return (
                        StatusCode::CONFLICT,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                let version: u64 = existing["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mut obj = body;
                obj["metadata"]["uid"] = existing["metadata"]["uid"].clone();
                obj["metadata"]["resourceVersion"] = json!((version + 1).to_string());
                state.objects.insert(path, obj.clone());
                (StatusCode::OK, obj)
            }
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                status_body(405, "MethodNotAllowed", "not supported here"),
            ),
        }
    }
}
