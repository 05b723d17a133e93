//! The account fields a MatrixUser manages, in one table: for each, what
//! the spec asks for, what a change to it carries, which part of an
//! account a backend reads it with, how it is taken from the spec and how
//! it is compared with the account as the backend reports it. [`Desired`],
//! [`Changes`], the diff and the names in Events and logs follow from it.
//!
//! A new field takes a row here, its field in the spec
//! ([`crate::api::MatrixUserSpec`]) and in [`Account`] (what the backends
//! report), and its calls in each backend: both destructure [`Changes`]
//! without `..`, so the compiler names every place that must learn it.

use std::collections::BTreeSet;

use crate::account::{Account, ExternalId, Threepid, UserId, normalize_address};
use crate::api::{MatrixUserSpec, UserType};

use super::{DesiredPassword, PasswordChange, normalize_threepid};

/// The part of an account a backend reads a field with: MAS keeps each in
/// a call of its own (the user, Synapse's profile, the emails, the upstream
/// links); Synapse's one GET answers them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The account itself: its state, flags and password.
    Account,
    /// Display name, avatar and user type: Synapse's, under MAS too.
    Profile,
    Threepids,
    ExternalIds,
}

/// What the diff knows besides the two values it compares.
#[derive(Clone, Copy, Debug)]
pub struct Situation {
    /// The spec re-activates a deactivated account.
    pub reactivating: bool,
    /// The account is deactivated once the plan ran.
    pub ends_deactivated: bool,
    /// The account is erased and stays deactivated: its profile stays
    /// erased.
    pub keep_erased: bool,
}

