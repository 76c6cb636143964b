//! Folding one workflow's patches onto its head: the pure heart of the materializer, shared
//! by the processor, `weir workflows replay` and the benchmark's naive path.
//!
//! Invariants: patches apply in the order given (partition order); each applied patch makes
//! exactly one new version (head + 1) whose document passes [`definition::check`]; a patch
//! that fails (bad operations, a failing `test`, an invalid result, a stale base version, a
//! foreign workspace) changes nothing and yields a rejection, and later patches still apply.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::definition::{self, canonical_json_verbatim_numbers, Limits};
use crate::patch::{Budget, Patch, PatchError};

/// The state of one workflow between patches.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// Owning workspace (fixed by the patch that created the workflow).
    pub workspace_id: String,
    /// Current version; 0 before the first applied patch.
    pub version: i64,
    /// Current definition; `Value::Null` before the first applied patch.
    pub definition: Value,
}

impl Head {
    /// The state of a workflow that does not exist yet.
    pub fn empty(workspace_id: &str) -> Self {
        Self {
            workspace_id: workspace_id.to_string(),
            version: 0,
            definition: Value::Null,
        }
    }
}

/// One submitted patch, parsed.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// Workspace of the submitter.
    pub workspace_id: String,
    /// The head version the submitter saw, if it asked for a check.
    pub base_version: Option<i64>,
    /// The operations, or why they could not be parsed.
    pub operations: Result<Patch, PatchError>,
}

/// What happened to one patch.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// It made a new version.
    Applied {
        /// The new version.
        version: i64,
        /// Canonical JSON of the new definition (sorted keys, no whitespace).
        canonical: String,
        /// Lowercase hex sha256 of `canonical`.
        sha256: String,
    },
    /// It changed nothing.
    Rejected {
        /// The head version when it was decided.
        head_version: i64,
        /// Machine-readable reason: `invalid_operation`, `path_not_found`, `test_failed`,
        /// `invalid_pointer`, `invalid_index`, `move_into_child`, `invalid_definition`,
        /// `version_conflict`, `workspace_mismatch`; over the [`Budget`]: `budget_ops`,
        /// `budget_bytes`, `budget_depth`, `budget_pointer`, `budget_work`; and from the
        /// processor, when what the patch refers to cannot be read: `blob_missing`,
        /// `blob_corrupt`, `head_unavailable`.
        code: &'static str,
        /// Human-readable reason.
        reason: String,
    },
}

/// Lowercase hex sha256 of a string.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Applies `patches` in order to `head`, each within `budget`, returning one decision per
/// patch.
pub fn fold(
    head: &mut Head,
    patches: &[Submitted],
    limits: &Limits,
    budget: &Budget,
) -> Vec<Decision> {
    patches
        .iter()
        .map(|p| step_with(head, p, limits, budget))
        .collect()
}

/// Applies one patch to `head` within [`default_budget`]`(limits)`.
pub fn step(head: &mut Head, patch: &Submitted, limits: &Limits) -> Decision {
    step_with(head, patch, limits, &default_budget(limits))
}

/// The default [`Budget`], with room for creating a workflow of `limits.max_bytes` in one
/// operation.
pub fn default_budget(limits: &Limits) -> Budget {
    let budget = Budget::default();
    Budget {
        max_bytes: budget.max_bytes.max(limits.max_bytes),
        ..budget
    }
}

