//! The process wiring: the adapters that let one processor use another's data without
//! depending on its crate. Each processor defines the seam it needs as a trait (the gateway's
//! [`RunStatusSource`] and [`CacheLookupSource`], the coordinator's [`DispatchCache`] and
//! [`PatchLog`]); this crate implements them with the crate that owns the data. The `weir`
//! binary, the tools and the integration tests build their processes from it.
//!
//! Invariant: the processor crates depend on weir-runtime and weir-model only; every edge
//! between two processors is an adapter here.

use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use sqlx::PgConnection;
use uuid::Uuid;
use weir_coordinator::{
    CacheCandidate, CacheSeamError, CachedResult, DispatchCache, PatchLog, RebuildError, Rebuilt,
};
use weir_gateway::auth::Caller;
use weir_gateway::sources::{
    CacheLookupAnswer, CacheLookupRequest, CacheLookupSource, HitKind, RunStatusSource, SourceError,
};
use weir_materializer::replay::{self, ReplayError};
use weir_model::definition::Limits;
use weir_model::patch::Budget;
use weir_model::{Permission, RunStatus};
use weir_runtime::cas::Cas;
use weir_runtime::config::CacheConfig;
use weir_runtime::{Classify as _, Disposition};

/// Run status for the gateway, from the coordinator's tables.
pub struct CoordinatorRunStatus {
    pool: sqlx::PgPool,
}

impl CoordinatorRunStatus {
    /// Reads from `pool` (the database the coordinator writes).
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl RunStatusSource for CoordinatorRunStatus {
    async fn run_status(
        &self,
        workspace_id: &str,
        run_id: Uuid,
    ) -> Result<Option<RunStatus>, SourceError> {
        weir_coordinator::run_status(&self.pool, workspace_id, run_id)
            .await
            .map_err(|e| SourceError::unavailable(format!("run status from postgres: {e}")))
    }

    async fn run_exists(&self, workspace_id: &str, run_id: Uuid) -> Result<bool, SourceError> {
        weir_coordinator::run_exists(&self.pool, workspace_id, run_id)
            .await
            .map_err(|e| SourceError::unavailable(format!("run lookup in postgres: {e}")))
    }
}

/// Synchronous lookups for the gateway in weir's result cache (weir-cache), exact then
/// semantic.
pub struct ResultCacheLookup {
    cache: weir_cache::Cache,
}

impl ResultCacheLookup {
    /// Looks up in `cache`.
    pub fn new(cache: weir_cache::Cache) -> Self {
        Self { cache }
    }
}

/// Results up to this size are returned inline in the answer (else only their CAS ref).
const INLINE_RESULT_BYTES: usize = 256 * 1024;

#[async_trait]
impl CacheLookupSource for ResultCacheLookup {
    async fn lookup(
        &self,
        caller: &Caller,
        request: &CacheLookupRequest,
    ) -> Result<CacheLookupAnswer, SourceError> {
        let fail = |e: weir_cache::CacheError| SourceError {
            message: format!("cache lookup: {e}"),
            // A content-caused failure is the request's (422); the rest is the cache's (503).
            rejection: (e.disposition() == Disposition::DeadLetter).then(|| e.public_message()),
        };
        let req = weir_cache::LookupRequest {
            request_id: weir_runtime::events::new_event_id().to_string(),
            workspace_id: caller.workspace_id.clone(),
            // The audit trail names who asked: the API key, not the workspace.
            requester: caller.key_id.clone(),
            permission: caller.permission,
            node_type: request.node_type.clone(),
            config: request.config.clone(),
            inputs: request.inputs.clone(),
            prompt: request.prompt.clone(),
            embedding: None,
            semantic: request.semantic,
        };
        let answer = self.cache.lookup(&req).await.map_err(fail)?;
        let mut result = None;
        if let Some(r) = &answer.result_ref {
            // Verified again on read: content addressing makes a stale or corrupt copy impossible.
            let blob = self
                .cache
                .cas()
                .get(r)
                .await
                .map_err(|e| SourceError::unavailable(format!("cache result {r}: {e}")))?;
            if blob.len() <= INLINE_RESULT_BYTES {
                result = serde_json::from_slice(&blob).ok();
            }
        }
        Ok(CacheLookupAnswer {
            hit: answer.hit,
            kind: answer.kind.map(|k| match k {
                weir_runtime::events::CacheKind::Exact => HitKind::Exact,
                weir_runtime::events::CacheKind::Semantic => HitKind::Semantic,
            }),
            similarity: answer.similarity,
            result_ref: answer.result_ref.map(|r| r.to_string()),
            result,
            saved_ms: answer.saved_ms,
        })
    }
}

/// The coordinator's older versions, rebuilt with the materializer's replay of the patch log.
pub struct PatchLogReplay {
    pool: sqlx::PgPool,
    cas: Cas,
}

impl PatchLogReplay {
    /// Reads the log from `pool` and its blobs from `cas`.
    pub fn new(pool: sqlx::PgPool, cas: Cas) -> Self {
        Self { pool, cas }
    }
}

impl PatchLog for PatchLogReplay {
    fn rebuild<'a>(
        &'a self,
        workspace_id: &'a str,
        workflow_id: &'a str,
        version: i64,
        limits: &'a Limits,
        budget: &'a Budget,
    ) -> BoxFuture<'a, Result<Rebuilt, RebuildError>> {
        Box::pin(async move {
            let report = replay::replay_with(
                &self.pool,
                &self.cas,
                workspace_id,
                workflow_id,
                Some(version),
                limits,
                budget,
            )
            .await
            .map_err(|e| match e {
                ReplayError::Postgres(e) => RebuildError::Postgres(e),
                ReplayError::Cas(e) => RebuildError::Cas(e),
                other => RebuildError::Unavailable(other.to_string()),
            })?;
            Ok(Rebuilt {
                version: report.version,
                definition: report.definition,
                differences: report.differences,
            })
        })
    }
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
                if !weir_model::cache::is_cacheable(&self.cfg.cacheable_node_types, &c.node_type) {
                    continue;
                }
                // The run's permission was checked when it started; an unknown level asks nothing.
                let Ok(permission) = Permission::parse(&c.permission) else {
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
        weir_model::cache::is_cacheable(&self.cfg.cacheable_node_types, node_type)
    }
}
