//! Topics `weir.completions.v1` (the coordinator's input: run requests, node results, cancel
//! requests) and `weir.node-ready.v1` (its work for workers), both keyed by run_id.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weir_model::WireRef;

use super::avro::{record_from_value, record_to_value, write_record};
use super::{uuid_text, EventError, Record, TopicEvent};

/// Avro enum `weir.runs.NodeStatus`: outcome of one node attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Succeeded,
    Failed,
}

event_record! {
    /// A client asks to start a run of one workflow version.
    RunRequested = "weir.runs.RunRequested" {
        run_id: String,
        workflow_id: String,
        /// Version to pin; `None` means the head when the run starts.
        version: Option<i64>,
        requester: String,
        /// read | write | admin.
        permission: String,
        inputs_json: Option<String>,
        inputs_ref: Option<WireRef>,
        idempotency_key: Option<String>,
    }
}

event_record! {
    /// A worker reports the outcome of one node attempt.
    NodeCompleted = "weir.runs.NodeCompleted" {
        run_id: String,
        node_id: String,
        /// Starts at 1.
        attempt: i32,
        status: NodeStatus,
        output_json: Option<String>,
        output_ref: Option<WireRef>,
        error: Option<String>,
        duration_ms: i64,
        worker_id: String,
        /// True when served from the result cache (Avro default false).
        from_cache: bool,
    }
}

event_record! {
    /// A client asks to cancel a run. Rust name differs from the Avro name
    /// (`weir.runs.RunCancelled`) to keep it apart from the coordinator's [`RunCancelled`].
    RunCancelRequested = "weir.runs.RunCancelled" {
        run_id: String,
        reason: Option<String>,
        requester: String,
    }
}

/// Avro record `weir.runs.NodeInput`: the output of one predecessor of a ready node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInput {
    pub node_id: String,
    pub output_json: Option<String>,
    pub output_ref: Option<WireRef>,
}

event_record! {
    /// A node of a run is ready to execute: work for a worker, once per attempt.
    NodeReady = "weir.runs.NodeReady" {
        run_id: String,
        workflow_id: String,
        version: i64,
        node_id: String,
        node_type: String,
        config_json: String,
        /// Predecessors' outputs, in definition order; empty for a root.
        inputs: Vec<NodeInput>,
        attempt: i32,
        hop: i32,
        /// timestamp-micros; `None` for no deadline.
        deadline_at: Option<i64>,
        run_inputs_json: Option<String>,
        run_inputs_ref: Option<WireRef>,
    }
}

union_topic! {
    /// Value of weir.completions.v1 (key run_id): the coordinator's input.
    CompletionEvent {
        topic: "weir.completions.v1", key: run_id,
        records: [RunRequested, NodeCompleted, RunCancelRequested]
    }
}

record_topic!(NodeReady {
    topic: "weir.node-ready.v1",
    key: run_id
});
