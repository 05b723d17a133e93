use super::*;
use crate::account::{ExternalId, Threepid};

#[test]
fn object_names_are_rfc_1123_subdomains() {
    for ok in ["alice", "a.b", "a-b", "0day", "a1.b2-c"] {
        assert!(is_object_name(ok), "{ok}");
    }
    for bad in [
        "",
        "a_b",
        "a=b",
        "a/b",
        "a+b",
        "-a",
        "a-",
        ".a",
        "a..b",
        "a.-b",
        "A",
        &"a".repeat(254),
    ] {
        assert!(!is_object_name(bad), "{bad}");
    }
}

#[test]
fn a_localpart_that_is_a_name_is_its_own_name_and_others_get_a_derived_one() {
    let names = object_names(&["alice", "bot_relay", "a=b", "a_b"], &BTreeSet::new());
    assert_eq!(names[0], ("alice".to_string(), false));
    for (name, differs) in &names[1..] {
        assert!(*differs && is_object_name(name), "{name}");
    }
    assert!(names[1].0.starts_with("bot-relay-"), "{:?}", names[1]);
    // `a=b` and `a_b` read alike: the hash keeps them apart.
    assert_ne!(names[2].0, names[3].0);
    // Deterministic: the same input, the same names.
    assert_eq!(
        names,
        object_names(&["alice", "bot_relay", "a=b", "a_b"], &BTreeSet::new())
    );
}

#[test]
fn a_derived_name_never_takes_the_name_of_an_account_or_a_matrixuser() {
    // The localpart whose derived name another localpart is.
    let derived = derived_name("x_y", 8);
    let names = object_names(&[derived.as_str(), "x_y"], &BTreeSet::new());
    assert_eq!(names[0], (derived.clone(), false));
    assert_ne!(names[1].0, derived);
    assert!(names[1].1);
    // A MatrixUser of the namespace already named like an account: the
    // account gets a derived name and spec.localpart.
    let taken: BTreeSet<String> = ["alice".to_string()].into();
    let names = object_names(&["alice"], &taken);
    assert_ne!(names[0].0, "alice");
    assert!(names[0].1);
    // Both the short and the long hash taken: numbered.
    let taken: BTreeSet<String> = [derived_name("x_y", 8), derived_name("x_y", 16)].into();
    assert_eq!(
        object_names(&["x_y"], &taken)[0].0,
        format!("{}-2", derived_name("x_y", 16))
    );
}

fn listed(localpart: &str) -> ListedAccount {
    ListedAccount {
        user_id: format!("@{localpart}:example.org"),
        localpart: localpart.into(),
        admin: false,
        deactivated: false,
        locked: false,
        guest: false,
        user_type: None,
        mas_id: None,
    }
}

#[test]
fn skips_by_cause() {
    let mut known = Known::default();
    known.recorded.insert("@managed:example.org".into());
    known.claimed.insert("claimed".into());
    let filter = regex::Regex::new("^team-").unwrap();
    let skip = |a: &ListedAccount, deact: bool, f: Option<&regex::Regex>| {
        skip_before_reading(a, "@admin:example.org", &known, deact, f)
    };
    assert_eq!(skip(&listed("admin"), false, None), Some(Skip::Admin));
    assert_eq!(skip(&listed("managed"), false, None), Some(Skip::Managed));
    assert_eq!(skip(&listed("claimed"), false, None), Some(Skip::Managed));
    let guest = ListedAccount {
        guest: true,
        ..listed("123")
    };
    assert_eq!(skip(&guest, false, None), Some(Skip::Guest));
    let gone = ListedAccount {
        deactivated: true,
        ..listed("team-old")
    };
    assert_eq!(skip(&gone, false, None), Some(Skip::Deactivated));
    assert_eq!(skip(&gone, true, Some(&filter)), None);
    assert_eq!(skip(&listed("other"), false, Some(&filter)), Some(Skip::Filtered));
    // Another team's deactivated or managed account is only filtered out.
    let theirs = ListedAccount {
        deactivated: true,
        ..listed("other")
    };
    assert_eq!(skip(&theirs, false, Some(&filter)), Some(Skip::Filtered));
    assert_eq!(skip(&listed("managed"), false, Some(&filter)), Some(Skip::Filtered));
    assert_eq!(skip(&listed("Upper"), false, None), Some(Skip::UnmanageableLocalpart));
    assert_eq!(skip(&listed("_bridge"), false, None), Some(Skip::UnmanageableLocalpart));
    assert_eq!(skip(&listed("team-a"), false, Some(&filter)), None);
}

#[test]
fn the_spec_holds_what_the_account_has_adopted_without_password_and_retained() {
    let account = Account {
        name: "@alice:example.org".into(),
        admin: true,
        locked: true,
        deactivated: true,
        user_type: Some("bot".into()),
        displayname: Some("Alice".into()),
        avatar_url: Some("not a uri".into()),
        threepids: vec![
            Threepid {
                medium: "email".into(),
                address: "b@example.org".into(),
            },
            Threepid {
                medium: "email".into(),
                address: "a@example.org".into(),
            },
        ],
        external_ids: vec![ExternalId {
            auth_provider: "oidc".into(),
            external_id: "1".into(),
        }],
        ..Default::default()
    };
    let (spec, left_out) = spec_of(&account, None, "hs", ManagementPolicy::Observe);
    assert!(spec.adopt && spec.password.is_none());
    assert_eq!(spec.deletion_policy, DeletionPolicy::Retain);
    assert_eq!(spec.management_policy, ManagementPolicy::Observe);
    assert_eq!(spec.display_name.as_deref(), Some("Alice"));
    assert_eq!(spec.avatar_url, None);
    assert_eq!(
        (spec.admin, spec.deactivated, spec.locked),
        (Some(true), Some(true), None)
    );
    assert_eq!(spec.user_type, Some(UserType::Bot));
    let addresses: Vec<&str> = spec.threepids.iter().flatten().map(|t| t.address.as_str()).collect();
    assert_eq!(addresses, ["a@example.org", "b@example.org"]);
    assert_eq!(spec.external_ids.as_ref().map(Vec::len), Some(1));
    assert_eq!(left_out.len(), 2, "{left_out:?}");
}

#[test]
fn output_is_deterministic_and_lists_every_file() {
    let imported = |l: &str| Imported {
        user_id: format!("@{l}:example.org"),
        localpart: l.into(),
        account: Account {
            name: format!("@{l}:example.org"),
            ..Default::default()
        },
    };
    let a = manifests(
        vec![imported("bob"), imported("al_ice")],
        "chat",
        "hs",
        ManagementPolicy::Observe,
        &BTreeSet::new(),
    )
    .unwrap();
    let b = manifests(
        vec![imported("al_ice"), imported("bob")],
        "chat",
        "hs",
        ManagementPolicy::Observe,
        &BTreeSet::new(),
    )
    .unwrap();
    assert_eq!(a, b);
    assert!(a[0].text.contains("localpart: al_ice"), "{}", a[0].text);
    assert_eq!(a[1].name, "bob");
    let k = kustomization(&a, "chat", "hs");
    assert!(k.contains(&format!("- {}.yaml\n- bob.yaml\n", a[0].name)), "{k}");
    // Every document parses back as a MatrixUser.
    for doc in multi_document(&a).split("---\n").filter(|d| !d.is_empty()) {
        let u: MatrixUser = serde_yaml::from_str(doc).unwrap();
        assert_eq!(u.metadata.namespace.as_deref(), Some("chat"));
    }
}
