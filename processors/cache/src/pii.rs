//! The PII guard: results that look like they hold personal data or secrets are not cached.
//!
//! Patterns: e-mail addresses; card numbers (13–19 digits, spaces or dashes allowed) that pass
//! the Luhn check; national id formats (US SSN `123-45-6789`, UK National Insurance number
//! `AB123456C`); API-key-like secrets (AWS access key ids, `sk-`/`sk_live_`-style keys, GitHub
//! and Slack tokens, Google API keys, PEM private keys). The guard errs on the side of not
//! caching: a false positive only costs a cache miss.

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
        assert!(luhn("4012888888881881"));
    }
}
