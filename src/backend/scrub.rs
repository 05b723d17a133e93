//! Text a homeserver sent, made fit for conditions, Events and logs.
//!
//! Whatever answers at the homeserver URL can echo the request it got (a
//! debugging proxy, a misconfigured gateway), and the request carries the
//! admin token and maybe a password. So the little text kept of an answer is
//! cleaned of every secret value of that request, of control characters,
//! and cut short.

use crate::secret::SecretString;

/// Put where a secret value was.
const REDACTED: &str = "***";

/// The secret values one request carries. An echo of the request may show
/// each in many forms: as it is (a header), JSON-escaped (`\"`, `\\`, or
/// every character as `\uXXXX`), form-encoded (`%2B`, `+` for a space),
/// HTML-escaped (`&amp;`, `&#x2B;`), upper- or lower-cased, or one of
/// these inside another. So the text is matched as it is and decoded, once
/// and twice, without regard to case; a Basic or Bearer credential also
/// without its scheme (its Base64 alone).
pub(crate) struct RequestSecrets {
    /// Each secret value's characters, case-folded.
    secrets: Vec<Vec<char>>,
}

impl RequestSecrets {
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a SecretString>) -> Self {
        let mut values = Vec::new();
        for secret in secrets {
            let raw = secret.expose();
            values.push(raw);
            // The credential of an Authorization header value, alone.
            for scheme in ["Basic ", "Bearer "] {
                if raw.len() > scheme.len()
                    && raw.is_char_boundary(scheme.len())
                    && raw[..scheme.len()].eq_ignore_ascii_case(scheme)
                {
                    values.push(raw[scheme.len()..].trim_start());
                }
            }
        }
        let secrets = values
            .into_iter()
            .filter(|v| !v.is_empty())
            .map(|v| v.chars().map(fold).collect())
            .collect();
        Self { secrets }
    }

    /// `text` without the request's secrets, without control characters,
    /// and at most about `max_bytes` long.
    ///
    /// Secrets go first: cut first, a secret at the cut would be left as a
    /// prefix that no longer matches.
    pub(crate) fn scrub(&self, text: &str, max_bytes: usize) -> String {
        bounded(&printable(&self.redact(text, max_bytes)), max_bytes)
    }

    /// Like [`scrub`](Self::scrub), for a value kept in status (a version):
    /// printable ASCII only, anything else shown as `?`, at most
    /// `max_bytes` long.
    pub(crate) fn scrub_ascii(&self, text: &str, max_bytes: usize) -> String {
        let ascii: String = self
            .redact(text, max_bytes)
            .chars()
            .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' })
            .collect();
        if ascii.len() <= max_bytes {
            return ascii;
        }
        // ASCII: any byte is a character boundary; `...` marks the cut.
        format!("{}...", &ascii[..max_bytes.saturating_sub(3)])
    }

    /// `text`, cut a little after `max_bytes` (far enough that a secret
    /// starting before the cut, in any of its forms, is still whole), with
    /// each secret's place replaced by [`REDACTED`].
    fn redact(&self, text: &str, max_bytes: usize) -> String {
        let longest = self.secrets.iter().map(Vec::len).max().unwrap_or(0);
        // `&#x0010FFFF;` is the longest form of one character decoded here,
        // twice over; one character more tells the caller's cut to mark it.
        let margin = longest.saturating_mul(2 * MAX_ESCAPE_BYTES).saturating_add(4);
        let text = cut(text, max_bytes.saturating_add(margin));
        if self.secrets.is_empty() {
            return text.to_string();
        }
        let raw = view_of(text);
        let once = decode(&raw);
        let twice = decode(&once);
        let mut places: Vec<(usize, usize)> = Vec::new();
        for view in [&raw, &once, &twice] {
            for secret in &self.secrets {
                places.extend(matches(view, secret));
            }
        }
        places.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in places {
            if end <= at {
                continue;
            }
            if start >= at {
                out.push_str(&text[at..start]);
                out.push_str(REDACTED);
            }
            // Else it overlaps the last place: one mark for both.
            at = end;
        }
        out.push_str(&text[at..]);
        out
    }
}

/// The longest escape decoded as one character: `&#x0010FFFF;`.
const MAX_ESCAPE_BYTES: usize = 12;

