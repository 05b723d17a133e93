//! Password digests known to match: checking a status digest against a
//! password costs PBKDF2's milliseconds of CPU, and every reconcile of an
//! in-sync MatrixUser would pay it again.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::secret::{DigestKey, SecretString};

/// A status digest and the SHA-256 of the password it was found to match,
/// per MatrixUser (namespace, name).
type Known = HashMap<(String, String), (String, [u8; 32])>;

/// Per MatrixUser, a status digest known to match a password.
#[derive(Default)]
pub(super) struct DigestMemo(Mutex<Known>);

impl DigestMemo {
    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `digest` (from the status of `user`) is one of `password`:
    /// remembered, or computed with `key` (and then remembered).
    pub(super) fn matches(
        &self,
        user: (String, String),
        digest: &str,
        password: &SecretString,
        key: &DigestKey,
    ) -> bool {
        let fingerprint = sha256(password);
        if self
            .lock()
            .get(&user)
            .is_some_and(|(d, f)| d == digest && *f == fingerprint)
        {
            return true;
        }
        let matches = crate::secret::digest_matches(digest, password, key);
        if matches {
            self.remember(user, digest.to_string(), password);
        }
        matches
    }

    /// Remembers that `digest` is one of `password`, for [`Self::matches`].
    pub(super) fn remember(&self, user: (String, String), digest: String, password: &SecretString) {
        self.lock().insert(user, (digest, sha256(password)));
    }

    pub(super) fn retain(&self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.lock().retain(|(ns, name), _| keep(ns, name));
    }

    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

fn sha256(password: &SecretString) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, password.expose().as_bytes());
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
        let user = || ("chat".to_string(), "alice".to_string());
        let password = SecretString::new("correct horse");
        let digest = password_digest(&password, &key);
        assert!(memo.matches(user(), &digest, &password, &key));
        assert_eq!(memo.len(), 1);
        // Remembered: it matches even under another key now.
        assert!(memo.matches(user(), &digest, &password, &DigestKey::generate()));
        assert!(!memo.matches(user(), &digest, &SecretString::new("battery staple"), &key));
        assert!(!memo.matches(user(), "pbkdf2-sha256$1$00$00", &password, &key));
        memo.retain(|_, name| name != "alice");
        assert_eq!(memo.len(), 0);
    }
}
