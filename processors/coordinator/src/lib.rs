//! The run coordinator: consumes weir.completions.v1 (RunRequested, NodeCompleted,
//! RunCancelled) through the runtime and turns them into the next work of each run: NodeReady
//! events for workers and run lifecycle events, written through the outbox in the batch's
//! transaction.
//!
//! - [`machine`]: the pure run state machine (property-tested against a reference model).
//! - [`processor`]: the batch processor; per batch a handful of set-based statements.
//! - [`timers`]: the durable timer loop (retries, deadlines, stall detection).
//! - [`cache`]: the dispatch-time result cache seam.
//! - [`status`]: the run status read by the HTTP gateway.

pub mod cache;
pub mod machine;
pub mod metrics;
pub mod processor;
pub mod status;
pub mod timers;

pub use cache::{CacheCandidate, CacheSeamError, CachedResult, DispatchCache, ResultCache};
pub use processor::{Coordinator, GROUP};
pub use status::{run_status, NodeStatusView, RunStatus};
pub use timers::TimerLoop;
