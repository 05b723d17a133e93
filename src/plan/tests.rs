//! The plan is neutral; what each case sends to Synapse is its changes as
//! the Synapse backend batches them into PUT bodies
//! ([`crate::synapse::user_update`]). MAS's calls for the same changes are
//! tested in `backend::mas::tests`.

use super::*;
use crate::api::{ExternalIdSpec, HomeserverRef, ThreepidSpec, UserType};
use crate::synapse::{UserUpdate, user_update};

/// The Synapse PUT body an action makes (of an account that exists).
fn body(action: Option<Action>) -> Option<UserUpdate> {
    match action {
        None => None,
        Some(Action::Update(c)) => Some(user_update(&c, false)),
        Some(Action::Create) => panic!("an existing account is never created"),
    }
}

fn user_id() -> UserId {
    UserId::new("alice", "example.org").unwrap()
}

/// An account as Synapse reports a plain, active user.
fn account() -> Account {
    Account {
        name: "@alice:example.org".into(),
        account_id: None,
        admin: false,
        deactivated: false,
        locked: false,
        erased: false,
        user_type: None,
        displayname: Some("alice".into()),
        avatar_url: None,
        threepids: vec![],
        external_ids: vec![],
        creation_ts: Some(1_700_000_000),
    }
}

/// A spec that manages nothing.
fn desired() -> Desired {
    Desired::existing(user_id())
}

fn owned() -> Authority {
    Authority {
        owned: true,
        ..Authority::default()
    }
}

fn email(address: &str) -> Threepid {
    Threepid {
        medium: "email".into(),
        address: address.into(),
    }
}

fn msisdn(address: &str) -> Threepid {
    Threepid {
        medium: "msisdn".into(),
        address: address.into(),
    }
}

fn ext(provider: &str, id: &str) -> ExternalId {
    ExternalId {
        auth_provider: provider.into(),
        external_id: id.into(),
    }
}

fn password(value: &str, applied: bool, logout_devices: bool) -> DesiredPassword {
    DesiredPassword {
        value: SecretString::new(value),
        applied,
        logout_devices,
    }
}

/// The update an owned, existing account gets.
fn update(d: &Desired, a: &Account) -> UserUpdate {
    body(plan(d, Some(a), owned(), &Owners::default()).unwrap().action).unwrap_or_default()
}

type Setup = fn(&mut Desired, &mut Account);

