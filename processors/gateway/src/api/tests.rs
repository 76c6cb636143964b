//! Unit tests of the request extractors: derived ids, If-Match, ids and JSON errors.

use axum::http::{header, HeaderMap, HeaderValue};
use serde_json::Value;

use super::extract::{check_id, derived_id, if_match, json_error};
use super::runs::RunBody;

#[test]
fn derived_ids_are_stable_and_scoped() {
    let a = derived_id("ws", "run", "k1");
    assert_eq!(a, derived_id("ws", "run", "k1"), "same key, same id");
    assert_ne!(
        a,
        derived_id("ws2", "run", "k1"),
        "workspaces never share ids"
    );
    assert_ne!(a, derived_id("ws", "patch", "k1"), "scopes never share ids");
    assert_ne!(
        derived_id("w", "sx", "k"),
        derived_id("ws", "x", "k"),
        "no concatenation clash"
    );
    assert_eq!(a.get_version_num(), 8);
}

#[test]
fn if_match_and_ids_are_checked() {
    let mut h = HeaderMap::new();
    assert_eq!(if_match(&h).unwrap(), None);
    for (v, want) in [("3", Some(3)), ("\"4\"", Some(4)), ("W/\"5\"", Some(5))] {
        h.insert(header::IF_MATCH, HeaderValue::from_static(v));
        assert_eq!(if_match(&h).unwrap(), want);
    }
    h.insert(header::IF_MATCH, HeaderValue::from_static("0"));
    assert_eq!(if_match(&h).unwrap(), Some(0), "0: must not exist yet");
    h.insert(header::IF_MATCH, HeaderValue::from_static("-1"));
    assert_eq!(if_match(&h).unwrap_err().status, 400);
    h.insert(header::IF_MATCH, HeaderValue::from_static("\"abc\""));
    assert_eq!(if_match(&h).unwrap_err().status, 400);
    assert!(check_id("workflow id", "orders:v1_a-b.c", true).is_ok());
    assert!(check_id("node id", "a:b", false).is_err());
    assert!(check_id("workflow id", "", true).is_err());
    assert!(check_id("workflow id", &"x".repeat(129), true).is_err());
    assert_eq!(
        json_error(serde_json::from_str::<Value>("{").unwrap_err()).status,
        400
    );
    assert_eq!(
        json_error(serde_json::from_str::<RunBody>(r#"{"workflow_id": 3}"#).unwrap_err()).status,
        422
    );
}
