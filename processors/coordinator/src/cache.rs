//! The dispatch-time cache seam. Before a node attempt is dispatched, the coordinator may ask
//! a [`DispatchCache`] whether a result for the same work is already known. A hit completes
//! the attempt as succeeded (`from_cache`) without a NodeReady; its successors become ready in
//! the same batch. No cache (the default) dispatches every attempt to workers.
//!
//! The lookup runs inside the batch transaction, on its connection, so a cache backed by
//! Postgres sees a consistent snapshot and costs no extra connection. It is called once per
//! round of dispatches in a batch with every candidate at once (set-based), and must return
//! exactly one answer per candidate, in order. Which node types are cacheable is the cache's
//! decision (answer `None` for the others).
//!
//! A cache is an optimization: nothing wrong with it may stop runs or drop a completion.
//! weir's result cache (`weir_wiring::ResultCache`, so this crate
//! depends on no other processor) runs its lookup under a savepoint; a failure that retrying cannot fix (the
//! cache's own data, a CAS misconfiguration, a data error in its statements) is rolled back
//! to the savepoint and answered as all misses — the attempts go to workers — with an error
//! logged. Only transient failures (connection lost, CAS unreachable) retry the batch.

use futures::future::BoxFuture;
use sqlx::PgConnection;
use weir_runtime::Disposition;

/// One attempt about to be dispatched.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheCandidate {
    /// The run (for the cache's audit trail).
    pub run_id: String,
    /// The node (for the cache's audit trail).
    pub node_id: String,
    /// Workspace of the run (the cache's tenant).
    pub workspace_id: String,
    /// Who requested the run.
    pub requester: String,
    /// The requester's permission (`RunRequested.permission`: read, write or admin).
    pub permission: String,
    /// Node type (`http_request`, `agent`, ...).
    pub node_type: String,
    /// The node's config from the pinned definition.
    pub config: serde_json::Value,
    /// What the node will see: `{"predecessors": {<node_id>: <output>}, "run": <run inputs>}`
    /// where an output or the run inputs are the JSON value when inline, or
    /// `{"$ref": "sha256:..."}` when in the CAS, and `null` when absent.
    pub inputs: serde_json::Value,
}

/// A cached result that answers a candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResult {
    /// The output, inline JSON text.
    pub output_json: Option<String>,
    /// The output, as a CAS reference.
    pub output_ref: Option<String>,
    /// Worker time this hit saves, in ms (the cost recorded with the entry).
    pub saved_ms: i64,
    /// The cache entry that answered (for logs).
    pub entry_key: String,
}

/// A lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheSeamError {
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The cache answered a different number of results than candidates: a broken
    /// [`DispatchCache`] implementation (no record can cause it; weir's result cache never does).
    #[error("cache answered {answers} results for {candidates} candidates")]
    Mismatch {
        /// Candidates asked.
        candidates: usize,
        /// Answers given.
        answers: usize,
    },
    /// Anything else, with whether retrying the batch may help.
    #[error("{message}")]
    Other {
        /// Detail.
        message: String,
        /// Retry the batch (else the process stops: a cache bug must not drop runs).
        /// weir's result cache returns only retryable ones: it degrades to misses otherwise.
        retryable: bool,
    },
}

impl CacheSeamError {
    /// What the consumer does with the batch.
    pub fn disposition(&self) -> Disposition {
        match self {
            CacheSeamError::Postgres(e) => weir_runtime::error::postgres_disposition(e),
            CacheSeamError::Mismatch { .. } => Disposition::Fatal,
            CacheSeamError::Other {
                retryable: true, ..
            } => Disposition::Retry,
            CacheSeamError::Other { .. } => Disposition::Fatal,
        }
    }
}

/// A result cache consulted before dispatching.
pub trait DispatchCache: Send + Sync {
    /// One answer per candidate, in order: `Some` to complete the attempt from the cache.
    fn lookup<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        candidates: &'a [CacheCandidate],
    ) -> BoxFuture<'a, Result<Vec<Option<CachedResult>>, CacheSeamError>>;

    /// Whether a worker's successful result of `node_type` is offered to the cache (a
    /// CacheStore event through the outbox, stored by the cache processor), so a later run
    /// with the same node, config and inputs is served from it.
    fn stores(&self, node_type: &str) -> bool;
}
