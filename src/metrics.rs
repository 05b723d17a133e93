//! Prometheus metrics. Every label takes values from a closed set (kinds,
//! results, endpoints, status classes, condition reasons), so the series
//! stay bounded however many users there are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabel {
    endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// One Homeserver's accounts in one state: as many series as Homeservers
/// (a handful) times three.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabels {
    namespace: String,
    homeserver: String,
    state: &'static str,
}

/// The operator's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    reconciliations: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<KindLabel, Histogram>,
    admin_requests: Family<RequestLabels, Counter>,
    admin_request_duration: Family<EndpointLabel, Histogram>,
    users_by_reason: Family<ReasonLabel, Gauge>,
    homeserver_accounts: Family<AccountLabels, Gauge>,
    /// The Ready reason of each MatrixUser, to count them by reason.
    user_reasons: Arc<Mutex<HashMap<(String, String), &'static str>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("matrix_user_operator");
        let reconciliations = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciliations",
            "Reconciliations by resource kind and result",
            reconciliations.clone(),
        );
        let reconcile_duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            reconcile_duration.clone(),
        );
        let admin_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "admin_requests",
            "Synapse admin API requests by endpoint and HTTP status class",
            admin_requests.clone(),
        );
        let admin_request_duration = Family::<EndpointLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 15))
        });
        registry.register(
            "admin_request_duration_seconds",
            "Latency of Synapse admin API requests",
            admin_request_duration.clone(),
        );
        let users_by_reason = Family::<ReasonLabel, Gauge>::default();
        registry.register(
            "matrixusers",
            "MatrixUsers by the reason of their Ready condition",
            users_by_reason.clone(),
        );
        let homeserver_accounts = Family::<AccountLabels, Gauge>::default();
        registry.register(
            "homeserver_accounts",
            "Accounts on each Homeserver's server by state: managed (a MatrixUser records it), unmanaged, deactivated",
            homeserver_accounts.clone(),
        );
        Self {
            registry: Arc::new(registry),
            homeserver_accounts,
            reconciliations,
            reconcile_duration,
            admin_requests,
            admin_request_duration,
            users_by_reason,
            user_reasons: Arc::default(),
        }
    }

    /// One reconcile of `kind` ended with `result` (`success`, `error`).
    pub fn reconciled(&self, kind: &'static str, result: &'static str, took: Duration) {
        self.reconciliations
            .get_or_create(&ReconcileLabels { kind, result })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
    }

    /// One admin API request; `status` is `None` when no response came.
    pub fn admin_request(&self, endpoint: &'static str, status: Option<u16>, took: Duration) {
        let status_class = match status {
            Some(200..=299) => "2xx",
            Some(400..=499) => "4xx",
            Some(500..=599) => "5xx",
            Some(_) => "other",
            None => "transport_error",
        };
        self.admin_requests
            .get_or_create(&RequestLabels { endpoint, status_class })
            .inc();
        self.admin_request_duration
            .get_or_create(&EndpointLabel { endpoint })
            .observe(took.as_secs_f64());
    }

    /// Records the Ready reason of a MatrixUser; `None` when it is gone.
    pub fn user_reason(&self, namespace: &str, name: &str, reason: Option<&'static str>) {
        let mut reasons = self.user_reasons.lock().unwrap_or_else(|p| p.into_inner());
        let key = (namespace.to_string(), name.to_string());
        let old = match reason {
            Some(r) => reasons.insert(key, r),
            None => reasons.remove(&key),
        };
        if old == reason {
            return;
        }
        if let Some(old) = old {
            self.users_by_reason.get_or_create(&ReasonLabel { reason: old }).dec();
        }
        if let Some(new) = reason {
            self.users_by_reason.get_or_create(&ReasonLabel { reason: new }).inc();
        }
    }

    /// Forgets the MatrixUsers for which `keep` is false (they are gone).
    pub fn retain_users(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        let mut reasons = self.user_reasons.lock().unwrap_or_else(|p| p.into_inner());
        reasons.retain(|(ns, name), reason| {
            let kept = keep(ns, name);
            if !kept {
                self.users_by_reason.get_or_create(&ReasonLabel { reason }).dec();
            }
            kept
        });
    }

    /// How many MatrixUsers the per-user entries cover.
    pub fn tracked_users(&self) -> usize {
        self.user_reasons.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The accounts a Homeserver's last count found; `None` when it is gone.
    pub fn homeserver_accounts(&self, namespace: &str, homeserver: &str, counts: Option<[u64; 3]>) {
        for (i, state) in ["managed", "unmanaged", "deactivated"].into_iter().enumerate() {
            let labels = AccountLabels {
                namespace: namespace.to_string(),
                homeserver: homeserver.to_string(),
                state,
            };
            match counts {
                Some(c) => {
                    self.homeserver_accounts
                        .get_or_create(&labels)
                        .set(i64::try_from(c[i]).unwrap_or(i64::MAX));
                }
                None => {
                    self.homeserver_accounts.remove(&labels);
                }
            }
        }
    }

    /// The metrics in Prometheus's text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synapse::Endpoint;

    #[test]
    fn families_and_bounded_labels() {
        let m = Metrics::new();
        m.reconciled("MatrixUser", "success", Duration::from_millis(12));
        m.admin_request(Endpoint::GetUser.as_str(), Some(404), Duration::from_millis(3));
        m.admin_request(Endpoint::PutUser.as_str(), None, Duration::from_millis(3));
        m.user_reason("ns", "a", Some("InSync"));
        m.user_reason("ns", "b", Some("InSync"));
        m.user_reason("ns", "b", Some("Conflict"));
        m.user_reason("ns", "a", None);
        m.user_reason("ns", "gone", Some("Conflict"));
        m.retain_users(|_, name| name != "gone");
        m.homeserver_accounts("chat", "hs", Some([3, 2, 1]));
        m.homeserver_accounts("chat", "old", Some([1, 1, 1]));
        m.homeserver_accounts("chat", "old", None);
        assert!(!m.encode().contains(r#"homeserver="old""#));
        assert_eq!(m.tracked_users(), 1);
        let text = m.encode();
        for line in [
            r#"matrix_user_operator_reconciliations_total{kind="MatrixUser",result="success"} 1"#,
            r#"matrix_user_operator_admin_requests_total{endpoint="get_user",status_class="4xx"} 1"#,
            r#"matrix_user_operator_admin_requests_total{endpoint="put_user",status_class="transport_error"} 1"#,
            r#"matrix_user_operator_matrixusers{reason="InSync"} 0"#,
            r#"matrix_user_operator_matrixusers{reason="Conflict"} 1"#,
            r#"matrix_user_operator_homeserver_accounts{namespace="chat",homeserver="hs",state="unmanaged"} 2"#,
            r#"matrix_user_operator_reconcile_duration_seconds_count{kind="MatrixUser"} 1"#,
            r#"matrix_user_operator_admin_request_duration_seconds_count{endpoint="get_user"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }
}
