//! The PII guard: results that look like they hold personal data or secrets are not cached.
//!
//! Patterns: e-mail addresses; card numbers (13–19 digits, spaces or dashes allowed) that pass
//! the Luhn check; national id formats (US SSN `123-45-6789`, UK National Insurance number
//! `AB123456C`); API-key-like secrets (AWS access key ids, `sk-`/`sk_live_`-style keys, GitHub
//! and Slack tokens, Google API keys, PEM private keys). The guard errs on the side of not
//! caching: a false positive only costs a cache miss.
//!
//! What is scanned is what a reader of the result would see, not only its raw bytes: JSON
//! escapes (`jane\u0040example.com`, `\u002d`) hide a pattern from a regex over the text, so
//! [`scan_result`] also walks the parsed JSON and scans every string (keys included) and
//! every number. The walk is iterative and visits each value once: its work is bounded by the
//! result's size, which the caller bounds (`cache.max_result_bytes`) before calling.

use std::sync::LazyLock;

use regex::Regex;

/// Which kind of sensitive data a text matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiKind {
    /// An e-mail address.
    Email,
    /// A payment card number passing Luhn.
    CardNumber,
    /// A national identification number.
    NationalId,
    /// An API key, token or private key.
    Secret,
}

impl PiiKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::CardNumber => "card_number",
            PiiKind::NationalId => "national_id",
            PiiKind::Secret => "secret",
        }
    }
}

// The patterns are constants checked by the tests below, so compiling them cannot fail.
static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
        .expect("email pattern")
});
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\b\d(?:[ \-]?\d){12,18}\b").expect("card pattern"));
static NATIONAL_ID: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b\d{3}-\d{2}-\d{4}\b|\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
        .expect("national id pattern")
});
static SECRET: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
        r"|\b(?:sk|rk|pk)[-_](?:live[-_]|test[-_]|proj[-_])?[A-Za-z0-9_\-]{20,}",
        r"|\bgh[pousr]_[A-Za-z0-9]{36,}",
        r"|\bxox[abprs]-[A-Za-z0-9\-]{10,}",
        r"|\bAIza[0-9A-Za-z_\-]{35}",
        r"|-----BEGIN [A-Z ]*PRIVATE KEY-----",
    ))
    .expect("secret pattern")
});

/// The first kind of sensitive data found in `text`, if any.
pub fn scan(text: &str) -> Option<PiiKind> {
    if EMAIL.is_match(text) {
        return Some(PiiKind::Email);
    }
    if CARD.find_iter(text).any(|m| luhn(m.as_str())) {
        return Some(PiiKind::CardNumber);
    }
    if NATIONAL_ID.is_match(text) {
        return Some(PiiKind::NationalId);
    }
    if SECRET.is_match(text) {
        return Some(PiiKind::Secret);
    }
    None
}

/// The first kind of sensitive data in a result's bytes: the raw text, then, if the bytes
/// are JSON, every string and number of the parsed value; if they are not JSON, the text with
/// JSON-style `\uXXXX` escapes decoded (a blob may be JSON that nests past the parser's limit).
pub fn scan_result(bytes: &[u8]) -> Option<PiiKind> {
    let text = String::from_utf8_lossy(bytes);
    if let Some(kind) = scan(&text) {
        return Some(kind);
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v) => scan_json(&v),
        Err(_) => {
            let decoded = decode_escapes(&text);
            scan(&decoded)
        }
    }
}

