//! Unit tests of the cache module: the semantic statement's filters, prompt bounds and metric
//! labels, the PII scan of large results.

use bytes::Bytes;

use super::semantic::semantic_statement;
use super::store::{scan_off_runtime, INLINE_SCAN_BYTES};
use super::*;
use crate::pii;
use weir_runtime::Classify as _;

#[test]
fn a_semantic_hit_needs_the_same_config_and_a_number() {
    let sql = semantic_statement(384);
    // The config is matched in the WHERE clause of the nearest-neighbour scan itself,
    // next to the workspace, node type and permission filters.
    let scan = &sql[sql.find("FROM cache_semantic c").unwrap()..sql.find("LIMIT 1").unwrap()];
    for filter in [
        "c.workspace_id = r.workspace_id",
        "c.node_type = r.node_type",
        "c.config_hash = r.config_hash",
        "c.required_permission <= r.perm",
        "c.expires_at > now()",
    ] {
        assert!(scan.contains(filter), "{filter} missing from:\n{scan}");
    }
    // NaN >= threshold is true in Postgres: both the hit set and the flag exclude it.
    assert_eq!(
        sql.matches("similarity <> 'NaN'::float8").count(),
        2,
        "{sql}"
    );
}

#[test]
fn prompts_are_bounded_and_labels_are_not_caller_chosen() {
    let cfg = CacheConfig {
        max_prompt_bytes: 8,
        ..CacheConfig::default()
    };
    assert!(check_prompt(&cfg, None).is_ok());
    assert!(check_prompt(&cfg, Some("12345678")).is_ok());
    for bad in ["", "  \n", "123456789"] {
        let e = check_prompt(&cfg, Some(bad)).unwrap_err();
        assert_eq!(
            e.disposition(),
            weir_runtime::Disposition::DeadLetter,
            "{e}"
        );
    }
    assert_eq!(node_label(&cfg, "agent"), "agent");
    assert_eq!(node_label(&cfg, "human-x-123"), "other");
}

#[tokio::test]
async fn large_results_are_scanned_too() {
    let mut text = "{\"pad\":\"".to_string() + &"a".repeat(INLINE_SCAN_BYTES);
    text.push_str("\",\"to\":\"jane\\u0040example.com\"}");
    assert_eq!(
        scan_off_runtime(Bytes::from(text)).await,
        Some(pii::PiiKind::Email)
    );
}
