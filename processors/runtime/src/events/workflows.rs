//! Topic `weir.workflows.v1` (key workflow_id): the materializer's output, one event per applied
//! version or the rejection.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weir_model::WireRef;

use super::avro::{record_from_value, record_to_value, write_record};
use super::{uuid_text, EventError, Record, TopicEvent};

event_record! {
    /// A new version of a workflow definition was materialized (one per applied version).
    WorkflowMaterialized = "weir.workflows.WorkflowMaterialized" {
        workflow_id: String,
        version: i64,
        definition_json: Option<String>,
        /// CAS ref of the definition when stored in the CAS (claim check).
        definition_ref: Option<WireRef>,
        #[serde(with = "uuid_text::vec")]
        patch_ids: Vec<Uuid>,
        /// Lowercase hex sha256 of the canonical definition JSON.
        definition_sha256: String,
    }
}

event_record! {
    /// A patch was rejected; later patches of the workflow still apply.
    PatchRejected = "weir.workflows.PatchRejected" {
        workflow_id: String,
        #[serde(with = "uuid_text")]
        patch_id: Uuid,
        base_version: Option<i64>,
        /// Head version when rejected (0 when the workflow does not exist).
        head_version: i64,
        /// test_failed, invalid_operation, invalid_definition, version_conflict, ... (open set).
        reason_code: String,
        reason: String,
    }
}

union_topic! {
    /// Value of weir.workflows.v1 (key workflow_id): the materializer's output.
    WorkflowEvent {
        topic: "weir.workflows.v1", key: workflow_id,
        records: [WorkflowMaterialized, PatchRejected]
    }
}