/// The first kind of sensitive data in any string (object keys included) or number of `v`.
pub fn scan_json(v: &serde_json::Value) -> Option<PiiKind> {
    use serde_json::Value;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        let found = match v {
            Value::String(s) => scan(s),
            // A card number may be a JSON number: 4111111111111111.
            Value::Number(n) => scan(&n.to_string()),
            Value::Array(a) => {
                stack.extend(a.iter());
                None
            }
            Value::Object(m) => {
                for (k, x) in m {
                    if let Some(kind) = scan(k) {
                        return Some(kind);
                    }
                    stack.push(x);
                }
                None
            }
            Value::Null | Value::Bool(_) => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// `text` with JSON string escapes decoded (`\uXXXX`, surrogate pairs, `\n`, `\/`, ...);
/// anything that is not a valid escape is kept as it is.
fn decode_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let hex4 = |it: &mut std::iter::Peekable<std::str::Chars<'_>>| -> Option<u32> {
        let s: String = it.clone().take(4).collect();
        if s.len() == 4 && s.chars().all(|c| c.is_ascii_hexdigit()) {
            for _ in 0..4 {
                it.next();
            }
            u32::from_str_radix(&s, 16).ok()
        } else {
            None
        }
    };
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.peek().copied() {
            Some('u') => {
                chars.next();
                match hex4(&mut chars) {
                    Some(hi @ 0xD800..=0xDBFF) => {
                        let mut ahead = chars.clone();
                        let lo = (ahead.next() == Some('\\') && ahead.next() == Some('u'))
                            .then(|| hex4(&mut ahead))
                            .flatten()
                            .filter(|lo| (0xDC00..=0xDFFF).contains(lo));
                        match lo {
                            Some(lo) => {
                                chars = ahead;
                                let cp = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                                out.push(char::from_u32(cp).unwrap_or('\u{fffd}'));
                            }
                            None => out.push('\u{fffd}'),
                        }
                    }
                    Some(cp) => out.push(char::from_u32(cp).unwrap_or('\u{fffd}')),
                    None => out.push_str("\\u"),
                }
            }
            Some(e @ ('n' | 't' | 'r' | 'b' | 'f' | '/' | '"' | '\\')) => {
                chars.next();
                out.push(match e {
                    'n' => '\n',
                    't' => '\t',
                    'r' => '\r',
                    'b' => '\u{8}',
                    'f' => '\u{c}',
                    other => other,
                });
            }
            _ => out.push('\\'),
        }
    }
    out
}

/// The Luhn check over the digits of `s` (separators ignored), for 13 to 19 digits.
pub fn luhn(s: &str) -> bool {
    let digits: Vec<u32> = s.chars().filter_map(|c| c.to_digit(10)).collect();
    if !(13..=19).contains(&digits.len()) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                *d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_patterns_are_found_and_ordinary_text_is_not() {
        let cases = [
            (r#"{"to":"jane.doe+x@example.co.uk"}"#, Some(PiiKind::Email)),
            ("card 4111 1111 1111 1111 ok", Some(PiiKind::CardNumber)),
            ("card 4111-1111-1111-1112", None), // fails Luhn
            ("ssn 078-05-1120", Some(PiiKind::NationalId)),
            ("nino AB 12 34 56 C", Some(PiiKind::NationalId)),
            ("key AKIAIOSFODNN7EXAMPLE", Some(PiiKind::Secret)),
            (
                "sk-proj-abcdefghijklmnopqrstuvwx1234",
                Some(PiiKind::Secret),
            ),
            (
                "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB",
                Some(PiiKind::Secret),
            ),
            ("-----BEGIN RSA PRIVATE KEY-----", Some(PiiKind::Secret)),
            (
                r#"{"temperature": 21.5, "city": "Paris", "count": 1234567}"#,
                None,
            ),
            ("order 2026-11-28 total 123456789012", None), // 12 digits: too short for a card
            ("tokens: 4111111111111112", None),
        ];
        for (text, want) in cases {
            assert_eq!(scan(text), want, "{text}");
        }
        assert!(!luhn("79927398713"), "11 digits is not a card");
    }

    #[test]
    fn escaped_sensitive_data_is_found_in_the_parsed_values() {
        let cases = [
            (
                r#"{"to":"jane.doe\u0040example.com"}"#,
                Some(PiiKind::Email),
            ),
            (
                r#"{"to":"jane\u002edoe@example\u002ecom"}"#,
                Some(PiiKind::Email),
            ),
            (r#"{"jane\u0040example.com":1}"#, Some(PiiKind::Email)),
            (
                r#"["sk\u002dproj-abcdefghijklmnopqrstuvwx1234"]"#,
                Some(PiiKind::Secret),
            ),
            (r#"{"card":4111111111111111}"#, Some(PiiKind::CardNumber)),
            (
                r#"{"ssn":"078\u002d05\u002d1120"}"#,
                Some(PiiKind::NationalId),
            ),
            (r#"{"city":"Paris","note":"\u0040home"}"#, None),
        ];
        for (i, (text, want)) in cases.into_iter().enumerate() {
            if i < 4 {
                assert_eq!(scan(text), None, "the raw bytes hide it: {text}");
            }
            assert_eq!(scan_result(text.as_bytes()), want, "{text}");
        }
        // Not JSON (nested past the parser's limit): the escapes are decoded before the scan.
        let deep = format!(
            "{}\"a\\u0040b.example.org\"{}",
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(scan_result(deep.as_bytes()), Some(PiiKind::Email));
        let pair = r#"x \ud83d\ude00 jane\u0040example.com \u12 \q"#;
        assert_eq!(decode_escapes(pair), "x 😀 jane@example.com \\u12 \\q");
        assert_eq!(scan_result(pair.as_bytes()), Some(PiiKind::Email));
        assert!(luhn("4012888888881881"));
    }
}
