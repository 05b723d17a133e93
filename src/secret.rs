//! Secret values (passwords, access tokens) and what may be recorded of them.

use std::fmt;
use std::num::NonZeroU32;

use ring::rand::{SecureRandom, SystemRandom};

/// A secret value. `Debug` and `Display` print `***`, so it can sit in any
/// struct that is logged or put into an error.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl serde::Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(SecretString)
    }
}

/// The operator's key for password digests, kept in a Secret of its own
/// namespace (see `controller::digest_key`): a digest in status is then of
/// no use to whoever reads it without that key, even for a weak password.
#[derive(Clone)]
pub struct DigestKey([u8; DIGEST_KEY_LEN]);

pub const DIGEST_KEY_LEN: usize = 32;

impl DigestKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut key = [0u8; DIGEST_KEY_LEN];
        // As for salts: no randomness at all is no reason to stop.
        let _ = SystemRandom::new().fill(&mut key);
        Self(key)
    }

    /// The key of `bytes`, which must be [`DIGEST_KEY_LEN`] long.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    fn hmac(&self) -> ring::hmac::Key {
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0)
    }
}

impl fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DigestKey(***)")
    }
}

/// Digests made with the operator's key: `hmac-sha256$<salt hex>$<mac hex>`.
const KEYED_SCHEME: &str = "hmac-sha256";

/// Digests of earlier releases, still recognised (and replaced by a keyed
/// one once they match).
const DIGEST_SCHEME: &str = "pbkdf2-sha256";
/// What earlier releases used; made here only by tests now.
#[cfg(test)]
const DIGEST_ITERATIONS: u32 = 10_000;
/// Digests asking for more work than this match nothing.
const MAX_DIGEST_ITERATIONS: u32 = 1_000_000;
const SALT_LEN: usize = 16;
#[cfg(test)]
const HASH_LEN: usize = 32;

/// A salted HMAC-SHA256 digest of `password` under the operator's `key`,
/// in the form `hmac-sha256$<salt hex>$<mac hex>`.
///
/// Stored in status to tell whether the password in the Secret is the one
/// last applied. Without the key it cannot be checked against guesses, so
/// reading status tells nothing of the password, however weak (a plain
/// salted hash, even a slow one, can be brute-forced offline).
pub fn password_digest(password: &SecretString, key: &DigestKey) -> String {
    let mut salt = [0u8; SALT_LEN];
    // SystemRandom fails only when the OS has no randomness at all; a fixed
    // salt then is still better than refusing to record the password.
    let _ = SystemRandom::new().fill(&mut salt);
    let mac = ring::hmac::sign(&key.hmac(), &[&salt[..], password.expose().as_bytes()].concat());
    format!("{KEYED_SCHEME}${}${}", hex(&salt), hex(mac.as_ref()))
}

/// Whether `digest` is keyed, as [`password_digest`] makes them now.
pub fn is_keyed(digest: &str) -> bool {
    digest.starts_with(KEYED_SCHEME) && digest.as_bytes().get(KEYED_SCHEME.len()) == Some(&b'$')
}

#[cfg(test)]
fn digest_with(password: &SecretString, iterations: u32, salt: &[u8]) -> String {
    let mut hash = [0u8; HASH_LEN];
    let iterations_nz = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations_nz,
        salt,
        password.expose().as_bytes(),
        &mut hash,
    );
    format!("{DIGEST_SCHEME}${iterations}${}${}", hex(salt), hex(&hash))
}

/// Whether `digest` (as made by [`password_digest`] with `key`, or by an
/// earlier release) was made of `password`. A digest that does not parse
/// matches nothing.
pub fn digest_matches(digest: &str, password: &SecretString, key: &DigestKey) -> bool {
    if is_keyed(digest) {
        let mut parts = digest.split('$').skip(1);
        let (Some(salt), Some(mac), None) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let (Some(salt), Some(mac)) = (unhex(salt), unhex(mac)) else {
            return false;
        };
        let message = [&salt[..], password.expose().as_bytes()].concat();
        return ring::hmac::verify(&key.hmac(), &message, &mac).is_ok();
    }
    legacy_digest_matches(digest, password)
}

