//! The fake API server answers as a kube-apiserver does where the operator
//! depends on it: checked here through a kube client, as the operator
//! talks to it.

use matrix_user_operator_testkit as common;

use std::time::Duration;

use common::fake_kube::{FakeApiServer, KUBECTL, KUBECTL_CLIENT_SIDE, LAST_APPLIED, path_of};
use futures::{AsyncBufReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::PartialObjectMeta;
use matrix_user_operator::api::MatrixUser;
use serde_json::{Value, json};

const NS: &str = "chat";

fn user(name: &str) -> Value {
    json!({
        "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"homeserverRef": {"name": "hs"}},
    })
}

fn users(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<MatrixUser>(&()))
}

fn dynamic(v: Value) -> DynamicObject {
    serde_json::from_value(v).unwrap()
}

fn condition(type_: &str, reason: &str) -> Value {
    json!({"type": type_, "status": "True", "reason": reason, "message": "",
           "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

fn status_apply(status: Value) -> Value {
    json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser", "status": status})
}

/// The code, reason and message of an API error.
fn api_error<T: std::fmt::Debug>(result: Result<T, kube::Error>) -> (u16, String, String) {
    match result {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn version_of(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn apply_removes_what_its_manager_stopped_applying_and_keeps_what_others_own() {
    let (client, fake) = FakeApiServer::start();
    fake.put(user("u"));
    let api = users(&client, NS);
    let path = path_of(&user("u"));
    let force = PatchParams::apply("operator").force();

    let first = status_apply(json!({"userId": "@u:x", "conditions": [condition("Ready", "InSync")]}));
    api.patch_status("u", &force, &Patch::Apply(&first)).await.unwrap();
    let other = status_apply(json!({"conditions": [condition("Audited", "Checked")]}));
    api.patch_status("u", &PatchParams::apply("auditor"), &Patch::Apply(&other))
        .await
        .unwrap();
    // Built from a stale object: no userId.
    let stale = status_apply(json!({"conditions": [condition("Ready", "Conflict")]}));
    api.patch_status("u", &force, &Patch::Apply(&stale)).await.unwrap();

    let status = &fake.get(&path).unwrap()["status"];
    assert!(status["userId"].is_null(), "only the operator owned it: {status}");
    let conditions: Vec<(&str, &str)> = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].as_str().unwrap(), c["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(conditions, vec![("Ready", "Conflict"), ("Audited", "Checked")]);
    let history = fake.status_history(&path);
    assert_eq!(history.len(), 3, "{history:?}");
    assert_eq!(history[0]["userId"], "@u:x");

    // A field another manager owns with another value: refused unless forced.
    let takeover =
        status_apply(json!({"conditions": [condition("Ready", "Conflict"), condition("Audited", "Skipped")]}));
    let (code, reason, message) = api_error(
        api.patch_status("u", &PatchParams::apply("operator"), &Patch::Apply(&takeover))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"), "{message}");
    assert!(message.contains("auditor"), "{message}");
    api.patch_status("u", &force, &Patch::Apply(&takeover)).await.unwrap();
    // The auditor lost that field: its next apply without it keeps it.
    let nothing = status_apply(json!({}));
    api.patch_status("u", &PatchParams::apply("auditor"), &Patch::Apply(&nothing))
        .await
        .unwrap();
    let status = &fake.get(&path).unwrap()["status"];
    assert_eq!(status["conditions"][1]["reason"], "Skipped", "{status}");

    // The object's endpoint leaves the status alone, and the reverse.
    let mut main = user("u");
    main["spec"]["displayName"] = json!("U");
    main["status"] = json!({"userId": "@forged:x"});
    api.patch("u", &force, &Patch::Apply(&main)).await.unwrap();
    let stored = fake.get(&path).unwrap();
    assert_eq!(stored["spec"]["displayName"], "U");
    assert!(stored["status"]["userId"].is_null(), "{stored}");
    let spec_through_status = json!({"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                                     "spec": {"displayName": "V"}});
    api.patch_status("u", &force, &Patch::Apply(&spec_through_status))
        .await
        .unwrap();
    assert_eq!(fake.get(&path).unwrap()["spec"]["displayName"], "U");
}

/// The managedFields entry of `manager` (through `subresource`, `""` for
/// the object itself).
fn entry<'v>(obj: &'v Value, manager: &str, subresource: &str) -> &'v Value {
    obj["metadata"]["managedFields"]
        .as_array()
        .unwrap_or_else(|| panic!("no managedFields: {obj}"))
        .iter()
        .find(|e| e["manager"] == manager && e["subresource"].as_str().unwrap_or_default() == subresource)
        .unwrap_or_else(|| {
            panic!(
                "no entry of {manager} {subresource:?}: {}",
                obj["metadata"]["managedFields"]
            )
        })
}

#[tokio::test]
async fn objects_carry_managed_fields_per_manager_and_client_side_apply_its_annotation() {
    let (client, fake) = FakeApiServer::start();
    let api = users(&client, NS);
    let mut alice = user("alice");
    alice["spec"]["displayName"] = json!("Alice");
    let path = path_of(&alice);
    // As a user applies it: `kubectl apply --server-side`.
    fake.apply(KUBECTL, alice);
    // A finalizer as kube's helper adds it (a JSON patch, no fieldManager),
    // then a status as the operator writes it.
    let finalizer = json!([{"op": "add", "path": "/metadata/finalizers", "value": ["matrix-operator.io/cleanup"]}]);
    api.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Json::<()>(serde_json::from_value(finalizer).unwrap()),
    )
    .await
    .unwrap();
    let status = status_apply(json!({"userId": "@alice:x", "conditions": [condition("Ready", "InSync")]}));
    api.patch_status(
        "alice",
        &PatchParams::apply("matrix-user-operator").force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();

    let stored = fake.get(&path).unwrap();
    assert_eq!(
        stored["metadata"]["managedFields"].as_array().unwrap().len(),
        3,
        "{stored}"
    );
    let by_kubectl = entry(&stored, KUBECTL, "");
    assert_eq!(by_kubectl["operation"], "Apply");
    assert_eq!(by_kubectl["apiVersion"], "matrix-operator.io/v1alpha1");
    assert_eq!(by_kubectl["fieldsType"], "FieldsV1");
    assert!(
        by_kubectl["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{by_kubectl}"
    );
    assert_eq!(
        by_kubectl["fieldsV1"],
        json!({"f:spec": {"f:displayName": {}, "f:homeserverRef": {"f:name": {}}}})
    );
    let by_patch = entry(&stored, "unknown", "");
    assert_eq!(by_patch["operation"], "Update");
    assert_eq!(
        by_patch["fieldsV1"],
        json!({"f:metadata": {"f:finalizers": {".": {}, "v:\"matrix-operator.io/cleanup\"": {}}}})
    );
    let by_operator = entry(&stored, "matrix-user-operator", "status");
    assert_eq!(by_operator["operation"], "Apply");
    assert_eq!(
        by_operator["fieldsV1"]["f:status"]["f:conditions"]["k:{\"type\":\"Ready\"}"],
        json!({".": {}, "f:type": {}, "f:status": {}, "f:reason": {}, "f:message": {}, "f:lastTransitionTime": {}})
    );
    assert_eq!(by_operator["fieldsV1"]["f:status"]["f:userId"], json!({}));
    // Clients get them too: whole objects, and metadata-only ones.
    let read = api.get("alice").await.unwrap();
    assert_eq!(read.metadata.managed_fields.map(|m| m.len()), Some(3));
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    fake.apply(
        KUBECTL,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pw", "namespace": NS},
                               "stringData": {"password": "x"}}),
    );
    let meta = secrets.get_metadata("pw").await.unwrap();
    assert_eq!(meta.metadata.managed_fields.map(|m| m.len()), Some(1));

    // Client-side `kubectl apply`: the whole object in an annotation too.
    let bob = user("bob");
    fake.apply_client_side(bob.clone());
    let stored = fake.get(&path_of(&bob)).unwrap();
    let applied: Value =
        serde_json::from_str(stored["metadata"]["annotations"][LAST_APPLIED].as_str().unwrap()).unwrap();
    assert_eq!(applied, bob);
    let by_kubectl = entry(&stored, KUBECTL_CLIENT_SIDE, "");
    assert_eq!(by_kubectl["operation"], "Update");
    assert_eq!(
        by_kubectl["fieldsV1"]["f:metadata"]["f:annotations"],
        json!({".": {}, format!("f:{LAST_APPLIED}"): {}})
    );
    assert_eq!(
        by_kubectl["fieldsV1"]["f:spec"],
        json!({".": {}, "f:homeserverRef": {".": {}, "f:name": {}}})
    );
}

#[tokio::test]
async fn a_stale_resource_version_is_a_conflict_for_put_patch_and_apply() {
    let (client, fake) = FakeApiServer::start();
    fake.put(user("x"));
    let api = users(&client, NS);
    let stale = fake.get(&path_of(&user("x"))).unwrap();
    let stale_rv = stale["metadata"]["resourceVersion"].clone();
    let change = json!({"spec": {"displayName": "new"}});
    api.patch("x", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap();

    let expected = (
        409,
        "Conflict".to_string(),
        "Operation cannot be fulfilled on matrixusers.matrix-operator.io \"x\": the object has been modified; \
         please apply your changes to the latest version and try again"
            .to_string(),
    );
    let put = api.replace("x", &PostParams::default(), &dynamic(stale.clone())).await;
    assert_eq!(api_error(put), expected);
    let merge = json!({"metadata": {"resourceVersion": stale_rv}, "spec": {"displayName": "other"}});
    let patched = api.patch("x", &PatchParams::default(), &Patch::Merge(&merge)).await;
    assert_eq!(api_error(patched), expected);
    let mut applied = user("x");
    applied["metadata"]["resourceVersion"] = stale_rv;
    let applied = api
        .patch("x", &PatchParams::apply("m").force(), &Patch::Apply(&applied))
        .await;
    assert_eq!(api_error(applied), expected);
    assert_eq!(fake.get(&path_of(&user("x"))).unwrap()["spec"]["displayName"], "new");

    // With the current version, the PUT goes through.
    let current = fake.get(&path_of(&user("x"))).unwrap();
    api.replace("x", &PostParams::default(), &dynamic(current))
        .await
        .unwrap();
}

#[tokio::test]
async fn generation_counts_spec_changes_and_every_write_a_resource_version() {
    let (client, fake) = FakeApiServer::start();
    let api = users(&client, NS);
    let mut new = user("g");
    new["status"] = json!({"userId": "@g:x"});
    let created = serde_json::to_value(api.create(&PostParams::default(), &dynamic(new)).await.unwrap()).unwrap();
    assert_eq!(created["metadata"]["generation"], 1);
    assert!(created["status"].is_null(), "status is not created with the object");
    let mut last = version_of(&created);

    let writes = [
        ("status", json!({"status": {"userId": "@g:x"}}), 1),
        ("labels", json!({"metadata": {"labels": {"a": "b"}}}), 1),
        ("spec", json!({"spec": {"displayName": "G"}}), 2),
    ];
    for (what, patch, generation) in writes {
        let result = if what == "status" {
            api.patch_status("g", &PatchParams::default(), &Patch::Merge(&patch))
                .await
        } else {
            api.patch("g", &PatchParams::default(), &Patch::Merge(&patch)).await
        };
        let obj = serde_json::to_value(result.unwrap()).unwrap();
        assert_eq!(obj["metadata"]["generation"], generation, "after a {what} write");
        assert!(version_of(&obj) > last, "a {what} write bumps resourceVersion");
        last = version_of(&obj);
    }
    assert_eq!(fake.get(&path_of(&user("g"))).unwrap()["status"]["userId"], "@g:x");
    let list = client
        .request_text(
            http::Request::get(format!("/apis/matrix-operator.io/v1alpha1/namespaces/{NS}/matrixusers"))
                .body(vec![])
                .unwrap(),
        )
        .await
        .unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["metadata"]["resourceVersion"], last.to_string());
}

#[tokio::test]
async fn a_watch_sees_every_change_after_its_version_in_its_namespace() {
    let (client, fake) = FakeApiServer::start();
    fake.put(user("before"));
    let api = users(&client, NS);
    let listed = api.list(&ListParams::default()).await.unwrap();
    let version = listed.metadata.resource_version.unwrap();
    let mut events = api
        .watch(&WatchParams::default().timeout(10), &version)
        .await
        .unwrap()
        .boxed();

    let mut elsewhere = user("elsewhere");
    elsewhere["metadata"]["namespace"] = json!("other");
    users(&client, "other")
        .create(&PostParams::default(), &dynamic(elsewhere))
        .await
        .unwrap();
    api.create(&PostParams::default(), &dynamic(user("w"))).await.unwrap();
    let patch = json!({"spec": {"displayName": "W"}});
    api.patch("w", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    api.delete("w", &DeleteParams::default()).await.unwrap();

    let mut seen = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        seen.push(match event {
            WatchEvent::Added(o) => format!("ADDED {}", o.metadata.name.unwrap()),
            WatchEvent::Modified(o) => format!("MODIFIED {}", o.metadata.name.unwrap()),
            WatchEvent::Deleted(o) => format!("DELETED {}", o.metadata.name.unwrap()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen, vec!["ADDED w", "MODIFIED w", "DELETED w"]);

    // A label selector filters what a watch from "now" sees.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    for (name, labels) in [("plain", json!({})), ("marked", json!({"app": "x"}))] {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": name, "namespace": NS, "labels": labels}});
        fake.put(secret);
    }
    let mut selected = secrets
        .watch(&WatchParams::default().labels("app=x").timeout(10), "0")
        .await
        .unwrap()
        .boxed();
    match selected.next().await.unwrap().unwrap() {
        WatchEvent::Added(s) => assert_eq!(s.metadata.name.as_deref(), Some("marked")),
        other => panic!("{other:?}"),
    }
}

async fn first_watch_event(api: &Api<DynamicObject>, version: &str) -> WatchEvent<DynamicObject> {
    let mut events = api
        .watch(&WatchParams::default().timeout(10), version)
        .await
        .unwrap()
        .boxed();
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_watch_from_before_a_compaction_or_a_restart_is_expired() {
    let (client, fake) = FakeApiServer::start();
    let api = users(&client, NS);
    fake.put(user("a"));
    let old = version_of(&fake.get(&path_of(&user("a"))).unwrap());
    fake.put(user("b"));
    fake.compact();
    match first_watch_event(&api, &old.to_string()).await {
        WatchEvent::Error(e) => {
            assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
            assert!(
                e.message.starts_with(&format!("too old resource version: {old} (")),
                "{}",
                e.message
            );
        }
        other => panic!("{other:?}"),
    }

    // A restart cuts open watches, and the history is gone with it.
    let current = version_of(&fake.get(&path_of(&user("b"))).unwrap()).to_string();
    let mut open = api
        .watch(&WatchParams::default().timeout(30), &current)
        .await
        .unwrap()
        .boxed();
    fake.put(user("c"));
    assert!(matches!(open.next().await, Some(Ok(WatchEvent::Added(_)))));
    fake.restart();
    let ended = tokio::time::timeout(Duration::from_secs(5), open.next())
        .await
        .expect("the watch ends");
    assert!(!matches!(ended, Some(Ok(_))), "{ended:?}");
    // A new client: one whose pooled connections were cut may see one
    // transport error first, as against a restarting apiserver.
    let api = users(&fake.client(), NS);
    assert!(matches!(first_watch_event(&api, &current).await, WatchEvent::Error(e) if e.code == 410));
}

#[tokio::test]
async fn metadata_only_lists_and_watches_carry_no_data() {
    let (client, fake) = FakeApiServer::start();
    fake.put(
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": NS},
                    "data": {"password": "c2VjcmV0"}}),
    );
    let metadata = |path: &str, accept: &str| {
        http::Request::get(path)
            .header(http::header::ACCEPT, accept)
            .body(vec![])
            .unwrap()
    };
    let collection = format!("/api/v1/namespaces/{NS}/secrets");
    let list = client
        .request_text(metadata(
            &collection,
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        ))
        .await
        .unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(list["items"][0]["metadata"]["name"], "s");
    assert!(!list.to_string().contains("c2VjcmV0"), "{list}");

    let watch = client
        .request_stream(metadata(
            &format!("{collection}?watch=true&resourceVersion=0&timeoutSeconds=5"),
            "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1",
        ))
        .await
        .unwrap();
    let mut lines = Box::pin(watch).lines();
    let line = lines.next().await.unwrap().unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["type"], "ADDED");
    assert_eq!(event["object"]["kind"], "PartialObjectMetadata");
    assert!(!line.contains("c2VjcmV0"), "{line}");

    // And kube's metadata API gets what it asks for.
    let api: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), NS);
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|s| s.metadata.name.unwrap())
        .collect();
    assert_eq!(names, vec!["s"]);
    assert!(fake.requests().iter().all(|r| r.metadata_only));
}

#[tokio::test]
async fn deletion_waits_for_the_finalizers_and_takes_what_the_object_owned() {
    let (client, fake) = FakeApiServer::start();
    let api = users(&client, NS);
    let mut held = user("held");
    held["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
    fake.put(held.clone());
    let path = path_of(&held);
    let uid = fake.get(&path).unwrap()["metadata"]["uid"].clone();
    fake.put(json!({"apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "owned", "namespace": NS,
                                 "ownerReferences": [{"apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                                                      "name": "held", "uid": uid, "controller": true}]}}));

    api.delete("held", &DeleteParams::default()).await.unwrap();
    let deleting = fake.get(&path).expect("held by its finalizer");
    assert!(deleting["metadata"]["deletionTimestamp"].is_string());
    let more = json!({"metadata": {"finalizers": ["example.com/cleanup", "example.com/late"]}});
    let (code, reason, _) = api_error(api.patch("held", &PatchParams::default(), &Patch::Merge(&more)).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    let version = deleting["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    let release = json!({"metadata": {"finalizers": null}});
    api.patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    assert!(fake.get(&path).is_none(), "gone with its last finalizer");
    assert!(matches!(
        first_watch_event(&api, &version).await,
        WatchEvent::Deleted(_)
    ));
    assert!(
        fake.get(&format!("/api/v1/namespaces/{NS}/secrets/owned")).is_none(),
        "garbage-collected with its owner"
    );
}

#[tokio::test]
async fn a_namespace_terminates_until_its_last_finalizer_goes() {
    let (client, fake) = FakeApiServer::start();
    let ns = "doomed";
    let mut held = user("held");
    held["metadata"]["namespace"] = json!(ns);
    held["metadata"]["finalizers"] = json!(["example.com/cleanup"]);
    fake.put(held.clone());
    let secret =
        |name: &str| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns}});
    fake.put(secret("loose"));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(ns, &DeleteParams::default()).await.unwrap();

    let phase = |fake: &FakeApiServer| {
        fake.get(&format!("/api/v1/namespaces/{ns}"))
            .map(|n| n["status"]["phase"].clone())
    };
    assert_eq!(phase(&fake), Some(json!("Terminating")));
    assert!(fake.get(&format!("/api/v1/namespaces/{ns}/secrets/loose")).is_none());
    assert!(fake.get(&path_of(&held)).unwrap()["metadata"]["deletionTimestamp"].is_string());

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let (code, reason, message) = api_error(
        secrets
            .create(&PostParams::default(), &serde_json::from_value(secret("new")).unwrap())
            .await,
    );
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        message,
        format!(
            "secrets \"new\" is forbidden: unable to create new content in namespace {ns} because it is being terminated"
        )
    );
    let event = json!({"apiVersion": "events.k8s.io/v1", "kind": "Event",
                       "metadata": {"name": "held.1", "namespace": ns}, "reason": "Cleanup"});
    let events: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        ns,
        &ApiResource::erase::<k8s_openapi::api::events::v1::Event>(&()),
    );
    let (code, _, _) = api_error(events.create(&PostParams::default(), &dynamic(event)).await);
    assert_eq!(code, 403);

    // Writes to what is there still work: status, then the finalizer.
    let api = users(&client, ns);
    let status = json!({"status": {"userId": "@held:x"}});
    api.patch_status("held", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let release = json!({"metadata": {"finalizers": []}});
    api.patch("held", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    assert_eq!(phase(&fake), None, "the namespace is gone");
    let (code, _, _) = api_error(namespaces.get(ns).await);
    assert_eq!(code, 404);
}

#[tokio::test]
async fn a_server_that_is_down_fails_requests_and_cuts_watches_until_it_is_up() {
    let (client, fake) = FakeApiServer::start();
    fake.put(user("u"));
    let api = users(&client, NS);
    let mut open = api
        .watch(&WatchParams::default().timeout(30), "0")
        .await
        .unwrap()
        .boxed();
    assert!(matches!(open.next().await, Some(Ok(WatchEvent::Added(_)))));

    fake.set_down(true);
    let ended = tokio::time::timeout(Duration::from_secs(5), open.next())
        .await
        .expect("the watch is cut");
    assert!(!matches!(ended, Some(Ok(_))), "{ended:?}");
    match api.get("u").await {
        Err(kube::Error::Api(s)) => panic!("a transport failure, not an answer: {s:?}"),
        Err(_) => {}
        Ok(_) => panic!("answered while down"),
    }

    fake.set_down(false);
    // A new client: the old one's pooled connections were cut.
    users(&fake.client(), NS).get("u").await.expect("up again");
}

#[tokio::test]
async fn a_kubeconfig_file_leads_a_client_to_it() {
    let (_, fake) = FakeApiServer::start();
    fake.put(user("u"));
    let dir = std::env::temp_dir().join(format!("fake-kube-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = fake.kubeconfig_file(&dir);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), fake.url());
    let client = kube::Client::try_from(config).unwrap();
    let names: Vec<String> = users(&client, NS)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|u| u.metadata.name.unwrap())
        .collect();
    assert_eq!(names, vec!["u"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_watch_that_times_out_ends_with_a_bookmark_of_the_current_version() {
    let (client, fake) = FakeApiServer::start();
    let api = users(&client, NS);
    let version = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut events = api
        .watch(&WatchParams::default().timeout(1), &version)
        .await
        .unwrap()
        .boxed();
    // A change to something else: the watch sees nothing but the version.
    fake.put(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": NS}}));
    let current =
        fake.get(&format!("/api/v1/namespaces/{NS}/secrets/s")).unwrap()["metadata"]["resourceVersion"].clone();
    match events.next().await {
        Some(Ok(WatchEvent::Bookmark(b))) => assert_eq!(json!(b.metadata.resource_version), current),
        other => panic!("{other:?}"),
    }
    assert!(events.next().await.is_none(), "and ends");
}

/// Field selectors parse as the API server parses them (apimachinery's
/// `fields.ParseSelector`): an unescaped `=` or `,` in a value, or an
/// unknown escape, is a 400 with its message; `\=`, `\,` and `\\` are data.
#[tokio::test]
async fn field_selectors_refuse_unescaped_values_and_unescape_escaped_ones() {
    let (client, fake) = FakeApiServer::start();
    let mut odd = user("odd");
    odd["spec"]["localpart"] = json!("a=b");
    fake.put(odd);
    let mut plain = user("plain");
    plain["spec"]["localpart"] = json!("a");
    fake.put(plain);
    let api = users(&client, NS);
    let list = |selector: &str| {
        let api = api.clone();
        let params = ListParams::default().fields(selector);
        async move { api.list(&params).await }
    };
    for (selector, message) in [
        (
            "spec.localpart=a=b",
            "invalid field selector: unescaped character in value: 61",
        ),
        (
            "spec.localpart==a=b",
            "invalid field selector: unescaped character in value: 61",
        ),
        (
            r"spec.localpart=a\b",
            r"invalid field selector: invalid escape sequence: \b",
        ),
        (
            r"spec.localpart=a\",
            r"invalid field selector: invalid escape sequence: \",
        ),
        (
            "spec.localpart=a,b",
            "invalid selector: 'spec.localpart=a,b'; can't understand 'b'",
        ),
    ] {
        let (code, reason, got) = api_error(list(selector).await);
        assert_eq!(
            (code, reason.as_str(), got.as_str()),
            (400, "BadRequest", message),
            "{selector}"
        );
        // A watch parses the same way.
        let watched = api
            .watch(&WatchParams::default().fields(selector).timeout(1), "0")
            .await;
        assert!(
            matches!(watched, Err(kube::Error::Api(ref s)) if s.code == 400),
            "{selector}: a watch is refused too"
        );
    }
    let names = |list: kube::core::ObjectList<DynamicObject>| -> Vec<String> {
        list.items.into_iter().map(|o| o.metadata.name.unwrap()).collect()
    };
    assert_eq!(names(list(r"spec.localpart=a\=b").await.unwrap()), ["odd"]);
    assert_eq!(names(list(r"spec.localpart!=a\=b").await.unwrap()), ["plain"]);
    assert_eq!(names(list("spec.localpart=a").await.unwrap()), ["plain"]);
    assert!(names(list(r"metadata.name=a\=b,spec.localpart=a\=b").await.unwrap()).is_empty());
    assert!(names(list(r"spec.localpart=a\,b\\").await.unwrap()).is_empty());
}

/// Metadata is validated as the API server validates it: a label value over
/// 63 characters or off the label grammar, or a name over 253, is a 422
/// naming the field, the value and the limit; on create and on update.
#[tokio::test]
async fn label_values_and_names_over_their_limits_are_invalid() {
    let (client, _fake) = FakeApiServer::start();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = |name: &str, label: &str| -> Secret {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "labels": {"matrix-operator.io/x": label}}}))
        .unwrap()
    };
    let long = "v".repeat(64);
    let (code, reason, message) = api_error(secrets.create(&PostParams::default(), &secret("a", &long)).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    assert_eq!(
        message,
        format!(
            r#"Secret "a" is invalid: metadata.labels: Invalid value: "{long}": must be no more than 63 characters"#
        )
    );
    let (code, _, message) = api_error(secrets.create(&PostParams::default(), &secret("a", "-x")).await);
    assert_eq!(code, 422);
    assert!(
        message.starts_with(r#"Secret "a" is invalid: metadata.labels: Invalid value: "-x": a valid label must be"#),
        "{message}"
    );
    let name = "n".repeat(254);
    let (code, _, message) = api_error(secrets.create(&PostParams::default(), &secret(&name, "ok")).await);
    assert_eq!(code, 422);
    assert_eq!(
        message,
        format!(
            r#"Secret "{name}" is invalid: metadata.name: Invalid value: "{name}": must be no more than 253 characters"#
        )
    );
    // At the limits, and on update.
    secrets
        .create(&PostParams::default(), &secret(&"n".repeat(253), &"v".repeat(63)))
        .await
        .expect("at the limits");
    secrets
        .create(&PostParams::default(), &secret("b", ""))
        .await
        .expect("an empty value");
    let patch = json!({"metadata": {"labels": {"matrix-operator.io/x": long}}});
    let (code, _, _) = api_error(secrets.patch("b", &PatchParams::default(), &Patch::Merge(&patch)).await);
    assert_eq!(code, 422);
}
