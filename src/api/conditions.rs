//! The `Ready` condition both kinds carry, merged by type.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The condition type every resource of this operator reports.
pub const READY: &str = "Ready";

/// The outcome to record as the `Ready` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ready {
    pub ready: bool,
    /// CamelCase reason, from a closed set per kind (documented in the README).
    pub reason: &'static str,
    /// A human message; never holds a secret value.
    pub message: String,
}

impl Ready {
    pub fn ok(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: true,
            reason,
            message: message.into(),
        }
    }
    pub fn not_ready(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            ready: false,
            reason,
            message: message.into(),
        }
    }
}

/// The `Ready` condition in `conditions`, if any.
pub fn ready_condition(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == READY)
}

/// Merges `ready` into `conditions` as the `Ready` condition.
///
/// `lastTransitionTime` moves only when the status flips, so recording the
/// same outcome twice leaves the conditions equal and no status write is
/// needed.
pub fn set_condition(conditions: &mut Vec<Condition>, ready: &Ready, generation: Option<i64>, now: Time) {
    let status = if ready.ready { "True" } else { "False" };
    let new = |last_transition_time| Condition {
        type_: READY.to_string(),
        status: status.to_string(),
        reason: ready.reason.to_string(),
        message: ready.message.clone(),
        observed_generation: generation,
        last_transition_time,
    };
    match conditions.iter_mut().find(|c| c.type_ == READY) {
        Some(existing) => {
            let since = if existing.status == status {
                existing.last_transition_time.clone()
            } else {
                now
            };
            *existing = new(since);
        }
        None => conditions.push(new(now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
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
        set_condition(
            &mut conditions,
            &Ready::not_ready("SecretNotFound", "a"),
            Some(1),
            at(10),
        );
        set_condition(&mut conditions, &Ready::not_ready("SynapseError", "b"), Some(2), at(20));
        assert_eq!(conditions[0].last_transition_time, at(10));
        assert_eq!(conditions[0].reason, "SynapseError");
        assert_eq!(conditions[0].observed_generation, Some(2));
        set_condition(&mut conditions, &Ready::ok("InSync", "c"), Some(2), at(30));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].last_transition_time, at(30));
    }
}
