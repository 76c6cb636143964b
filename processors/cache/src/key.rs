//! Cache keys: canonical JSON, its hash, permission levels and the entry key.
//!
//! Invariants: equal JSON values hash equally whatever their member order or number spelling
//! (`1`, `1.0` and `1e0` are one number); the entry key binds the workspace, the entry's
//! required permission level, the node type and both hashes, each field length-prefixed so
//! that no two different tuples share a preimage.

use std::fmt::Write as _;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::CacheError;

/// Permission levels, ordered: read < write < admin.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// May read.
    Read = 1,
    /// May write.
    Write = 2,
    /// May administer.
    Admin = 3,
}

impl Permission {
    /// Every level, lowest first.
    pub const ALL: [Permission; 3] = [Permission::Read, Permission::Write, Permission::Admin];

    /// The level as stored in Postgres (1, 2, 3).
    pub fn level(self) -> i16 {
        self as i16
    }

    /// The level's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Write => "write",
            Permission::Admin => "admin",
        }
    }

    /// Parses `read`, `write` or `admin`; anything else is an invalid request.
    pub fn parse(s: &str) -> Result<Permission, CacheError> {
        match s {
            "read" => Ok(Permission::Read),
            "write" => Ok(Permission::Write),
            "admin" => Ok(Permission::Admin),
            other => Err(CacheError::Invalid(format!(
                "permission must be read, write or admin, not {:?}",
                other.chars().take(40).collect::<String>()
            ))),
        }
    }

    /// This level and every lower one: the levels of entries a requester may be served.
    pub fn and_below(self) -> impl Iterator<Item = Permission> {
        Permission::ALL.into_iter().filter(move |p| *p <= self)
    }
}

/// Canonical JSON text: object members sorted by key (byte order), no whitespace, strings
/// escaped as serde_json escapes them, numbers normalized: an integral value within ±2^53 is
/// printed as an integer (`1.0` → `1`), other integers as they are, other floats in the
/// shortest form that round-trips (`1.50` → `1.5`).
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(&mut out, v);
    out
}

fn write_canonical(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, x);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut members: Vec<(&String, &Value)> = m.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, x)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(out, k);
                out.push(':');
                write_canonical(out, x);
            }
            out.push('}');
        }
    }
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
    Sha256::digest(canonical_json(v).as_bytes()).into()
}

/// Parses JSON text from an event; an invalid text is an invalid request.
pub fn parse_json(what: &str, text: &str) -> Result<Value, CacheError> {
    serde_json::from_str(text).map_err(|e| CacheError::Invalid(format!("{what} is not JSON: {e}")))
}

/// The exact-cache key of an entry: sha256 over the length-prefixed fields.
pub fn entry_key(
    workspace_id: &str,
    level: Permission,
    node_type: &str,
    config_hash: &[u8; 32],
    inputs_hash: &[u8; 32],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"weir.cache.exact.v1");
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
    h.finalize().into()
}

/// The key of a semantic entry: one per (workspace, level, node type, prompt).
pub fn semantic_key(
    workspace_id: &str,
    level: Permission,
    node_type: &str,
    prompt: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"weir.cache.semantic.v1");
    for field in [
        workspace_id.as_bytes(),
        level.as_str().as_bytes(),
        node_type.as_bytes(),
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
            canonical_json(&a),
            r#"{"a":"é\n","b":[1,2.5,{"x":0,"y":100}]}"#
        );
        assert_eq!(json_hash(&a), json_hash(&b));
        assert_ne!(json_hash(&json!({"a": 1})), json_hash(&json!({"a": "1"})));
        assert_eq!(canonical_json(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(canonical_json(&json!(0.1)), "0.1");
        let k = |ws: &str, p, t: &str| entry_key(ws, p, t, &json_hash(&json!({})), &json_hash(&a));
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
        assert!(Permission::parse("root").is_err());
        assert_eq!(
            Permission::Write.and_below().collect::<Vec<_>>(),
            vec![Permission::Read, Permission::Write]
        );
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
        fn canonical_text_parses_back_to_the_same_hash(v in arb_json()) {
            let text = canonical_json(&v);
            let back: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(canonical_json(&back), text.clone());
            // Integers written as floats hash like the integers.
            let floaty = serde_json::from_str::<Value>(&text.replace(",1,", ",1.0,")).unwrap();
            prop_assert_eq!(json_hash(&floaty), json_hash(&v));
        }
    }
}
