//! `spec.managementPolicy: Observe` on a real Synapse, through the fake
//! Kubernetes API server, with every request to Synapse counted by a
//! proxy: an observed account that matches is InSync with no write; one
//! changed in Synapse is Drifted, naming the field and leaving it; a
//! missing one is NotFound and not created (nor its password generated);
//! deleting an observed MatrixUser leaves the account; flipping to Manage
//! meets the adoption rules and then corrects the account.

use matrix_user_operator_testkit as common;

use std::sync::Arc;

use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{account, cluster_in, condition_of, homeserver_in, matrix_user_in, secret_in, stored_user};
use common::proxy::{Misbehave, Proxy};
use common::synapse;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use matrix_user_operator::api::MatrixUser;
use matrix_user_operator::controller::{Config, Context, reconcile_user};
use matrix_user_operator::metrics::Metrics;
use serde_json::{Value, json};

const NS: &str = "observe";

struct Rig {
    fake: FakeApiServer,
    client: kube::Client,
    proxy: Proxy,
    obj: Value,
    user_id: String,
}

impl Rig {
    /// A MatrixUser `name` with `spec` (the Homeserver `hs` and the
    /// localpart added), its Homeserver's URL the proxy's.
    async fn new(localpart: &str, spec: Value, status: Value, policy: Value) -> Self {
        let s = synapse();
        let proxy = Proxy::start(&s.base_url, |_| Misbehave::Forward).await;
        let (client, fake) = cluster_in(&[NS], json!({}));
        let rig = Rig {
            fake,
            client,
            proxy,
            obj: Value::Null,
            user_id: s.user_id(localpart),
        };
        rig.set_policy(policy);
        let mut spec = spec;
        spec["homeserverRef"] = json!({"name": "hs"});
        spec["localpart"] = json!(localpart);
        let obj = matrix_user_in(NS, "member", spec, status);
        rig.fake.put(obj.clone());
        Rig { obj, ..rig }
    }

    /// The Homeserver, at the proxy, with this policy.
    fn set_policy(&self, policy: Value) {
        let mut hs = homeserver_in(NS, "hs", policy);
        hs["spec"]["url"] = json!(self.proxy.url);
        self.fake.put(hs);
    }

    fn stored(&self) -> MatrixUser {
        stored_user(&self.fake, &self.obj)
    }

    /// One pass over the MatrixUser as the fake server holds it.
    async fn reconcile(&self) -> MatrixUser {
        let user = self.stored();
        let mut writer = Writer::<MatrixUser>::default();
        writer.apply_watcher_event(&watcher::Event::Apply(user.clone()));
        let ctx = Arc::new(Context::new(
            self.client.clone(),
            Config::default(),
            writer.as_reader(),
            Metrics::new(),
        ));
        let _ = reconcile_user(Arc::new(user), ctx).await;
        self.stored()
    }

    /// Changes the spec (a new generation), as `kubectl apply` would.
    fn set_spec(&self, field: &str, value: Value) {
        let mut obj = self.fake.get(&path_of(&self.obj)).unwrap();
        obj["spec"][field] = value;
        let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
        obj["metadata"]["generation"] = json!(generation);
        self.fake.put(obj);
    }

    /// The requests to Synapse other than reads.
    fn writes(&self) -> Vec<String> {
        self.proxy
            .seen()
            .iter()
            .filter(|s| s.method != "GET")
            .map(|s| format!("{} {}", s.method, s.path))
            .collect()
    }
}

fn ready(u: &MatrixUser) -> (String, String, String) {
    condition_of(u, "Ready").expect("a Ready condition")
}