/// Every managed field, absent / equal / different: (case, setup, expected body).
fn field_cases() -> Vec<(&'static str, Setup, UserUpdate)> {
    let none = UserUpdate::default;
    vec![
        (
            "displayname absent",
            |_, a| a.displayname = Some("Whatever".into()),
            none(),
        ),
        (
            "displayname equal",
            |d, a| {
                d.displayname = Some("Alice".into());
                a.displayname = Some("Alice".into())
            },
            none(),
        ),
        (
            "displayname different",
            |d, _| d.displayname = Some("Alice L".into()),
            UserUpdate {
                displayname: Some("Alice L".into()),
                ..none()
            },
        ),
        (
            "displayname cleared, already null",
            |d, a| {
                d.displayname = Some(String::new());
                a.displayname = None
            },
            none(),
        ),
        (
            "displayname cleared, set",
            |d, _| d.displayname = Some(String::new()),
            UserUpdate {
                displayname: Some(String::new()),
                ..none()
            },
        ),
        ("avatar absent", |_, a| a.avatar_url = Some("mxc://x/y".into()), none()),
        (
            "avatar equal",
            |d, a| {
                d.avatar_url = Some("mxc://x/y".into());
                a.avatar_url = Some("mxc://x/y".into())
            },
            none(),
        ),
        (
            "avatar different",
            |d, a| {
                d.avatar_url = Some("mxc://x/z".into());
                a.avatar_url = Some("mxc://x/y".into())
            },
            UserUpdate {
                avatar_url: Some("mxc://x/z".into()),
                ..none()
            },
        ),
        (
            "avatar set from null",
            |d, _| d.avatar_url = Some("mxc://x/z".into()),
            UserUpdate {
                avatar_url: Some("mxc://x/z".into()),
                ..none()
            },
        ),
        (
            "avatar cleared, already null",
            |d, _| d.avatar_url = Some(String::new()),
            none(),
        ),
        ("admin absent", |_, a| a.admin = true, none()),
        (
            "admin equal",
            |d, a| {
                d.admin = Some(false);
                a.admin = false
            },
            none(),
        ),
        (
            "admin different",
            |d, a| {
                d.admin = Some(false);
                a.admin = true
            },
            UserUpdate {
                admin: Some(false),
                ..none()
            },
        ),
        ("locked absent", |_, a| a.locked = true, none()),
        (
            "locked equal",
            |d, a| {
                d.locked = Some(true);
                a.locked = true
            },
            none(),
        ),
        (
            "locked different",
            |d, _| d.locked = Some(true),
            UserUpdate {
                locked: Some(true),
                ..none()
            },
        ),
        (
            "unlock",
            |d, a| {
                d.locked = Some(false);
                a.locked = true
            },
            UserUpdate {
                locked: Some(false),
                ..none()
            },
        ),
        ("user type absent", |_, a| a.user_type = Some("bot".into()), none()),
        (
            "user type equal",
            |d, a| {
                d.user_type = Some(UserType::Bot);
                a.user_type = Some("bot".into())
            },
            none(),
        ),
        (
            "user type different",
            |d, a| {
                d.user_type = Some(UserType::Support);
                a.user_type = Some("bot".into())
            },
            UserUpdate {
                user_type: Some("support".into()),
                ..none()
            },
        ),
        (
            "user type from none",
            |d, _| d.user_type = Some(UserType::Bot),
            UserUpdate {
                user_type: Some("bot".into()),
                ..none()
            },
        ),
        (
            "threepids absent",
            |_, a| a.threepids = vec![email("x@example.org")],
            none(),
        ),
        (
            "threepids equal, other order",
            |d, a| {
                d.threepids = Some(vec![email("a@example.org"), msisdn("441234")]);
                a.threepids = vec![msisdn("441234"), email("a@example.org")];
            },
            none(),
        ),
        (
            "threepids equal once lower-cased",
            |d, a| {
                // desired_from_spec lower-cases; Synapse reports lower case.
                d.threepids = Some(vec![email("alice@example.org")]);
                a.threepids = vec![email("Alice@Example.org")];
            },
            none(),
        ),
        (
            "threepids different",
            |d, a| {
                d.threepids = Some(vec![email("new@example.org")]);
                a.threepids = vec![email("old@example.org")];
            },
            UserUpdate {
                threepids: Some(vec![email("new@example.org")]),
                ..none()
            },
        ),
        (
            "threepids one more",
            |d, a| {
                d.threepids = Some(vec![email("a@example.org"), email("b@example.org")]);
                a.threepids = vec![email("a@example.org")];
            },
            UserUpdate {
                threepids: Some(vec![email("a@example.org"), email("b@example.org")]),
                ..none()
            },
        ),
        (
            "threepids none wanted",
            |d, a| {
                d.threepids = Some(vec![]);
                a.threepids = vec![email("a@example.org")]
            },
            UserUpdate {
                threepids: Some(vec![]),
                ..none()
            },
        ),
        (
            "threepids none wanted, none held",
            |d, _| d.threepids = Some(vec![]),
            none(),
        ),
        (
            "external ids absent",
            |_, a| a.external_ids = vec![ext("oidc", "1")],
            none(),
        ),
        (
            "external ids equal, other order",
            |d, a| {
                d.external_ids = Some(vec![ext("oidc", "1"), ext("saml", "2")]);
                a.external_ids = vec![ext("saml", "2"), ext("oidc", "1")];
            },
            none(),
        ),
        (
            "external ids different",
            |d, a| {
                d.external_ids = Some(vec![ext("oidc", "2")]);
                a.external_ids = vec![ext("oidc", "1")];
            },
            UserUpdate {
                external_ids: Some(vec![ext("oidc", "2")]),
                ..none()
            },
        ),
        (
            "external ids none wanted",
            |d, a| {
                d.external_ids = Some(vec![]);
                a.external_ids = vec![ext("oidc", "1")]
            },
            UserUpdate {
                external_ids: Some(vec![]),
                ..none()
            },
        ),
        ("password absent", |_, _| {}, none()),
        (
            "password applied",
            |d, _| d.password = Some(password("pw", true, false)),
            none(),
        ),
        (
            "password new, keep devices",
            |d, _| d.password = Some(password("pw2", false, false)),
            UserUpdate {
                password: Some(SecretString::new("pw2")),
                logout_devices: Some(false),
                ..none()
            },
        ),
        (
            "password new, log out devices",
            |d, _| d.password = Some(password("pw2", false, true)),
            UserUpdate {
                password: Some(SecretString::new("pw2")),
                logout_devices: Some(true),
                ..none()
            },
        ),
        ("deactivated absent", |_, a| a.deactivated = true, none()),
        ("deactivated equal, false", |d, _| d.deactivated = Some(false), none()),
        (
            "deactivated equal, true",
            |d, a| {
                d.deactivated = Some(true);
                a.deactivated = true
            },
            none(),
        ),
    ]
}

#[test]
fn every_field_absent_equal_and_different() {
    // Demoting an admin is a write to a server admin's account, which
    // needs the admin policy (see no_write_reaches_a_server_admin_…).
    let admin_allowed = Authority {
        admin_allowed: true,
        ..owned()
    };
    for (case, setup, expected) in field_cases() {
        let (mut d, mut a) = (desired(), account());
        setup(&mut d, &mut a);
        let planned = plan(&d, Some(&a), admin_allowed, &Owners::default()).unwrap().action;
        assert_eq!(body(planned).unwrap_or_default(), expected, "{case}");
    }
}

#[test]
fn an_account_in_sync_plans_nothing() {
    let mut d = desired();
    d.displayname = Some("Alice".into());
    d.avatar_url = Some("mxc://example.org/abc".into());
    d.admin = Some(true);
    d.deactivated = Some(false);
    d.locked = Some(false);
    d.user_type = Some(UserType::Bot);
    d.password = Some(password("pw", true, true));
    d.threepids = Some(vec![email("alice@example.org"), email("a2@example.org")]);
    d.external_ids = Some(vec![ext("oidc", "1")]);
    let mut a = account();
    a.displayname = Some("Alice".into());
    a.avatar_url = Some("mxc://example.org/abc".into());
    a.admin = true;
    a.user_type = Some("bot".into());
    a.threepids = vec![email("a2@example.org"), email("alice@example.org")];
    a.external_ids = vec![ext("oidc", "1")];
    let authority = Authority {
        owned: true,
        admin_allowed: true,
        ..Authority::default()
    };
    let p = plan(&d, Some(&a), authority, &Owners::default()).unwrap();
    assert!(p.is_empty(), "{p:?}");
    assert_eq!(lookups(&d, Some(&a)), Lookups::default());
}

