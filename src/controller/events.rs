//! Kubernetes Events about the operator's objects (`events.k8s.io/v1`).
//!
//! kube-runtime's `Recorder` keeps every Event it published for six minutes,
//! whole, to count repeats into a series, and scans all of them at every
//! publish: converging 10,000 new MatrixUsers kept 10,000 Events in memory
//! and made each publish cost O(N). Here a repeat is recognised by a small
//! key, at most [`MAX_SERIES`] of them are remembered, and the scan runs only
//! when that bound is reached.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event as K8sEvent, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams, PostParams};
pub use kube::runtime::events::EventType;
use kube::{Api, Client};

fn type_name(type_: EventType) -> &'static str {
    match type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    }
}

/// How long a repeat still counts into the series of the first Event (the
/// span kube-runtime and client-go use).
const SERIES_SPAN: SignedDuration = SignedDuration::from_mins(6);

/// The most Event series remembered at once: at the bound, the expired ones
/// go, then the oldest half. A repeat of a forgotten one starts a new Event.
const MAX_SERIES: usize = 1024;

/// What makes two Events the same one repeated.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    type_: EventType,
    reason: String,
    note: String,
    namespace: Option<String>,
    uid: Option<String>,
    name: Option<String>,
}

/// An Event published, as far as a repeat needs it.
#[derive(Clone, Debug)]
struct Series {
    name: String,
    count: i32,
    last: Timestamp,
}

/// Publishes Events as one reporting controller.
pub struct Publisher {
    client: Client,
    controller: String,
    series: Mutex<HashMap<SeriesKey, Series>>,
}

impl Publisher {
    pub fn new(client: Client, controller: &str) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            series: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes an Event about `regarding`: a new Event, or, for a repeat
    /// within [`SERIES_SPAN`] of the last, the series count of the first
    /// one. Cluster-scoped objects' Events go to the `default` namespace.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = SeriesKey {
            type_,
            reason: reason.to_string(),
            note: note.clone(),
            namespace: regarding.namespace.clone(),
            uid: regarding.uid.clone(),
            name: regarding.name.clone(),
        };
        let repeat = self.lock().get(&key).filter(|s| s.last + SERIES_SPAN > now).cloned();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let series = match repeat {
            Some(mut series) => {
                series.count = series.count.saturating_add(1);
                series.last = now;
                let patch = K8sEvent {
                    series: Some(EventSeries {
                        count: series.count,
                        last_observed_time: MicroTime(now),
                    }),
                    ..Default::default()
                };
                events
                    .patch(&series.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
                series
            }
            None => {
                let name = format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                );
                let event = K8sEvent {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(namespace.clone()),
                        ..Default::default()
                    },
                    action: Some(reason.to_string()),
                    reason: Some(reason.to_string()),
                    note: Some(note),
                    event_time: Some(MicroTime(now)),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.controller.clone()),
                    type_: Some(type_name(type_).to_string()),
                    ..Default::default()
                };
                events.create(&PostParams::default(), &event).await?;
                Series {
                    name,
                    count: 1,
                    last: now,
                }
            }
        };
        self.remember(key, series, now);
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SeriesKey, Series>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, key: SeriesKey, series: Series, now: Timestamp) {
        let mut all = self.lock();
        if all.len() >= MAX_SERIES && !all.contains_key(&key) {
            all.retain(|_, s| s.last + SERIES_SPAN > now);
            if all.len() >= MAX_SERIES {
                let mut times: Vec<Timestamp> = all.values().map(|s| s.last).collect();
                times.sort_unstable();
                let median = times[times.len() / 2];
                all.retain(|_, s| s.last > median);
            }
        }
        all.insert(key, series);
    }

    /// How many Event series are remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publisher() -> Publisher {
        // Never connected: these tests exercise the memory alone.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        Publisher::new(Client::try_from(config).unwrap(), "test")
    }

    fn key(i: usize) -> SeriesKey {
        SeriesKey {
            type_: EventType::Normal,
            reason: "Created".into(),
            note: format!("created @u{i}:example.org"),
            namespace: Some("ns".into()),
            uid: Some(format!("uid-{i}")),
            name: Some(format!("u{i}")),
        }
    }

    fn series(i: usize, last: Timestamp) -> Series {
        Series {
            name: format!("u{i}.1"),
            count: 1,
            last,
        }
    }

    #[tokio::test]
    async fn the_series_remembered_stay_bounded_however_many_objects_have_events() {
        let p = publisher();
        let now = Timestamp::now();
        for i in 0..10 * MAX_SERIES {
            // Each a little later than the one before, all within the span.
            let at = now + SignedDuration::from_millis(i as i64);
            p.remember(key(i), series(i, at), at);
        }
        assert!(p.remembered() <= MAX_SERIES, "{} remembered", p.remembered());
        // The newest is still there to count a repeat.
        assert!(p.lock().contains_key(&key(10 * MAX_SERIES - 1)));
    }

    #[tokio::test]
    async fn expired_series_go_first_when_the_bound_is_reached() {
        let p = publisher();
        let long_ago = Timestamp::now() - SignedDuration::from_hours(1);
        for i in 0..MAX_SERIES - 1 {
            p.remember(key(i), series(i, long_ago), long_ago);
        }
        let now = Timestamp::now();
        p.remember(key(MAX_SERIES - 1), series(MAX_SERIES - 1, now), now);
        p.remember(key(MAX_SERIES), series(MAX_SERIES, now), now);
        assert_eq!(p.remembered(), 2, "only the two recent series are left");
    }
}
