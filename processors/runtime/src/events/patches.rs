//! Topic `weir.patches.v1` (key workflow_id): patches to workflow definitions, the materializer's
//! input.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weir_model::WireRef;

use super::avro::{record_from_value, record_to_value, write_record};
use super::{uuid_text, EventError, Record, TopicEvent};

event_record! {
    /// A client asks to change one workflow definition with an RFC 6902 JSON Patch.
    PatchSubmitted = "weir.patches.PatchSubmitted" {
        /// Unique id of the patch, chosen by the submitter.
        #[serde(with = "uuid_text")]
        patch_id: Uuid,
        workflow_id: String,
        author: String,
        /// Head version the patch was written against; `None` applies to the current head.
        base_version: Option<i64>,
        /// The RFC 6902 operations array as JSON text; "" when `operations_ref` is set.
        operations_json: String,
        /// CAS ref (`sha256:<hex>`) of the operations when the patch is large.
        operations_ref: Option<WireRef>,
    }
}

record_topic!(PatchSubmitted {
    topic: "weir.patches.v1",
    key: workflow_id
});