#[test]
fn other_differences_go_in_one_body_and_the_password_alone_after() {
    let mut d = desired();
    d.displayname = Some("Alice".into());
    d.locked = Some(true);
    d.password = Some(password("pw", false, false));
    let mut a = account();
    let u = update(&d, &a);
    assert_eq!(body_fields(&u), vec!["displayname", "locked"]);
    // Once those are in place, the password follows on its own.
    a.displayname = Some("Alice".into());
    a.locked = true;
    let u = update(&d, &a);
    assert_eq!(
        u,
        UserUpdate {
            password: Some(SecretString::new("pw")),
            logout_devices: Some(false),
            ..UserUpdate::default()
        }
    );
}

#[test]
fn reactivation_carries_the_password_and_the_rest_follows() {
    let mut d = desired();
    d.deactivated = Some(false);
    d.displayname = Some("Back".into());
    d.threepids = Some(vec![email("alice@example.org")]);
    d.password = Some(password("pw", true, false));
    let mut a = account();
    a.deactivated = true;
    let u = update(&d, &a);
    assert_eq!(body_fields(&u), vec!["password", "deactivated"]);
    a.deactivated = false;
    // The password was applied with the re-activation (the executor marks it so).
    d.password = Some(password("pw", true, false));
    assert_eq!(body_fields(&update(&d, &a)), vec!["displayname", "threepids"]);
}

#[test]
fn a_missing_account_is_created_with_an_empty_body_first() {
    let mut d = desired();
    d.displayname = Some("Alice".into());
    d.deactivated = Some(true);
    d.locked = Some(false);
    d.password = Some(password("pw", false, false));
    for authority in [Authority::default(), owned()] {
        let p = plan(&d, None, authority, &Owners::default()).unwrap();
        assert_eq!(p.action, Some(Action::Create));
        assert!(!p.adopt && !p.sends_password());
    }
}

#[test]
fn after_create_the_fields_follow_including_deactivation_and_lock() {
    // Synapse ignores deactivated/locked on create; the round after the
    // create sends them to the account as it now is.
    let mut d = desired();
    d.deactivated = Some(true);
    d.displayname = Some("Alice".into());
    let fresh = account(); // displayname = localpart, as Synapse sets it
    assert_eq!(
        update(&d, &fresh),
        UserUpdate {
            displayname: Some("Alice".into()),
            deactivated: Some(true),
            ..UserUpdate::default()
        }
    );
    let mut d = desired();
    d.locked = Some(true);
    assert_eq!(
        update(&d, &fresh),
        UserUpdate {
            locked: Some(true),
            ..UserUpdate::default()
        }
    );
}

#[test]
fn create_without_displayname_leaves_synapses_default_alone() {
    // Synapse sets displayname = localpart; an unmanaged displayname stays so.
    assert!(
        plan(&desired(), Some(&account()), owned(), &Owners::default())
            .unwrap()
            .is_empty()
    );
}

/// deactivated × locked, desired (None/false/true each) against actual.
#[test]
fn every_transition_of_deactivated_and_locked() {
    let states = [None, Some(false), Some(true)];
    for want_deact in states {
        for want_locked in states {
            if want_deact == Some(true) && want_locked == Some(true) {
                continue; // rejected by the CRD schema
            }
            for have_deact in [false, true] {
                for have_locked in [false, true] {
                    let mut d = desired();
                    d.deactivated = want_deact;
                    d.locked = want_locked;
                    let mut a = account();
                    a.deactivated = have_deact;
                    a.locked = have_locked;
                    let u = update(&d, &a);
                    let case = format!("want d={want_deact:?} l={want_locked:?}, have d={have_deact} l={have_locked}");
                    let expect_deact = want_deact.filter(|w| *w != have_deact);
                    let expect_locked = want_locked.filter(|w| *w != have_locked);
                    assert_eq!(u.deactivated, expect_deact, "{case}");
                    assert_eq!(u.locked, expect_locked, "{case}");
                    assert!(
                        !(u.deactivated == Some(true) && u.locked == Some(true)),
                        "{case}: Synapse rejects both"
                    );
                    assert_eq!(u.password, None, "{case}: no password is managed");
                    // Every other field stays out of the body.
                    let rest = UserUpdate {
                        deactivated: None,
                        locked: None,
                        ..u
                    };
                    assert_eq!(rest, UserUpdate::default(), "{case}");
                }
            }
        }
    }
}

#[test]
fn reactivation_sends_the_password_in_the_same_call() {
    let mut d = desired();
    d.deactivated = Some(false);
    // Applied long ago; deactivation removed the hash since.
    d.password = Some(password("pw", true, false));
    let mut a = account();
    a.deactivated = true;
    let p = plan(&d, Some(&a), owned(), &Owners::default()).unwrap();
    assert_eq!(
        body(p.action),
        Some(UserUpdate {
            deactivated: Some(false),
            password: Some(SecretString::new("pw")),
            logout_devices: Some(false),
            ..UserUpdate::default()
        })
    );
    assert!(!p.reactivates_without_password);
}

#[test]
fn reactivation_without_a_managed_password_is_flagged() {
    let mut d = desired();
    d.deactivated = Some(false);
    let mut a = account();
    a.deactivated = true;
    let p = plan(&d, Some(&a), owned(), &Owners::default()).unwrap();
    assert!(p.reactivates_without_password);
    assert_eq!(
        body(p.action),
        Some(UserUpdate {
            deactivated: Some(false),
            ..UserUpdate::default()
        })
    );
}

#[test]
fn reactivation_restores_threepids_in_the_same_call() {
    let mut d = desired();
    d.deactivated = Some(false);
    d.threepids = Some(vec![email("alice@example.org")]);
    let mut a = account();
    a.deactivated = true; // Synapse removed the threepids
    let u = update(&d, &a);
    assert_eq!(u.threepids, Some(vec![email("alice@example.org")]));
    assert_eq!(u.deactivated, Some(false));
}