/// Applies one patch to `head` within `budget`. A patch over the budget is rejected with its
/// `budget_*` code, like any other failing patch.
pub fn step_with(head: &mut Head, patch: &Submitted, limits: &Limits, budget: &Budget) -> Decision {
    let reject = |head: &Head, code: &'static str, reason: String| Decision::Rejected {
        head_version: head.version,
        code,
        reason,
    };
    if head.version > 0 && head.workspace_id != patch.workspace_id {
        return reject(
            head,
            "workspace_mismatch",
            "the workflow belongs to another workspace".into(),
        );
    }
    if let Some(base) = patch.base_version {
        if base != head.version {
            return reject(
                head,
                "version_conflict",
                format!(
                    "patch is based on version {base}, the head is version {}",
                    head.version
                ),
            );
        }
    }
    let ops = match &patch.operations {
        Ok(ops) => ops,
        Err(e) => return reject(head, e.code(), e.to_string()),
    };
    let undo = match ops.apply_reversible_with(&mut head.definition, budget) {
        Ok(undo) => undo,
        Err(e) => return reject(head, e.code(), e.to_string()),
    };
    // The canonical text is needed for an applied patch anyway, and its length is exactly
    // what the size limit counts: check the size on it, then the rest without re-measuring
    // (same order, so the same error, as `definition::check`).
    let canonical = canonical_json_verbatim_numbers(&head.definition);
    let checked = if canonical.len() > limits.max_bytes {
        Err(definition::DefinitionError::TooLarge {
            max_bytes: limits.max_bytes,
        })
    } else {
        let measured = Limits {
            max_bytes: usize::MAX,
            ..*limits
        };
        definition::check(&head.definition, &measured)
    };
    if let Err(e) = checked {
        if undo.revert(&mut head.definition).is_err() {
            // The undo log replays what this very call recorded, so this is unreachable; if
            // it ever happened, the head could not be trusted: rebuild it from scratch.
            head.definition = Value::Null;
            head.version = 0;
        }
        return reject(head, e.code(), e.to_string());
    }
    if head.version == 0 {
        head.workspace_id = patch.workspace_id.clone();
    }
    head.version += 1;
    let sha256 = sha256_hex(&canonical);
    Decision::Applied {
        version: head.version,
        canonical,
        sha256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn submitted(ws: &str, base: Option<i64>, ops: Value) -> Submitted {
        Submitted {
            workspace_id: ws.into(),
            base_version: base,
            operations: Patch::from_value(&ops),
        }
    }

    fn create() -> Value {
        json!([{"op": "add", "path": "", "value": {
            "nodes": {"fetch": {"type": "http_request", "config": {"url": "https://x"}}},
            "edges": []}}])
    }

    #[test]
    fn versions_are_contiguous_and_rejections_change_nothing() {
        let limits = Limits::default();
        let mut head = Head::empty("ws");
        let patches = vec![
            submitted("ws", Some(0), create()),
            // a failing test op
            submitted(
                "ws",
                None,
                json!([{"op": "test", "path": "/edges", "value": [1]}]),
            ),
            // a valid change
            submitted(
                "ws",
                Some(1),
                json!([
                {"op": "add", "path": "/nodes/sum", "value": {"type": "agent", "config": {}}},
                {"op": "add", "path": "/edges/-", "value": {"from": "fetch", "to": "sum"}}]),
            ),
            // a result that is not a DAG
            submitted(
                "ws",
                None,
                json!([{"op": "add", "path": "/edges/-", "value": {"from": "sum", "to": "fetch"}}]),
            ),
            // stale base version
            submitted(
                "ws",
                Some(1),
                json!([{"op": "remove", "path": "/nodes/sum"}]),
            ),
            // another workspace
            submitted(
                "other",
                None,
                json!([{"op": "replace", "path": "/edges", "value": []}]),
            ),
            // unparseable operations
            submitted("ws", None, json!({"op": "add"})),
            submitted(
                "ws",
                None,
                json!([{"op": "replace", "path": "/nodes/fetch/config/url", "value": "https://y"}]),
            ),
        ];
        let decisions = fold(&mut head, &patches, &limits, &Budget::default());
        let summary: Vec<String> = decisions
            .iter()
            .map(|d| match d {
                Decision::Applied { version, .. } => format!("v{version}"),
                Decision::Rejected {
                    code, head_version, ..
                } => format!("{code}@{head_version}"),
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                "v1",
                "test_failed@1",
                "v2",
                "invalid_definition@2",
                "version_conflict@2",
                "workspace_mismatch@2",
                "invalid_operation@2",
                "v3"
            ]
        );
        assert_eq!(head.version, 3);
        assert_eq!(
            head.definition["nodes"]["fetch"]["config"]["url"],
            "https://y"
        );
        assert_eq!(
            head.definition["edges"].as_array().map(Vec::len),
            Some(1),
            "the cycle edge was reverted"
        );
        let Decision::Applied {
            canonical, sha256, ..
        } = &decisions[7]
        else {
            panic!()
        };
        assert_eq!(
            *canonical,
            canonical_json_verbatim_numbers(&head.definition)
        );
        assert_eq!(*sha256, sha256_hex(canonical));
    }

    #[test]
    fn a_workflow_must_be_created_by_a_whole_document() {
        let mut head = Head::empty("ws");
        let d = step(
            &mut head,
            &submitted(
                "ws",
                None,
                json!([{"op": "add", "path": "/nodes", "value": {}}]),
            ),
            &Limits::default(),
        );
        assert!(
            matches!(
                d,
                Decision::Rejected {
                    code: "path_not_found",
                    head_version: 0,
                    ..
                }
            ),
            "{d:?}"
        );
        assert_eq!(head, Head::empty("ws"));
    }
}
