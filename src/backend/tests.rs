//! Every field × backend: from a desired and an observed account, the plan's
//! changes, and what each backend sends for them — Synapse's PUT body and
//! MAS's calls.

use super::mas::{MasCall, calls};
use super::synapse::{UserUpdate, user_update};
use crate::account::{Account, ExternalId, Threepid, UserId};
use crate::plan::{Action, Authority, Changes, Desired, DesiredPassword, Owners, plan};
use crate::secret::SecretString;

fn observed() -> Account {
    Account {
        name: "@alice:example.org".into(),
        account_id: Some("01J0000000000000000000ALICE".into()),
        displayname: Some("alice".into()),
        creation_ts: Some(1_700_000_000),
        ..Account::default()
    }
}

fn email(address: &str) -> Threepid {
    Threepid {
        medium: "email".into(),
        address: address.into(),
    }
}

fn link(provider: &str, subject: &str) -> ExternalId {
    ExternalId {
        auth_provider: provider.into(),
        external_id: subject.into(),
    }
}

fn password(value: &str) -> DesiredPassword {
    DesiredPassword {
        value: SecretString::new(value),
        applied: false,
        logout_devices: true,
    }
}

type Setup = fn(&mut Desired, &mut Account);

struct Case {
    name: &'static str,
    setup: Setup,
    synapse: UserUpdate,
    mas: Vec<MasCall>,
}

fn cases() -> Vec<Case> {
    let none = UserUpdate::default;
    vec![
        Case {
            name: "displayname",
            setup: |d, _| d.displayname = Some("Alice".into()),
            synapse: UserUpdate {
                displayname: Some("Alice".into()),
                ..none()
            },
            mas: vec![MasCall::Profile(Changes {
                displayname: Some("Alice".into()),
                ..Changes::default()
            })],
        },
        Case {
            name: "avatar_url",
            setup: |d, _| d.avatar_url = Some("mxc://example.org/a".into()),
            synapse: UserUpdate {
                avatar_url: Some("mxc://example.org/a".into()),
                ..none()
            },
            mas: vec![MasCall::Profile(Changes {
                avatar_url: Some("mxc://example.org/a".into()),
                ..Changes::default()
            })],
        },
        Case {
            name: "user_type",
            setup: |d, _| d.user_type = Some(crate::api::UserType::Bot),
            synapse: UserUpdate {
                user_type: Some("bot".into()),
                ..none()
            },
            mas: vec![MasCall::Profile(Changes {
                user_type: Some("bot".into()),
                ..Changes::default()
            })],
        },
        Case {
            name: "admin",
            setup: |d, _| d.admin = Some(true),
            synapse: UserUpdate {
                admin: Some(true),
                ..none()
            },
            mas: vec![MasCall::SetAdmin(true)],
        },
        Case {
            name: "admin revoked",
            setup: |d, a| {
                d.admin = Some(false);
                a.admin = true;
            },
            synapse: UserUpdate {
                admin: Some(false),
                ..none()
            },
            mas: vec![MasCall::SetAdmin(false)],
        },
        Case {
            name: "lock",
            setup: |d, _| d.locked = Some(true),
            synapse: UserUpdate {
                locked: Some(true),
                ..none()
            },
            mas: vec![MasCall::Lock],
        },
        Case {
            name: "unlock",
            setup: |d, a| {
                d.locked = Some(false);
                a.locked = true;
            },
            synapse: UserUpdate {
                locked: Some(false),
                ..none()
            },
            mas: vec![MasCall::Unlock],
        },
        Case {
            name: "password",
            setup: |d, _| d.password = Some(password("correct horse battery staple")),
            synapse: UserUpdate {
                password: Some(SecretString::new("correct horse battery staple")),
                logout_devices: Some(true),
                ..none()
            },
            mas: vec![MasCall::SetPassword, MasCall::EndSessions],
        },
        Case {
            name: "emails added and removed",
            setup: |d, a| {
                d.threepids = Some(vec![email("new@example.org")]);
                a.threepids = vec![email("old@example.org")];
            },
            synapse: UserUpdate {
                threepids: Some(vec![email("new@example.org")]),
                ..none()
            },
            mas: vec![
                MasCall::AddEmail("new@example.org".into()),
                MasCall::DeleteEmail("old@example.org".into()),
            ],
        },
        Case {
            name: "SSO links added and removed",
            setup: |d, a| {
                d.external_ids = Some(vec![link("01JPROVIDER", "alice-new")]);
                a.external_ids = vec![link("01JPROVIDER", "alice-old")];
            },
            synapse: UserUpdate {
                external_ids: Some(vec![link("01JPROVIDER", "alice-new")]),
                ..none()
            },
            mas: vec![
                MasCall::AddLink(link("01JPROVIDER", "alice-new")),
                MasCall::DeleteLink(link("01JPROVIDER", "alice-old")),
            ],
        },
        Case {
            name: "deactivate, with a profile change first and no emails",
            setup: |d, _| {
                d.deactivated = Some(true);
                d.displayname = Some("Gone".into());
                d.threepids = Some(vec![email("a@example.org")]);
            },
            synapse: UserUpdate {
                displayname: Some("Gone".into()),
                deactivated: Some(true),
                ..none()
            },
            mas: vec![
                MasCall::Profile(Changes {
                    displayname: Some("Gone".into()),
                    ..Changes::default()
                }),
                MasCall::Deactivate,
            ],
        },
        Case {
            // Deactivation deleted MAS's emails and cleared the displayname:
            // both come back, after the re-activation.
            name: "reactivate with password, emails and displayname",
            setup: |d, a| {
                a.deactivated = true;
                a.displayname = None;
                d.deactivated = Some(false);
                d.password = Some(password("correct horse battery staple"));
                d.threepids = Some(vec![email("a@example.org")]);
                d.displayname = Some("Alice".into());
            },
            // Synapse: re-activation carries the password; the rest waits a
            // round (see user_update).
            synapse: UserUpdate {
                deactivated: Some(false),
                password: Some(SecretString::new("correct horse battery staple")),
                logout_devices: Some(true),
                ..none()
            },
            mas: vec![
                MasCall::Reactivate,
                MasCall::SetPassword,
                MasCall::EndSessions,
                MasCall::AddEmail("a@example.org".into()),
                MasCall::Profile(Changes {
                    displayname: Some("Alice".into()),
                    ..Changes::default()
                }),
            ],
        },
        Case {
            name: "in sync",
            setup: |d, a| {
                d.displayname = Some("alice".into());
                d.locked = Some(false);
                d.admin = Some(false);
                d.threepids = Some(vec![email("A@Example.org".to_ascii_lowercase().as_str())]);
                a.threepids = vec![email("a@example.org")];
            },
            synapse: none(),
            mas: vec![],
        },
    ]
}

