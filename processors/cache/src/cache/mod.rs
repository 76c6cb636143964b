//! The cache itself: exact and semantic lookup and store, usable as a library (the gateway's
//! synchronous lookup, the coordinator's batch lookup) and by the cache processor.
//!
//! Layout: this module holds the [`Cache`] handle (construction, the embedding space, the
//! lookup that tries the exact path and then the semantic one) and the per-node-type rules
//! (TTL, threshold, metric label); [`types`] the requests and answers; [`exact`] the
//! exact-key lookups (also [`exact_lookup_batch`], the coordinator's); `semantic` the
//! nearest-neighbour statement; `store` the writes; `blobs` reading, verifying and putting
//! results in the CAS.
//!
//! Invariants:
//! - Isolation is in the SQL: every lookup statement matches `workspace_id = <requester's>`
//!   and `required_permission <= <requester's level>` and `expires_at > now()` in its WHERE
//!   clause; nothing is filtered afterwards.
//! - A hit is served only after its CAS blob was read and verified (the CAS re-hashes on
//!   read). A missing or corrupt blob turns the hit into a miss, deletes the entry and takes
//!   back the hit's audit row, in the caller's transaction.
//! - A cache answers only the question asked: the exact key covers the prompt when there is
//!   one, and a semantic hit needs the same workspace, node type and config (hash) as the
//!   entry, a requester at or above its level, and a similarity that is a number at or above
//!   the threshold (NaN is never a hit; every vector is a [`UnitVector`], validated once where
//!   it enters: a record, a caller, an embedder).
//! - Every served hit has exactly one audit row, written by the lookup statement itself (in
//!   the caller's transaction, or committed durably before a synchronous answer is returned);
//!   every store has one too (`store` or `refused`, in the store's transaction). The audit
//!   names the requester the caller authenticated (the gateway: the API key id).
//! - Results matching the PII guard (over the parsed JSON values, see [`crate::pii::scan_result`]),
//!   of a node type that is not cacheable, or larger than `cache.max_result_bytes` are never
//!   stored; each refusal is counted and audited.
//! - What a record's content can break costs that record only: an invalid prompt or vector,
//!   or a prompt the embedder refuses, is answered per request ([`StoreOutcome::Rejected`],
//!   `Err(reason)` from [`Cache::lookup_in`]) before any of its effects is written.
//! - A store touches `cache_blobs` before it puts the blob, so the GC's grace period covers it.

mod blobs;
pub mod exact;
mod semantic;
mod store;
#[cfg(test)]
mod tests;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use sqlx::{PgConnection, PgPool};
use weir_runtime::cas::Cas;
use weir_runtime::config::CacheConfig;
use weir_runtime::events::CacheKind;

use crate::embed::{Embedded, Embedder};
use crate::error::CacheError;
use crate::metrics as m;

use blobs::{parse_ref, verify};
pub use exact::exact_lookup_batch;
use exact::{exact_find_verify, ExactProbe};
use semantic::semantic_statement;
pub use types::{
    Answer, ExactHit, ExactRequest, LookupRequest, Refusal, StoreOutcome, StoreRequest,
    StoreResult, UnitVector, INLINE_RESULT_BYTES,
};

/// Whether results of `node_type` may be cached under `cfg`
/// ([`weir_model::cache::is_cacheable`] of `cache.cacheable_node_types`).
fn is_cacheable(cfg: &CacheConfig, node_type: &str) -> bool {
    weir_model::cache::is_cacheable(&cfg.cacheable_node_types, node_type)
}

/// The `node_type` metric label: a configured (cacheable or semantic) type, else `other`, so
/// that no caller can grow the metric series with names of its choosing.
pub fn node_label(cfg: &CacheConfig, node_type: &str) -> String {
    if is_cacheable(cfg, node_type) || is_semantic(cfg, node_type) {
        node_type.to_string()
    } else {
        "other".to_string()
    }
}

