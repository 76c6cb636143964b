//! Checks every request body gets before anything else looks at it.
//!
//! - `\u0000` anywhere in the JSON (a member name or a string) is refused with 400 naming
//!   the JSON pointer: Postgres stores JSON as `jsonb` and text, and both refuse the NUL
//!   character, so such a body would otherwise become an event no processor can store.
//! - Nesting depth is bounded by serde_json's recursion limit (128 levels; deeper is a 400),
//!   which every body parser in the gateway keeps, so walking a parsed value recursively is
//!   bounded too.

use serde_json::Value;

use crate::problem::Problem;

/// Whether the raw body can hold an escaped NUL at all (`\u0000`; JSON cannot carry a raw
/// NUL byte in a string). A cheap scan that spares the parse for almost every body.
fn may_hold_nul(body: &[u8]) -> bool {
    body.windows(6)
        .any(|w| w[0] == b'\\' && (w[1] == b'u' || w[1] == b'U') && w[2..] == *b"0000")
}

/// The JSON pointer (RFC 6901) of the first member name or string holding U+0000.
pub fn nul_pointer(v: &Value) -> Option<String> {
    fn escape(s: &str) -> String {
        s.replace('~', "~0").replace('/', "~1")
    }
    fn walk(v: &Value, at: &mut String) -> bool {
        match v {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().enumerate().any(|(i, item)| {
                let len = at.len();
                at.push('/');
                at.push_str(&i.to_string());
                let found = walk(item, at);
                if !found {
                    at.truncate(len);
                }
                found
            }),
            Value::Object(m) => m.iter().any(|(k, item)| {
                let len = at.len();
                at.push('/');
                // A NUL in the name itself: the pointer names the member, shown escaped.
                at.push_str(&escape(&k.replace('\0', "\\u0000")));
                let found = k.contains('\0') || walk(item, at);
                if !found {
                    at.truncate(len);
                }
                found
            }),
            _ => false,
        }
    }
    let mut at = String::new();
    walk(v, &mut at).then_some(at)
}

/// 400 if the JSON body holds `\u0000` anywhere. A body that is not JSON passes: the
/// handler's parser says what is wrong with it.
pub fn reject_nul(body: &[u8]) -> Result<(), Problem> {
    if !may_hold_nul(body) {
        return Ok(());
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Ok(());
    };
    match nul_pointer(&v) {
        Some(pointer) => Err(Problem::bad_request(format!(
            "the JSON holds the NUL character (\\u0000) at {:?}; it cannot be stored",
            if pointer.is_empty() { "/" } else { &pointer }
        ))
        .with_code("nul_character")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nul_is_found_in_names_and_strings_with_its_pointer() {
        assert_eq!(
            nul_pointer(&json!({"a": [1, "x\u{0}"]})),
            Some("/a/1".into())
        );
        assert_eq!(
            nul_pointer(&json!({"ok": "y", "b/c": {"k\u{0}": 1}})),
            Some("/b~1c/k\\u0000".into())
        );
        assert_eq!(nul_pointer(&json!("\u{0}")), Some(String::new()));
        assert_eq!(nul_pointer(&json!({"a": ["fine", {"b": null}]})), None);
    }

    #[test]
    fn only_a_real_escape_is_refused() {
        let p = reject_nul(br#"{"nodes": {"s": {"config": {"x": "a\u0000b"}}}}"#).unwrap_err();
        assert_eq!(p.status, 400);
        assert!(p.detail.contains("/nodes/s/config/x"), "{}", p.detail);
        assert_eq!(p.code, Some("nul_character"));
        assert!(reject_nul(br#"{"k\u0000": 1}"#).is_err());
        // An escaped backslash followed by the text u0000 is six ordinary characters.
        assert!(reject_nul(br#"{"x": "\\u0000"}"#).is_ok());
        assert!(reject_nul(br#"{"x": "\u0001"}"#).is_ok());
        assert!(
            reject_nul(b"not json \\u0000").is_ok(),
            "left to the parser"
        );
    }

    #[test]
    fn deep_nesting_is_refused_by_the_parser() {
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert!(reject_nul(deep.as_bytes()).is_ok());
    }
}