#[test]
fn a_deactivated_account_gets_no_threepids_and_no_password() {
    for want in [Some(true), None] {
        let mut d = desired();
        d.deactivated = want;
        d.threepids = Some(vec![email("alice@example.org")]);
        d.password = Some(password("new", false, false));
        let mut a = account();
        a.deactivated = true;
        assert_eq!(update(&d, &a), UserUpdate::default(), "want {want:?}");
        assert_eq!(lookups(&d, Some(&a)), Lookups::default(), "want {want:?}");
    }
}

#[test]
fn deactivating_sends_profile_changes_but_not_threepids_or_password() {
    let mut d = desired();
    d.deactivated = Some(true);
    d.displayname = Some("Gone".into());
    d.threepids = Some(vec![email("alice@example.org")]);
    d.password = Some(password("new", false, false));
    let u = update(&d, &account());
    assert_eq!(
        u,
        UserUpdate {
            deactivated: Some(true),
            displayname: Some("Gone".into()),
            ..UserUpdate::default()
        }
    );
}

#[test]
fn an_erased_account_that_stays_deactivated_keeps_its_profile_erased() {
    let mut d = desired();
    d.displayname = Some("Alice".into());
    d.avatar_url = Some("mxc://x/y".into());
    let mut a = account();
    a.deactivated = true;
    a.erased = true;
    a.displayname = None;
    assert_eq!(update(&d, &a), UserUpdate::default());
    // Re-activated, the profile comes back.
    d.deactivated = Some(false);
    let u = update(&d, &a);
    assert_eq!(u.displayname.as_deref(), Some("Alice"));
    assert_eq!(u.avatar_url.as_deref(), Some("mxc://x/y"));
}

#[test]
fn an_existing_account_not_owned_is_refused_without_adoption() {
    let d = desired();
    let a = account();
    let cases = [
        (
            Authority {
                adopt_requested: false,
                adoption_allowed: true,
                ..Authority::default()
            },
            "AdoptionNotRequested",
        ),
        (
            Authority {
                adopt_requested: true,
                adoption_allowed: false,
                ..Authority::default()
            },
            "AdoptionNotAllowed",
        ),
        (Authority::default(), "AdoptionNotRequested"),
    ];
    for (authority, expected) in cases {
        let err = plan(&d, Some(&a), authority, &Owners::default()).unwrap_err();
        assert!(format!("{err:?}").starts_with(expected), "{authority:?}: {err:?}");
        assert!(err.to_string().contains("@alice:example.org"));
    }
}

#[test]
fn adoption_needs_both_the_spec_and_the_policy_and_is_recorded() {
    let mut d = desired();
    d.displayname = Some("Alice".into());
    let authority = Authority {
        adopt_requested: true,
        adoption_allowed: true,
        ..Authority::default()
    };
    let p = plan(&d, Some(&account()), authority, &Owners::default()).unwrap();
    assert!(p.adopt);
    assert!(matches!(p.action, Some(Action::Update(ref u)) if u.displayname.as_deref() == Some("Alice")));
    // Adopting an account already in line records it and writes nothing.
    let p = plan(&desired(), Some(&account()), authority, &Owners::default()).unwrap();
    assert!(p.adopt && p.action.is_none() && !p.is_empty());
    // Owned already: no adoption to record.
    let p = plan(
        &desired(),
        Some(&account()),
        Authority {
            owned: true,
            ..authority
        },
        &Owners::default(),
    )
    .unwrap();
    assert!(p.is_empty());
}

#[test]
fn adopting_sends_the_password_of_the_spec() {
    let mut d = desired();
    d.password = Some(password("pw", false, false));
    let authority = Authority {
        adopt_requested: true,
        adoption_allowed: true,
        ..Authority::default()
    };
    assert!(
        plan(&d, Some(&account()), authority, &Owners::default())
            .unwrap()
            .sends_password()
    );
}

#[test]
fn adopting_an_admin_needs_the_admin_policy() {
    let mut admin = account();
    admin.admin = true;
    let authority = Authority {
        adopt_requested: true,
        adoption_allowed: true,
        ..Authority::default()
    };
    let err = plan(&desired(), Some(&admin), authority, &Owners::default()).unwrap_err();
    assert_eq!(
        err,
        Refusal::AdoptingAdmin {
            user_id: "@alice:example.org".into()
        }
    );
    let allowed = Authority {
        admin_allowed: true,
        ..authority
    };
    assert!(
        plan(&desired(), Some(&admin), allowed, &Owners::default())
            .unwrap()
            .adopt
    );
    // An owned account made admin by someone else is not refused while
    // nothing is to be written to it.
    assert!(plan(&desired(), Some(&admin), owned(), &Owners::default()).is_ok());
}

#[test]
fn no_write_reaches_a_server_admin_without_the_admin_policy() {
    let mut admin = account();
    admin.admin = true;
    let mut d = desired();
    d.displayname = Some("Changed".into());
    d.password = Some(password("pw", false, false));
    // Owned, as a status record says: the record may be forged.
    assert_eq!(
        plan(&d, Some(&admin), owned(), &Owners::default()),
        Err(Refusal::ChangingAdmin {
            user_id: "@alice:example.org".into()
        })
    );
    let allowed = Authority {
        admin_allowed: true,
        ..owned()
    };
    assert!(
        plan(&d, Some(&admin), allowed, &Owners::default())
            .unwrap()
            .sends_password()
    );
    // Deleting is a write too.
    assert_eq!(
        plan_deletion(DeletionPolicy::Deactivate, owned(), Some(&admin)),
        Err(Untouched::ServerAdmin)
    );
    assert_eq!(
        plan_deletion(DeletionPolicy::Erase, allowed, Some(&admin)),
        Ok(DeletionAction::Deactivate { erase: true })
    );
}

