//! The materializer's patch log as clients read it: the applied operations after a version,
//! each with the version it made and that version's sha256, so a client holding version V
//! folds forward (`weir_model::patch::apply_patch`) and checks every result against the
//! sha256 of its canonical JSON.
//!
//! Invariant: a page holds contiguous versions starting at `after + 1`. When the log has
//! no row for `after + 1` although the head is past it (the log no longer covers that
//! range), the page says `gap` and holds nothing: the client fetches the head instead.

use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;
use weir_model::CasRef;
use weir_runtime::cas::Cas;

/// One applied patch.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    /// The version this patch made.
    pub version: i64,
    /// The patch.
    pub patch_id: Uuid,
    /// Lowercase hex sha256 of the canonical JSON of that version's definition.
    pub definition_sha256: String,
    /// The RFC 6902 operations, as applied.
    pub operations: Value,
}

/// The applied patches after a version.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    /// The workflow's head version when read.
    pub head_version: i64,
    /// The head's sha256.
    pub head_sha256: String,
    /// Contiguous applied patches after the asked version, oldest first.
    pub patches: Vec<Applied>,
    /// The log does not cover the version after the asked one: fetch the head.
    pub gap: bool,
}

/// Why the log could not be read.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    /// The CAS failed (operations stored by reference).
    #[error("cas: {0}")]
    Cas(#[from] weir_runtime::cas::CasError),
    /// A stored row is not usable (a ref that does not parse, operations missing).
    #[error("patch log row of version {0} is unreadable")]
    Unreadable(i64),
}

/// The head version and sha256 of a workflow of `workspace_id`, `None` when it has none.
pub async fn head(
    pool: &PgPool,
    workspace_id: &str,
    workflow_id: &str,
) -> Result<Option<(i64, String)>, LogError> {
    Ok(sqlx::query!(
        "SELECT version, definition_sha256 FROM weir_workflow_heads
         WHERE workspace_id = $1 AND workflow_id = $2",
        workspace_id,
        workflow_id
    )
    .fetch_optional(pool)
    .await?
    .map(|r| (r.version, r.definition_sha256)))
}

/// At most `limit` applied patches of `workflow_id` (of `workspace_id`) after version
/// `after`; `None` when the workspace has no such workflow.
pub async fn after(
    pool: &PgPool,
    cas: &Cas,
    workspace_id: &str,
    workflow_id: &str,
    after: i64,
    limit: i64,
) -> Result<Option<Page>, LogError> {
    // One statement, so one snapshot: the head and the rows agree. (Read in two, a
    // version committed between them would show in the head but not in the rows: a false
    // gap.)
    let rows = sqlx::query!(
        r#"SELECT h.version AS head_version, h.definition_sha256 AS head_sha256,
                  p.version AS "version?", p.patch_id AS "patch_id?",
                  p.definition_sha256 AS "definition_sha256?",
                  p.operations AS "operations?", p.operations_ref AS "operations_ref?"
           FROM weir_workflow_heads h
           LEFT JOIN LATERAL (
               SELECT version, patch_id, definition_sha256, operations, operations_ref
               FROM weir_workflow_patches
               WHERE workspace_id = h.workspace_id AND workflow_id = h.workflow_id
                 AND status = 'applied' AND version > $3
               ORDER BY version
               LIMIT $4
           ) p ON true
           WHERE h.workspace_id = $1 AND h.workflow_id = $2
           ORDER BY p.version"#,
        workspace_id,
        workflow_id,
        after,
        limit
    )
    .fetch_all(pool)
    .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let (head_version, head_sha256) = (first.head_version, first.head_sha256.clone());
    let mut patches = Vec::with_capacity(rows.len());
    for (expected, r) in (after + 1..).zip(rows) {
        let (Some(version), Some(patch_id), Some(sha)) =
            (r.version, r.patch_id, r.definition_sha256)
        else {
            // The head without any row after `after`.
            break;
        };
        if version != expected {
            break;
        }
        let operations = match (r.operations, r.operations_ref) {
            (Some(ops), _) => ops,
            (None, Some(rf)) => {
                let rf: CasRef = rf.parse().map_err(|_| LogError::Unreadable(version))?;
                cas.get_json(&rf).await?
            }
            (None, None) => return Err(LogError::Unreadable(version)),
        };
        patches.push(Applied {
            version,
            patch_id,
            definition_sha256: sha,
            operations,
        });
    }
    let gap = patches.is_empty() && after < head_version;
    Ok(Some(Page {
        head_version,
        head_sha256,
        patches,
        gap,
    }))
}
