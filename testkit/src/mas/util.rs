//! Small pieces the stand-in needs and the crate has no dependency for:
//! ULIDs, RFC 3339 timestamps, random tokens, base64 for Basic auth.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ALNUM: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the system's random source");
    bytes
}

/// `n` random characters from `[0-9A-Za-z]`.
pub fn random_alnum(n: usize) -> String {
    let mut out = String::with_capacity(n);
    while out.len() < n {
        for b in random_bytes::<32>() {
            // 248 = 4 * 62: no modulo bias.
            if b < 248 && out.len() < n {
                out.push(ALNUM[(b % 62) as usize] as char);
            }
        }
    }
    out
}

/// `n` random upper-case letters (Synapse-style device IDs).
pub fn random_upper(n: usize) -> String {
    let mut out = String::with_capacity(n);
    while out.len() < n {
        for b in random_bytes::<32>() {
            // 234 = 9 * 26.
            if b < 234 && out.len() < n {
                out.push((b'A' + b % 26) as char);
            }
        }
    }
    out
}

/// A MAS-looking token: `<prefix>_<30 random>_<6 random>`. (Real MAS ends
/// with a CRC32 checksum in base62; nothing here depends on it.)
pub fn token(prefix: &str) -> String {
    format!("{prefix}_{}_{}", random_alnum(30), random_alnum(6))
}

/// Last ULID handed out, as (timestamp ms, 80-bit randomness), so IDs are
/// strictly increasing within the process (MAS lists are ordered by ID, and
/// pagination cursors rely on it).
static LAST_ULID: Mutex<(u64, u128)> = Mutex::new((0, 0));

/// A new ULID (26 Crockford base32 characters), monotonic in this process.
pub fn ulid() -> String {
    let mut last = LAST_ULID.lock().unwrap_or_else(|p| p.into_inner());
    let ms = now_ms();
    let (ms, random) = if ms <= last.0 {
        (last.0, (last.1 + 1) & ((1u128 << 80) - 1))
    } else {
        let bytes = random_bytes::<10>();
        let mut r = 0u128;
        for b in bytes {
            r = (r << 8) | b as u128;
        }
        // Leave headroom so increments within one millisecond never wrap.
        (ms, r >> 1)
    };
    *last = (ms, random);
    let value = ((ms as u128) << 80) | random;
    (0..26)
        .map(|i| CROCKFORD[((value >> (5 * (25 - i))) & 31) as usize] as char)
        .collect()
}

/// Whether `s` looks like a ULID (as MAS's path extractor demands).
pub fn is_ulid(s: &str) -> bool {
    s.len() == 26 && s.bytes().all(|b| CROCKFORD.contains(&b.to_ascii_uppercase())) && s.as_bytes()[0] <= b'7'
}

/// RFC 3339 in UTC with microseconds, as MAS's `DateTime<Utc>` serialises
/// (`2026-01-02T03:04:05.678901Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        (ms % 1000) * 1000
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub fn base64_encode(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.trim().bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => continue,
            _ => return None,
        };
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// The `key=value` pairs of a query string or form body, decoded.
pub fn form_pairs(text: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(text.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)] // `#[test]`s vanish in harness = false binaries (e2e)
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123000Z");
        assert_eq!(
            base64_decode(&base64_encode(b"client:s3cret")).unwrap(),
            b"client:s3cret"
        );
        let (a, b) = (ulid(), ulid());
        assert!(a < b && is_ulid(&a), "{a} {b}");
    }
}
