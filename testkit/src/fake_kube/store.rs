//! The apiserver's state and its answers: objects with resourceVersions,
//! the history watches resume from, field ownership, deletion with
//! finalizers, garbage collection and namespace lifecycle.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::Recorded;
use super::fields::{self, Manager, Ownership};
use super::managed::Writes;
use super::resource::{Resource, Target};

/// How many changes the watch history keeps: older resourceVersions get
/// 410 Gone, as from a real apiserver's watch cache.
const HISTORY: usize = 1000;

/// What a write-without-apply that names no `fieldManager` is owned by.
const DEFAULT_MANAGER: &str = "unknown";

/// Who [`Store::put`] writes as.
const SEED_MANAGER: &str = "test-seed";

/// A request as the store needs it.
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    /// Whether the Accept header asks for PartialObjectMetadata.
    pub metadata_only: bool,
    pub body: Value,
}

impl Request {
    fn param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

pub enum Reply {
    Json(StatusCode, Value),
    /// A watch: newline-delimited events until the sender goes or the
    /// timeout passes, then the closing bookmark if it asked for bookmarks.
    Watch {
        events: UnboundedReceiver<Bytes>,
        timeout: Duration,
        bookmark: Option<Bookmark>,
    },
}

/// What a watch's closing bookmark is of. An apiserver sends one as a watch
/// times out, so the client resumes from there even when nothing it watches
/// changed (and does not fall behind the history).
pub struct Bookmark {
    resource: Resource,
}

fn failure(code: StatusCode, reason: &str, message: String) -> Reply {
    Reply::Json(code, status(code.as_u16(), reason, &message))
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "message": message, "code": code})
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
struct Change {
    resource_version: u64,
    resource: Resource,
    event: EventType,
    object: Value,
    /// The object before, for watches whose selector it left or entered.
    previous: Option<Value>,
}

/// `labelSelector` and `fieldSelector` terms: `a=b`, `a==b`, `a!=b`, `a`
/// (labels only).
#[derive(Default)]
struct Selector {
    labels: Vec<Term>,
    fields: Vec<Term>,
}

enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
}

impl Term {
    fn parse_labels(text: &str) -> Vec<Term> {
        text.split(',')
            .filter(|t| !t.is_empty())
            .map(|t| {
                if let Some((k, v)) = t.split_once("!=") {
                    Term::NotEquals(k.into(), v.into())
                } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                    Term::Equals(k.into(), v.into())
                } else {
                    Term::Exists(t.into())
                }
            })
            .collect()
    }

    /// A `fieldSelector` as apimachinery's `fields.ParseSelector` reads it:
    /// terms split at commas not escaped by a backslash; each term split at
    /// its first `!=`, `==` or `=`; the value unescaped (`\\`, `\,`, `\=`),
    /// where any other backslash, and any unescaped `,` or `=`, is an error
    /// (the API server's message, answered with 400 BadRequest).
    fn parse_fields(text: &str) -> Result<Vec<Term>, String> {
        let mut terms = Vec::new();
        for part in split_unescaped_commas(text) {
            if part.is_empty() {
                continue;
            }
            let Some((field, operator, value)) = split_term(part) else {
                return Err(format!("invalid selector: '{text}'; can't understand '{part}'"));
            };
            let value = unescape_field_value(value)?;
            terms.push(match operator {
                "!=" => Term::NotEquals(field.into(), value),
                _ => Term::Equals(field.into(), value),
            });
        }
        Ok(terms)
    }

    fn matches(&self, value: impl Fn(&str) -> Option<String>) -> bool {
        match self {
            Term::Equals(k, v) => value(k).as_ref() == Some(v),
            Term::NotEquals(k, v) => value(k).as_ref() != Some(v),
            Term::Exists(k) => value(k).is_some(),
        }
    }
}

/// The terms of a field selector: a comma behind a backslash is data.
fn split_unescaped_commas(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut start, mut escaped) = (0, false);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            ',' => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

/// `field`, operator, raw value: split at the first operator (a field has
/// no escapes).
fn split_term(term: &str) -> Option<(&str, &'static str, &str)> {
    term.char_indices().find_map(|(i, _)| {
        ["!=", "==", "="]
            .into_iter()
            .find(|op| term[i..].starts_with(op))
            .map(|op| (&term[..i], op, &term[i + op.len()..]))
    })
}