#[test]
fn every_field_on_both_backends() {
    let authority = Authority {
        owned: true,
        admin_allowed: true,
        ..Authority::default()
    };
    for case in cases() {
        let mut desired = Desired::existing(UserId::new("alice", "example.org").unwrap());
        let mut account = observed();
        (case.setup)(&mut desired, &mut account);
        let p = plan(&desired, Some(&account), authority, &Owners::default()).unwrap();
        let changes = match p.action {
            Some(Action::Update(c)) => c,
            None => Default::default(),
            Some(Action::Create) => panic!("{}: an existing account is never created", case.name),
        };
        assert_eq!(user_update(&changes, false), case.synapse, "{}: Synapse", case.name);
        assert_eq!(calls(&account, &changes), case.mas, "{}: MAS", case.name);
    }
}

#[test]
fn a_new_accounts_password_goes_with_its_fields_and_logs_nothing_out() {
    let mut desired = Desired::existing(UserId::new("alice", "example.org").unwrap());
    desired.displayname = Some("Alice".into());
    desired.password = Some(password("correct horse battery staple"));
    let p = plan(
        &desired,
        Some(&observed()),
        Authority {
            owned: true,
            ..Authority::default()
        },
        &Owners::default(),
    )
    .unwrap();
    let Some(Action::Update(changes)) = p.action else {
        panic!("an update")
    };
    // An account of long standing: the password alone, after the rest.
    assert_eq!(
        user_update(&changes, false),
        UserUpdate {
            displayname: Some("Alice".into()),
            ..UserUpdate::default()
        }
    );
    // Created by this sync: one PUT, with no logout (there are no devices,
    // and a resend after a failure must end no session either).
    assert_eq!(
        user_update(&changes, true),
        UserUpdate {
            displayname: Some("Alice".into()),
            password: Some(SecretString::new("correct horse battery staple")),
            logout_devices: Some(false),
            ..UserUpdate::default()
        }
    );
}
