//! The status of one run, for the HTTP gateway's `GET /v1/runs/{run_id}`.

use sqlx::PgPool;
use uuid::Uuid;
use weir_model::run::{NodeState, RunStatus};

/// The status of run `run_id` (looked up by its hyphenated lowercase text) if it belongs to
/// `workspace_id`; `None` otherwise, so a caller cannot probe other workspaces' runs.
pub async fn run_status(
    pool: &PgPool,
    workspace_id: &str,
    run_id: Uuid,
) -> Result<Option<RunStatus>, sqlx::Error> {
    let id = run_id.to_string();
    let Some(run) = sqlx::query!(
        r#"SELECT workflow_id, version, status, reason FROM weir_runs
           WHERE run_id = $1 AND workspace_id = $2"#,
        id,
        workspace_id,
    )
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    // Nodes never dispatched have no row: list them from the pinned snapshot (inline
    // definitions; a CAS-held one lists the dispatched nodes only).
    let nodes = sqlx::query!(
        r#"WITH d AS (
             SELECT n.key AS node_id, n.value->>'type' AS node_type
             FROM weir_coordinator_definitions c, jsonb_each(c.definition->'nodes') n
             WHERE c.workspace_id = $4 AND c.workflow_id = $2 AND c.version = $3
               AND c.definition IS NOT NULL)
           SELECT coalesce(r.node_id, d.node_id) AS "node_id!",
                  coalesce(r.node_type, d.node_type, '') AS "node_type!",
                  coalesce(r.status, 'waiting') AS "status!",
                  coalesce(r.attempt, 0) AS "attempt!"
           FROM d FULL JOIN (SELECT * FROM weir_run_nodes WHERE run_id = $1) r ON r.node_id = d.node_id
           ORDER BY 1"#,
        id,
        run.workflow_id,
        run.version,
        workspace_id,
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|n| NodeState {
        node_id: n.node_id,
        node_type: n.node_type,
        status: n.status,
        attempt: n.attempt,
    })
    .collect();
    Ok(Some(RunStatus {
        run_id,
        workflow_id: run.workflow_id,
        version: run.version,
        status: run.status,
        reason: run.reason,
        nodes,
    }))
}

/// Whether run `run_id` exists in `workspace_id` (one index probe; other workspaces' runs
/// answer false).
pub async fn run_exists(
    pool: &PgPool,
    workspace_id: &str,
    run_id: Uuid,
) -> Result<bool, sqlx::Error> {
    let id = run_id.to_string();
    let found = sqlx::query_scalar!(
        r#"SELECT 1 AS "one!" FROM weir_runs WHERE run_id = $1 AND workspace_id = $2"#,
        id,
        workspace_id,
    )
    .fetch_optional(pool)
    .await?;
    Ok(found.is_some())
}