#[tokio::test]
async fn an_observed_account_is_compared_never_written_and_a_flip_to_manage_meets_the_adoption_rules() {
    let s = synapse();
    let localpart = s.unique_localpart("obs-flip");
    s.register_user(&localpart, "the-old-password", false).await;
    let user_id = s.user_id(&localpart);
    let (status, body) = s
        .admin_put(
            &format!("/_synapse/admin/v2/users/{user_id}"),
            json!({"displayname": "Observed One"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The password Secret does not exist: an observer never reads it.
    let spec = json!({
        "managementPolicy": "Observe", "adopt": true, "displayName": "Observed One", "locked": false,
        "password": {"secretRef": {"name": "member-password", "key": "password"}},
    });
    let rig = Rig::new(&localpart, spec, Value::Null, json!({"allowAdoption": false})).await;

    let u = rig.reconcile().await;
    let (status, reason, message) = ready(&u);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InSync"), "{message}");
    assert_eq!(rig.writes(), Vec::<String>::new(), "no write to Synapse");
    assert!(rig.proxy.count("/_synapse/admin/v2/users/") > 0, "the account was read");
    assert_eq!(
        u.status.as_ref().and_then(|s| s.user_id.clone()),
        None,
        "no ownership recorded"
    );
    assert_eq!(rig.fake.event_reasons(), Vec::<String>::new());

    // Changed in Synapse: Drifted, naming the field, never its value.
    let (status, body) = s
        .admin_put(
            &format!("/_synapse/admin/v2/users/{user_id}"),
            json!({"displayname": "Renamed By Hand"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let u = rig.reconcile().await;
    let (status, reason, message) = ready(&u);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Drifted"), "{message}");
    assert!(
        message.contains("displayname") && message.contains(&user_id),
        "{message}"
    );
    assert!(
        !message.contains("Renamed") && !message.contains("Observed One"),
        "{message}"
    );
    assert_eq!(
        condition_of(&u, "Stalled").map(|c| c.0).as_deref(),
        Some("True"),
        "waits for a change"
    );
    assert_eq!(rig.fake.event_reasons(), vec!["Drifted"]);
    assert_eq!(account(&user_id).await.1["displayname"], "Renamed By Hand");
    assert_eq!(rig.writes(), Vec::<String>::new(), "no write to Synapse");

    // Manage, on a Homeserver that does not allow adoption: refused, as
    // for any existing account, though the resource observed it.
    rig.set_spec("managementPolicy", json!("Manage"));
    rig.fake
        .put(secret_in(NS, "member-password", "password", "the-new-password"));
    let u = rig.reconcile().await;
    let (status, reason, message) = ready(&u);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "AdoptionRefused"),
        "{message}"
    );
    assert_eq!(rig.writes(), Vec::<String>::new(), "no write to Synapse");

    // Allowed: adopted and corrected.
    rig.set_policy(json!({"allowAdoption": true}));
    let u = rig.reconcile().await;
    let (status, reason, message) = ready(&u);
    assert_eq!((status.as_str(), reason.as_str()), ("True", "InSync"), "{message}");
    assert_eq!(account(&user_id).await.1["displayname"], "Observed One");
    assert_eq!(u.status.as_ref().and_then(|s| s.user_id.clone()), Some(user_id.clone()));
    assert!(s.login(&localpart, "the-new-password").await.is_ok());
    assert!(!rig.writes().is_empty());
}

#[tokio::test]
async fn observing_a_missing_account_reports_not_found_and_creates_nothing() {
    let s = synapse();
    let localpart = s.unique_localpart("obs-missing");
    let spec = json!({"managementPolicy": "Observe", "displayName": "Nobody", "password": {"generate": true}});
    let rig = Rig::new(&localpart, spec, Value::Null, json!({})).await;

    let u = rig.reconcile().await;
    let (status, reason, message) = ready(&u);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotFound"), "{message}");
    assert!(message.contains(&rig.user_id), "{message}");
    assert_eq!(account(&rig.user_id).await.0, 404, "not created");
    assert_eq!(rig.writes(), Vec::<String>::new(), "no write to Synapse");
    assert!(
        rig.fake
            .get(&format!("/api/v1/namespaces/{NS}/secrets/member-credentials"))
            .is_none(),
        "no password generated"
    );
}

#[tokio::test]
async fn deleting_an_observed_matrix_user_leaves_the_account_whatever_its_deletion_policy() {
    let s = synapse();
    let localpart = s.unique_localpart("obs-delete");
    s.register_user(&localpart, "a-password", false).await;
    let user_id = s.user_id(&localpart);
    // Even with an ownership recorded (it was managed before).
    let spec = json!({"managementPolicy": "Observe", "deletionPolicy": "Deactivate"});
    let rig = Rig::new(&localpart, spec, json!({"userId": user_id}), json!({})).await;
    let u = rig.reconcile().await;
    assert_eq!(ready(&u).1, "InSync", "{:?}", ready(&u));

    let mut deleting = serde_json::to_value(rig.stored()).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-03-01T00:00:00Z");
    rig.fake.put(deleting);
    rig.reconcile_deleted().await;
    assert!(
        rig.fake.get(&path_of(&rig.obj)).is_none(),
        "finalizer removed, object gone"
    );
    assert_eq!(account(&user_id).await.1["deactivated"], false);
    assert_eq!(rig.writes(), Vec::<String>::new(), "no write to Synapse");
    assert!(rig.fake.event_reasons().contains(&"Retained".to_string()));
}

impl Rig {
    async fn reconcile_deleted(&self) {
        let user = self.stored();
        let ctx = Arc::new(Context::new(
            self.client.clone(),
            Config::default(),
            Writer::<MatrixUser>::default().as_reader(),
            Metrics::new(),
        ));
        let _ = reconcile_user(Arc::new(user), ctx).await;
    }
}
