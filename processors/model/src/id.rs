//! Names chosen by tenants: workflow ids and node ids.
//!
//! Invariant: an id is 1 to [`MAX_ID_BYTES`] bytes of `A-Z a-z 0-9 _ . -`; a workflow id may
//! also hold `:` (a node id may not: `:` separates a run's node in composite keys). Every
//! entry point (the HTTP gateway, definition validation) checks with these functions, so an
//! id accepted in one place is accepted in all.

/// Longest id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// Whether `id` is a valid id: `^[A-Za-z0-9_.-]{1,128}$`, plus `:` when `colon`.
pub fn valid_id(id: &str, colon: bool) -> bool {
    (1..=MAX_ID_BYTES).contains(&id.len())
        && id.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') || (colon && b == b':')
        })
}

/// Whether `id` is a valid workflow id: `^[A-Za-z0-9_.:-]{1,128}$`.
pub fn valid_workflow_id(id: &str) -> bool {
    valid_id(id, true)
}

/// Whether `id` is a valid node id: `^[A-Za-z0-9_.-]{1,128}$`.
pub fn valid_node_id(id: &str) -> bool {
    valid_id(id, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded_and_plain() {
        assert!(valid_workflow_id("team.a:flow-1_x"));
        assert!(!valid_node_id("a:b"));
        assert!(valid_node_id(&"n".repeat(MAX_ID_BYTES)));
        for bad in ["", "a b", "a/b", "é", "a\0"] {
            assert!(!valid_workflow_id(bad) && !valid_node_id(bad), "{bad:?}");
        }
        assert!(!valid_workflow_id(&"w".repeat(MAX_ID_BYTES + 1)));
    }
}