/// [`digest_matches`] for the salted PBKDF2 digests of earlier releases.
fn legacy_digest_matches(digest: &str, password: &SecretString) -> bool {
    let mut parts = digest.split('$');
    let (Some(DIGEST_SCHEME), Some(iterations), Some(salt), Some(hash), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(iterations), Some(salt), Some(hash)) = (iterations.parse::<u32>(), unhex(salt), unhex(hash)) else {
        return false;
    };
    // The digest comes from status, which others may write: bound the work.
    let Some(iterations) = NonZeroU32::new(iterations).filter(|n| n.get() <= MAX_DIGEST_ITERATIONS) else {
        return false;
    };
    ring::pbkdf2::verify(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        &salt,
        password.expose().as_bytes(),
        &hash,
    )
    .is_ok()
}

/// A new random password of `len` characters from an alphabet without
/// look-alikes or characters that need quoting in a shell.
pub fn generate_password(len: usize) -> Result<SecretString, ring::error::Unspecified> {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let rng = SystemRandom::new();
    let mut out = String::with_capacity(len);
    let mut byte = [0u8; 1];
    while out.len() < len {
        rng.fill(&mut byte)?;
        // Rejection sampling keeps every character equally likely.
        let limit = 256 - 256 % ALPHABET.len();
        if (byte[0] as usize) < limit {
            out.push(ALPHABET[byte[0] as usize % ALPHABET.len()] as char);
        }
    }
    Ok(SecretString(out))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(***)");
    }

    #[test]
    fn digest_matches_its_password_only() {
        let key = DigestKey::generate();
        let pw = SecretString::new("correct horse");
        let d = password_digest(&pw, &key);
        assert!(d.starts_with("hmac-sha256$"), "{d}");
        assert!(!d.contains("correct"));
        assert!(digest_matches(&d, &pw, &key));
        assert!(!digest_matches(&d, &SecretString::new("correct horse "), &key));
    }

    /// Issue 15, point 10: a digest in status could be brute-forced offline
    /// by whoever reads status. Without the operator's key it tells nothing.
    #[test]
    fn a_digest_cannot_be_checked_without_the_operators_key() {
        let pw = SecretString::new("password1");
        let d = password_digest(&pw, &DigestKey::generate());
        assert!(!digest_matches(&d, &pw, &DigestKey::generate()));
        assert!(!legacy_digest_matches(&d, &pw));
    }

    #[test]
    fn digests_of_earlier_releases_still_match() {
        let pw = SecretString::new("old");
        let legacy = digest_with(&pw, DIGEST_ITERATIONS, b"0123456789abcdef");
        let key = DigestKey::generate();
        assert!(!is_keyed(&legacy));
        assert!(digest_matches(&legacy, &pw, &key));
        assert!(!digest_matches(&legacy, &SecretString::new("new"), &key));
        assert!(is_keyed(&password_digest(&pw, &key)));
    }

    #[test]
    fn digests_are_salted() {
        let key = DigestKey::generate();
        let pw = SecretString::new("same");
        let (a, b) = (password_digest(&pw, &key), password_digest(&pw, &key));
        assert_ne!(a, b);
        assert!(digest_matches(&a, &pw, &key) && digest_matches(&b, &pw, &key));
        assert_eq!(format!("{key:?}"), "DigestKey(***)");
        assert_eq!(DigestKey::from_bytes(key.expose()).unwrap().expose(), key.expose());
        assert!(DigestKey::from_bytes(&[0; 31]).is_none());
    }

    #[test]
    fn malformed_digests_match_nothing() {
        let pw = SecretString::new("x");
        for d in [
            "pbkdf2-sha256$4000000000$00$00",
            "",
            "x",
            "pbkdf2-sha256$0$00$00",
            "pbkdf2-sha256$10$zz$00",
            "md5$1$00$00",
            "pbkdf2-sha256$1$00$00$00",
            "hmac-sha256$00",
            "hmac-sha256$zz$00",
            "hmac-sha256$00$00$00",
        ] {
            assert!(!digest_matches(d, &pw, &DigestKey::generate()), "{d}");
        }
    }

    #[test]
    fn generated_passwords_are_long_distinct_and_plain() {
        let a = generate_password(32).unwrap();
        let b = generate_password(32).unwrap();
        assert_eq!(a.expose().len(), 32);
        assert_ne!(a, b);
        assert!(a.expose().chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