macro_rules! account_fields {
    ($(
        $(#[$doc:meta])*
        $field:ident: $wanted:ty => $change:ty,
            part $part:ident,
            from spec $from_spec:expr,
            compare $compare:expr;
    )*) => {
        /// The account as the spec describes it. `None` fields are not managed.
        #[derive(Clone, Debug, PartialEq)]
        pub struct Desired {
            pub user_id: UserId,
            $($(#[$doc])* pub $field: Option<$wanted>,)*
        }

        impl Desired {
            /// An account that exists and has nothing else managed.
            pub fn existing(user_id: UserId) -> Self {
                Self { user_id, $($field: None,)* }
            }

            /// The account a spec describes, but for the password (which
            /// is read from a Secret).
            pub(super) fn of_spec(spec: &MatrixUserSpec, user_id: UserId) -> Self {
                Self {
                    user_id,
                    $($field: {
                        let from_spec: fn(&MatrixUserSpec) -> Option<$wanted> = $from_spec;
                        from_spec(spec)
                    },)*
                }
            }

            /// Whether the spec manages a field read with `part`.
            pub fn manages(&self, part: Part) -> bool {
                false $(|| (Part::$part == part && self.$field.is_some()))*
            }
        }

        /// The fields of an account to change, each to the value given;
        /// `None` is left as it is. Threepids and external ids are the
        /// whole set wanted.
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct Changes {
            $(pub $field: Option<$change>,)*
        }

        /// The names of the fields, as Events, logs and Synapse's user API
        /// call them, in the order [`Changes::field_names`] gives them.
        pub const FIELD_NAMES: &[&str] = &[$(stringify!($field)),*];

        impl Changes {
            pub fn is_empty(&self) -> bool {
                $(self.$field.is_none())&&*
            }

            /// The names of the fields changed (never their values).
            pub fn field_names(&self) -> Vec<&'static str> {
                let mut out = Vec::new();
                $(if self.$field.is_some() {
                    out.push(stringify!($field));
                })*
                out
            }

            /// The changes to fields read with `part`.
            pub fn of_part(&self, part: Part) -> Changes {
                Changes {
                    $($field: self.$field.clone().filter(|_| Part::$part == part),)*
                }
            }
        }

        /// The managed fields of `desired` that differ on `account`, in the
        /// situation the diff worked out.
        pub(super) fn changes(desired: &Desired, account: &Account, situation: &Situation) -> Changes {
            Changes {
                $($field: desired.$field.as_ref().and_then(|wanted| {
                    let compare: fn(&$wanted, &Account, &Situation) -> Option<$change> = $compare;
                    compare(wanted, account, situation)
                }),)*
            }
        }
    };
}

account_fields! {
    /// Set from a Secret, never read back: compared by its digest in status.
    password: DesiredPassword => PasswordChange,
        part Account,
        from spec |_| None,
        compare |p, _, s| {
            // Deactivation removed the password hash: re-activation sets it
            // again, applied before or not.
            (!s.ends_deactivated && (s.reactivating || !p.applied)).then(|| PasswordChange {
                value: p.value.clone(),
                logout_devices: p.logout_devices,
            })
        };
    // Synapse reports a cleared displayname or avatar as null and takes ""
    // to clear one.
    displayname: String => String,
        part Profile,
        from spec |s| s.display_name.clone(),
        compare |name, a, s| profile_text(name, a.displayname.as_deref(), s);
    avatar_url: String => String,
        part Profile,
        from spec |s| s.avatar_url.clone(),
        compare |url, a, s| profile_text(url, a.avatar_url.as_deref(), s);
    /// Normalised (see [`normalize_threepid`]), in spec order, each once.
    threepids: Vec<Threepid> => Vec<Threepid>,
        part Threepids,
        from spec |s| s.threepids.as_ref().map(|ts| {
            dedup(ts.iter().map(|t| normalize_threepid(t.medium, &t.address)))
        }),
        // Deactivation removes every threepid: a deactivated account has
        // none to manage, and re-adding them would fight Synapse forever.
        compare |ts, a, s| {
            (!s.ends_deactivated && threepid_set(ts) != threepid_set(&a.threepids)).then(|| ts.clone())
        };
    /// In spec order, each once.
    external_ids: Vec<ExternalId> => Vec<ExternalId>,
        part ExternalIds,
        from spec |s| s.external_ids.as_ref().map(|ids| {
            dedup(ids.iter().map(|e| ExternalId {
                auth_provider: e.auth_provider.clone(),
                external_id: e.external_id.clone(),
            }))
        }),
        compare |ids, a, _| (set_of(ids) != set_of(&a.external_ids)).then(|| ids.clone());
    admin: bool => bool,
        part Account,
        from spec |s| s.admin,
        compare |admin, a, _| flag(*admin, a.admin);
    deactivated: bool => bool,
        part Account,
        from spec |s| s.deactivated,
        compare |deactivated, a, _| flag(*deactivated, a.deactivated);
    locked: bool => bool,
        part Account,
        from spec |s| s.locked,
        compare |locked, a, _| flag(*locked, a.locked);
    user_type: UserType => String,
        part Profile,
        from spec |s| s.user_type,
        compare |t, a, _| (a.user_type.as_deref() != Some(t.as_str())).then(|| t.as_str().to_string());
}

/// A managed display name or avatar: an erased account that stays
/// deactivated keeps it cleared.
fn profile_text(wanted: &str, held: Option<&str>, situation: &Situation) -> Option<String> {
    (!situation.keep_erased && held.unwrap_or("") != wanted).then(|| wanted.to_string())
}

/// A flag: the wanted value, if the account's differs.
fn flag(wanted: bool, held: bool) -> Option<bool> {
    (wanted != held).then_some(wanted)
}

/// Threepids as Synapse stores them (see [`normalize_address`]), as a set.
pub(super) fn threepid_set(threepids: &[Threepid]) -> BTreeSet<(String, String)> {
    threepids
        .iter()
        .map(|t| (t.medium.clone(), normalize_address(&t.medium, &t.address)))
        .collect()
}

pub(super) fn set_of<T: Ord>(items: &[T]) -> BTreeSet<&T> {
    items.iter().collect()
}

pub(super) fn dedup<T: Ord + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = BTreeSet::new();
    items.filter(|i| seen.insert(i.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;

    fn every_field() -> Changes {
        Changes {
            password: Some(PasswordChange {
                value: SecretString::new("pw"),
                logout_devices: false,
            }),
            displayname: Some("Alice".into()),
            avatar_url: Some("mxc://example.org/a".into()),
            threepids: Some(vec![]),
            external_ids: Some(vec![]),
            admin: Some(true),
            deactivated: Some(true),
            locked: Some(true),
            user_type: Some("bot".into()),
        }
    }

    #[test]
    fn every_field_is_named_once_in_table_order() {
        // Synapse's names of the PUT body's keys, which Events show.
        let names = [
            "password",
            "displayname",
            "avatar_url",
            "threepids",
            "external_ids",
            "admin",
            "deactivated",
            "locked",
            "user_type",
        ];
        assert_eq!(FIELD_NAMES, names);
        assert_eq!(every_field().field_names(), FIELD_NAMES);
        assert!(Changes::default().field_names().is_empty());
        assert!(Changes::default().is_empty() && !every_field().is_empty());
    }

    #[test]
    fn each_field_is_read_with_one_part() {
        let all = every_field();
        let parts = [Part::Account, Part::Profile, Part::Threepids, Part::ExternalIds];
        let mut named: Vec<&str> = parts.iter().flat_map(|p| all.of_part(*p).field_names()).collect();
        named.sort_unstable();
        let mut expected = FIELD_NAMES.to_vec();
        expected.sort_unstable();
        assert_eq!(named, expected);
        assert_eq!(
            all.of_part(Part::Profile).field_names(),
            ["displayname", "avatar_url", "user_type"]
        );
    }

    #[test]
    fn a_desired_manages_the_parts_of_its_fields() {
        let mut d = Desired::existing(UserId::new("alice", "example.org").unwrap());
        assert!(!d.manages(Part::Profile) && !d.manages(Part::Account));
        d.user_type = Some(UserType::Bot);
        assert!(d.manages(Part::Profile));
        assert!(!d.manages(Part::Threepids) && !d.manages(Part::ExternalIds));
        d.external_ids = Some(vec![]);
        assert!(d.manages(Part::ExternalIds));
    }
}
