//! Topic `weir.run-events.v1` (key run_id): run lifecycle events from the coordinator.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weir_model::WireRef;

use super::avro::{record_from_value, record_to_value, write_record};
use super::{uuid_text, EventError, Record, TopicEvent};

event_record! {
    /// A run started on its pinned version.
    RunStarted = "weir.run_events.RunStarted" {
        run_id: String,
        workflow_id: String,
        version: i64,
        requester: String,
    }
}

event_record! {
    /// Every node of the run succeeded.
    RunCompleted = "weir.run_events.RunCompleted" {
        run_id: String,
        workflow_id: String,
        version: i64,
        duration_ms: i64,
        outputs_json: Option<String>,
        outputs_ref: Option<WireRef>,
    }
}

event_record! {
    /// The run failed.
    RunFailed = "weir.run_events.RunFailed" {
        run_id: String,
        workflow_id: String,
        version: i64,
        failed_node_id: Option<String>,
        reason: String,
    }
}

event_record! {
    /// The run was cancelled (the coordinator's answer to a [`RunCancelRequested`]).
    RunCancelled = "weir.run_events.RunCancelled" {
        run_id: String,
        workflow_id: String,
        version: i64,
        reason: Option<String>,
    }
}

event_record! {
    /// A node attempt failed and another one is scheduled.
    NodeRetried = "weir.run_events.NodeRetried" {
        run_id: String,
        workflow_id: String,
        version: i64,
        node_id: String,
        failed_attempt: i32,
        next_attempt: i32,
        /// timestamp-micros.
        retry_at: i64,
        error: Option<String>,
    }
}

event_record! {
    /// A run made no progress for longer than the stall time.
    RunStalled = "weir.run_events.RunStalled" {
        run_id: String,
        workflow_id: String,
        version: i64,
        idle_ms: i64,
        /// timestamp-micros.
        last_progress_at: i64,
    }
}

union_topic! {
    /// Value of weir.run-events.v1 (key run_id): run lifecycle events from the coordinator.
    RunEvent {
        topic: "weir.run-events.v1", key: run_id,
        records: [RunStarted, RunCompleted, RunFailed, RunCancelled, NodeRetried, RunStalled]
    }
}
