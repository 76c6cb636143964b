//! The materializer's metrics: names (kept in [`crate::processor::names`], re-exported here)
//! and their help text and units. `reason` of rejected patches is a fixed code
//! (`test_failed`, `invalid_definition`, `blob_missing`, ...), never a message.

pub use crate::processor::names::*;

/// Help text and units of the materializer's metrics. Call once at start, after the
/// recorder is installed (`weir_runtime::telemetry::metrics_handle`).
pub fn describe() {
    use metrics::{describe_counter, Unit};
    describe_counter!(
        PATCHES_APPLIED,
        Unit::Count,
        "Patches applied (each made a new workflow version)."
    );
    describe_counter!(
        PATCHES_REJECTED,
        Unit::Count,
        "Patches rejected and recorded (not dead-lettered), by reason code."
    );
    describe_counter!(
        PATCHES_DUPLICATE,
        Unit::Count,
        "Patches skipped because their id was already decided."
    );
    describe_counter!(DEFINITIONS_IN_CAS, Unit::Count,
        "Definitions stored in the CAS instead of inline (larger than materializer.inline_definition_max_bytes).");
}
