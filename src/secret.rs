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

const DIGEST_SCHEME: &str = "pbkdf2-sha256";
const DIGEST_ITERATIONS: u32 = 10_000;
/// Digests asking for more work than this match nothing.
const MAX_DIGEST_ITERATIONS: u32 = 1_000_000;
const SALT_LEN: usize = 16;
const HASH_LEN: usize = 32;

/// A salted PBKDF2-HMAC-SHA256 digest of `password`, in the form
/// `pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>`.
///
/// Stored in status to tell whether the password in the Secret is the one
/// last applied; the salt and the iterations make it useless as a lookup
/// table key and slow to brute-force.
pub fn password_digest(password: &SecretString) -> String {
    let mut salt = [0u8; SALT_LEN];
    // SystemRandom fails only when the OS has no randomness at all; a fixed
    // salt then is still better than refusing to record the password.
    let _ = SystemRandom::new().fill(&mut salt);
    digest_with(password, DIGEST_ITERATIONS, &salt)
}

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

/// Whether `digest` (as made by [`password_digest`]) was made of `password`.
/// A digest that does not parse matches nothing.
pub fn digest_matches(digest: &str, password: &SecretString) -> bool {
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
        let pw = SecretString::new("correct horse");
        let d = password_digest(&pw);
        assert!(d.starts_with("pbkdf2-sha256$10000$"));
        assert!(!d.contains("correct"));
        assert!(digest_matches(&d, &pw));
        assert!(!digest_matches(&d, &SecretString::new("correct horse ")));
    }

    #[test]
    fn digests_are_salted() {
        let pw = SecretString::new("same");
        let (a, b) = (password_digest(&pw), password_digest(&pw));
        assert_ne!(a, b);
        assert!(digest_matches(&a, &pw) && digest_matches(&b, &pw));
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
        ] {
            assert!(!digest_matches(d, &pw), "{d}");
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
