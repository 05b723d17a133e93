//! Whose account it is, as a sync learns it round by round: the pure state
//! machine of the ownership transitions — an account recognised as the one
//! a pending creation made, adopted, created, or its creation time
//! confirmed by a read — and of the pending creation record. No I/O: the
//! executor ([`crate::apply::sync_account`]) feeds it what it read and what
//! the backend answered, and records [`Claim`] in its progress.

use crate::account::Account;

use super::{Authority, PendingCreation, Plan};

/// What became of the pending creation record during a sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PendingOutcome {
    /// No create was asked for: the record is as it was.
    #[default]
    Unchanged,
    /// A create was asked for under this record and its answer never came
    /// (a timeout, say): keep the record, the account may be this one's.
    Unanswered(PendingCreation),
    /// The create was answered and made the account, but the answer did not
    /// say when (shared-secret registration): keep the record until a read
    /// does, so that it still tells this account from one of the same ID
    /// made at another time.
    Unconfirmed(PendingCreation),
    /// Settled: the account was created (and is owned now), or it existed
    /// already and is not this resource's creation.
    Settled,
}

/// What a sync found out about the account's ownership, to be recorded
/// whether the sync succeeds or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claim {
    /// This sync created the account (the backend said so), or recognised
    /// it as the one a pending creation made.
    pub created: bool,
    /// This sync adopted an existing account.
    pub adopted: bool,
    pub pending_creation: PendingOutcome,
    /// The backend's creation time of the account, once known.
    pub creation_ts: Option<i64>,
    /// The backend's own ID of the account (MAS's), once known.
    pub account_id: Option<String>,
}

/// The ownership state of one sync: what the operator may do
/// ([`Authority`], which the plan reads) and what it found out ([`Claim`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ownership {
    pub authority: Authority,
    pub claim: Claim,
    /// The create asked for last, under this record (`None`: none
    /// recorded), and whether an earlier create of ours was unanswered then.
    asked: Option<(Option<PendingCreation>, bool)>,
}

/// What a create answered, as far as ownership goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateAnswer {
    /// The account did not exist and the create made it.
    pub created: bool,
    pub creation_ts: Option<i64>,
    pub account_id: Option<String>,
}

impl Ownership {
    pub fn new(authority: Authority) -> Self {
        Self {
            authority,
            ..Self::default()
        }
    }

    /// A read reported `account`: an owned account whose create did not
    /// say when it was made gets its creation time, once the read shows one
    /// under the pending record (an account made at any other time is not
    /// this one: [`Authority::owns`]).
    pub fn observed(&mut self, account: &Account) {
        let a = &mut self.authority;
        if a.owned
            && a.owned_creation_ts.is_none()
            && let Some(ts) = account.creation_ts
            && a.pending_creation.is_some_and(|p| p.covers(ts))
        {
            a.owned_creation_ts = Some(ts);
            a.pending_creation = None;
            self.claim.creation_ts = Some(ts);
            self.claim.pending_creation = PendingOutcome::Settled;
        }
    }

    /// Whether `account`, as an answer reported it, leaves the creation
    /// time of the account this sync created unknown (a shared-secret
    /// registration does not say it): a read tells.
    pub fn awaits_creation_time(&self, account: &Account) -> bool {
        self.claim.created && self.claim.creation_ts.is_none() && account.creation_ts.is_none()
    }

    /// Whether `plan` takes an existing account as the resource's own
    /// (the caller's guard is asked first).
    pub fn claims(plan: &Plan) -> bool {
        plan.created_by_pending || plan.adopt
    }

    /// `plan` took `account` as the resource's own: the account its
    /// pending creation made, or an adopted one.
    pub fn claimed(&mut self, plan: &Plan, account: Option<&Account>) {
        let created_at = account.and_then(|a| a.creation_ts);
        self.authority.owned = true;
        self.authority.owned_creation_ts = created_at;
        self.claim.creation_ts = created_at;
        self.claim.account_id = account.and_then(|a| a.account_id.clone());
        if plan.created_by_pending {
            self.authority.pending_creation = None;
            self.claim.pending_creation = PendingOutcome::Settled;
            self.claim.created = true;
        } else {
            self.claim.adopted = true;
        }
    }

    /// The account is in line: what it reports is what is recorded.
    pub fn in_line(&mut self, account: &Account) {
        self.claim.creation_ts = account.creation_ts;
        self.claim.account_id = account.account_id.clone();
    }

    /// A create is about to be sent, under the record `pending` the guard
    /// made durable (`None`: none).
    pub fn create_asked(&mut self, pending: Option<PendingCreation>) {
        // A create of this ID asked for before, never answered.
        let earlier_unanswered = self.authority.pending_creation.is_some();
        self.asked = Some((pending, earlier_unanswered));
        self.authority.pending_creation = pending;
    }