/// apimachinery's `fields.UnescapeValue`, with its error messages (a rune
/// prints as its number there: `=` is 61).
fn unescape_field_value(value: &str) -> Result<String, String> {
    let mut out = String::with_capacity(value.len());
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            if !matches!(c, '\\' | ',' | '=') {
                return Err(format!("invalid field selector: invalid escape sequence: \\{c}"));
            }
            out.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' => escaped = true,
            ',' | '=' => {
                return Err(format!(
                    "invalid field selector: unescaped character in value: {}",
                    c as u32
                ));
            }
            c => out.push(c),
        }
    }
    if escaped {
        return Err("invalid field selector: invalid escape sequence: \\".into());
    }
    Ok(out)
}

impl Selector {
    /// The request's selectors, or the 400 the API server answers to a
    /// field selector it cannot parse.
    fn of(request: &Request) -> Result<Self, Reply> {
        Ok(Selector {
            labels: Term::parse_labels(&request.param("labelSelector").unwrap_or_default()),
            fields: Term::parse_fields(&request.param("fieldSelector").unwrap_or_default())
                .map_err(|message| failure(StatusCode::BAD_REQUEST, "BadRequest", message))?,
        })
    }

    fn matches(&self, obj: &Value) -> bool {
        let meta = &obj["metadata"];
        let label = |k: &str| meta["labels"][k].as_str().map(str::to_string);
        // The CRDs' selectableFields: a field the object lacks selects as "".
        let field = |k: &str| match k {
            "metadata.name" => meta["name"].as_str().map(str::to_string),
            "metadata.namespace" => meta["namespace"].as_str().map(str::to_string),
            "spec.localpart" if obj["kind"] == "MatrixUser" => {
                Some(obj["spec"]["localpart"].as_str().unwrap_or_default().to_string())
            }
            _ => None,
        };
        self.labels.iter().all(|t| t.matches(label)) && self.fields.iter().all(|t| t.matches(field))
    }
}

/// What a watch receives.
struct Watcher {
    resource: Resource,
    namespace: Option<String>,
    selector: Selector,
    metadata_only: bool,
    sender: UnboundedSender<Bytes>,
}

impl Watcher {
    /// The event this watch sees of `change`, if any: one that leaves the
    /// selector is a deletion, one that enters it an addition.
    fn event_of(&self, change: &Change) -> Option<Bytes> {
        if change.resource != self.resource
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| change.object["metadata"]["namespace"] != ns)
        {
            return None;
        }
        let now = self.selector.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.selector.matches(p));
        let event = match (change.event, before, now) {
            (EventType::Modified, true, false) => EventType::Deleted,
            (EventType::Modified, false, true) => EventType::Added,
            (event, _, true) => event,
            (_, _, false) => return None,
        };
        Some(self.line(event.name(), &change.object))
    }

    fn line(&self, event: &str, obj: &Value) -> Bytes {
        let object = if self.metadata_only {
            metadata_only(obj)
        } else {
            obj.clone()
        };
        let mut line = serde_json::to_vec(&json!({"type": event, "object": object})).expect("JSON");
        line.push(b'\n');
        Bytes::from(line)
    }
}