/// Refuses a prompt the cache will not hash or embed ([`weir_model::cache::check_prompt`]
/// within `cache.max_prompt_bytes`), as an invalid request.
pub fn check_prompt(cfg: &CacheConfig, prompt: Option<&str>) -> Result<(), CacheError> {
    weir_model::cache::check_prompt(prompt, cfg.max_prompt_bytes).map_err(CacheError::Invalid)
}

/// Whether lookups of `node_type` may be answered by a semantic (prompt) match.
pub fn is_semantic(cfg: &CacheConfig, node_type: &str) -> bool {
    cfg.semantic_node_types.iter().any(|t| t == node_type)
}

/// TTL of an exact entry of `node_type`.
pub fn exact_ttl(cfg: &CacheConfig, node_type: &str) -> Duration {
    Duration::from_secs(
        cfg.ttl_secs
            .get(node_type)
            .copied()
            .unwrap_or(cfg.default_ttl_secs),
    )
}

/// TTL of a semantic entry of `node_type` (falls back to the exact TTL).
pub fn semantic_ttl(cfg: &CacheConfig, node_type: &str) -> Duration {
    cfg.semantic_ttl_secs
        .get(node_type)
        .map_or_else(|| exact_ttl(cfg, node_type), |s| Duration::from_secs(*s))
}

/// The similarity a semantic match needs in `workspace` for `node_type`: the most specific
/// of `cache.threshold_overrides` (`ws/type`, `ws/*`, `*/type`), else the default.
pub fn threshold(cfg: &CacheConfig, workspace: &str, node_type: &str) -> f64 {
    let o = &cfg.threshold_overrides;
    o.get(&format!("{workspace}/{node_type}"))
        .or_else(|| o.get(&format!("{workspace}/*")))
        .or_else(|| o.get(&format!("*/{node_type}")))
        .copied()
        .unwrap_or(cfg.similarity_threshold)
}

/// Counts a hit. No `workspace` label: workspace ids are not bounded by the configuration,
/// so per-workspace figures come from the audit table, not from metrics.
fn count_hit(node_type: &str, outcome: &'static str, cost_ms: i64, cost: Option<f64>) {
    let nt = node_type.to_string();
    metrics::counter!(m::LOOKUPS, "node_type" => nt.clone(), "outcome" => outcome).increment(1);
    metrics::counter!(m::SAVED_MS, "node_type" => nt.clone()).increment(cost_ms.max(0) as u64);
    if let Some(c) = cost {
        // Counters are integers: cost is counted in thousandths of the configured unit.
        metrics::counter!(m::SAVED_COST, "node_type" => nt)
            .increment((c * 1000.0).round().max(0.0) as u64);
    }
}

/// The result cache: a pool, the CAS, the settings and (for semantic entries) an embedder.
#[derive(Clone)]
pub struct Cache {
    pool: PgPool,
    /// Same server, sessions started with the lookup settings (iterative HNSW scans,
    /// ef_search), so a synchronous lookup needs no transaction and no SET round trips. Its
    /// commits are durable (the server's synchronous_commit): a hit's audit row is on disk
    /// before the answer leaves.
    lookup_pool: PgPool,
    cas: Cas,
    cfg: Arc<CacheConfig>,
    embedder: Option<Embedder>,
    semantic_sql: Arc<str>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dimensions", &self.cfg.dimensions)
            .field("embedder", &self.embedder)
            .finish()
    }
}

/// Advisory lock key serializing [`Cache::prepare`] across processes ("weircach" in ASCII).
const PREPARE_LOCK: i64 = 0x7765_6972_6361_6368;

/// Postgres identifier of the HNSW index for dimension `d`.
pub fn hnsw_index_name(d: u32) -> String {
    format!("cache_semantic_hnsw_{d}")
}

