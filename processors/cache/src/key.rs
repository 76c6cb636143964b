//! Cache keys: canonical JSON, its hash and the entry key (over the permission level).
//!
//! Invariants: equal JSON values hash equally whatever their member order or number spelling
//! (`1`, `1.0` and `1e0` are one number); the entry key binds the workspace, the entry's
//! required permission level, the node type and both hashes, each field length-prefixed so
//! that no two different tuples share a preimage.

use std::fmt::Write as _;

use serde_json::Value;
use sha2::{Digest, Sha256};

use weir_model::Permission;

use crate::error::CacheError;

/// Canonical JSON with numbers normalized by value: `1`, `1.0` and `1e0` give the same text (a
/// cache key must not miss over a number's spelling). The definition hash's
/// [`weir_model::definition::canonical_json_verbatim_numbers`] keeps them apart.
///
/// Canonical JSON text: object members sorted by key (byte order), no whitespace, strings
/// escaped as serde_json escapes them, numbers normalized: an integral value within ±2^53 is
/// printed as an integer (`1.0` → `1`), other integers as they are, other floats in the
/// shortest form that round-trips (`1.50` → `1.5`).
///
/// Iterative, not recursive: a value built in memory (a definition grown by patches) may nest
/// deeper than the parser's limit, and hashing it must not overflow the stack.
pub fn canonical_json_normalized_numbers(v: &Value) -> String {
    enum Step<'a> {
        Value(&'a Value),
        Raw(&'static str),
        Key(&'a str),
    }
    let mut out = String::new();
    let mut stack = vec![Step::Value(v)];
    while let Some(step) = stack.pop() {
        match step {
            Step::Raw(s) => out.push_str(s),
            Step::Key(k) => {
                write_string(&mut out, k);
                out.push(':');
            }
            Step::Value(Value::Null) => out.push_str("null"),
            Step::Value(Value::Bool(b)) => out.push_str(if *b { "true" } else { "false" }),
            Step::Value(Value::Number(n)) => write_number(&mut out, n),
            Step::Value(Value::String(s)) => write_string(&mut out, s),
            Step::Value(Value::Array(a)) => {
                out.push('[');
                stack.push(Step::Raw("]"));
                // Pushed in reverse: the stack pops the first element first.
                for (i, x) in a.iter().enumerate().rev() {
                    stack.push(Step::Value(x));
                    if i > 0 {
                        stack.push(Step::Raw(","));
                    }
                }
            }
            Step::Value(Value::Object(m)) => {
                let mut members: Vec<(&String, &Value)> = m.iter().collect();
                members.sort_unstable_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                stack.push(Step::Raw("}"));
                for (i, (k, x)) in members.into_iter().enumerate().rev() {
                    stack.push(Step::Value(x));
                    stack.push(Step::Key(k));
                    if i > 0 {
                        stack.push(Step::Raw(","));
                    }
                }
            }
        }
    }
    out
}

fn write_number(out: &mut String, n: &serde_json::Number) {
    // Writing to a String cannot fail, hence the ignored results.
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
        if f.fract() == 0.0 && f.abs() <= EXACT {
            let _ = write!(out, "{}", f as i64);
        } else {
            // serde_json prints f64 in the shortest round-tripping form.
            out.push_str(
                &serde_json::Number::from_f64(f).map_or_else(|| "null".into(), |x| x.to_string()),
            );
        }
    }
}

fn write_string(out: &mut String, s: &str) {
    // serde_json's escaping of a plain string cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// SHA-256 of the canonical JSON of `v`.
pub fn json_hash(v: &Value) -> [u8; 32] {
    Sha256::digest(canonical_json_normalized_numbers(v).as_bytes()).into()
}

/// Parses JSON text from an event; an invalid text is an invalid request.
pub fn parse_json(what: &str, text: &str) -> Result<Value, CacheError> {
    serde_json::from_str(text).map_err(|e| CacheError::Invalid(format!("{what} is not JSON: {e}")))
}

/// The exact-cache key of an entry: sha256 over the length-prefixed fields. The prompt is
/// part of the question: an agent asked something else with the same config and inputs is
/// another entry. "No prompt" and "an empty prompt" are different keys (a presence byte).
pub fn entry_key(
    workspace_id: &str,
    level: Permission,
    node_type: &str,
    config_hash: &[u8; 32],
    inputs_hash: &[u8; 32],
    prompt: Option<&str>,
) -> [u8; 32] {
    let mut h = Sha256::new();
    // v2: v1 keys left the prompt out (and could answer another prompt's question).
    h.update(b"weir.cache.exact.v2");
    for field in [
        workspace_id.as_bytes(),
        level.as_str().as_bytes(),
        node_type.as_bytes(),
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field);
    }
    h.update(config_hash);
    h.update(inputs_hash);
    match prompt {
        Some(p) => {
            h.update([1u8]);
            h.update((p.len() as u64).to_be_bytes());
            h.update(p.as_bytes());
        }
        None => h.update([0u8]),
    }
    h.finalize().into()
}

/// The key of a semantic entry: one per (workspace, level, node type, config, prompt). The
/// config is part of it: the same prompt to another model or system prompt is another
/// question, and its entry must not replace this one.
pub fn semantic_key(
    workspace_id: &str,
    level: Permission,
    node_type: &str,
    config_hash: &[u8; 32],
    prompt: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"weir.cache.semantic.v2");
    for field in [
        workspace_id.as_bytes(),
        level.as_str().as_bytes(),
        node_type.as_bytes(),
        config_hash.as_slice(),
        prompt.as_bytes(),
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn canonical_form_ignores_order_and_number_spelling() {
        let a: Value =
            serde_json::from_str(r#"{"b":[1.0,2.50,{"y":1e2,"x":-0.0}],"a":"é\n"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":"é\n","b":[1,2.5,{"x":0,"y":100}]}"#).unwrap();
        assert_eq!(
            canonical_json_normalized_numbers(&a),
            r#"{"a":"é\n","b":[1,2.5,{"x":0,"y":100}]}"#
        );
        assert_eq!(json_hash(&a), json_hash(&b));
        assert_ne!(json_hash(&json!({"a": 1})), json_hash(&json!({"a": "1"})));
        assert_eq!(
            canonical_json_normalized_numbers(&json!(u64::MAX)),
            "18446744073709551615"
        );
        assert_eq!(canonical_json_normalized_numbers(&json!(0.1)), "0.1");
        let k = |ws: &str, p, t: &str| {
            entry_key(ws, p, t, &json_hash(&json!({})), &json_hash(&a), None)
        };
        assert_ne!(
            k("w1", Permission::Read, "pure"),
            k("w2", Permission::Read, "pure")
        );
        assert_ne!(
            k("w1", Permission::Read, "pure"),
            k("w1", Permission::Write, "pure")
        );
        assert_ne!(
            k("w1", Permission::Read, "pure"),
            k("w1", Permission::Read, "agent")
        );
        assert_ne!(
            k("ab", Permission::Read, "c"),
            k("a", Permission::Read, "bc")
        );
        // The prompt is part of the question.
        let (c, i) = (
            json_hash(&json!({"model": "m"})),
            json_hash(&json!({"q": 1})),
        );
        let agent = |p: Option<&str>| entry_key("w1", Permission::Read, "agent", &c, &i, p);
        assert_ne!(agent(Some("prompt A")), agent(Some("prompt B")));
        assert_ne!(agent(Some("")), agent(None));
        assert_eq!(agent(Some("prompt A")), agent(Some("prompt A")));
        // Moving bytes between the inputs and the prompt cannot collide either.
        assert_ne!(
            entry_key("w", Permission::Read, "agent", &c, &i, Some("ab")),
            entry_key("w", Permission::Read, "agent", &c, &i, Some("a"))
        );
        // A semantic key covers the config.
        let other = json_hash(&json!({"model": "m2"}));
        assert_ne!(
            semantic_key("w1", Permission::Read, "agent", &c, "p"),
            semantic_key("w1", Permission::Read, "agent", &other, "p")
        );
        assert_eq!(
            Permission::Write.and_below().collect::<Vec<_>>(),
            vec![Permission::Read, Permission::Write]
        );
    }

    #[test]
    fn deeply_nested_values_hash_without_recursion() {
        let mut v = json!(1);
        for _ in 0..100_000 {
            v = Value::Array(vec![v]);
        }
        let text = canonical_json_normalized_numbers(&v);
        assert_eq!(text.len(), 200_001);
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(text, format!("{open}1{close}"));
        // serde_json drops nested values recursively; unwind by hand.
        let mut cur = v;
        while let Value::Array(mut a) = cur {
            cur = a.pop().unwrap_or(Value::Null);
        }
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-1_000_000i64..1_000_000).prop_map(|i| json!(i)),
            "[a-z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn exact_keys_of_different_prompts_differ(a in ".{0,40}", b in ".{0,40}") {
            let h = json_hash(&json!({}));
            let k = |p: &str| entry_key("w", Permission::Write, "agent", &h, &h, Some(p));
            prop_assert_eq!(k(&a) == k(&b), a == b);
        }

        #[test]
        fn canonical_text_parses_back_to_the_same_hash(v in arb_json()) {
            let text = canonical_json_normalized_numbers(&v);
            let back: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(canonical_json_normalized_numbers(&back), text.clone());
            // Integers written as floats hash like the integers.
            let floaty = serde_json::from_str::<Value>(&text.replace(",1,", ",1.0,")).unwrap();
            prop_assert_eq!(json_hash(&floaty), json_hash(&v));
        }
    }
}
