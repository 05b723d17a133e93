//! Fair shares of the MatrixUser controller's reconcile slots across
//! Homeservers.
//!
//! kube-runtime runs at most `--concurrency` reconciles at once, from one
//! queue: without shares, the MatrixUsers of one slow Homeserver (calls
//! answered after tens of seconds) could hold every slot and stall every
//! other tenant's changes. Here a Homeserver may have at most its share of
//! the slots in flight:
//!
//! - `concurrency / n`, `n` being the Homeservers with reconciles in flight
//!   (the asking one included), at least one;
//! - and the last free slot only if it has nothing in flight: so a change
//!   to another Homeserver's MatrixUser starts at once even while one or
//!   two Homeservers fill their shares (unless `concurrency` Homeservers
//!   have work).
//!
//! A reconcile over its Homeserver's share does not wait inside its slot:
//! it is put back in the queue for a moment (see [`Slots::take`]) and lets
//! the slot go to another Homeserver's MatrixUser.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;

use crate::api::MatrixUser;

/// The first wait of a reconcile put back for its Homeserver's share; it
/// doubles with each reconcile of that Homeserver put back since the last
/// one that ran, up to [`DEFER_MAX`].
pub const DEFER_FIRST: Duration = Duration::from_secs(1);
/// The longest wait: a slow Homeserver's backlog is looked at about this
/// often, at little cost, however long it is.
pub const DEFER_MAX: Duration = Duration::from_secs(30);

/// A Homeserver, within the pool of slots its MatrixUsers are reconciled
/// in (one controller's: per watched namespace with `--namespace`, else
/// one for all).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HomeserverKey {
    pub pool: String,
    pub namespace: String,
    pub name: String,
}

impl HomeserverKey {
    /// The Homeserver of `user`; `scoped`: each watched namespace has a
    /// controller (and pool) of its own.
    pub fn of(user: &MatrixUser, scoped: bool) -> Self {
        let namespace = user.namespace().unwrap_or_default();
        Self {
            pool: if scoped { namespace.clone() } else { String::new() },
            namespace,
            name: user.spec.homeserver_ref.name.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Use {
    in_flight: usize,
    /// Reconciles put back since the last one that was let in.
    deferred: u32,
}

/// The reconcile slots of each pool, by Homeserver.
pub struct Slots {
    capacity: usize,
    uses: Arc<Mutex<HashMap<HomeserverKey, Use>>>,
}

/// One reconcile slot of a Homeserver's share, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    key: HomeserverKey,
    uses: Arc<Mutex<HashMap<HomeserverKey, Use>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = uses.get_mut(&self.key) {
            u.in_flight = u.in_flight.saturating_sub(1);
            if u.in_flight == 0 {
                uses.remove(&self.key);
            }
        }
    }
}

impl Slots {
    /// Shares of `capacity` slots per pool (the controller's concurrency).
    pub fn new(capacity: u16) -> Self {
        Self {
            capacity: usize::from(capacity.max(1)),
            uses: Arc::default(),
        }
    }

    /// The most reconciles one Homeserver may have in flight while `busy`
    /// Homeservers of its pool (itself included) have some.
    pub fn share(&self, busy: usize) -> usize {
        (self.capacity / busy.max(1)).max(1)
    }

    /// A slot for a reconcile of `homeserver`'s MatrixUser, or, when the
    /// Homeserver has its share in flight, how long to wait before asking
    /// again (the caller requeues the MatrixUser and gives its own slot
    /// back to the runtime).
    pub fn take(&self, homeserver: HomeserverKey) -> Result<Slot, Duration> {
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        let pool = uses.iter().filter(|(k, _)| k.pool == homeserver.pool);
        let others = pool
            .clone()
            .filter(|(k, u)| **k != homeserver && u.in_flight > 0)
            .count();
        let in_flight: usize = pool.map(|(_, u)| u.in_flight).sum();
        let share = self.share(others + 1);
        let u = uses.entry(homeserver.clone()).or_default();
        let last_slot = in_flight + 1 >= self.capacity;
        if u.in_flight < share && !(last_slot && u.in_flight > 0) {
            u.in_flight += 1;
            u.deferred = 0;
            return Ok(Slot {
                key: homeserver,
                uses: self.uses.clone(),
            });
        }
        let wait = DEFER_FIRST.saturating_mul(1u32 << u.deferred.min(5)).min(DEFER_MAX);
        u.deferred = u.deferred.saturating_add(1);
        Err(wait)
    }