impl Cache {
    /// Builds the cache and prepares the database for `cfg.dimensions` ([`Cache::prepare`]).
    /// Without an embedder, semantic lookups and stores need events that carry vectors.
    pub async fn new(
        pool: PgPool,
        cas: Cas,
        cfg: Arc<CacheConfig>,
        embedder: Option<Embedder>,
    ) -> Result<Cache, CacheError> {
        if let Some(e) = &embedder {
            if e.dimensions() != cfg.dimensions as usize {
                return Err(CacheError::Dimension(format!(
                    "cache.dimensions is {} but the {} embedder produces {}",
                    cfg.dimensions,
                    e.name(),
                    e.dimensions()
                )));
            }
        }
        let d = cfg.dimensions;
        let semantic_sql: Arc<str> = semantic_statement(d).into();
        let session = vec![
            ("hnsw.iterative_scan", "strict_order".to_string()),
            (
                "hnsw.ef_search",
                cfg.hnsw_ef_search.clamp(1, 1000).to_string(),
            ),
        ];
        let options = (*pool.connect_options()).clone().options(session);
        let lookup_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(pool.options().get_max_connections())
            .acquire_timeout(pool.options().get_acquire_timeout())
            // No ping before each use: it is a round trip on every lookup. A connection that
            // broke meanwhile fails that one lookup and is then discarded by the pool.
            .test_before_acquire(false)
            .connect_lazy_with(options);
        let cache = Cache {
            pool,
            lookup_pool,
            cas,
            cfg,
            embedder,
            semantic_sql,
        };
        cache.prepare().await?;
        Ok(cache)
    }

