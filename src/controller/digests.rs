//! Password digests known to match: checking a status digest against a
//! password costs PBKDF2's milliseconds of CPU, and every reconcile of an
//! in-sync MatrixUser would pay it again.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::Mutex;

use crate::secret::{DigestKey, SecretString};

/// A MatrixUser, as a hash of its namespace and name: the memo keeps no
/// copy of any name (two maps of names cost ≈0.3 KiB per user at 10,000).
/// Two users with one hash share an entry, which then holds the fact of one
/// of them: a fact about a digest and a password, true whoever holds them,
/// so a shared entry costs a PBKDF2 check, never a false match.
type UserKey = u64;

/// The SHA-256 of a status digest and of the password it was found to
/// match, per MatrixUser.
type Known = HashMap<UserKey, ([u8; 32], [u8; 32])>;

/// Per MatrixUser, a status digest known to match a password.
#[derive(Default)]
pub(super) struct DigestMemo {
    hasher: std::hash::RandomState,
    known: Mutex<Known>,
}

impl DigestMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self, (namespace, name): (&str, &str)) -> UserKey {
        self.hasher.hash_one((namespace, name))
    }

    /// Whether `digest` (from the status of `user`, a namespace and name)
    /// is one of `password`: remembered, or computed with `key` (and then
    /// remembered).
    pub(super) fn matches(&self, user: (&str, &str), digest: &str, password: &SecretString, key: &DigestKey) -> bool {
        let fact = (sha256(digest.as_bytes()), sha256(password.expose().as_bytes()));
        if self.lock().get(&self.key(user)) == Some(&fact) {
            return true;
        }
        let matches = crate::secret::digest_matches(digest, password, key);
        if matches {
            self.lock().insert(self.key(user), fact);
        }
        matches
    }

    /// Remembers that `digest` is one of `password`, for [`Self::matches`].
    pub(super) fn remember(&self, user: (&str, &str), digest: &str, password: &SecretString) {
        let fact = (sha256(digest.as_bytes()), sha256(password.expose().as_bytes()));
        self.lock().insert(self.key(user), fact);
    }

    /// Forgets every MatrixUser but `present` ones.
    pub(super) fn retain_users<'a>(&self, present: impl IntoIterator<Item = (&'a str, &'a str)>) {
        let present: HashSet<UserKey> = present.into_iter().map(|user| self.key(user)).collect();
        self.lock().retain(|user, _| present.contains(user));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::password_digest;

    #[test]
    fn a_digest_is_computed_once_per_password_and_never_matches_another() {
        let key = DigestKey::generate();
        let memo = DigestMemo::default();
        let user = ("chat", "alice");
        let password = SecretString::new("correct horse");
        let digest = password_digest(&password, &key);
        assert!(memo.matches(user, &digest, &password, &key));
        assert_eq!(memo.len(), 1);
        // Remembered: it matches even under another key now.
        assert!(memo.matches(user, &digest, &password, &DigestKey::generate()));
        assert!(!memo.matches(user, &digest, &SecretString::new("battery staple"), &key));
        assert!(!memo.matches(user, "pbkdf2-sha256$1$00$00", &password, &key));
        // Another user's fact is not this one's.
        assert!(!memo.matches(("chat", "bob"), &digest, &password, &DigestKey::generate()));
        memo.retain_users([("chat", "bob")]);
        assert_eq!(memo.len(), 0);
    }
}
