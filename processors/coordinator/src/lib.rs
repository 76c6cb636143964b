//! The run coordinator: consumes weir.completions.v1 (RunRequested, NodeCompleted,
//! RunCancelled) through the runtime and turns them into the next work of each run: NodeReady
//! events for workers and run lifecycle events, written through the outbox in the batch's
//! transaction.
//!
//! - [`machine`]: the pure run state machine (property-tested against a reference model).
//! - [`processor`]: the batch processor; per batch a handful of set-based statements:
//!   `load` (read and lock), `step` (the machine, pure), `write` (rows and outbox events).
//! - [`error`]: the coordinator's failures, each classified once.
//! - [`timers`]: the durable timer loop (retries, deadlines, stall detection).
//! - [`cache`]: the dispatch-time result cache seam.
//! - [`history`]: the patch-log seam that rebuilds older versions.
//! - [`status`]: the run status read by the HTTP gateway.

pub mod cache;
pub mod error;
pub mod history;
pub mod machine;
pub mod metrics;
pub mod processor;
pub mod status;
pub mod timers;

pub use cache::{CacheCandidate, CacheSeamError, CachedResult, DispatchCache};
pub use error::CoordinatorError;
pub use history::{PatchLog, RebuildError, Rebuilt};
pub use processor::{Coordinator, GROUP};
pub use status::{run_exists, run_status};
pub use timers::TimerLoop;