    /// Pins the deployment's embedding space (refusing a different dimension than the one
    /// already stored) and creates the HNSW expression index for it if missing.
    pub async fn prepare(&self) -> Result<(), CacheError> {
        let d = self.cfg.dimensions as i32;
        let embedder = self.embedder.as_ref().map_or("none", |e| e.name());
        let mut conn = self.pool.acquire().await?;
        sqlx::query!(
            "INSERT INTO cache_embedding_space (dims, embedder) VALUES ($1, $2) ON CONFLICT (singleton) DO NOTHING",
            d,
            embedder
        )
        .execute(&mut *conn)
        .await?;
        let stored = sqlx::query_scalar!("SELECT dims FROM cache_embedding_space")
            .fetch_one(&mut *conn)
            .await?;
        let other = sqlx::query_scalar!("SELECT count(*) AS \"n!\" FROM (SELECT 1 FROM cache_semantic WHERE dims <> $1 LIMIT 1) x", d)
            .fetch_one(&mut *conn)
            .await?;
        if stored != d || other > 0 {
            return Err(CacheError::Dimension(format!(
                "the cache's semantic table holds {stored}-dimension embeddings but cache.dimensions is {d}; \
                 keep the dimension, or delete the semantic entries (DELETE FROM cache_semantic) \
                 and reset it (DELETE FROM cache_embedding_space)"
            )));
        }
        // A migration cannot know the dimension, so the index is created here (idempotent).
        let ddl = format!(
            "CREATE INDEX IF NOT EXISTS {} ON cache_semantic USING hnsw ((embedding::vector({d})) vector_cosine_ops) \
             WITH (m = 16, ef_construction = 64) WHERE dims = {d}",
            hnsw_index_name(d as u32)
        );
        // Several processes (the cache processor and the gateway of one `weir dev`, or replicas)
        // may prepare at once: concurrent CREATE INDEX IF NOT EXISTS can still collide, so they
        // take turns under a transaction-scoped advisory lock.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PREPARE_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::raw_sql(&ddl).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The settings.
    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// The CAS.
    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The embedder, if any.
    pub fn embedder(&self) -> Option<&Embedder> {
        self.embedder.as_ref()
    }

    /// One synchronous lookup (the gateway's call): its own transaction.
    ///
    /// Runs on a session of the lookup pool, without a transaction: each statement commits
    /// on its own (the lookup statement together with its audit rows).
    /// An invalid request (a bad prompt or vector, a prompt the embedder refuses) is
    /// [`CacheError::Invalid`] with the reason.
    pub async fn lookup(&self, req: &LookupRequest) -> Result<Answer, CacheError> {
        check_prompt(&self.cfg, req.prompt.as_deref())?;
        let mut conn = self.lookup_pool.acquire().await?;
        let mut answers = self
            .lookup_on(&mut conn, std::slice::from_ref(req), true)
            .await?;
        answers
            .pop()
            .ok_or(CacheError::Internal(
                "a lookup of one request returned no answer",
            ))?
            .map_err(CacheError::Invalid)
    }

    /// The unit vectors of the requests that need one (`wanted`: semantic node types with a
    /// prompt or a vector), embedding the missing ones in one batched call: per request
    /// `None` (not wanted), a vector, or `Err(reason)` when the request's own vector or
    /// prompt cannot give one. `Err` of the whole call only for the embedder as a whole.
    ///
    /// Vectors arrive validated ([`UnitVector`]: from the record, the caller or the
    /// embedder); only their length is compared with this deployment's dimension here, as a
    /// [`UnitVector`] does not know which dimension the deployment uses.
    async fn embeddings(
        &self,
        items: Vec<(Option<String>, Option<UnitVector>, bool)>,
    ) -> Result<Vec<Option<Embedded>>, CacheError> {
        let dims = self.cfg.dimensions as usize;
        let mut out: Vec<Option<Embedded>> = vec![None; items.len()];
        let mut todo = Vec::new();
        for (i, (prompt, given, wanted)) in items.into_iter().enumerate() {
            if !wanted {
                continue;
            }
            match (given, prompt) {
                (Some(v), _) if v.dims() != dims => {
                    out[i] = Some(Err(format!(
                        "an embedding has {} dimensions, this deployment uses {dims} (cache.dimensions)",
                        v.dims()
                    )))
                }
                (Some(v), _) => out[i] = Some(Ok(v)),
                (None, Some(p)) => todo.push((i, p)),
                (None, None) => {}
            }
        }
        if !todo.is_empty() {
            let Some(embedder) = &self.embedder else {
                // A deployment without an embedder takes vectors only: the request's fault.
                for (i, _) in todo {
                    out[i] = Some(Err(
                        "a prompt without a vector needs an embedder, and none is configured"
                            .into(),
                    ));
                }
                return Ok(out);
            };
            let vectors = embedder
                .embed(todo.iter().map(|(_, p)| p.clone()).collect())
                .await?;
            if vectors.len() != todo.len() {
                return Err(CacheError::Embed {
                    message: format!(
                        "the embedder answered {} vectors for {} prompts",
                        vectors.len(),
                        todo.len()
                    ),
                    class: crate::error::EmbedClass::Unavailable,
                });
            }
            // The embedder validated its vectors against its dimension, which `Cache::new`
            // checked is this deployment's.
            for ((i, _), v) in todo.into_iter().zip(vectors) {
                out[i] = Some(v);
            }
        }
        Ok(out)
    }

    /// Answers `reqs` on `conn` (inside the caller's transaction): all exact lookups in one
    /// statement, then the semantic ones that missed in one statement. Per request an
    /// answer, or `Err(reason)` for a request whose vector or prompt cannot be used (it wrote
    /// nothing). Prompts are expected checked already ([`check_prompt`]).
    pub async fn lookup_in(
        &self,
        conn: &mut PgConnection,
        reqs: &[LookupRequest],
    ) -> Result<Vec<Result<Answer, String>>, CacheError> {
        self.lookup_on(conn, reqs, false).await
    }

    /// `tuned`: the session already has the lookup settings (a lookup-pool connection).
    async fn lookup_on(
        &self,
        conn: &mut PgConnection,
        reqs: &[LookupRequest],
        tuned: bool,
    ) -> Result<Vec<Result<Answer, String>>, CacheError> {
        let probes: Vec<ExactProbe> = reqs.iter().map(ExactProbe::from).collect();
        let verified = exact_find_verify(conn, &self.cas, &probes).await?;
        let mut answers: Vec<Option<Result<Answer, String>>> = vec![None; reqs.len()];
        for (f, _) in verified {
            let r = &reqs[f.ord];
            count_hit(
                &node_label(&self.cfg, &r.node_type),
                "exact",
                f.cost_ms,
                self.cfg.cost_per_hit.get(&r.node_type).copied(),
            );
            answers[f.ord] = Some(Ok(Answer {
                request_id: r.request_id.clone(),
                hit: true,
                kind: Some(CacheKind::Exact),
                similarity: None,
                result_ref: Some(parse_ref(&f.result_ref)?),
                saved_ms: f.cost_ms,
                entry_key: Some(hex::encode(&f.entry_key)),
            }));
        }
        // Semantic lookups for the misses that allow one.
        let wanted: Vec<bool> = reqs
            .iter()
            .zip(&answers)
            .map(|(r, a)| {
                a.is_none()
                    && r.semantic
                    && is_semantic(&self.cfg, &r.node_type)
                    && (r.prompt.is_some() || r.embedding.is_some())
            })
            .collect();
        if wanted.iter().any(|w| *w) {
            let items = embedding_items(reqs.iter().map(|r| (&r.prompt, &r.embedding)), &wanted);
            let vectors = self.embeddings(items).await?;
            let mut sem: Vec<(usize, UnitVector)> = Vec::new();
            for (i, v) in vectors.into_iter().enumerate() {
                match v {
                    Some(Ok(v)) => sem.push((i, v)),
                    Some(Err(reason)) => answers[i] = Some(Err(reason)),
                    None => {}
                }
            }
            let (found, best) = self.semantic_probe(conn, reqs, &sem, tuned).await?;
            let verified = verify(conn, &self.cas, found, "semantic").await?;
            for (f, _) in verified {
                let r = &reqs[f.ord];
                count_hit(
                    &node_label(&self.cfg, &r.node_type),
                    "semantic",
                    f.cost_ms,
                    self.cfg.cost_per_hit.get(&r.node_type).copied(),
                );
                answers[f.ord] = Some(Ok(Answer {
                    request_id: r.request_id.clone(),
                    hit: true,
                    kind: Some(CacheKind::Semantic),
                    similarity: f.similarity,
                    result_ref: Some(parse_ref(&f.result_ref)?),
                    saved_ms: f.cost_ms,
                    entry_key: Some(hex::encode(&f.entry_key)),
                }));
            }
            for (i, sim) in best {
                if answers[i].is_none() {
                    let r = &reqs[i];
                    // A NaN best match (an entry that slipped past validation) is no number.
                    let sim = sim.is_finite().then_some(sim);
                    if let Some(sim) = sim {
                        metrics::histogram!(m::NEAR_MISS_SIMILARITY, "node_type" => node_label(&self.cfg, &r.node_type)).record(sim);
                    }
                    answers[i] = Some(Ok(Answer::miss(&r.request_id, sim)));
                }
            }
        }
        Ok(reqs
            .iter()
            .zip(answers)
            .map(|(r, a)| {
                a.unwrap_or_else(|| {
                    metrics::counter!(m::LOOKUPS, "node_type" => node_label(&self.cfg, &r.node_type), "outcome" => "miss").increment(1);
                    Ok(Answer::miss(&r.request_id, None))
                })
            })
            .collect())
    }
}

/// (prompt, given vector, wanted) per request, owned, for [`Cache::embeddings`].
fn embedding_items<'a>(
    reqs: impl Iterator<Item = (&'a Option<String>, &'a Option<UnitVector>)>,
    wanted: &[bool],
) -> Vec<(Option<String>, Option<UnitVector>, bool)> {
    reqs.zip(wanted)
        .map(|((p, e), w)| {
            if *w {
                (p.clone(), e.clone(), true)
            } else {
                (None, None, false)
            }
        })
        .collect()
}