/// A character of a text as matched, and where it was in the text (byte
/// offsets): one character of the text, or an escape decoded.
#[derive(Clone, Copy, Debug)]
struct Decoded {
    c: char,
    /// What else it may stand for: a `+` is a space in a form-encoded body.
    alt: Option<char>,
    start: usize,
    end: usize,
}

impl Decoded {
    fn is(&self, folded: char) -> bool {
        fold(self.c) == folded || self.alt.is_some_and(|a| fold(a) == folded)
    }
}

/// `c` in the one case the matching compares (lower), when that is one
/// character.
fn fold(c: char) -> char {
    let mut lower = c.to_lowercase();
    match (lower.next(), lower.next()) {
        (Some(l), None) => l,
        _ => c,
    }
}

fn cut(text: &str, max_bytes: usize) -> &str {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn view_of(text: &str) -> Vec<Decoded> {
    text.char_indices()
        .map(|(i, c)| Decoded {
            c,
            alt: None,
            start: i,
            end: i + c.len_utf8(),
        })
        .collect()
}

/// The places (byte ranges of the text) where `secret` is in `view`.
fn matches<'a>(view: &'a [Decoded], secret: &'a [char]) -> impl Iterator<Item = (usize, usize)> + 'a {
    let n = secret.len();
    (0..view.len().saturating_sub(n - 1)).filter_map(move |i| {
        let window = &view[i..i + n];
        window
            .iter()
            .zip(secret)
            .all(|(d, s)| d.is(*s))
            .then(|| (window[0].start, window[n - 1].end))
    })
}

/// `view` with every escape it holds decoded: JSON's (`\uXXXX`, with
/// surrogate pairs, and `\"` and its kin), percent-encoding (UTF-8 bytes
/// as `%XX`), HTML's character references (`&#43;`, `&#x2B;`, `&amp;` and
/// a few other names), and `+` as a space besides itself.
fn decode(view: &[Decoded]) -> Vec<Decoded> {
    let mut out = Vec::with_capacity(view.len());
    let mut i = 0;
    while i < view.len() {
        let d = view[i];
        let decoded = match d.c {
            '\\' => json_escape(view, i),
            '%' => {
                let (chars, next) = percent_run(view, i);
                if next > i {
                    out.extend(chars);
                    i = next;
                    continue;
                }
                None
            }
            '&' => html_reference(view, i),
            '+' => Some((Decoded { alt: Some(' '), ..d }, i + 1)),
            _ => None,
        };
        match decoded {
            Some((c, next)) => {
                out.push(c);
                i = next;
            }
            None => {
                out.push(d);
                i += 1;
            }
        }
    }
    out
}

fn hex_value(view: &[Decoded], from: usize, digits: usize) -> Option<u32> {
    let slice = view.get(from..from + digits)?;
    slice.iter().try_fold(0u32, |n, d| Some(n * 16 + d.c.to_digit(16)?))
}

fn spanning(c: char, view: &[Decoded], first: usize, next: usize) -> (Decoded, usize) {
    let d = Decoded {
        c,
        alt: None,
        start: view[first].start,
        end: view[next - 1].end,
    };
    (d, next)
}

/// The JSON escape at `i` (a `\`): the character and where the next begins.
fn json_escape(view: &[Decoded], i: usize) -> Option<(Decoded, usize)> {
    let c = match view.get(i + 1)?.c {
        'u' => {
            let unit = hex_value(view, i + 2, 4)?;
            let after = i + 6;
            if (0xD800..0xDC00).contains(&unit)
                && view.get(after).is_some_and(|d| d.c == '\\')
                && view.get(after + 1).is_some_and(|d| d.c == 'u')
                && let Some(low) = hex_value(view, after + 2, 4)
                && (0xDC00..0xE000).contains(&low)
            {
                let c = char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?;
                return Some(spanning(c, view, i, after + 6));
            }
            return Some(spanning(char::from_u32(unit).unwrap_or('\u{FFFD}'), view, i, after));
        }
        '"' => '"',
        '\\' => '\\',
        '/' => '/',
        'b' => '\u{8}',
        'f' => '\u{C}',
        'n' => '\n',
        'r' => '\r',
        't' => '\t',
        _ => return None,
    };
    Some(spanning(c, view, i, i + 2))
}

/// The run of `%XX` at `i`, decoded as UTF-8 (a byte that is not part of
/// a character becomes U+FFFD), and where the next character begins; no
/// characters and `i` when there is no `%XX` at `i`.
fn percent_run(view: &[Decoded], i: usize) -> (Vec<Decoded>, usize) {
    let mut bytes = Vec::new();
    let mut next = i;
    while view.get(next).is_some_and(|d| d.c == '%')
        && let Some(byte) = hex_value(view, next + 1, 2)
    {
        bytes.push(byte as u8);
        next += 3;
    }
    let mut chars = Vec::new();
    // Each byte came from three elements of the view, starting at i + 3k.
    let mut k = 0;
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            let first = i + 3 * k;
            k += c.len_utf8();
            chars.push(spanning(c, view, first, i + 3 * k).0);
        }
        for _ in chunk.invalid() {
            chars.push(spanning('\u{FFFD}', view, i + 3 * k, i + 3 * k + 3).0);
            k += 1;
        }
    }
    (chars, next)
}