fn metadata_only(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn finalizers(obj: &Value) -> Vec<Value> {
    obj["metadata"]["finalizers"].as_array().cloned().unwrap_or_default()
}

fn is_deleting(obj: &Value) -> bool {
    !obj["metadata"]["deletionTimestamp"].is_null()
}

/// Everything but metadata and status: what a generation counts.
fn generation_content(obj: &Value) -> Value {
    let mut content = obj.clone();
    if let Some(map) = content.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    content
}

#[derive(Default)]
pub struct Store {
    /// By path (`/api/v1/namespaces/ns/secrets/x`).
    objects: BTreeMap<String, Value>,
    ownership: BTreeMap<String, Ownership>,
    /// The last write of each manager, by path: with `ownership`, the
    /// objects' `metadata.managedFields`.
    writes: BTreeMap<String, Writes>,
    resource_version: u64,
    history: VecDeque<Change>,
    /// The history holds every change after this version.
    history_since: u64,
    watchers: Vec<Watcher>,
    pub requests: Vec<Recorded>,
    /// Every status each object had, by path.
    statuses: BTreeMap<String, Vec<Value>>,
    /// Namespaces deleted and gone: nothing can be created in them.
    gone_namespaces: BTreeSet<String>,
    next_uid: u64,
}

impl Store {
    pub fn get(&self, path: &str) -> Option<Value> {
        self.objects.get(path).cloned()
    }

    pub fn status_history(&self, path: &str) -> Vec<Value> {
        self.statuses.get(path).cloned().unwrap_or_default()
    }

    /// Stores `obj` as an update by [`SEED_MANAGER`] would, with what the
    /// server stamps: uid, creationTimestamp, generation (1 if absent) and
    /// a new resourceVersion.
    pub fn put(&mut self, obj: Value, key: String, resource: Resource) {
        self.put_as(SEED_MANAGER, obj, key, resource);
    }

    /// [`Store::put`] by `manager`.
    pub fn put_as(&mut self, manager: &str, mut obj: Value, key: String, resource: Resource) {
        let old = self.objects.get(&key).cloned();
        let meta = &mut obj["metadata"];
        if meta["uid"].is_null() {
            meta["uid"] = json!(self.new_uid());
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!(now());
        }
        if meta["generation"].is_null() {
            meta["generation"] = json!(1);
        }
        self.own(&key, &resource, (manager.into(), ""), old.as_ref(), &obj);
        self.commit(key, resource, obj);
    }

    /// Server-side apply of `obj` by `manager` (`kubectl apply
    /// --server-side` is manager `kubectl`), not recorded as a request:
    /// the stored object, or the apiserver's answer refusing it.
    pub fn apply_as(&mut self, manager: &str, obj: Value, key: &str) -> Result<Value, Value> {
        let Some(Target::Object {
            resource,
            namespace,
            name,
            ..
        }) = super::resource::parse(key)
        else {
            panic!("{key} is no object path");
        };
        let request = Request {
            method: Method::PATCH,
            path: key.to_string(),
            query: format!("fieldManager={manager}"),
            content_type: "application/apply-patch+yaml".into(),
            metadata_only: false,
            body: obj,
        };
        match self.write(&request, resource, namespace, &name, None) {
            Reply::Json(code, value) if code.is_success() => Ok(value),
            Reply::Json(_, value) => Err(value),
            Reply::Watch { .. } => unreachable!("a write answers with an object"),
        }
    }

    fn new_uid(&mut self) -> String {
        self.next_uid += 1;
        format!("00000000-0000-4000-8000-{:012}", self.next_uid)
    }

    /// Forgets the history: watches resuming from before now get 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.history_since = self.resource_version;
    }

    /// Ends every watch, as a restarting apiserver does.
    pub fn cut_watches(&mut self) {
        self.watchers.clear();
    }

    /// Deletes a namespace: it terminates, everything in it is deleted, and
    /// it is gone once nothing is left in it.
    pub fn delete_namespace(&mut self, name: &str) -> Reply {
        if self.gone_namespaces.contains(name) {
            return self.not_found(&Resource::namespaces(), name);
        }
        let key = Resource::namespaces().key(None, name);
        let mut ns = self.objects.get(&key).cloned().unwrap_or_else(|| {
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "uid": self.new_uid(),
                   "creationTimestamp": now()}, "spec": {"finalizers": ["kubernetes"]}})
        });
        if !is_deleting(&ns) {
            ns["metadata"]["deletionTimestamp"] = json!(now());
            ns["status"] = json!({"phase": "Terminating"});
            ns = self.commit(key.clone(), Resource::namespaces(), ns);
            let contents: Vec<String> = self
                .objects
                .iter()
                .filter(|(_, o)| o["metadata"]["namespace"] == name)
                .map(|(k, _)| k.clone())
                .collect();
            for content in contents {
                self.delete(&content);
            }
            self.finish_namespace(name);
        }
        Reply::Json(StatusCode::OK, ns)
    }

    fn namespace_phase(&self, name: &str) -> NamespacePhase {
        if self.gone_namespaces.contains(name) {
            return NamespacePhase::Gone;
        }
        match self.objects.get(&Resource::namespaces().key(None, name)) {
            Some(ns) if is_deleting(ns) => NamespacePhase::Terminating,
            _ => NamespacePhase::Active,
        }
    }

    /// Removes a terminating namespace once it is empty.
    fn finish_namespace(&mut self, name: &str) {
        if self.namespace_phase(name) != NamespacePhase::Terminating
            || self.objects.values().any(|o| o["metadata"]["namespace"] == name)
        {
            return;
        }
        self.remove(&Resource::namespaces().key(None, name));
        self.gone_namespaces.insert(name.to_string());
    }

    pub fn handle(&mut self, request: Request) -> Reply {
        self.requests.push(Recorded {
            method: request.method.clone(),
            path: request.path.clone(),
            query: request.query.clone(),
            metadata_only: request.metadata_only,
            body: request.body.clone(),
        });
        let Some(target) = super::resource::parse(&request.path) else {
            return failure(StatusCode::NOT_FOUND, "NotFound", format!("{} not found", request.path));
        };
        let watch = matches!(request.param("watch").as_deref(), Some("true" | "1"));
        match (&request.method, target) {
            (&Method::GET, Target::Collection { resource, namespace }) if watch => {
                self.watch(&request, resource, namespace)
            }
            (&Method::GET, Target::Collection { resource, namespace }) => self.list(&request, &resource, namespace),
            (&Method::POST, Target::Collection { resource, namespace }) => self.create(&request, resource, namespace),
            (
                &Method::GET,
                Target::Object {
                    resource,
                    namespace,
                    name,
                    subresource,
                },
            ) => self.read(&request, &resource, namespace.as_deref(), &name, subresource.as_deref()),
            (
                &Method::DELETE,
                Target::Object {
                    resource,
                    name,
                    subresource: None,
                    ..
                },
            ) if resource == Resource::namespaces() => self.delete_namespace(&name),
            (
                &Method::DELETE,
                Target::Object {
                    resource,
                    namespace,
                    name,
                    subresource: None,
                },
            ) => {
                let key = resource.key(namespace.as_deref(), &name);
                match self.delete(&key) {
                    Some(obj) => Reply::Json(StatusCode::OK, obj),
                    None => self.not_found(&resource, &name),
                }
            }
            (
                &Method::PUT | &Method::PATCH,
                Target::Object {
                    resource,
                    namespace,
                    name,
                    subresource,
                },
            ) => self.write(&request, resource, namespace, &name, subresource.as_deref()),
            (method, _) => failure(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported on {}", request.path),
            ),
        }
    }

    fn not_found(&self, resource: &Resource, name: &str) -> Reply {
        failure(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("{} \"{name}\" not found", resource.qualified()),
        )
    }

    fn read(
        &self,
        request: &Request,
        resource: &Resource,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
    ) -> Reply {
        let stored = self.objects.get(&resource.key(namespace, name)).cloned();
        // Namespaces never created are there, as in a cluster that has them.
        let implicit = || {
            (*resource == Resource::namespaces() && !self.gone_namespaces.contains(name)).then(|| {
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name},
                       "status": {"phase": "Active"}})
            })
        };
        match (stored.or_else(implicit), subresource) {
            (Some(obj), None) if request.metadata_only => Reply::Json(StatusCode::OK, metadata_only(&obj)),
            (Some(obj), None) => Reply::Json(StatusCode::OK, obj),
            (Some(obj), Some("status")) if resource.has_status_subresource() => Reply::Json(StatusCode::OK, obj),
            _ => self.not_found(resource, name),
        }
    }

    fn matching<'a>(
        &'a self,
        resource: &'a Resource,
        namespace: Option<&'a str>,
        selector: &'a Selector,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |(key, obj)| {
                resource_of(key).as_ref() == Some(resource)
                    && namespace.is_none_or(|ns| obj["metadata"]["namespace"] == ns)
                    && selector.matches(obj)
            })
            .map(|(_, obj)| obj)
    }

    fn list(&self, request: &Request, resource: &Resource, namespace: Option<String>) -> Reply {
        let selector = match Selector::of(request) {
            Ok(selector) => selector,
            Err(refused) => return refused,
        };
        let items: Vec<Value> = self
            .matching(resource, namespace.as_deref(), &selector)
            .map(|o| {
                if request.metadata_only {
                    metadata_only(o)
                } else {
                    o.clone()
                }
            })
            .collect();
        let (api_version, kind) = if request.metadata_only {
            ("meta.k8s.io/v1".to_string(), "PartialObjectMetadataList".to_string())
        } else {
            (resource.api_version().to_string(), format!("{}List", resource.kind()))
        };
        Reply::Json(
            StatusCode::OK,
            json!({"apiVersion": api_version, "kind": kind,
                   "metadata": {"resourceVersion": self.resource_version.to_string()}, "items": items}),
        )
    }

    fn watch(&mut self, request: &Request, resource: Resource, namespace: Option<String>) -> Reply {
        let selector = match Selector::of(request) {
            Ok(selector) => selector,
            Err(refused) => return refused,
        };
        let (sender, receiver) = unbounded_channel();
        let timeout = Duration::from_secs(
            request
                .param("timeoutSeconds")
                .and_then(|t| t.parse().ok())
                .unwrap_or(1800),
        );
        let watcher = Watcher {
            resource,
            namespace,
            selector,
            metadata_only: request.metadata_only,
            sender,
        };
        let since = request
            .param("resourceVersion")
            .filter(|v| !v.is_empty() && v != "0")
            .map(|v| v.parse::<u64>().unwrap_or(0));
        match since {
            Some(version) if version < self.history_since => {
                let expired = status(
                    410,
                    "Expired",
                    &format!("too old resource version: {version} ({})", self.history_since + 1),
                );
                let _ = watcher.sender.send(watcher.line("ERROR", &expired));
                return Reply::Watch {
                    events: receiver,
                    timeout,
                    bookmark: None,
                };
            }
            Some(version) => {
                for change in self.history.iter().filter(|c| c.resource_version > version) {
                    if let Some(line) = watcher.event_of(change) {
                        let _ = watcher.sender.send(line);
                    }
                }
            }
            // From "now" or "any": the current state, as ADDED events.
            None => {
                let current: Vec<Bytes> = self
                    .matching(&watcher.resource, watcher.namespace.as_deref(), &watcher.selector)
                    .map(|o| watcher.line("ADDED", o))
                    .collect();
                for line in current {
                    let _ = watcher.sender.send(line);
                }
                if request.param("sendInitialEvents").as_deref() == Some("true") {
                    let bookmark = json!({"apiVersion": watcher.resource.api_version(), "kind": watcher.resource.kind(),
                        "metadata": {"resourceVersion": self.resource_version.to_string(),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}});
                    let _ = watcher.sender.send(watcher.line("BOOKMARK", &bookmark));
                }
            }
        }
        let bookmark = (request.param("allowWatchBookmarks").as_deref() == Some("true")).then(|| Bookmark {
            resource: watcher.resource.clone(),
        });
        self.watchers.push(watcher);
        Reply::Watch {
            events: receiver,
            timeout,
            bookmark,
        }
    }

    /// A BOOKMARK event at the current resourceVersion.
    pub fn bookmark_line(&self, bookmark: &Bookmark) -> Bytes {
        let object = json!({"apiVersion": bookmark.resource.api_version(), "kind": bookmark.resource.kind(),
                            "metadata": {"resourceVersion": self.resource_version.to_string()}});
        let mut line = serde_json::to_vec(&json!({"type": "BOOKMARK", "object": object})).expect("JSON");
        line.push(b'\n');
        Bytes::from(line)
    }

    fn field_manager(request: &Request) -> String {
        request
            .param("fieldManager")
            .unwrap_or_else(|| DEFAULT_MANAGER.to_string())
    }

    /// Refuses creation where the namespace does not take it.
    fn refuse_create(&self, resource: &Resource, namespace: Option<&str>, name: &str) -> Option<Reply> {
        let ns = namespace?;
        match self.namespace_phase(ns) {
            NamespacePhase::Active => None,
            NamespacePhase::Terminating => Some(failure(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                    resource.qualified()
                ),
            )),
            NamespacePhase::Gone => Some(self.not_found(&Resource::namespaces(), ns)),
        }
    }

    /// The 422 the API server's metadata validation answers for an object
    /// whose name is longer than a DNS subdomain may be, or whose label
    /// values are no label values (apimachinery's `ValidateObjectMeta`,
    /// `IsValidLabelValue`), with its messages and causes.
    fn invalid_metadata(resource: &Resource, obj: &Value) -> Option<Reply> {
        let meta = &obj["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let mut causes: Vec<(String, String, String)> = Vec::new();
        if name.len() > 253 {
            causes.push((
                "metadata.name".into(),
                name.into(),
                "must be no more than 253 characters".into(),
            ));
        }
        for value in meta["labels"].as_object().into_iter().flat_map(|m| m.values()) {
            let value = value.as_str().unwrap_or_default();
            if value.len() > 63 {
                causes.push((
                    "metadata.labels".into(),
                    value.into(),
                    "must be no more than 63 characters".into(),
                ));
            }
            let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            let edges = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
            let valid = value.is_empty()
                || (value.chars().all(inner) && edges(value.chars().next()) && edges(value.chars().last()));
            if !valid {
                causes.push((
                    "metadata.labels".into(),
                    value.into(),
                    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', \
                     and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', \
                     regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
                        .into(),
                ));
            }
        }
        if causes.is_empty() {
            return None;
        }
        let errors: Vec<String> = causes
            .iter()
            .map(|(field, value, why)| format!("{field}: Invalid value: {value:?}: {why}"))
            .collect();
        let errors = match errors.as_slice() {
            [one] => one.clone(),
            many => format!("[{}]", many.join(", ")),
        };
        let group_kind = match resource.group() {
            "" => resource.kind(),
            group => format!("{}.{group}", resource.kind()),
        };
        let mut reply = status(422, "Invalid", &format!("{group_kind} {name:?} is invalid: {errors}"));
        reply["details"] = json!({
            "name": name, "group": resource.group(), "kind": resource.kind(),
            "causes": causes.iter().map(|(field, value, why)| json!({
                "reason": "FieldValueInvalid", "message": format!("Invalid value: {value:?}: {why}"), "field": field,
            })).collect::<Vec<Value>>(),
        });
        Some(Reply::Json(StatusCode::UNPROCESSABLE_ENTITY, reply))
    }

    fn create(&mut self, request: &Request, resource: Resource, namespace: Option<String>) -> Reply {
        let mut obj = request.body.clone();
        if obj["metadata"]["name"].is_null() {
            let Some(prefix) = obj["metadata"]["generateName"].as_str().map(str::to_string) else {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required".into(),
                );
            };
            obj["metadata"]["name"] = json!(format!("{prefix}{:05x}", self.resource_version + 1));
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        if resource == Resource::namespaces() {
            self.gone_namespaces.remove(&name);
        }
        if let Some(refused) = self.refuse_create(&resource, namespace.as_deref(), &name) {
            return refused;
        }
        if let Some(invalid) = Self::invalid_metadata(&resource, &obj) {
            return invalid;
        }
        let key = resource.key(namespace.as_deref(), &name);
        if self.objects.contains_key(&key) {
            return failure(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.qualified()),
            );
        }
        if resource.has_status_subresource()
            && let Some(map) = obj.as_object_mut()
        {
            // Status is the status subresource's to write.
            map.remove("status");
        }
        self.stamp_new(&mut obj, namespace.as_deref());
        self.own(&key, &resource, (Self::field_manager(request), ""), None, &obj);
        let created = self.commit(key, resource, obj);
        Reply::Json(StatusCode::CREATED, created)
    }

    fn stamp_new(&mut self, obj: &mut Value, namespace: Option<&str>) {
        let uid = self.new_uid();
        let meta = &mut obj["metadata"];
        if let Some(ns) = namespace {
            meta["namespace"] = json!(ns);
        }
        meta["uid"] = json!(uid);
        meta["creationTimestamp"] = json!(now());
        meta["generation"] = json!(1);
        if let Some(map) = meta.as_object_mut() {
            map.remove("deletionTimestamp");
        }
    }

    fn own(&mut self, key: &str, resource: &Resource, manager: Manager, old: Option<&Value>, new: &Value) {
        self.wrote(key, &manager, false);
        let lists = |path: &[String]| resource.list_type(path);
        self.ownership
            .entry(key.to_string())
            .or_default()
            .update(manager, old.unwrap_or(&Value::Null), new, &lists);
    }

    /// Remembers `manager`'s write of the object at `key` for its
    /// managedFields entry.
    fn wrote(&mut self, key: &str, manager: &Manager, apply: bool) {
        self.writes
            .entry(key.to_string())
            .or_default()
            .wrote(manager, apply, now());
    }

    /// PUT and PATCH, of an object or its status.
    fn write(
        &mut self,
        request: &Request,
        resource: Resource,
        namespace: Option<String>,
        name: &str,
        subresource: Option<&str>,
    ) -> Reply {
        let status_write = match subresource {
            None => false,
            Some("status") if resource.has_status_subresource() => true,
            Some(_) => return self.not_found(&resource, name),
        };
        let key = resource.key(namespace.as_deref(), name);
        let apply = request.method == Method::PATCH && request.content_type.starts_with("application/apply-patch");
        let manager_name = Self::field_manager(request);
        if apply && request.param("fieldManager").is_none() {
            return failure(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch"
                    .into(),
            );
        }
        let manager: Manager = (manager_name, if status_write { "status" } else { "" });
        let existing = self.objects.get(&key).cloned();
        let current = match existing.clone() {
            Some(obj) => obj,
            // An apply creates what is not there; the status of nothing is not found.
            None if apply && !status_write => {
                if let Some(refused) = self.refuse_create(&resource, namespace.as_deref(), name) {
                    return refused;
                }
                let mut empty = json!({"apiVersion": resource.api_version(), "kind": resource.kind(),
                                       "metadata": {"name": name}});
                if let Some(ns) = &namespace {
                    empty["metadata"]["namespace"] = json!(ns);
                }
                empty
            }
            None => return self.not_found(&resource, name),
        };
        let conflict = || {
            failure(
                StatusCode::CONFLICT,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    resource.qualified()
                ),
            )
        };
        let current_version = &current["metadata"]["resourceVersion"];
        let mut owners = self.ownership.get(&key).cloned().unwrap_or_default();
        let lists = |path: &[String]| resource.list_type(path);
        let written = if apply {
            let requested = &request.body["metadata"]["resourceVersion"];
            if !requested.is_null() && requested != current_version {
                return conflict();
            }
            let applied = applied_config(&resource, &request.body, status_write);
            let force = request.param("force").as_deref() == Some("true");
            match owners.apply(manager.clone(), &current, &applied, force, &lists) {
                Ok(obj) => obj,
                Err(fields::Conflicts(conflicts)) => {
                    let lines: Vec<String> = conflicts
                        .iter()
                        .map(|(m, p)| format!("conflict with \"{m}\": {}", fields::display(p)))
                        .collect();
                    return failure(
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("Apply failed with {} conflict(s): {}", lines.len(), lines.join("; ")),
                    );
                }
            }
        } else {
            let patched = match patched(request, &current) {
                Ok(obj) => obj,
                Err(reply) => return reply,
            };
            let requested = &patched["metadata"]["resourceVersion"];
            if !requested.is_null() && requested != current_version {
                return conflict();
            }
            patched
        };
        let mut obj = scoped(&resource, &current, &written, status_write);
        if existing.is_none() {
            self.stamp_new(&mut obj, namespace.as_deref());
        } else {
            // What the server owns, a client cannot change.
            for field in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "name",
                "namespace",
            ] {
                match current["metadata"].get(field) {
                    Some(v) => obj["metadata"][field] = v.clone(),
                    None => {
                        if let Some(meta) = obj["metadata"].as_object_mut() {
                            meta.remove(field);
                        }
                    }
                }
            }
            let added = finalizers(&obj)
                .into_iter()
                .filter(|f| !finalizers(&current).contains(f))
                .count();
            if is_deleting(&current) && added > 0 {
                return failure(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    format!(
                        "{} \"{name}\" is invalid: metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                        resource.qualified()
                    ),
                );
            }
            if generation_content(&obj) != generation_content(&current) {
                obj["metadata"]["generation"] = json!(current["metadata"]["generation"].as_i64().unwrap_or(0) + 1);
            }
        }
        if let Some(invalid) = Self::invalid_metadata(&resource, &obj) {
            return invalid;
        }
        self.wrote(&key, &manager, apply);
        if !apply {
            owners.update(manager, &current, &obj, &lists);
        }
        self.ownership.insert(key.clone(), owners);
        if is_deleting(&current) && finalizers(&obj).is_empty() {
            // The apiserver deletes instead of writing: watches see the
            // object go as it was last stored.
            let removed = self.remove(&key).unwrap_or(current);
            return Reply::Json(StatusCode::OK, removed);
        }
        let stored = self.commit(key, resource, obj);
        Reply::Json(
            if existing.is_none() {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            stored,
        )
    }

    /// Stores `obj` with a new resourceVersion and tells the watches.
    fn commit(&mut self, key: String, resource: Resource, mut obj: Value) -> Value {
        let ownership = self.ownership.get(&key).cloned().unwrap_or_default();
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let managed = self
            .writes
            .entry(key.clone())
            .or_default()
            .render(&ownership, &api_version);
        match (
            managed.as_array().is_some_and(|m| m.is_empty()),
            obj["metadata"].as_object_mut(),
        ) {
            (true, Some(meta)) => {
                meta.remove("managedFields");
            }
            (false, Some(meta)) => {
                meta.insert("managedFields".into(), managed);
            }
            (_, None) => {}
        }
        self.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        let previous = self.objects.insert(key.clone(), obj.clone());
        let event = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        let statuses = self.statuses.entry(key.clone()).or_default();
        if !obj["status"].is_null() && statuses.last() != Some(&obj["status"]) {
            statuses.push(obj["status"].clone());
        }
        self.publish(Change {
            resource_version: self.resource_version,
            resource,
            event,
            object: obj.clone(),
            previous,
        });
        obj
    }

    fn publish(&mut self, change: Change) {
        self.watchers.retain(|w| match w.event_of(&change) {
            Some(line) => w.sender.send(line).is_ok(),
            None => !w.sender.is_closed(),
        });
        self.history.push_back(change);
        while self.history.len() > HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.history_since = dropped.resource_version;
            }
        }
    }

    /// DELETE: an object with finalizers is marked for deletion, one
    /// without is removed. `None` when there is no such object.
    fn delete(&mut self, key: &str) -> Option<Value> {
        let mut obj = self.objects.get(key)?.clone();
        if finalizers(&obj).is_empty() {
            return self.remove(key);
        }
        if is_deleting(&obj) {
            return Some(obj);
        }
        obj["metadata"]["deletionTimestamp"] = json!(now());
        obj["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        // As the apiserver's markAsDeleting does: watchers of generation see
        // the deletion.
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(0);
        obj["metadata"]["generation"] = json!(generation + 1);
        let resource = resource_of(key)?;
        Some(self.commit(key.to_string(), resource, obj))
    }

    /// Removes an object for good, then what it owned (garbage collection)
    /// and its namespace if that waited for it.
    fn remove(&mut self, key: &str) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        self.ownership.remove(key);
        self.writes.remove(key);
        self.resource_version += 1;
        obj["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.publish(Change {
            resource_version: self.resource_version,
            resource: resource_of(key)?,
            event: EventType::Deleted,
            object: obj.clone(),
            previous: None,
        });
        let live: BTreeSet<String> = self
            .objects
            .values()
            .filter_map(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .collect();
        let orphans: Vec<String> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                o["metadata"]["ownerReferences"].as_array().is_some_and(|owners| {
                    !owners.is_empty()
                        && owners
                            .iter()
                            .all(|r| r["uid"].as_str().is_none_or(|uid| !live.contains(uid)))
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for orphan in orphans {
            self.delete(&orphan);
        }
        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
            self.finish_namespace(ns);
        }
        Some(obj)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NamespacePhase {
    Active,
    Terminating,
    Gone,
}

fn resource_of(key: &str) -> Option<Resource> {
    match super::resource::parse(key)? {
        Target::Object { resource, .. } => Some(resource),
        Target::Collection { .. } => None,
    }
}

/// What a write may change: on a kind with a status subresource, a write
/// of the object keeps the status it had, and a status write keeps
/// everything else.
fn scoped(resource: &Resource, current: &Value, written: &Value, status_write: bool) -> Value {
    if !resource.has_status_subresource() {
        return written.clone();
    }
    let (mut base, from) = if status_write {
        (current.clone(), written)
    } else {
        (written.clone(), current)
    };
    match (base.as_object_mut(), from.get("status")) {
        (Some(map), Some(status)) => {
            map.insert("status".into(), status.clone());
        }
        (Some(map), None) => {
            map.remove("status");
        }
        (None, _) => {}
    }
    base
}

/// What an apply through this endpoint may set: the status alone through
/// `/status`, all but the status through the object of a kind with a
/// status subresource.
fn applied_config(resource: &Resource, body: &Value, status_write: bool) -> Value {
    if !resource.has_status_subresource() {
        return body.clone();
    }
    let mut applied = body.clone();
    if let Some(map) = applied.as_object_mut() {
        if status_write {
            map.retain(|k, _| k == "apiVersion" || k == "kind" || k == "metadata" || k == "status");
            if let Some(meta) = map.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.retain(|k, _| k == "name" || k == "namespace");
            }
        } else {
            map.remove("status");
        }
    }
    applied
}

/// The object a PUT or non-apply PATCH makes of `current`.
fn patched(request: &Request, current: &Value) -> Result<Value, Reply> {
    if request.method == Method::PUT {
        return Ok(request.body.clone());
    }
    let mut obj = current.clone();
    match request.content_type.as_str() {
        t if t.starts_with("application/json-patch") => {
            let Value::Array(ops) = &request.body else {
                return Err(failure(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "a JSON patch is a list".into(),
                ));
            };
            // The apiserver passes a test of a missing path for null
            // (kube's finalizer helper relies on it); json_patch fails it.
            let ops: Vec<Value> = ops
                .iter()
                .filter(|op| {
                    !(op["op"] == "test"
                        && op["value"].is_null()
                        && op["path"].as_str().is_some_and(|p| obj.pointer(p).is_none()))
                })
                .cloned()
                .collect();
            let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
                .map_err(|e| failure(StatusCode::BAD_REQUEST, "BadRequest", e.to_string()))?;
            json_patch::patch(&mut obj, &patch)
                .map_err(|e| failure(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e.to_string()))?;
        }
        t if t.starts_with("application/merge-patch") => json_patch::merge(&mut obj, &request.body),
        other => {
            return Err(failure(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the fake API server does not take {other} patches"),
            ));
        }
    }
    Ok(obj)
}
