//! A run's progress number (the id of its stream's messages) and the edges of its pinned
//! definition (for drawing the DAG).
//!
//! Invariant: the coordinator only moves a node forward (waiting → running → retry_wait →
//! running of the next attempt → succeeded / failed / cancelled) and a run from running to
//! one final status. [`progress`] gives every node a number that grows with each of those
//! steps and sums them with the run's own step, so two states of one run read in time order
//! have progress numbers in that order, and equal numbers mean the same state: a stream
//! that sends only numbers above the last one it sent never sends a state twice.

use serde::Serialize;
use sqlx::PgPool;
use weir_model::run::RunStatus;
use weir_model::CasRef;
use weir_runtime::cas::Cas;

/// Whether a run status is final.
pub fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

/// The progress number of one node: 0 waiting; attempt `a` running `3a-2`, waiting for a
/// retry `3a-1`, ended `3a`.
fn node_progress(status: &str, attempt: i32) -> u64 {
    let a = attempt.max(0) as u64;
    match (status, a) {
        ("waiting", _) => 0,
        // A node that ends without having run (cancelled while waiting).
        (_, 0) => 1,
        ("running", a) => 3 * a - 2,
        ("retry_wait", a) => 3 * a - 1,
        (_, a) => 3 * a,
    }
}

/// The run's progress number (see the module's invariant); never 0 for a run that exists,
/// so `Last-Event-ID: 0` asks for everything.
pub fn progress(run: &RunStatus) -> u64 {
    let nodes: u64 = run
        .nodes
        .iter()
        .map(|n| node_progress(&n.status, n.attempt))
        .sum();
    1 + nodes + u64::from(is_final(&run.status))
}

/// An edge of the DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    /// Predecessor node id.
    pub from: String,
    /// Successor node id.
    pub to: String,
}

/// Why the edges could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EdgesError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    /// The CAS failed.
    #[error("cas: {0}")]
    Cas(#[from] weir_runtime::cas::CasError),
}

/// The edges of version `version` of `workflow_id` as the coordinator pinned it for the
/// workspace's runs (empty when nothing is pinned, e.g. a run that failed at start).
pub async fn edges(
    pool: &PgPool,
    cas: &Cas,
    workspace_id: &str,
    workflow_id: &str,
    version: i64,
) -> Result<Vec<Edge>, EdgesError> {
    let row = sqlx::query!(
        "SELECT definition, definition_ref FROM weir_coordinator_definitions
         WHERE workspace_id = $1 AND workflow_id = $2 AND version = $3",
        workspace_id,
        workflow_id,
        version
    )
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else {
        return Ok(Vec::new());
    };
    let def = match (row.definition, row.definition_ref) {
        (Some(d), _) => d,
        (None, Some(r)) => match r.parse::<CasRef>() {
            Ok(r) => cas.get_json(&r).await?,
            Err(_) => return Ok(Vec::new()),
        },
        (None, None) => return Ok(Vec::new()),
    };
    Ok(def
        .get("edges")
        .and_then(|e| e.as_array())
        .map(|edges| {
            edges
                .iter()
                .filter_map(|e| {
                    Some(Edge {
                        from: e.get("from")?.as_str()?.to_string(),
                        to: e.get("to")?.as_str()?.to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_model::run::NodeState;

    fn run(status: &str, nodes: &[(&str, i32)]) -> RunStatus {
        RunStatus {
            run_id: uuid::Uuid::nil(),
            workflow_id: "w".into(),
            version: Some(1),
            status: status.into(),
            reason: None,
            nodes: nodes
                .iter()
                .enumerate()
                .map(|(i, (s, a))| NodeState {
                    node_id: format!("n{i}"),
                    node_type: "function".into(),
                    status: (*s).into(),
                    attempt: *a,
                })
                .collect(),
        }
    }

    #[test]
    fn every_forward_step_raises_the_progress() {
        let steps = [
            run("running", &[("waiting", 0), ("waiting", 0)]),
            run("running", &[("running", 1), ("waiting", 0)]),
            run("running", &[("retry_wait", 1), ("waiting", 0)]),
            run("running", &[("running", 2), ("waiting", 0)]),
            run("running", &[("succeeded", 2), ("waiting", 0)]),
            run("running", &[("succeeded", 2), ("running", 1)]),
            run("running", &[("succeeded", 2), ("succeeded", 1)]),
            run("completed", &[("succeeded", 2), ("succeeded", 1)]),
        ];
        for w in steps.windows(2) {
            assert!(progress(&w[0]) < progress(&w[1]), "{:?}", w[1]);
        }
        let cancelled = run("cancelled", &[("cancelled", 0), ("cancelled", 1)]);
        assert!(
            progress(&run("running", &[("waiting", 0), ("running", 1)])) < progress(&cancelled)
        );
        assert!(progress(&steps[0]) > 0);
    }
}
