//! Upkeep: the sweeper (expired entries, in batches), explicit purges, and the CAS garbage
//! collector for the blobs the cache stored.
//!
//! Invariants: expired entries are never served whether or not the sweeper has run (every
//! lookup checks `expires_at`); the sweeper only deletes rows already expired.
//!
//! The GC never deletes a blob something still needs. It considers only blobs the cache put
//! itself (`cache_blobs`), and deletes one only when all of these hold:
//! - no row references it: cache entries (exact and semantic, expired or not), workflow heads
//!   (`definition_ref`), the patch log (`operations_ref`, applied or rejected), pinned
//!   definition snapshots, run inputs (`inputs_ref`) and node outputs (`output_ref`);
//! - no owner is pinned (`weir_cas_owners.pinned`: some other part of weir — the gateway, the
//!   materializer — stored the same bytes, and its refs may live where the GC cannot look,
//!   such as output topics);
//! - no owner used it within `cache.gc_grace_secs` (a put, or the gateway accepting the ref
//!   from a caller: the grace covers events still in flight on Kafka);
//! - the cache last stored it more than `gc_grace_secs` + the longest cache TTL ago: every hit
//!   ever served from it (a hit is served only before its entry expires) is then older than
//!   the grace too, so a worker's completion carrying the hit's ref is no longer in flight.
//!
//! Ordering with writers: a collection locks the `cache_blobs` rows it examines and deletes
//! the blobs before it commits; every put and every accepted ref touches the same row first
//! (`weir_runtime::cas::owners`), so it waits for the collection and then puts the blob
//! again or finds the ref unknown. Blobs still referenced get their `last_referenced_at`
//! bumped, so the oldest rows do not block the collector's batches.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use weir_model::CasRef;
use weir_runtime::cas::Cas;
use weir_runtime::config::CacheConfig;

use crate::error::CacheError;
use crate::metrics as m;

/// Deleted rows after which `cache_semantic` is vacuumed. pgvector's filtered (iterative)
/// HNSW scans walk dead index entries until VACUUM removes them, and stop after
/// `hnsw.max_scan_tuples`: after a mass delete a lookup in a small workspace could end before
/// reaching its best live match. Autovacuum gets there too, but later.
pub const VACUUM_AFTER_DELETES: u64 = 5_000;

/// VACUUM (ANALYZE) of the semantic table: removes dead entries from the HNSW index.
pub async fn vacuum_semantic(pool: &PgPool) -> Result<(), CacheError> {
    // Simple protocol: VACUUM cannot run inside the implicit transaction of a prepared
    // statement.
    sqlx::raw_sql("VACUUM (ANALYZE) cache_semantic")
        .execute(pool)
        .await?;
    Ok(())
}

/// Deletes up to `batch` expired exact and semantic entries; returns how many went.
pub async fn sweep_once(pool: &PgPool, batch: i64) -> Result<u64, CacheError> {
    let n = sqlx::query_scalar!(
        r#"WITH e AS (
               DELETE FROM cache_entries WHERE entry_key IN (
                   SELECT entry_key FROM cache_entries WHERE expires_at <= now()
                   ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
               RETURNING 1
           ), s AS (
               DELETE FROM cache_semantic WHERE entry_key IN (
                   SELECT entry_key FROM cache_semantic WHERE expires_at <= now()
                   ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
               RETURNING 1
           )
           SELECT (SELECT count(*) FROM e) + (SELECT count(*) FROM s) AS "n!""#,
        batch
    )
    .fetch_one(pool)
    .await?;
    metrics::counter!(m::SWEPT).increment(n as u64);
    Ok(n as u64)
}

/// Sweeps until nothing expired is left (in batches of `batch`).
pub async fn sweep_all(pool: &PgPool, batch: i64) -> Result<u64, CacheError> {
    let mut total = 0;
    loop {
        let n = sweep_once(pool, batch).await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// What a purge removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    /// Exact entries deleted.
    pub exact: u64,
    /// Semantic entries deleted.
    pub semantic: u64,
}

/// Deletes every entry of `workspace` (of `node_type` only, if given), exact and semantic.
pub async fn purge(
    pool: &PgPool,
    workspace: &str,
    node_type: Option<&str>,
) -> Result<Purged, CacheError> {
    if workspace.is_empty() {
        return Err(CacheError::Invalid("purge needs a workspace".into()));
    }
    let row = sqlx::query!(
        r#"WITH e AS (
               DELETE FROM cache_entries WHERE workspace_id = $1 AND ($2::text IS NULL OR node_type = $2)
               RETURNING 1
           ), s AS (
               DELETE FROM cache_semantic WHERE workspace_id = $1 AND ($2::text IS NULL OR node_type = $2)
               RETURNING 1
           )
           SELECT (SELECT count(*) FROM e) AS "exact!", (SELECT count(*) FROM s) AS "semantic!""#,
        workspace,
        node_type
    )
    .fetch_one(pool)
    .await?;
    Ok(Purged {
        exact: row.exact as u64,
        semantic: row.semantic as u64,
    })
}

/// How long the GC waits: `grace` after the last use of a blob by any owner, and `hold`
/// (grace + the longest TTL an entry can have) after the cache last stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcWindow {
    /// `cache.gc_grace_secs`: longer than any event may wait on Kafka before it is applied.
    pub grace: Duration,
    /// Since the cache last stored the blob: `grace` + the longest cache TTL.
    pub hold: Duration,
}