    /// The create failed; `refusal`: the server refused it (4xx), so this
    /// request created nothing.
    pub fn create_failed(&mut self, refusal: bool) {
        let (pending, earlier_unanswered) = self.asked.unwrap_or_default();
        if refusal && !earlier_unanswered {
            // No earlier create of ours may have made the account either (a
            // refusal after an unanswered create may be that create's doing:
            // the record stays).
            self.authority.pending_creation = None;
            self.claim.pending_creation = PendingOutcome::Settled;
        } else if let Some(p) = pending {
            // No answer (or see above): whether the account was created is
            // unknown; the next read tells, under the record.
            self.claim.pending_creation = PendingOutcome::Unanswered(p);
        }
    }

    /// The create answered.
    pub fn create_answered(&mut self, answer: CreateAnswer) {
        let (pending, _) = self.asked.unwrap_or_default();
        self.authority.pending_creation = None;
        self.claim.pending_creation = PendingOutcome::Settled;
        if !answer.created {
            // It appeared meanwhile, untouched by the create; the next
            // round decides whether it may be adopted.
            return;
        }
        self.authority.owned = true;
        self.authority.owned_creation_ts = answer.creation_ts;
        self.claim.creation_ts = answer.creation_ts;
        self.claim.account_id = answer.account_id;
        self.claim.created = true;
        if answer.creation_ts.is_none()
            && let Some(p) = pending
        {
            self.authority.pending_creation = Some(p);
            self.claim.pending_creation = PendingOutcome::Unconfirmed(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(creation_ts: Option<i64>) -> Account {
        Account {
            name: "@alice:example.org".into(),
            creation_ts,
            account_id: Some("01MAS".into()),
            ..Account::default()
        }
    }

    const PENDING: PendingCreation = PendingCreation {
        requested_at: 1_000,
        last_requested_at: 1_000,
    };

    fn owned_unconfirmed() -> Authority {
        Authority {
            owned: true,
            pending_creation: Some(PENDING),
            ..Authority::default()
        }
    }

    type Step = fn(&mut Ownership);

    /// From a start, the steps of a sync, and the state they leave.
    struct Case {
        name: &'static str,
        start: Authority,
        steps: Vec<Step>,
        authority: Authority,
        claim: Claim,
    }

    fn answer(created: bool, creation_ts: Option<i64>) -> CreateAnswer {
        CreateAnswer {
            created,
            creation_ts,
            account_id: created.then(|| "01MAS".to_string()),
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                name: "a create answered with its time: created, owned, settled",
                start: Authority::default(),
                steps: vec![|o| o.create_asked(Some(PENDING)), |o| {
                    o.create_answered(answer(true, Some(1_001)))
                }],
                authority: Authority {
                    owned: true,
                    owned_creation_ts: Some(1_001),
                    ..Authority::default()
                },
                claim: Claim {
                    created: true,
                    pending_creation: PendingOutcome::Settled,
                    creation_ts: Some(1_001),
                    account_id: Some("01MAS".into()),
                    ..Claim::default()
                },
            },
            Case {
                name: "a create answered without a time: the record stays until a read confirms it",
                start: Authority::default(),
                steps: vec![|o| o.create_asked(Some(PENDING)), |o| {
                    o.create_answered(answer(true, None))
                }],
                authority: Authority {
                    owned: true,
                    pending_creation: Some(PENDING),
                    ..Authority::default()
                },
                claim: Claim {
                    created: true,
                    pending_creation: PendingOutcome::Unconfirmed(PENDING),
                    account_id: Some("01MAS".into()),
                    ..Claim::default()
                },
            },
            Case {
                name: "... and the read under the record confirms it",
                start: Authority::default(),
                steps: vec![
                    |o| o.create_asked(Some(PENDING)),
                    |o| o.create_answered(answer(true, None)),
                    |o| o.observed(&account(Some(1_010))),
                ],
                authority: Authority {
                    owned: true,
                    owned_creation_ts: Some(1_010),
                    ..Authority::default()
                },
                claim: Claim {
                    created: true,
                    pending_creation: PendingOutcome::Settled,
                    creation_ts: Some(1_010),
                    account_id: Some("01MAS".into()),
                    ..Claim::default()
                },
            },
            Case {
                name: "a read of an account made at another time confirms nothing",
                start: owned_unconfirmed(),
                steps: vec![|o| o.observed(&account(Some(999_999)))],
                authority: owned_unconfirmed(),
                claim: Claim::default(),
            },
            Case {
                name: "a create that found the account there: settled, not owned",
                start: Authority::default(),
                steps: vec![|o| o.create_asked(Some(PENDING)), |o| {
                    o.create_answered(answer(false, None))
                }],
                authority: Authority::default(),
                claim: Claim {
                    pending_creation: PendingOutcome::Settled,
                    ..Claim::default()
                },
            },
            Case {
                name: "a refused create with no earlier one unanswered: settled",
                start: Authority::default(),
                steps: vec![|o| o.create_asked(Some(PENDING)), |o| o.create_failed(true)],
                authority: Authority::default(),
                claim: Claim {
                    pending_creation: PendingOutcome::Settled,
                    ..Claim::default()
                },
            },
            Case {
                name: "a refused create after an unanswered one: the record stays",
                start: Authority {
                    pending_creation: Some(PendingCreation::at(900)),
                    ..Authority::default()
                },
                steps: vec![|o| o.create_asked(Some(PENDING)), |o| o.create_failed(true)],
                authority: Authority {
                    pending_creation: Some(PENDING),
                    ..Authority::default()
                },
                claim: Claim {
                    pending_creation: PendingOutcome::Unanswered(PENDING),
                    ..Claim::default()
                },
            },
            Case {
                name: "an unanswered create: the record stays",
                start: Authority::default(),
                steps: vec![|o| o.create_asked(Some(PENDING)), |o| o.create_failed(false)],
                authority: Authority {
                    pending_creation: Some(PENDING),
                    ..Authority::default()
                },
                claim: Claim {
                    pending_creation: PendingOutcome::Unanswered(PENDING),
                    ..Claim::default()
                },
            },
            Case {
                name: "an unanswered create with no record (no guard): nothing to keep",
                start: Authority::default(),
                steps: vec![|o| o.create_asked(None), |o| o.create_failed(false)],
                authority: Authority::default(),
                claim: Claim::default(),
            },
            Case {
                name: "the account of a pending creation, recognised: created and owned",
                start: Authority {
                    pending_creation: Some(PENDING),
                    ..Authority::default()
                },
                steps: vec![|o| {
                    let plan = Plan {
                        created_by_pending: true,
                        ..Plan::default()
                    };
                    o.claimed(&plan, Some(&account(Some(1_002))))
                }],
                authority: Authority {
                    owned: true,
                    owned_creation_ts: Some(1_002),
                    ..Authority::default()
                },
                claim: Claim {
                    created: true,
                    pending_creation: PendingOutcome::Settled,
                    creation_ts: Some(1_002),
                    account_id: Some("01MAS".into()),
                    ..Claim::default()
                },
            },
            Case {
                name: "an adopted account: owned, adopted, its pending record untouched",
                start: Authority {
                    adopt_requested: true,
                    adoption_allowed: true,
                    pending_creation: Some(PENDING),
                    ..Authority::default()
                },
                steps: vec![|o| {
                    let plan = Plan {
                        adopt: true,
                        ..Plan::default()
                    };
                    o.claimed(&plan, Some(&account(Some(5))))
                }],
                authority: Authority {
                    owned: true,
                    adopt_requested: true,
                    adoption_allowed: true,
                    owned_creation_ts: Some(5),
                    pending_creation: Some(PENDING),
                    ..Authority::default()
                },
                claim: Claim {
                    adopted: true,
                    creation_ts: Some(5),
                    account_id: Some("01MAS".into()),
                    ..Claim::default()
                },
            },
            Case {
                name: "an account in line: its time and ID recorded",
                start: Authority {
                    owned: true,
                    ..Authority::default()
                },
                steps: vec![|o| o.in_line(&account(Some(7)))],
                authority: Authority {
                    owned: true,
                    ..Authority::default()
                },
                claim: Claim {
                    creation_ts: Some(7),
                    account_id: Some("01MAS".into()),
                    ..Claim::default()
                },
            },
        ]
    }

    #[test]
    fn ownership_transitions() {
        for case in cases() {
            let mut o = Ownership::new(case.start);
            for step in &case.steps {
                step(&mut o);
            }
            assert_eq!(o.authority, case.authority, "{}", case.name);
            assert_eq!(o.claim, case.claim, "{}", case.name);
        }
    }

    #[test]
    fn only_a_plan_that_adopts_or_recognises_claims() {
        assert!(!Ownership::claims(&Plan::default()));
        for plan in [
            Plan {
                adopt: true,
                ..Plan::default()
            },
            Plan {
                created_by_pending: true,
                ..Plan::default()
            },
        ] {
            assert!(Ownership::claims(&plan));
        }
    }

    #[test]
    fn only_a_create_answered_without_its_time_awaits_a_read() {
        let mut o = Ownership::new(Authority::default());
        assert!(!o.awaits_creation_time(&account(None)), "nothing created");
        o.create_asked(Some(PENDING));
        o.create_answered(answer(true, None));
        assert!(
            o.awaits_creation_time(&account(None)),
            "registered: the answer said no time"
        );
        assert!(!o.awaits_creation_time(&account(Some(1_001))), "an answer that says it");
        o.observed(&account(Some(1_001)));
        assert!(!o.awaits_creation_time(&account(None)), "read under the record");

        let mut o = Ownership::new(Authority::default());
        o.create_asked(Some(PENDING));
        o.create_answered(answer(true, Some(1_001)));
        assert!(!o.awaits_creation_time(&account(None)), "the create said when");

        let mut o = Ownership::new(Authority::default());
        o.create_asked(Some(PENDING));
        o.create_answered(answer(false, None));
        assert!(!o.awaits_creation_time(&account(None)), "not this sync's creation");
    }
}