/// The HTML character reference at `i` (a `&`), and where the next
/// character begins.
fn html_reference(view: &[Decoded], i: usize) -> Option<(Decoded, usize)> {
    let end = (i + 1..view.len().min(i + MAX_ESCAPE_BYTES)).find(|&j| view[j].c == ';')?;
    let name: String = view[i + 1..end].iter().map(|d| d.c).collect();
    let c = if let Some(number) = name.strip_prefix('#') {
        let code = match number.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => number.parse().ok()?,
        };
        char::from_u32(code).unwrap_or('\u{FFFD}')
    } else {
        match name.to_ascii_lowercase().as_str() {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            "plus" => '+',
            "sol" => '/',
            "bsol" => '\\',
            "equals" => '=',
            "percnt" => '%',
            "num" => '#',
            "colon" => ':',
            "semi" => ';',
            "commat" => '@',
            "excl" => '!',
            "quest" => '?',
            "dollar" => '$',
            "lowbar" => '_',
            "nbsp" => ' ',
            _ => return None,
        }
    };
    Some(spanning(c, view, i, end + 1))
}

/// `text` with control characters and the invisible bidi controls replaced
/// by spaces: a message must not start new log lines or reorder what
/// `kubectl describe` shows.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() || is_bidi_control(c) { ' ' } else { c })
        .collect()
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// At most `max_bytes` of `text`, cut on a character boundary; `…` marks a cut.
fn bounded(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_string();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(values: &[&str]) -> RequestSecrets {
        let values: Vec<SecretString> = values.iter().map(|v| SecretString::new(*v)).collect();
        RequestSecrets::new(&values)
    }

    #[test]
    fn every_secret_of_the_request_is_redacted() {
        let s = secrets(&["the-token", "hunter2"]);
        assert_eq!(
            s.scrub("Bearer the-token sent {\"password\":\"hunter2\"}, hunter2 again", 200),
            "Bearer *** sent {\"password\":\"***\"}, *** again"
        );
    }

    #[test]
    fn json_escaped_secrets_are_redacted_too() {
        let s = secrets(&[r#"pa"ss\word"#]);
        // How the body carries it, echoed as text.
        assert_eq!(
            s.scrub(r#"body {"password":"pa\"ss\\word"}"#, 200),
            r#"body {"password":"***"}"#
        );
        assert_eq!(s.scrub(r#"raw pa"ss\word"#, 200), "raw ***");
    }

    #[test]
    fn a_secret_holding_another_is_redacted_whole() {
        let s = secrets(&["abc", "xxabcxx"]);
        assert_eq!(s.scrub("[xxabcxx] [abc]", 200), "[***] [***]");
    }

    #[test]
    fn empty_secrets_redact_nothing() {
        assert_eq!(secrets(&[""]).scrub("plain text", 200), "plain text");
    }

    #[test]
    fn control_and_bidi_characters_are_replaced() {
        let s = secrets(&[]);
        assert_eq!(
            s.scrub("line one\nfake log line\r\t\u{1b}[31mred\u{202E}desrever", 200),
            "line one fake log line   [31mred desrever"
        );
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let s = secrets(&[]);
        assert_eq!(s.scrub("short", 200), "short");
        let cut = s.scrub(&"é".repeat(150), 201);
        assert_eq!(cut, format!("{}…", "é".repeat(100)));
        assert_eq!(s.scrub(&"a".repeat(300), 200).len(), 200 + '…'.len_utf8());
    }

    /// `text` scrubbed of `secret` shows none of it: no `***`-free run of
    /// the text still holds it, in any case.
    fn assert_redacted(secret: &str, echo: &str) {
        let s = secrets(&[secret]);
        let text = format!("echo: {echo} end");
        let out = s.scrub(&text, 1000);
        assert_eq!(out, "echo: *** end", "{echo:?}");
    }

    #[test]
    fn the_basic_credential_is_redacted_without_its_scheme() {
        let s = secrets(&["Basic bXh1OnNlY3JldA=="]);
        assert_eq!(s.scrub("got bXh1OnNlY3JldA== from you", 200), "got *** from you");
        assert_eq!(
            s.scrub("Authorization: Basic bXh1OnNlY3JldA==", 200),
            "Authorization: ***"
        );
        // Its padding form-encoded, too.
        assert_eq!(s.scrub("cred=bXh1OnNlY3JldA%3D%3D", 200), "cred=***");
        let s = secrets(&["Bearer the-token"]);
        assert_eq!(s.scrub("token the-token", 200), "token ***");
    }

    #[test]
    fn form_encoded_secrets_are_redacted() {
        let secret = "a+b/c=d e&f%g";
        assert_redacted(secret, "a%2Bb%2Fc%3Dd+e%26f%25g");
        assert_redacted(secret, "a%2bb%2fc%3dd%20e%26f%25g");
        // A form-encoded space, and a `+` that is one.
        assert_redacted("two words", "two+words");
        assert_redacted("pa ss+word", "pa+ss%2Bword");
        // UTF-8 percent-encoded.
        assert_redacted("pässwörd", "p%C3%A4ssw%C3%B6rd");
    }

    #[test]
    fn echoes_in_another_case_are_redacted() {
        assert_redacted("hunter2-Secret", "HUNTER2-SECRET");
        assert_redacted("hunter2-Secret", "hunter2-secret");
        assert_redacted("Grüße-Ünïcode", "grüße-ÜNÏCODE");
        assert_redacted("a+b", "A%2BB");
    }

    #[test]
    fn unicode_escaped_json_echoes_are_redacted() {
        assert_redacted("hunter2+x", r"\u0068\u0075\u006e\u0074\u0065\u0072\u0032\u002b\u0078");
        assert_redacted("hunter2+x", r"HUNTER2\u002Bx");
        assert_redacted("pa\"ss", r#"pa\"ss"#);
        // A character outside the BMP, as a surrogate pair.
        assert_redacted("key🔑", r"key\ud83d\udd11");
        assert_redacted("a/b", r"a\/b");
    }

    #[test]
    fn html_escaped_echoes_are_redacted() {
        assert_redacted("a&b<c>\"d'e+f", "a&amp;b&lt;c&gt;&quot;d&#39;e&#x2B;f");
        assert_redacted("a&b+c", "a&AMP;b&#43;c");
        assert_redacted("x=y", "x&equals;y");
        // HTML-escaped JSON: escapes within escapes.
        assert_redacted("p\"w", "p\\&quot;w");
        assert_redacted("a+b", "a&amp;#x2B;b");
    }

    #[test]
    fn text_that_only_looks_encoded_stays() {
        let s = secrets(&["secret"]);
        assert_eq!(
            s.scrub("100% &amp; \\u00zz %zz &bogus; +", 200),
            "100% &amp; \\u00zz %zz &bogus; +"
        );
    }

    #[test]
    fn status_values_are_printable_ascii_and_short() {
        let s = secrets(&["the-token"]);
        assert_eq!(s.scrub_ascii("1.163.2 (the-token)", 100), "1.163.2 (***)");
        assert_eq!(s.scrub_ascii("1.0\n\u{202E}évil\u{200B}", 100), "1.0???vil?");
        let long = s.scrub_ascii(&"9".repeat(10_000), 100);
        assert_eq!(long, format!("{}...", "9".repeat(97)));
    }

    #[test]
    fn secrets_are_redacted_before_the_cut() {
        // Cut first, the first 4 bytes of the secret would stay.
        let s = secrets(&["SECRETVALUE"]);
        assert_eq!(s.scrub("aaaaaaSECRETVALUE and more", 10), "aaaaaa*** …");
    }
}
