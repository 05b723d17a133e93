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
//! it is put back in the queue (see [`Slots::take`]) and lets the slot go
//! to another Homeserver's MatrixUser. The MatrixUsers put back are paced
//! by their Homeserver's own speed: one turn every (its mean reconcile
//! time / its share), so a fast homeserver's backlog of 10,000 comes back
//! about as fast as its slots free up, and a slow one's is looked at about
//! every [`DEFER_MAX`]. (Waits that doubled per refusal, as before, put a
//! lone homeserver's backlog of 1,000 to sleep for 30 s at a time while its
//! slots stood idle: converging took minutes where a script took seconds.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::ResourceExt;

use crate::api::MatrixUser;

/// The shortest wait of a reconcile put back for its Homeserver's share.
pub const DEFER_MIN: Duration = Duration::from_millis(10);
/// The longest wait: a slow Homeserver's backlog is looked at about this
/// often, at little cost, however long it is.
pub const DEFER_MAX: Duration = Duration::from_secs(30);
/// A Homeserver's mean reconcile time until one was measured.
const FIRST_GUESS: Duration = Duration::from_millis(100);

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

#[derive(Debug)]
struct Use {
    in_flight: usize,
    /// When the last reconcile put back is due: the next one put back
    /// comes one turn later.
    last_turn: Instant,
}

/// The shortest turn: 1,000 put back come back within a second at most.
const SHORTEST_TURN: Duration = Duration::from_millis(1);

/// The most Homeservers whose mean reconcile time is kept (a few bytes
/// each); past it they start over from [`FIRST_GUESS`].
const MAX_MEANS: usize = 4096;

#[derive(Debug, Default)]
struct Uses {
    /// Homeservers with reconciles in flight.
    busy: HashMap<HomeserverKey, Use>,
    /// The mean time each Homeserver's reconciles hold a slot (a moving
    /// average), kept while it is idle too.
    means: HashMap<HomeserverKey, Duration>,
}

/// The reconcile slots of each pool, by Homeserver.
pub struct Slots {
    capacity: usize,
    uses: Arc<Mutex<Uses>>,
}

/// One reconcile slot of a Homeserver's share, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    key: HomeserverKey,
    uses: Arc<Mutex<Uses>>,
    taken: Instant,
}

