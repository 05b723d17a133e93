//! The resync of MatrixUsers: each is looked at again once per resync
//! interval, at its own phase of it (see [`super::requeue::phase_of`]), by one clock
//! for all of a scope's MatrixUsers instead of a timer per object in the
//! controller's scheduler. A scheduled requeue holds two copies of the
//! object's reference (≈0.5 KiB) for the whole interval: 5 MiB at 10,000
//! MatrixUsers, for what a phase computed from the uid gives as well.
//! As with a requeue, an object looked at (after a change, say) less than
//! half an interval before its phase comes is skipped then: its next look
//! comes 0.5 to 1.5 intervals after the last.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};

use super::requeue::{object_key, phase_of};

/// How often the clock looks for objects due: a 64th of the interval,
/// within [100 ms, 10 s] (at the default 10 minutes, every 9.4 s).
fn tick_of(interval: Duration) -> Duration {
    (interval / 64).clamp(Duration::from_millis(100), Duration::from_secs(10))
}

/// Whether an object at `phase` of `interval` (seconds) is due in the
/// window `(from, to]` (seconds since the Unix epoch): whether an instant
/// at that phase of the wall clock's intervals falls in it. Windows that
/// follow each other make an object due once per interval, however late
/// or irregular the ticks.
fn due(from: f64, to: f64, interval: f64, phase: f64) -> bool {
    let offset = phase.clamp(0.0, 1.0) * interval;
    ((to - offset) / interval).floor() > ((from - offset) / interval).floor()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// When each object was last looked at (seconds since the Unix epoch), by
/// a hash of its namespace and name: a few bytes per object.
#[derive(Clone, Default)]
pub struct LastLooks(Arc<Mutex<HashMap<u64, f64>>>);

impl LastLooks {
    fn key<K: Resource>(obj: &K) -> u64 {
        // Fixed keys: a collision only skips one resync of one object.
        let mut hasher = std::hash::DefaultHasher::new();
        (obj.meta().namespace.as_deref(), obj.meta().name.as_deref()).hash(&mut hasher);
        hasher.finish()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, f64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `obj` was looked at (and found in sync, or waiting for a change).
    pub fn looked_at<K: Resource>(&self, obj: &K) {
        self.lock().insert(Self::key(obj), now());
    }

    fn since<K: Resource>(&self, obj: &K, at: f64) -> bool {
        self.lock().get(&Self::key(obj)).is_some_and(|t| *t > at)
    }
}

/// Of `objects`, those due in the window `(from, to]` of the wall clock
/// for a resync every `interval` seconds, but not those `looks` says were
/// looked at less than half an interval before `to`.
fn due_among<K>(objects: &[Arc<K>], (from, to): (f64, f64), interval: f64, looks: &LastLooks) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    objects
        .iter()
        .filter(|obj| {
            let phase = phase_of(obj.meta().uid.as_deref(), &object_key(obj.as_ref()));
            due(from, to, interval, phase) && !looks.since(obj.as_ref(), to - interval / 2.0)
        })
        .map(|obj| ObjectRef::from_obj(obj.as_ref()))
        .collect()
}

/// The objects of `store` due for their resync, as their phases come:
/// every object once per `interval`, unless `looks` says it was looked at
/// less than half an interval before. What the stream hands on goes to the
/// controller's queue like a watch event (an object already queued is
/// looked at once).
pub fn due_in<K>(
    store: Store<K>,
    interval: Duration,
    looks: LastLooks,
) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let tick = tick_of(interval);
    let seconds = interval.as_secs_f64().max(0.001);
    let mut clock = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    futures::stream::unfold((clock, now(), 0u32), move |(mut clock, from, ticks)| {
        let (store, looks) = (store.clone(), looks.clone());
        async move {
            clock.tick().await;
            let to = now();
            let objects = store.state();
            let due = due_among(&objects, (from, to), seconds, &looks);
            // Once an interval, what is kept of objects that went goes.
            if ticks % 64 == 63 {
                let present: std::collections::HashSet<u64> =
                    objects.iter().map(|o| LastLooks::key(o.as_ref())).collect();
                looks.lock().retain(|k, _| present.contains(k));
            }
            Some((futures::stream::iter(due), (clock, to.max(from), ticks.wrapping_add(1))))
        }
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_one_after_another_make_each_phase_due_once_per_interval() {
        let interval = 600.0;
        let start = 1_800_000_123.25;
        // Ticks late and irregular, over exactly five intervals.
        let mut ticks = vec![start];
        let mut t = start;
        let mut step = 0;
        while t < start + 5.0 * interval {
            step += 1;
            t = (t + 9.4 + f64::from(step % 7) * 3.1).min(start + 5.0 * interval);
            ticks.push(t);
        }
        for phase in [0.0, 0.001, 0.25, 0.5, 0.7773, 0.999] {
            let times = ticks.windows(2).filter(|w| due(w[0], w[1], interval, phase)).count();
            assert_eq!(times, 5, "phase {phase}");
        }
        // An empty window, or a clock that went back, makes nothing due.
        assert!(!due(start, start, interval, 0.5));
        assert!(!due(start, start - 100.0, interval, 0.5));
    }

    #[test]
    fn objects_are_due_spread_over_the_interval() {
        let interval = 600.0;
        let start = 1_800_000_000.0;
        let tick = tick_of(Duration::from_secs(600)).as_secs_f64();
        let phases: Vec<f64> = (0..10_000)
            .map(|i| phase_of(None, &("MatrixUser".into(), "chat".into(), format!("u{i}"))))
            .collect();
        let per_tick: Vec<usize> = (0..(interval / tick).ceil() as usize)
            .map(|k| {
                let from = start + k as f64 * tick;
                phases.iter().filter(|p| due(from, from + tick, interval, **p)).count()
            })
            .collect();
        assert_eq!(per_tick.iter().sum::<usize>(), 10_000);
        // About 10,000 / 64 per tick, none more than twice that.
        assert!(*per_tick.iter().max().unwrap() < 2 * 10_000 / 64, "{per_tick:?}");
    }

    #[test]
    fn the_clock_ticks_within_its_bounds() {
        assert_eq!(tick_of(Duration::from_secs(600)), Duration::from_millis(9375));
        assert_eq!(tick_of(Duration::from_secs(2)), Duration::from_millis(100));
        assert_eq!(tick_of(Duration::from_secs(86_400)), Duration::from_secs(10));
    }

    #[tokio::test]
    async fn every_object_of_the_store_comes_due() {
        use crate::api::MatrixUser;
        use kube::runtime::watcher;
        let (store, mut writer) = kube::runtime::reflector::store::<MatrixUser>();
        let names: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
        for name in &names {
            let user: MatrixUser = serde_json::from_value(serde_json::json!({
                "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                "metadata": {"name": name, "namespace": "chat", "uid": format!("uid-{name}")},
                "spec": {"homeserverRef": {"name": "hs"}},
            }))
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(user));
        }
        let mut seen = std::collections::BTreeSet::new();
        let looks = LastLooks::default();
        let mut due = Box::pin(due_in(store, Duration::from_secs(1), looks));
        // A guard against hanging only: every phase of a one-second interval
        // comes within the next second.
        tokio::time::timeout(Duration::from_secs(30), async {
            while seen.len() < names.len() {
                let r = due.next().await.expect("an endless stream");
                seen.insert(r.name);
            }
        })
        .await
        .expect("every object due within its interval");
        assert_eq!(seen, names.iter().cloned().collect());
    }

    #[test]
    fn an_object_looked_at_less_than_half_an_interval_before_its_phase_is_skipped_then() {
        use crate::api::MatrixUser;
        let user = |name: &str| -> Arc<MatrixUser> {
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "matrix-operator.io/v1alpha1", "kind": "MatrixUser",
                    "metadata": {"name": name, "namespace": "chat", "uid": format!("uid-{name}")},
                    "spec": {"homeserverRef": {"name": "hs"}},
                }))
                .unwrap(),
            )
        };
        let objects = vec![user("never"), user("lately"), user("long-ago")];
        let looks = LastLooks::default();
        let interval = 600.0;
        let to = 1_800_000_600.0;
        looks
            .lock()
            .insert(LastLooks::key(objects[1].as_ref()), to - 0.4 * interval);
        looks
            .lock()
            .insert(LastLooks::key(objects[2].as_ref()), to - 0.6 * interval);
        // A window of a whole interval holds every phase.
        let due: Vec<String> = due_among(&objects, (to - interval, to), interval, &looks)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(due, ["never", "long-ago"]);
        // Looks at objects that went are forgotten at the next pruning, not
        // before: `since` still reads them.
        assert!(looks.since(objects[1].as_ref(), to - interval));
    }
}