#[test]
fn emails_are_ascii_with_one_at_sign() {
    for ok in ["alice@example.org", " A.B+c@Example.ORG ", "x@y"] {
        assert_eq!(validate_threepid(ThreepidMedium::Email, ok), Ok(()), "{ok}");
    }
    // `ß` case-folds to `ss` in Synapse but lower-cases to itself here.
    for bad in ["straße@example.org", "a@b@c", "nope", "@x", "x@", "a b@c", ""] {
        assert!(validate_threepid(ThreepidMedium::Email, bad).is_err(), "{bad}");
    }
    assert_eq!(validate_threepid(ThreepidMedium::Msisdn, "447700900000"), Ok(()));
    assert_eq!(
        normalize_threepid(ThreepidMedium::Email, " Alice@EXAMPLE.org "),
        email("alice@example.org")
    );
}

#[test]
fn conflict_messages_do_not_name_the_owner() {
    let t = Refusal::ThreepidInUse {
        medium: "email".into(),
        address: "a@b".into(),
        owner: "@bob:x".into(),
    };
    let e = Refusal::ExternalIdInUse {
        auth_provider: "oidc".into(),
        external_id: "1".into(),
        owner: "@bob:x".into(),
    };
    for r in [t, e] {
        assert!(!r.to_string().contains("@bob:x"), "{r}");
    }
}

#[test]
fn an_account_of_the_same_id_created_at_another_time_is_not_owned() {
    let a = account();
    let mine = Authority {
        owned: true,
        owned_creation_ts: a.creation_ts,
        ..Authority::default()
    };
    let mut d = desired();
    d.displayname = Some("Alice".into());
    assert!(plan(&d, Some(&a), mine, &Owners::default()).is_ok());
    let elsewhere = Authority {
        owned_creation_ts: Some(1),
        ..mine
    };
    assert!(matches!(
        plan(&d, Some(&a), elsewhere, &Owners::default()),
        Err(Refusal::AdoptionNotRequested { .. })
    ));
    // With adoption asked for and allowed, it is adopted (and recorded anew).
    let adopting = Authority {
        adopt_requested: true,
        adoption_allowed: true,
        ..elsewhere
    };
    assert!(plan(&d, Some(&a), adopting, &Owners::default()).unwrap().adopt);
    // Statuses from before the creation time was recorded still own.
    let legacy = Authority {
        owned_creation_ts: None,
        ..mine
    };
    assert!(plan(&d, Some(&a), legacy, &Owners::default()).is_ok());
}

#[test]
fn admin_needs_the_policy() {
    let mut d = desired();
    d.admin = Some(true);
    assert_eq!(
        plan(&d, None, Authority::default(), &Owners::default()),
        Err(Refusal::AdminNotAllowed)
    );
    assert_eq!(
        plan(&d, Some(&account()), owned(), &Owners::default()),
        Err(Refusal::AdminNotAllowed)
    );
    let allowed = Authority {
        owned: true,
        admin_allowed: true,
        ..Authority::default()
    };
    assert_eq!(update_with(&d, &account(), allowed).admin, Some(true));
    // admin: false needs no permission.
    d.admin = Some(false);
    assert!(plan(&d, Some(&account()), owned(), &Owners::default()).is_ok());
}

/// The names of the fields a Synapse body sends: the plan's fields found
/// in the JSON body, in the plan's order.
fn body_fields(u: &UserUpdate) -> Vec<&'static str> {
    let body = serde_json::to_value(u).unwrap();
    FIELD_NAMES
        .iter()
        .copied()
        .filter(|name| body.get(name).is_some())
        .collect()
}

fn update_with(d: &Desired, a: &Account, authority: Authority) -> UserUpdate {
    match plan(d, Some(a), authority, &Owners::default()).unwrap().action {
        Some(Action::Update(c)) => user_update(&c, false),
        other => panic!("expected an update, got {other:?}"),
    }
}

#[test]
fn lookups_cover_what_would_be_added_only() {
    let mut d = desired();
    d.threepids = Some(vec![email("held@example.org"), email("new@example.org")]);
    d.external_ids = Some(vec![ext("oidc", "1"), ext("oidc", "2")]);
    let mut a = account();
    a.threepids = vec![email("held@example.org"), email("dropped@example.org")];
    a.external_ids = vec![ext("oidc", "1")];
    assert_eq!(
        lookups(&d, Some(&a)),
        Lookups {
            threepids: vec![email("new@example.org")],
            external_ids: vec![ext("oidc", "2")]
        }
    );
    // Before the account exists, everything is looked up.
    assert_eq!(lookups(&d, None).threepids.len(), 2);
    assert_eq!(lookups(&d, None).external_ids.len(), 2);
    // Unmanaged fields need no lookups.
    assert_eq!(lookups(&desired(), Some(&a)), Lookups::default());
}

#[test]
fn a_threepid_of_another_account_is_a_conflict_even_before_create() {
    let mut d = desired();
    d.threepids = Some(vec![email("bob@example.org")]);
    let owners = Owners {
        threepids: vec![(email("bob@example.org"), Some("@bob:example.org".into()))],
        ..Owners::default()
    };
    let expected = Refusal::ThreepidInUse {
        medium: "email".into(),
        address: "bob@example.org".into(),
        owner: "@bob:example.org".into(),
    };
    assert_eq!(plan(&d, None, Authority::default(), &owners), Err(expected.clone()));
    assert_eq!(plan(&d, Some(&account()), owned(), &owners), Err(expected));
}

#[test]
fn an_external_id_of_another_account_is_a_conflict() {
    let mut d = desired();
    d.external_ids = Some(vec![ext("oidc", "7")]);
    let owners = Owners {
        external_ids: vec![(ext("oidc", "7"), Some("@bob:example.org".into()))],
        ..Owners::default()
    };
    assert!(matches!(
        plan(&d, Some(&account()), owned(), &owners),
        Err(Refusal::ExternalIdInUse { .. })
    ));
}