impl Slot {
    /// Gives the slot back, the reconcile having ended at `now`.
    fn release_at(&self, now: Instant) {
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        let took = now.saturating_duration_since(self.taken);
        if uses.means.len() >= MAX_MEANS && !uses.means.contains_key(&self.key) {
            uses.means.clear();
        }
        let mean = uses.means.entry(self.key.clone()).or_insert(FIRST_GUESS);
        // A moving average over about the last eight reconciles.
        *mean = (*mean * 7 + took) / 8;
        if let Some(u) = uses.busy.get_mut(&self.key) {
            u.in_flight = u.in_flight.saturating_sub(1);
            if u.in_flight == 0 {
                uses.busy.remove(&self.key);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release_at(Instant::now());
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
        self.take_at(homeserver, Instant::now())
    }

    fn take_at(&self, homeserver: HomeserverKey, now: Instant) -> Result<Slot, Duration> {
        let mut guard = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        let Uses { busy: uses, means } = &mut *guard;
        let pool = uses.iter().filter(|(k, _)| k.pool == homeserver.pool);
        let others = pool
            .clone()
            .filter(|(k, u)| **k != homeserver && u.in_flight > 0)
            .count();
        let in_flight: usize = pool.map(|(_, u)| u.in_flight).sum();
        let share = self.share(others + 1);
        let u = uses.entry(homeserver.clone()).or_insert(Use {
            in_flight: 0,
            last_turn: now,
        });
        let last_slot = in_flight + 1 >= self.capacity;
        if u.in_flight < share && !(last_slot && u.in_flight > 0) {
            u.in_flight += 1;
            return Ok(Slot {
                key: homeserver,
                uses: self.uses.clone(),
                taken: now,
            });
        }
        // One turn after the last one put back (or now), a turn being the
        // time its share of slots takes to free one: so those put back come
        // back about as its slots free up, not all at once.
        let mean = means.get(&homeserver).copied().unwrap_or(FIRST_GUESS);
        let turn = mean / u32::try_from(u.in_flight.max(1)).unwrap_or(u32::MAX);
        let due = u.last_turn.max(now) + turn.max(SHORTEST_TURN);
        // Beyond the longest wait they come back together, and go back
        // again if the Homeserver is still full.
        u.last_turn = due.min(now + DEFER_MAX);
        Err(u.last_turn.saturating_duration_since(now).clamp(DEFER_MIN, DEFER_MAX))
    }

    /// Reconciles in flight for `homeserver`.
    #[cfg(test)]
    fn in_flight(&self, homeserver: &HomeserverKey) -> usize {
        let uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        uses.busy.get(homeserver).map_or(0, |u| u.in_flight)
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

    /// Runs `n` reconciles of `key` that each take `took`, one after the other.
    fn run(slots: &Slots, key: &HomeserverKey, n: usize, took: Duration, mut now: Instant) -> Instant {
        for _ in 0..n {
            let slot = slots.take_at(key.clone(), now).unwrap();
            now += took;
            slot.release_at(now);
            std::mem::forget(slot);
        }
        now
    }

    #[test]
    fn a_fast_homeservers_backlog_comes_back_as_its_slots_free_up_not_after_seconds() {
        let slots = Slots::new(8);
        let key = hs("", "fast");
        // Reconciles of 10 ms.
        let now = run(&slots, &key, 50, Duration::from_millis(10), Instant::now());
        let held: Vec<Slot> = (0..7).map(|_| slots.take_at(key.clone(), now).unwrap()).collect();
        // A backlog of 1,000: each comes back one turn after the one before
        // (10 ms / 7 in flight, at least DEFER_MIN), the last well within
        // the time the 7 slots take to work through them all.
        let waits: Vec<Duration> = (0..1000)
            .map(|_| slots.take_at(key.clone(), now).unwrap_err())
            .collect();
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "spread out, in order");
        assert!(
            waits[0] <= Duration::from_millis(20),
            "the first at once: {:?}",
            waits[0]
        );
        let last = waits[999];
        assert!(
            last >= Duration::from_millis(1000) && last <= Duration::from_millis(2000),
            "1,000 turns of 10 ms / 7: {last:?}"
        );
        drop(held);
    }

    #[test]
    fn a_slow_homeservers_backlog_is_looked_at_every_longest_wait_at_most() {
        let slots = Slots::new(2);
        let key = hs("", "slow");
        let now = run(&slots, &key, 50, Duration::from_secs(60), Instant::now());
        let _held = slots.take_at(key.clone(), now).unwrap();
        let waits: Vec<Duration> = (0..5).map(|_| slots.take_at(key.clone(), now).unwrap_err()).collect();
        assert_eq!(waits, [DEFER_MAX; 5], "a turn is a minute: capped");
        // Later, the backlog is not pushed ever further away.
        let later = now + DEFER_MAX;
        assert_eq!(slots.take_at(key.clone(), later).unwrap_err(), DEFER_MAX);
    }

    #[test]
    fn a_homeserver_unknown_so_far_is_paced_by_a_first_guess() {
        let slots = Slots::new(2);
        let key = hs("", "new");
        let now = Instant::now();
        let _held = slots.take_at(key.clone(), now).unwrap();
        // One in flight: a turn is the whole guessed time.
        assert_eq!(slots.take_at(key.clone(), now).unwrap_err(), FIRST_GUESS);
        assert_eq!(slots.take_at(key.clone(), now).unwrap_err(), FIRST_GUESS * 2);
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
        assert!(slots.uses.lock().unwrap().busy.is_empty());
    }
}
