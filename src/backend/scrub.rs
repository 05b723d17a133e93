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

/// The secret values one request carries, in every form an echo of the
/// request shows them: as they are (the Authorization header) and
/// JSON-escaped (the body).
pub(crate) struct RequestSecrets {
    forms: Vec<String>,
}

impl RequestSecrets {
    pub(crate) fn new<'a>(secrets: impl IntoIterator<Item = &'a SecretString>) -> Self {
        let mut forms = Vec::new();
        for secret in secrets {
            let raw = secret.expose();
            if raw.is_empty() {
                continue;
            }
            let quoted = serde_json::to_string(raw).unwrap_or_default();
            let escaped = quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or_default();
            forms.push(raw.to_string());
            if !escaped.is_empty() && escaped != raw {
                forms.push(escaped.to_string());
            }
        }
        // The longest first: a secret may hold another one.
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        Self { forms }
    }

    /// `text` without the request's secrets, without control characters,
    /// and at most about `max_bytes` long.
    ///
    /// Secrets go first: cut first, a secret at the cut would be left as a
    /// prefix that no longer matches.
    pub(crate) fn scrub(&self, text: &str, max_bytes: usize) -> String {
        let mut text = text.to_string();
        for form in &self.forms {
            if text.contains(form.as_str()) {
                text = text.replace(form.as_str(), REDACTED);
            }
        }
        bounded(&printable(&text), max_bytes)
    }
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

    #[test]
    fn secrets_are_redacted_before_the_cut() {
        // Cut first, the first 4 bytes of the secret would stay.
        let s = secrets(&["SECRETVALUE"]);
        assert_eq!(s.scrub("aaaaaaSECRETVALUE and more", 10), "aaaaaa*** …");
    }
}
