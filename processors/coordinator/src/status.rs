//! The status of one run, for the HTTP gateway's `GET /v1/runs/{run_id}`.

use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

/// One node of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeStatusView {
    /// Node id.
    pub node_id: String,
    /// Node type.
    pub node_type: String,
    /// waiting, running, retry_wait, succeeded, failed or cancelled.
    pub status: String,
    /// Current attempt (0 while waiting).
    pub attempt: i32,
}

/// A run as the gateway shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunStatus {
    /// The run.
    pub run_id: Uuid,
    /// Its workflow.
    pub workflow_id: String,
    /// The pinned version (`None` when the run failed before pinning one).
    pub version: Option<i64>,
    /// running, completed, failed or cancelled.
    pub status: String,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// Every node of the pinned definition, by id.
    pub nodes: Vec<NodeStatusView>,
}

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
    .map(|n| NodeStatusView {
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