impl GcWindow {
    /// The window of `cfg`: `gc_grace_secs`, and that plus the longest exact or semantic TTL.
    pub fn of(cfg: &CacheConfig) -> GcWindow {
        let longest = cfg
            .ttl_secs
            .values()
            .chain(cfg.semantic_ttl_secs.values())
            .copied()
            .chain(std::iter::once(cfg.default_ttl_secs))
            .max()
            .unwrap_or(0);
        GcWindow {
            grace: Duration::from_secs(cfg.gc_grace_secs),
            hold: Duration::from_secs(cfg.gc_grace_secs.saturating_add(longest)),
        }
    }
}

/// One GC pass over up to `batch` of the oldest blobs the cache put: deletes those nothing
/// needs (see the module docs) from the CAS, with their `cache_blobs` and `weir_cas_owners`
/// rows, and marks the others referenced now. The rows are locked first and the blobs deleted
/// before the commit, so a put or a claim of one of them waits, then puts the blob again or
/// finds the ref unknown.
pub async fn gc_once(
    pool: &PgPool,
    cas: &Cas,
    window: GcWindow,
    batch: i64,
) -> Result<u64, CacheError> {
    let mut tx = pool.begin().await?;
    let refs = sqlx::query_scalar!(
        r#"WITH cand AS (
               SELECT result_ref FROM cache_blobs
               WHERE last_referenced_at < now() - $1 * interval '1 second'
               ORDER BY last_referenced_at LIMIT $3 FOR UPDATE SKIP LOCKED
           ), dead AS (
               SELECT c.result_ref FROM cand c
               WHERE NOT EXISTS (SELECT 1 FROM weir_cas_owners o
                                 WHERE o.blob_ref = c.result_ref
                                   AND (o.pinned OR o.last_used_at >= now() - $2 * interval '1 second'))
                 AND NOT EXISTS (SELECT 1 FROM cache_entries e WHERE e.result_ref = c.result_ref)
                 AND NOT EXISTS (SELECT 1 FROM cache_semantic s WHERE s.result_ref = c.result_ref)
                 AND NOT EXISTS (SELECT 1 FROM weir_workflow_heads h WHERE h.definition_ref = c.result_ref)
                 AND NOT EXISTS (SELECT 1 FROM weir_workflow_patches p WHERE p.operations_ref = c.result_ref)
                 AND NOT EXISTS (SELECT 1 FROM weir_coordinator_definitions d WHERE d.definition_ref = c.result_ref)
                 AND NOT EXISTS (SELECT 1 FROM weir_runs r WHERE r.inputs_ref = c.result_ref)
                 AND NOT EXISTS (SELECT 1 FROM weir_run_nodes n WHERE n.output_ref = c.result_ref)
           ), kept AS (
               UPDATE cache_blobs b SET last_referenced_at = now()
               FROM cand c
               WHERE b.result_ref = c.result_ref
                 AND NOT EXISTS (SELECT 1 FROM dead d WHERE d.result_ref = c.result_ref)
               RETURNING 1
           ), owners AS (
               DELETE FROM weir_cas_owners o USING dead d WHERE o.blob_ref = d.result_ref
               RETURNING 1
           )
           DELETE FROM cache_blobs b USING dead d WHERE b.result_ref = d.result_ref
           RETURNING b.result_ref"#,
        window.hold.as_secs_f64(),
        window.grace.as_secs_f64(),
        batch
    )
    .fetch_all(&mut *tx)
    .await?;
    for r in &refs {
        let r: CasRef = r
            .parse()
            .map_err(|e| CacheError::Invalid(format!("cache_blobs: {e}")))?;
        cas.delete(&r).await?;
    }
    tx.commit().await?;
    metrics::counter!(m::GC_DELETED).increment(refs.len() as u64);
    Ok(refs.len() as u64)
}

/// Runs the sweeper and the GC on their intervals until `cancel`.
pub async fn run_upkeep(pool: PgPool, cas: Cas, cfg: CacheConfig, cancel: CancellationToken) {
    let mut sweep = tokio::time::interval(Duration::from_millis(cfg.sweep_interval_ms.max(10)));
    let mut gc = tokio::time::interval(Duration::from_millis(cfg.gc_interval_ms.max(10)));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    gc.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let window = GcWindow::of(&cfg);
    let mut since_vacuum = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sweep.tick() => match sweep_all(&pool, cfg.sweep_batch).await {
                Ok(n) if n > 0 => {
                    tracing::info!(deleted = n, "swept expired cache entries");
                    since_vacuum += n;
                    if since_vacuum >= VACUUM_AFTER_DELETES {
                        match vacuum_semantic(&pool).await {
                            Ok(()) => since_vacuum = 0,
                            Err(e) => tracing::warn!(error = %e, "vacuum of cache_semantic failed; next sweep retries"),
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cache sweep failed; next interval retries"),
            },
            _ = gc.tick() => match gc_once(&pool, &cas, window, cfg.sweep_batch).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "collected unreferenced cache blobs"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cache blob collection failed; next interval retries"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gc_window_holds_for_the_grace_plus_the_longest_ttl() {
        let mut cfg = CacheConfig {
            gc_grace_secs: 100,
            default_ttl_secs: 10,
            ttl_secs: [("agent".to_string(), 50)].into_iter().collect(),
            semantic_ttl_secs: [("agent".to_string(), 70)].into_iter().collect(),
            ..CacheConfig::default()
        };
        let w = GcWindow::of(&cfg);
        assert_eq!(w.grace, Duration::from_secs(100));
        assert_eq!(
            w.hold,
            Duration::from_secs(170),
            "the semantic TTL is the longest"
        );
        cfg.ttl_secs.clear();
        cfg.semantic_ttl_secs.clear();
        assert_eq!(GcWindow::of(&cfg).hold, Duration::from_secs(110));
        cfg.gc_grace_secs = u64::MAX;
        assert_eq!(
            GcWindow::of(&cfg).hold,
            Duration::from_secs(u64::MAX),
            "saturates"
        );
    }
}