#[test]
fn free_or_own_threepids_are_no_conflict() {
    let mut d = desired();
    d.threepids = Some(vec![email("a@example.org"), email("b@example.org")]);
    let owners = Owners {
        threepids: vec![
            (email("a@example.org"), None),
            (email("b@example.org"), Some("@alice:example.org".into())),
        ],
        ..Owners::default()
    };
    assert!(plan(&d, Some(&account()), owned(), &owners).is_ok());
}

#[test]
fn desired_from_spec_normalises_and_keeps_unset_fields_unmanaged() {
    let spec = MatrixUserSpec {
        homeserver_ref: HomeserverRef { name: "hs".into() },
        localpart: None,
        display_name: Some("Alice".into()),
        avatar_url: None,
        admin: None,
        deactivated: Some(false),
        locked: None,
        user_type: None,
        password: None,
        threepids: Some(vec![
            ThreepidSpec {
                medium: ThreepidMedium::Email,
                address: " Alice@Example.ORG ".into(),
            },
            ThreepidSpec {
                medium: ThreepidMedium::Email,
                address: "alice@example.org".into(),
            },
            ThreepidSpec {
                medium: ThreepidMedium::Msisdn,
                address: "447700900000".into(),
            },
        ]),
        external_ids: Some(vec![ExternalIdSpec {
            auth_provider: "oidc".into(),
            external_id: "Abc".into(),
        }]),
        rooms: None,
        deletion_policy: DeletionPolicy::default(),
        adopt: false,
        management_policy: Default::default(),
    };
    let d = desired_from_spec(&spec, user_id(), None);
    assert_eq!(
        d.threepids,
        Some(vec![email("alice@example.org"), msisdn("447700900000")])
    );
    assert_eq!(
        d.external_ids,
        Some(vec![ext("oidc", "Abc")]),
        "external ids are case-sensitive"
    );
    assert_eq!(d.displayname.as_deref(), Some("Alice"));
    assert_eq!((d.admin, d.locked, d.avatar_url, d.user_type), (None, None, None, None));
    assert_eq!(d.deactivated, Some(false));
}

#[test]
fn deletion_policies() {
    let active = account();
    let mut deactivated = account();
    deactivated.deactivated = true;
    let mut erased = deactivated.clone();
    erased.erased = true;
    use DeletionPolicy::*;
    let deactivate = Ok(DeletionAction::Deactivate { erase: false });
    let erase = Ok(DeletionAction::Deactivate { erase: true });
    type Case<'a> = (
        DeletionPolicy,
        bool,
        Option<&'a Account>,
        Result<DeletionAction, Untouched>,
    );
    let cases: [Case; 12] = [
        (Deactivate, true, Some(&active), deactivate),
        (Deactivate, true, Some(&deactivated), Err(Untouched::AlreadyDone)),
        (Deactivate, true, None, Err(Untouched::AccountGone)),
        (Deactivate, false, Some(&active), Err(Untouched::NotOwned)),
        (Erase, true, Some(&active), erase),
        (Erase, true, Some(&deactivated), erase),
        (Erase, true, Some(&erased), Err(Untouched::AlreadyDone)),
        (Erase, false, Some(&active), Err(Untouched::NotOwned)),
        (Erase, true, None, Err(Untouched::AccountGone)),
        (Retain, true, Some(&active), Err(Untouched::Retained)),
        (Retain, true, Some(&deactivated), Err(Untouched::Retained)),
        (Retain, false, Some(&active), Err(Untouched::Retained)),
    ];
    for (policy, owned, account, expected) in cases {
        let authority = Authority {
            owned,
            ..Authority::default()
        };
        assert_eq!(
            plan_deletion(policy, authority, account),
            expected,
            "{policy:?} owned={owned} {account:?}"
        );
    }
    // Owned, but recorded with another creation time: not this account.
    let other_time = Authority {
        owned: true,
        owned_creation_ts: Some(1),
        ..Authority::default()
    };
    assert_eq!(
        plan_deletion(Deactivate, other_time, Some(&active)),
        Err(Untouched::NotOwned)
    );
    let same_time = Authority {
        owned_creation_ts: active.creation_ts,
        ..other_time
    };
    assert_eq!(plan_deletion(Deactivate, same_time, Some(&active)), deactivate);
    // Created under a pending creation the operator could not record.
    let pending = Authority {
        pending_creation: Some(PendingCreation::at(active.creation_ts.unwrap())),
        ..Authority::default()
    };
    assert_eq!(plan_deletion(Deactivate, pending, Some(&active)), deactivate);
}

#[test]
fn a_pending_creation_covers_accounts_created_in_its_window_only() {
    let p = PendingCreation::at(1_000);
    for (ts, covered) in [
        (1_000, true),
        (1_000 - CLOCK_SKEW_SECS, true),
        (1_000 - CLOCK_SKEW_SECS - 1, false),
        (1_000 + PENDING_CREATION_LIFETIME_SECS + CLOCK_SKEW_SECS, true),
        (1_000 + PENDING_CREATION_LIFETIME_SECS + CLOCK_SKEW_SECS + 1, false),
        (0, false),
    ] {
        assert_eq!(p.covers(ts), covered, "{ts}");
    }
    // Retried creates widen the window to the last one.
    let retried = PendingCreation {
        last_requested_at: 1_200,
        ..p
    };
    assert!(retried.covers(1_200 + PENDING_CREATION_LIFETIME_SECS));
    assert!(!retried.covers(1_000 - CLOCK_SKEW_SECS - 1));
}

