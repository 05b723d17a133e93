//! The conditions both kinds carry, merged by type: `Ready`, and the two
//! that kstatus (Flux, kpt, cli-utils) reads, `Reconciling` and `Stalled`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The resource matches its spec.
pub const READY: &str = "Ready";
/// Work is in flight, or a transient error is being retried.
pub const RECONCILING: &str = "Reconciling";
/// An error that waits for a change of the spec, a Secret or the Homeserver.
pub const STALLED: &str = "Stalled";

/// Where a resource stands after a pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// In line with the spec: `Ready`.
    Ready,
    /// Not yet, and the operator keeps at it: `Reconciling`.
    Reconciling,
    /// Not, until something changes: `Stalled`.
    Stalled,
}

/// The outcome of a pass, recorded as the three conditions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub standing: Standing,
    /// CamelCase reason, from a closed set per kind (documented in the README).
    pub reason: &'static str,
    /// A human message; never holds a secret value.
    pub message: String,
}

impl Ready {
    pub fn ok(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Standing::Ready, reason, message)
    }
    pub fn reconciling(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Standing::Reconciling, reason, message)
    }
    pub fn stalled(reason: &'static str, message: impl Into<String>) -> Self {
        Self::new(Standing::Stalled, reason, message)
    }
    fn new(standing: Standing, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            standing,
            reason,
            message: message.into(),
        }
    }
    pub fn is_ready(&self) -> bool {
        self.standing == Standing::Ready
    }
}

/// The `Ready` condition in `conditions`, if any.
pub fn ready_condition(conditions: &[Condition]) -> Option<&Condition> {
    condition(conditions, READY)
}

/// The condition of type `type_` in `conditions`, if any.
pub fn condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether `conditions` hold a condition of type `type_` that is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Merges `ready` into `conditions` as `Ready`, `Reconciling` and `Stalled`,
/// all three with its reason and message; other condition types are kept.
///
/// `lastTransitionTime` of each moves only when its status flips, so
/// recording the same outcome twice leaves the conditions equal and no
/// status write is needed.
pub fn set_condition(conditions: &mut Vec<Condition>, ready: &Ready, generation: Option<i64>, now: Time) {
    for (type_, holds) in [
        (READY, ready.standing == Standing::Ready),
        (RECONCILING, ready.standing == Standing::Reconciling),
        (STALLED, ready.standing == Standing::Stalled),
    ] {
        let status = if holds { "True" } else { "False" };
        let new = |last_transition_time| Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: ready.reason.to_string(),
            message: ready.message.clone(),
            observed_generation: generation,
            last_transition_time,
        };
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(existing) => {
                let since = if existing.status == status {
                    existing.last_transition_time.clone()
                } else {
                    now.clone()
                };
                *existing = new(since);
            }
            None => conditions.push(new(now.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn of<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        condition(conditions, type_).unwrap()
    }

    #[test]
    fn same_outcome_keeps_the_conditions_equal() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, &Ready::ok("InSync", "in sync"), Some(1), at(10));
        let before = conditions.clone();
        set_condition(&mut conditions, &Ready::ok("InSync", "in sync"), Some(1), at(20));
        assert_eq!(conditions, before);
    }

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let mut conditions = Vec::new();
        set_condition(&mut conditions, &Ready::stalled("SecretNotFound", "a"), Some(1), at(10));
        set_condition(&mut conditions, &Ready::stalled("InvalidSpec", "b"), Some(2), at(20));
        assert_eq!(of(&conditions, READY).last_transition_time, at(10));
        assert_eq!(of(&conditions, READY).reason, "InvalidSpec");
        assert_eq!(of(&conditions, READY).observed_generation, Some(2));
        set_condition(&mut conditions, &Ready::ok("InSync", "c"), Some(2), at(30));
        assert_eq!(conditions.len(), 3);
        assert_eq!(of(&conditions, READY).status, "True");
        assert_eq!(of(&conditions, READY).last_transition_time, at(30));
        assert_eq!(of(&conditions, STALLED).status, "False");
        assert_eq!(of(&conditions, STALLED).last_transition_time, at(30));
        assert_eq!(of(&conditions, RECONCILING).status, "False");
        assert_eq!(
            of(&conditions, RECONCILING).last_transition_time,
            at(10),
            "never flipped"
        );
    }

    #[test]
    fn exactly_one_of_the_three_holds() {
        for (ready, holds) in [
            (Ready::ok("InSync", ""), READY),
            (Ready::reconciling("Unreachable", ""), RECONCILING),
            (Ready::stalled("Conflict", ""), STALLED),
        ] {
            let mut conditions = Vec::new();
            set_condition(&mut conditions, &ready, Some(1), at(1));
            let trues: Vec<&str> = conditions
                .iter()
                .filter(|c| c.status == "True")
                .map(|c| c.type_.as_str())
                .collect();
            assert_eq!(trues, [holds], "{ready:?}");
            assert!(conditions.iter().all(|c| c.reason == ready.reason));
        }
    }

    #[test]
    fn other_condition_types_are_kept() {
        let mut conditions = vec![Condition {
            type_: "Custom".into(),
            status: "True".into(),
            reason: "Mine".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: at(1),
        }];
        set_condition(&mut conditions, &Ready::ok("InSync", ""), Some(1), at(2));
        assert_eq!(conditions.len(), 4);
        assert_eq!(conditions[0].type_, "Custom");
    }
}
