//! When a reconcile comes again: after a success, at the object's own
//! phase of the resync interval; after a failure, with exponential backoff
//! per object.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use kube::Resource;
use kube::runtime::controller::Action;

use super::{Context, Error};

/// The shortest and the longest wait before a failed reconcile is retried.
const MIN_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// An object's fixed place in the resync interval, a fraction in [0, 1):
/// from its uid (random, so uniform), else from its kind, namespace and
/// name.
pub(super) fn phase_of(uid: Option<&str>, key: &(String, String, String)) -> f64 {
    let text = match uid {
        Some(uid) => uid.to_string(),
        None => format!("{}/{}/{}", key.0, key.1, key.2),
    };
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest.as_ref()[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// The wait from `now` (time since the Unix epoch) to the next resync of an
/// object at `phase` of `interval`: the first instant at that phase of the
/// wall clock's intervals that is at least half an interval away. In steady
/// state an object is looked at once per interval, always at the same phase;
/// after a change (or its creation) the next look comes 0.5 to 1.5 intervals
/// later. Objects created or changed together, even all in one second, so
/// resync spread over a whole interval, as their phases are.
pub(super) fn next_resync(now: Duration, interval: Duration, phase: f64) -> Duration {
    let interval = interval.as_secs_f64().max(0.001);
    let now = now.as_secs_f64();
    let offset = phase.clamp(0.0, 1.0) * interval;
    // The first instant at `offset` in an interval at or after now + interval/2.
    let earliest = now + interval / 2.0;
    let mut at = (earliest / interval).floor() * interval + offset;
    if at < earliest {
        at += interval;
    }
    Duration::from_secs_f64(at - now)
}

/// An object by kind, namespace and name.
type ObjectKey = (String, String, String);

/// Failed attempts in a row, per object, for exponential backoff.
#[derive(Default)]
pub(super) struct Backoff(Mutex<HashMap<ObjectKey, u32>>);

impl Backoff {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, u32>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a failure of `object` and says how long to wait: the wait
    /// the server asked for (at least [`MIN_RETRY`]), else [`MIN_RETRY`]
    /// doubling per failure in a row, up to [`MAX_RETRY`].
    pub(super) fn failed(&self, object: ObjectKey, asked: Option<Duration>) -> Duration {
        let mut failures = self.lock();
        let n = failures.entry(object).or_insert(0);
        *n = n.saturating_add(1);
        if let Some(wait) = asked {
            return wait.max(MIN_RETRY);
        }
        (MIN_RETRY * (1u32 << (*n - 1).min(9))).min(MAX_RETRY)
    }

    pub(super) fn reset(&self, object: &ObjectKey) {
        self.lock().remove(object);
    }

    /// Keeps the counts of the objects (kind, namespace, name) `keep` selects.
    pub(super) fn retain(&self, mut keep: impl FnMut(&str, &str, &str) -> bool) {
        self.lock().retain(|(kind, ns, name), _| keep(kind, ns, name));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Context {
    /// The requeue after a success of `obj`: at the object's own phase of
    /// the resync interval, at least half an interval from now (see
    /// [`next_resync`]), so objects created together still resync spread
    /// over the whole interval.
    pub(super) fn resync<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Action {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let phase = phase_of(obj.meta().uid.as_deref(), &object_key(obj));
        Action::requeue(next_resync(now, self.config.resync_interval, phase))
    }

    pub(super) fn reset_backoff<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        self.failures.reset(&object_key(obj));
    }

    /// The wait before retrying a failed reconcile: Synapse's retry_after
    /// when it sent one (at least 1 s), else 1 s doubling per failure in a
    /// row, up to 5 min.
    pub fn backoff<K: Resource<DynamicType = ()>>(&self, obj: &K, error: &Error) -> Duration {
        self.failures.failed(object_key(obj), error.retry_after())
    }
}

pub(super) fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectKey {
    (
        K::kind(&()).into_owned(),
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resyncs_keep_each_object_at_its_phase_and_spread_objects_made_together() {
        let interval = Duration::from_secs(600);
        let now = Duration::from_secs(1_800_000_123);
        for phase in [0.0, 0.1, 0.5, 0.77, 0.999] {
            let wait = next_resync(now, interval, phase);
            assert!(wait >= interval / 2 && wait < interval * 3 / 2, "{phase}: {wait:?}");
            // Once at its phase, an object is looked at once per interval.
            let again = next_resync(now + wait, interval, phase);
            assert!((again.as_secs_f64() - 600.0).abs() < 1e-3, "{phase}: {again:?}");
        }
        // 10,000 objects made in one second resync over the whole interval,
        // none of its seconds holding more than a few times the mean.
        let mut per_second = vec![0u32; 1200];
        for i in 0..10_000 {
            let key = ("MatrixUser".to_string(), "chat".to_string(), format!("u{i}"));
            let wait = next_resync(now, interval, phase_of(None, &key));
            per_second[wait.as_secs() as usize] += 1;
        }
        let busy: Vec<usize> = (0..per_second.len()).filter(|s| per_second[*s] > 0).collect();
        assert!(busy.len() > 550, "{} busy seconds", busy.len());
        assert!(*per_second.iter().max().unwrap() < 60);
        assert_eq!(
            phase_of(Some("a-uid"), &Default::default()),
            phase_of(Some("a-uid"), &Default::default())
        );
    }

    #[test]
    fn failures_in_a_row_double_the_wait_up_to_its_cap_and_a_success_resets_it() {
        let backoff = Backoff::default();
        let key = || ("MatrixUser".to_string(), "chat".to_string(), "alice".to_string());
        let waits: Vec<u64> = (0..11).map(|_| backoff.failed(key(), None).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff.failed(key(), Some(Duration::from_millis(10))), MIN_RETRY);
        assert_eq!(
            backoff.failed(key(), Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
        backoff.reset(&key());
        assert_eq!(backoff.failed(key(), None), MIN_RETRY);
        assert_eq!(backoff.len(), 1);
        backoff.retain(|kind, _, _| kind != "MatrixUser");
        assert_eq!(backoff.len(), 0);
    }
}