#[test]
fn an_account_made_by_a_pending_creation_is_recorded_as_created_not_adopted() {
    let a = account();
    let authority = Authority {
        pending_creation: Some(PendingCreation::at(a.creation_ts.unwrap() - 2)),
        ..Authority::default()
    };
    let d = Desired {
        displayname: Some("Alice".into()),
        ..desired()
    };
    let p = plan(&d, Some(&a), authority, &Owners::default()).unwrap();
    assert!(p.created_by_pending && !p.adopt);
    assert!(p.action.is_some(), "the fields follow at once");
    // The same account created long after the request is someone else's.
    let late = Authority {
        pending_creation: Some(PendingCreation::at(a.creation_ts.unwrap() - 3_600)),
        ..Authority::default()
    };
    assert!(matches!(
        plan(&d, Some(&a), late, &Owners::default()),
        Err(Refusal::AdoptionNotRequested { .. })
    ));
}

#[test]
fn an_owned_account_whose_creation_time_was_not_told_is_known_by_the_pending_record() {
    // Created by shared-secret registration: owned, the time not yet read.
    let a = account();
    let ts = a.creation_ts.unwrap();
    let owned = |pending| Authority {
        owned: true,
        pending_creation: pending,
        ..Authority::default()
    };
    assert!(owned(Some(PendingCreation::at(ts - 2))).owns(&a));
    assert!(
        !owned(Some(PendingCreation::at(ts - 3_600))).owns(&a),
        "made at another time"
    );
    assert!(owned(None).owns(&a), "no record, no time: as before");
    // A recorded time still decides alone.
    let recorded = Authority {
        owned_creation_ts: Some(ts),
        ..owned(Some(PendingCreation::at(ts - 3_600)))
    };
    assert!(recorded.owns(&a));
}

#[test]
fn field_names_name_fields_never_values() {
    let c = Changes {
        password: Some(PasswordChange {
            value: SecretString::new("hunter2"),
            logout_devices: true,
        }),
        threepids: Some(vec![email("a@example.org")]),
        ..Changes::default()
    };
    assert_eq!(c.field_names(), vec!["password", "threepids"]);
    assert!(!format!("{:?}", c.field_names()).contains("hunter2"));
}

/// Status is written by whoever may patch it: a forged pending creation at
/// the ends of i64 (or an account's creation time there) must neither
/// overflow the window — a panic in a debug build — nor wrap it around.
#[test]
fn a_pending_creation_at_the_ends_of_time_neither_overflows_nor_wraps() {
    for (first, last) in [
        (i64::MAX, i64::MAX),
        (i64::MIN, i64::MIN),
        (i64::MIN, i64::MAX),
        (i64::MAX - 1, i64::MAX - 1),
    ] {
        let p = PendingCreation {
            requested_at: first,
            last_requested_at: last,
        };
        for ts in [i64::MIN, -1, 0, 1_700_000_000, i64::MAX] {
            let covered = p.covers(ts);
            // Saturated, the window is [first - skew, last + lifetime + skew]
            // cut at the ends of i64.
            let want = i128::from(ts) >= i128::from(first) - i128::from(CLOCK_SKEW_SECS)
                && i128::from(ts) <= i128::from(last) + i128::from(PENDING_CREATION_LIFETIME_SECS + CLOCK_SKEW_SECS);
            assert_eq!(covered, want, "{p:?} covers {ts}");
        }
    }
    // An account created at the end of time, under an ordinary record.
    let a = Account {
        creation_ts: Some(i64::MAX),
        ..account()
    };
    let authority = Authority {
        owned: true,
        pending_creation: Some(PendingCreation::at(i64::MAX)),
        ..Authority::default()
    };
    assert!(authority.owns(&a));
    assert!(authority.created_by_pending(&a));
}

// ---- rooms ----

fn names(list: &[&str]) -> Vec<RoomName> {
    list.iter().map(|n| RoomName(n.to_string())).collect()
}

fn rec(room_id: &str, alias: Option<&str>, joined: bool) -> ManagedRoom {
    ManagedRoom {
        room_id: room_id.into(),
        alias: alias.map(Into::into),
        joined,
    }
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|i| i.to_string()).collect()
}

fn joins(p: &RoomPlan) -> Vec<(&str, &str)> {
    p.join
        .iter()
        .map(|j| (j.room_id.as_str(), j.listed_as.as_str()))
        .collect()
}

fn ids(rooms: &[ManagedRoom]) -> Vec<&str> {
    rooms.iter().map(|r| r.room_id.as_str()).collect()
}

