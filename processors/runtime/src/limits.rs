//! The domain model's size limits, built from the configuration in this one place: the
//! materializer, the coordinator, the gateway, replay and the checks of `weir chaos` must
//! agree on them, or a patch accepted in one would be rejected (or replay differently) in
//! another.

use weir_model::definition::Limits;
use weir_model::patch::Budget;

use crate::config::MaterializerConfig;

impl MaterializerConfig {
    /// The definition limits (`materializer.max_definition_bytes`, `max_nodes`, `max_edges`).
    pub fn limits(&self) -> Limits {
        Limits {
            max_bytes: self.max_definition_bytes,
            max_nodes: self.max_nodes,
            max_edges: self.max_edges,
        }
    }

    /// The patch budget (`materializer.patch_max_*`): a patch the materializer applies under
    /// raised limits replays as applied only within this same budget.
    pub fn budget(&self) -> Budget {
        Budget {
            max_operations: self.patch_max_operations,
            max_bytes: self.patch_max_bytes,
            max_depth: self.patch_max_depth,
            max_pointer_bytes: self.patch_max_pointer_bytes,
            max_array_shifts: self.patch_max_array_shifts,
        }
    }
}