    /// Reconciles in flight for `homeserver`.
    #[cfg(test)]
    fn in_flight(&self, homeserver: &HomeserverKey) -> usize {
        let uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        uses.get(homeserver).map_or(0, |u| u.in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(pool: &str, name: &str) -> HomeserverKey {
        HomeserverKey {
            pool: pool.into(),
            namespace: "chat".into(),
            name: name.into(),
        }
    }

    /// Takes slots for `key` until one is refused: the slots and the wait.
    fn fill(slots: &Slots, key: &HomeserverKey) -> (Vec<Slot>, Duration) {
        let mut held = Vec::new();
        loop {
            match slots.take(key.clone()) {
                Ok(slot) => held.push(slot),
                Err(wait) => return (held, wait),
            }
            assert!(held.len() <= 1000, "never refused");
        }
    }

    #[test]
    fn shares() {
        let slots = Slots::new(8);
        assert_eq!(slots.share(1), 8);
        assert_eq!(slots.share(2), 4);
        assert_eq!(slots.share(3), 2);
        assert_eq!(slots.share(9), 1, "at least one");
        assert_eq!(Slots::new(1).share(1), 1);
        assert_eq!(Slots::new(0).share(1), 1);
        // One slot: nothing to share, nothing to keep.
        let one = Slots::new(1);
        let (held, _) = fill(&one, &hs("", "a"));
        assert_eq!(held.len(), 1);
    }

    #[test]
    fn a_busy_homeserver_leaves_a_slot_and_shrinks_to_its_share_as_others_come() {
        let slots = Slots::new(4);
        let (slow, fast) = (hs("", "slow"), hs("", "fast"));
        let (mut slow_held, _) = fill(&slots, &slow);
        assert_eq!(slow_held.len(), 3, "alone: every slot but the last");
        // Another Homeserver's reconcile starts at once, in the last slot.
        let fast_slot = slots.take(fast.clone()).expect("the slot kept free");
        // Two Homeservers busy: the slow one gets no more until it is under
        // half.
        assert!(slots.take(slow.clone()).is_err());
        slow_held.pop();
        assert!(slots.take(slow.clone()).is_err(), "2 of 4 in flight: its share");
        assert!(
            slots.take(fast.clone()).is_err(),
            "under its share, but the last free slot waits for a Homeserver with none"
        );
        slow_held.pop();
        let second_fast = slots.take(fast.clone()).expect("its half");
        assert!(slots.take(fast.clone()).is_err());
        assert!(slots.take(slow.clone()).is_err(), "the last free slot");
        drop((fast_slot, second_fast));
        assert_eq!(slots.in_flight(&fast), 0);
        // Alone again: back to every slot but the last.
        let (more, _) = fill(&slots, &slow);
        assert_eq!(slow_held.len() + more.len(), 3);
    }

    #[test]
    fn two_busy_homeservers_leave_a_slot_to_a_third() {
        let slots = Slots::new(8);
        let (a, b, c) = (hs("", "a"), hs("", "b"), hs("", "c"));
        let _a: Vec<Slot> = (0..4).map(|_| slots.take(a.clone()).unwrap()).collect();
        let (b_held, _) = fill(&slots, &b);
        assert_eq!(b_held.len(), 3, "its share is 4, but not the last slot");
        let _c = slots.take(c.clone()).expect("the last slot, at once");
        assert_eq!(slots.share(3), 2);
        assert!(slots.take(a.clone()).is_err() && slots.take(b.clone()).is_err());
    }

    #[test]
    fn waits_grow_while_a_homeserver_is_refused_and_start_over_once_it_runs() {
        let slots = Slots::new(2);
        let key = hs("", "slow");
        let held = slots.take(key.clone()).unwrap();
        let waits: Vec<u64> = (0..8).map(|_| slots.take(key.clone()).unwrap_err().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
        drop(held);
        assert_eq!(slots.in_flight(&key), 0);
        let _held = slots.take(key.clone()).unwrap();
        assert_eq!(slots.take(key.clone()).unwrap_err(), DEFER_FIRST);
    }

    #[test]
    fn pools_are_shared_out_each_on_its_own() {
        let slots = Slots::new(4);
        let (_a, _) = fill(&slots, &hs("team-a", "hs"));
        // Another controller's pool: its Homeserver is alone there.
        let (b, _) = fill(&slots, &hs("team-b", "hs"));
        assert_eq!(b.len(), 3);
    }

    #[test]
    fn slots_come_back_when_dropped_and_nothing_is_kept_of_idle_homeservers() {
        let slots = Slots::new(8);
        let key = hs("", "hs");
        let (held, _) = fill(&slots, &key);
        assert_eq!(slots.in_flight(&key), 7);
        drop(held);
        assert_eq!(slots.in_flight(&key), 0);
        assert!(slots.uses.lock().unwrap().is_empty());
    }
}