#[test]
fn the_membership_diff_joins_what_is_missing_and_leaves_only_what_the_operator_joined() {
    let resolved: std::collections::BTreeMap<RoomName, String> =
        [(RoomName("#general:ex.org".into()), "!gen".to_string())].into();
    struct Case {
        name: &'static str,
        listed: &'static [&'static str],
        recorded: Vec<ManagedRoom>,
        joined: &'static [&'static str],
        active: bool,
        join: Vec<(&'static str, &'static str)>,
        leave: Vec<&'static str>,
        kept: Vec<ManagedRoom>,
        joined_listed: usize,
    }
    let cases = vec![
        Case {
            name: "a new listed room is joined, by ID or by alias",
            listed: &["!a", "#general:ex.org"],
            recorded: vec![],
            joined: &[],
            active: true,
            join: vec![("!a", "!a"), ("!gen", "#general:ex.org")],
            leave: vec![],
            kept: vec![],
            joined_listed: 0,
        },
        Case {
            name: "in every listed room the operator joined: nothing to do",
            listed: &["!a", "#general:ex.org"],
            recorded: vec![rec("!a", None, true), rec("!gen", Some("#general:ex.org"), true)],
            joined: &["!a", "!gen", "!own"],
            active: true,
            join: vec![],
            leave: vec![],
            kept: vec![rec("!a", None, true), rec("!gen", Some("#general:ex.org"), true)],
            joined_listed: 2,
        },
        Case {
            name: "a listed room the account is in on its own stays its own (not recorded)",
            listed: &["!own"],
            recorded: vec![],
            joined: &["!own"],
            active: true,
            join: vec![],
            leave: vec![],
            kept: vec![],
            joined_listed: 1,
        },
        Case {
            name: "a room the operator joined, no longer listed, is left",
            listed: &["!a"],
            recorded: vec![rec("!a", None, true), rec("!b", None, true)],
            joined: &["!a", "!b"],
            active: true,
            join: vec![],
            leave: vec!["!b"],
            kept: vec![rec("!a", None, true)],
            joined_listed: 1,
        },
        Case {
            name: "rooms: [] leaves what the operator joined, never the account's own",
            listed: &[],
            recorded: vec![rec("!b", None, true)],
            joined: &["!b", "!own"],
            active: true,
            join: vec![],
            leave: vec!["!b"],
            kept: vec![],
            joined_listed: 0,
        },
        Case {
            name: "a room the account left on its own is joined again (drift)",
            listed: &["!a"],
            recorded: vec![rec("!a", None, true)],
            joined: &[],
            active: true,
            join: vec![("!a", "!a")],
            leave: vec![],
            kept: vec![],
            joined_listed: 0,
        },
        Case {
            name: "an unlisted room the account left already: the record goes, nothing to leave",
            listed: &[],
            recorded: vec![rec("!b", None, true)],
            joined: &[],
            active: true,
            join: vec![],
            leave: vec![],
            kept: vec![],
            joined_listed: 0,
        },
        Case {
            name: "deactivated: nothing joined, records kept for re-activation, none left",
            listed: &["!a"],
            recorded: vec![rec("!a", None, true), rec("!b", None, true)],
            joined: &[],
            active: false,
            join: vec![],
            leave: vec![],
            kept: vec![rec("!a", None, false)],
            joined_listed: 0,
        },
        Case {
            name: "re-activated: the records' rooms are joined again",
            listed: &["!a"],
            recorded: vec![rec("!a", None, false)],
            joined: &[],
            active: true,
            join: vec![("!a", "!a")],
            leave: vec![],
            kept: vec![],
            joined_listed: 0,
        },
        Case {
            name: "a room listed by ID and by alias is one membership",
            listed: &["!gen", "#general:ex.org"],
            recorded: vec![],
            joined: &[],
            active: true,
            join: vec![("!gen", "!gen")],
            leave: vec![],
            kept: vec![],
            joined_listed: 0,
        },
        Case {
            name: "an alias that points elsewhere now: the new room joined, the old left",
            listed: &["#general:ex.org"],
            recorded: vec![rec("!old", Some("#general:ex.org"), true)],
            joined: &["!old"],
            active: true,
            join: vec![("!gen", "#general:ex.org")],
            leave: vec!["!old"],
            kept: vec![],
            joined_listed: 0,
        },
    ];
    for c in cases {
        let p = plan_rooms(&names(c.listed), &c.recorded, &set(c.joined), &resolved, c.active);
        assert_eq!(joins(&p), c.join, "{}: join", c.name);
        assert_eq!(ids(&p.leave), c.leave, "{}: leave", c.name);
        assert_eq!(p.kept, c.kept, "{}: kept", c.name);
        assert_eq!(p.joined_listed, c.joined_listed, "{}: joined_listed", c.name);
        assert!(p.unresolved.is_empty(), "{}", c.name);
    }
}

#[test]
fn an_alias_not_looked_up_names_its_recorded_room_and_an_unknown_one_is_reported() {
    let none = std::collections::BTreeMap::new();
    // Recorded and the account is in it: no lookup, and the record stands.
    let recorded = vec![rec("!gen", Some("#general:ex.org"), true)];
    let listed = names(&["#general:ex.org", "#nosuch:ex.org"]);
    let p = plan_rooms(&listed, &recorded, &set(&["!gen"]), &none, true);
    assert_eq!(p.kept, recorded);
    assert_eq!(p.unresolved, names(&["#nosuch:ex.org"]));
    assert!(p.join.is_empty() && p.leave.is_empty());
    // A failed lookup of a recorded alias holds nothing up: its record's
    // room is joined again.
    let p = plan_rooms(&listed[..1], &recorded, &set(&[]), &none, true);
    assert_eq!(joins(&p), vec![("!gen", "#general:ex.org")]);
}

#[test]
fn aliases_are_looked_up_only_when_their_room_is_not_known_to_be_joined() {
    let listed = names(&["#a:ex.org", "#b:ex.org", "!c", "#a:ex.org"]);
    let recorded = vec![rec("!a", Some("#a:ex.org"), true), rec("!b", Some("#b:ex.org"), true)];
    // In both: a resync costs no lookup.
    assert!(aliases_to_resolve(&listed, &recorded, &set(&["!a", "!b"]), true).is_empty());
    // Left !b: its alias is looked up again (it may point elsewhere now).
    assert_eq!(
        aliases_to_resolve(&listed, &recorded, &set(&["!a"]), true),
        names(&["#b:ex.org"])
    );
    // New: looked up once, however often listed.
    assert_eq!(
        aliases_to_resolve(&listed, &[], &set(&[]), true),
        names(&["#a:ex.org", "#b:ex.org"])
    );
    // Deactivated: nothing is joined, nothing looked up.
    assert!(aliases_to_resolve(&listed, &[], &set(&[]), false).is_empty());
}
