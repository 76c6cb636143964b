//! A run as its status is shown to clients (`GET /v1/runs/{run_id}`): written by the
//! coordinator's read of its tables, served by the gateway.
//!
//! Invariant: the field names are the HTTP API's (documented in the OpenAPI description);
//! the status strings are the coordinator's own names, passed through unchanged.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// One node of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// Node id in the definition.
    pub node_id: String,
    /// Node type.
    pub node_type: String,
    /// waiting, running, retry_wait, succeeded, failed or cancelled.
    pub status: String,
    /// Current attempt (1-based; 0 while waiting).
    pub attempt: i32,
}

/// A run's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    /// The run.
    pub run_id: Uuid,
    /// Its workflow.
    pub workflow_id: String,
    /// The pinned version; `None` when the run failed before one was pinned.
    pub version: Option<i64>,
    /// running, completed, failed or cancelled.
    pub status: String,
    /// Why it failed or was cancelled, if it did.
    pub reason: Option<String>,
    /// Every node of the pinned definition, by id.
    pub nodes: Vec<NodeState>,
}
