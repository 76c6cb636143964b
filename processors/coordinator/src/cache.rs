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
//! [`ResultCache`] runs its lookup under a savepoint; a failure that retrying cannot fix (the
//! cache's own data, a CAS misconfiguration, a data error in its statements) is rolled back
//! to the savepoint and answered as all misses — the attempts go to workers — with an error
//! logged. Only transient failures (connection lost, CAS unreachable) retry the batch.

use std::sync::Arc;

use futures::future::BoxFuture;
use sqlx::PgConnection;
use weir_runtime::cas::Cas;
use weir_runtime::config::CacheConfig;
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
    /// [`DispatchCache`] implementation (no record can cause it; [`ResultCache`] never does).
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
        /// [`ResultCache`] returns only retryable ones: it degrades to misses otherwise.
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

/// weir's result cache (weir-cache) as the dispatch cache: exact lookups of cacheable node
/// types in the batch's transaction (one statement for every candidate, with the audit rows),
/// and results of those types offered back to it.
pub struct ResultCache {
    cas: Cas,
    cfg: Arc<CacheConfig>,
}

impl ResultCache {
    /// Looks up with `cfg`'s cacheable node types; blobs are verified through `cas`.
    pub fn new(cas: Cas, cfg: Arc<CacheConfig>) -> Self {
        Self { cas, cfg }
    }
}

impl DispatchCache for ResultCache {
    fn lookup<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        candidates: &'a [CacheCandidate],
    ) -> BoxFuture<'a, Result<Vec<Option<CachedResult>>, CacheSeamError>> {
        Box::pin(async move {
            let mut asked = Vec::new();
            let mut reqs = Vec::new();
            for (i, c) in candidates.iter().enumerate() {
                if !weir_cache::is_cacheable(&self.cfg, &c.node_type) {
                    continue;
                }
                // The run's permission was checked when it started; an unknown level asks nothing.
                let Ok(permission) = weir_cache::Permission::parse(&c.permission) else {
                    continue;
                };
                asked.push(i);
                reqs.push(weir_cache::ExactRequest {
                    workspace_id: c.workspace_id.clone(),
                    permission,
                    node_type: c.node_type.clone(),
                    config: c.config.clone(),
                    inputs: c.inputs.clone(),
                    // The coordinator offers results without a prompt (its CacheStore events
                    // carry none), so it looks them up without one.
                    prompt: None,
                    // The audit names who asked: the key that requested the run (the run and
                    // node are in the request id).
                    requester: c.requester.clone(),
                    request_id: format!("{}/{}", c.run_id, c.node_id),
                });
            }
            let mut answers = vec![None; candidates.len()];
            if reqs.is_empty() {
                return Ok(answers);
            }
            // Under a savepoint (the batch transaction is open): a failure that is not
            // transient is undone and answered as misses instead of stopping the batch.
            sqlx::query("SAVEPOINT weir_dispatch_cache")
                .execute(&mut *conn)
                .await?;
            let hits = match weir_cache::exact_lookup_batch(conn, &self.cas, &reqs).await {
                Ok(hits) => {
                    sqlx::query("RELEASE SAVEPOINT weir_dispatch_cache")
                        .execute(&mut *conn)
                        .await?;
                    hits
                }
                Err(e) if e.disposition() == Disposition::Retry => {
                    return Err(match e {
                        weir_cache::CacheError::Postgres(e) => CacheSeamError::Postgres(e),
                        other => CacheSeamError::Other {
                            retryable: true,
                            message: other.to_string(),
                        },
                    })
                }
                Err(e) => {
                    tracing::error!(error = %e, candidates = reqs.len(),
                        "dispatch cache lookup failed; dispatching to workers without the cache");
                    sqlx::query("ROLLBACK TO SAVEPOINT weir_dispatch_cache")
                        .execute(&mut *conn)
                        .await?;
                    return Ok(answers);
                }
            };
            for (i, hit) in asked.into_iter().zip(hits) {
                answers[i] = hit.map(|h| {
                    let inline = h.result_json.map(|v| v.to_string());
                    CachedResult {
                        output_ref: inline.is_none().then(|| h.result_ref.to_string()),
                        output_json: inline,
                        saved_ms: h.saved_ms,
                        entry_key: h.entry_key,
                    }
                });
            }
            Ok(answers)
        })
    }

    fn stores(&self, node_type: &str) -> bool {
        weir_cache::is_cacheable(&self.cfg, node_type)
    }
}
