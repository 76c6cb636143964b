//! The cache itself: exact and semantic lookup and store, usable as a library (the gateway's
//! synchronous lookup, the coordinator's batch lookup) and by the cache processor.
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
//!   the threshold (NaN is never a hit; every vector is validated before it is stored or
//!   compared, see [`crate::embed::validate_vector`]).
//! - Every served hit has exactly one audit row, written by the lookup statement itself (in
//!   the caller's transaction, or committed durably before a synchronous answer is returned);
//!   every store has one too (`store` or `refused`, in the store's transaction). The audit
//!   names the requester the caller authenticated (the gateway: the API key id).
//! - Results matching the PII guard (over the parsed JSON values, see [`pii::scan_result`]),
//!   of a node type that is not cacheable, or larger than `cache.max_result_bytes` are never
//!   stored; each refusal is counted and audited.
//! - What a record's content can break costs that record only: an invalid prompt or vector,
//!   or a prompt the embedder refuses, is answered per request ([`StoreOutcome::Rejected`],
//!   `Err(reason)` from [`Cache::lookup_in`]) before any of its effects is written.
//! - A store touches `cache_blobs` before it puts the blob, so the GC's grace period covers it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::join_all;
use serde_json::Value;
use sqlx::{FromRow as _, PgConnection, PgPool};
use uuid::Uuid;
use weir_model::CasRef;
use weir_runtime::cas::{Cas, CasError};
use weir_runtime::config::CacheConfig;
use weir_runtime::events::CacheKind;

use weir_model::cache::validate_vector;
use weir_model::Permission;

use crate::embed::{Embedded, Embedder};
use crate::error::CacheError;
use crate::key::{entry_key, json_hash, semantic_key};
use crate::metrics as m;
use crate::pii;

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

/// One lookup.
#[derive(Debug, Clone)]
pub struct LookupRequest {
    /// Correlates the answer.
    pub request_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// Who asks (for the audit trail).
    pub requester: String,
    /// The requester's level.
    pub permission: Permission,
    /// Node type.
    pub node_type: String,
    /// Node config.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// Agent prompt, for a semantic lookup.
    pub prompt: Option<String>,
    /// The prompt's embedding, if the caller has it.
    pub embedding: Option<Vec<f32>>,
    /// Whether a semantic match may answer.
    pub semantic: bool,
}

/// The answer to one lookup (the fields of a CacheAnswer).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The request's id.
    pub request_id: String,
    /// Whether an entry was served.
    pub hit: bool,
    /// How it matched, on a hit.
    pub kind: Option<CacheKind>,
    /// Similarity of a semantic hit, or of the best near miss.
    pub similarity: Option<f64>,
    /// The verified result, on a hit.
    pub result_ref: Option<CasRef>,
    /// Work the hit saved, in ms.
    pub saved_ms: i64,
    /// Hex key of the entry that answered.
    pub entry_key: Option<String>,
}

impl Answer {
    fn miss(request_id: &str, similarity: Option<f64>) -> Answer {
        Answer {
            request_id: request_id.into(),
            hit: false,
            kind: None,
            similarity,
            result_ref: None,
            saved_ms: 0,
            entry_key: None,
        }
    }
}

/// The result offered to the cache.
#[derive(Debug, Clone)]
pub enum StoreResult {
    /// JSON text; the cache puts it in the CAS.
    Json(String),
    /// Already in the CAS.
    Ref(CasRef),
}

/// One store.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    /// Correlation id.
    pub request_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// Who produced the result (the entry's owner, in the audit trail).
    pub requester: String,
    /// The producer's level (must be at least `required_permission`).
    pub permission: Permission,
    /// Node type.
    pub node_type: String,
    /// Node config.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// The result.
    pub result: StoreResult,
    /// Agent prompt, for a semantic entry.
    pub prompt: Option<String>,
    /// The prompt's embedding, if the producer has it.
    pub embedding: Option<Vec<f32>>,
    /// What producing the result cost, in ms.
    pub cost_ms: i64,
    /// The least level a requester needs to be served this entry.
    pub required_permission: Permission,
}

/// Why a result was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node type is not cacheable.
    NotCacheable,
    /// The result matched the PII guard.
    Pii(pii::PiiKind),
    /// Larger than `cache.max_result_bytes`.
    TooLarge,
    /// The referenced blob is missing or corrupt.
    BadBlob,
}

impl Refusal {
    /// The reason, as audited and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotCacheable => "not_cacheable",
            Refusal::Pii(pii::PiiKind::Email) => "pii:email",
            Refusal::Pii(pii::PiiKind::CardNumber) => "pii:card_number",
            Refusal::Pii(pii::PiiKind::NationalId) => "pii:national_id",
            Refusal::Pii(pii::PiiKind::Secret) => "pii:secret",
            Refusal::TooLarge => "too_large",
            Refusal::BadBlob => "bad_blob",
        }
    }
}

/// What a store did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored: the exact key (hex) and whether a semantic entry was written too.
    Stored {
        /// Hex exact key.
        entry_key: String,
        /// Whether a semantic entry was written.
        semantic: bool,
    },
    /// Not stored: the cache does not keep this result (audited as `refused`).
    Refused(Refusal),
    /// The request is invalid (a bad prompt or vector, a prompt the embedder refuses, a
    /// required permission above the producer's): nothing was written; the processor
    /// dead-letters the record with this reason.
    Rejected(String),
}

/// A request of [`exact_lookup_batch`] (the coordinator's pre-dispatch check).
#[derive(Debug, Clone)]
pub struct ExactRequest {
    /// Tenant.
    pub workspace_id: String,
    /// The requester's level.
    pub permission: Permission,
    /// Node type.
    pub node_type: String,
    /// Node config.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// The prompt, when the node has one (part of the exact key).
    pub prompt: Option<String>,
    /// Who asks, for the audit trail (the coordinator: the key that requested the run).
    pub requester: String,
    /// Correlation id for the audit trail (e.g. `<run_id>/<node_id>`).
    pub request_id: String,
}

/// A verified exact hit.
#[derive(Debug, Clone, PartialEq)]
pub struct ExactHit {
    /// The result parsed as JSON, when it is at most [`INLINE_RESULT_BYTES`].
    pub result_json: Option<Value>,
    /// The result's CAS ref (always set; verified).
    pub result_ref: CasRef,
    /// Work the hit saved, in ms.
    pub saved_ms: i64,
    /// Hex key of the entry.
    pub entry_key: String,
}

/// Results up to this size come back parsed in [`ExactHit::result_json`].
pub const INLINE_RESULT_BYTES: usize = 256 * 1024;

/// A candidate found by a lookup statement, before its blob is verified.
#[derive(Debug, Clone)]
struct Found {
    ord: usize,
    entry_key: Vec<u8>,
    result_ref: String,
    cost_ms: i64,
    audit_id: Uuid,
    similarity: Option<f64>,
}

/// Finds exact entries for `reqs` in one statement; then verifies the blobs while one more
/// statement bumps hit counts and writes the audit rows. Entries whose blob is bad are deleted (with their
/// audit rows) and answered as misses. Runs on the caller's connection, so inside the
/// caller's transaction if there is one.
pub async fn exact_lookup_batch(
    conn: &mut PgConnection,
    cas: &Cas,
    reqs: &[ExactRequest],
) -> Result<Vec<Option<ExactHit>>, CacheError> {
    let probes: Vec<ExactProbe> = reqs
        .iter()
        .map(|r| ExactProbe {
            workspace_id: r.workspace_id.clone(),
            permission: r.permission,
            node_type: r.node_type.clone(),
            config_hash: json_hash(&r.config),
            inputs_hash: json_hash(&r.inputs),
            prompt: r.prompt.clone(),
            requester: r.requester.clone(),
            request_id: r.request_id.clone(),
        })
        .collect();
    let verified = exact_find_verify(conn, cas, &probes).await?;
    let mut out = vec![None; reqs.len()];
    for (f, bytes) in verified {
        let r = &reqs[f.ord];
        count_hit(m::node_type_label(&r.node_type), "exact", f.cost_ms, None);
        let result_json = if bytes.len() <= INLINE_RESULT_BYTES {
            serde_json::from_slice(&bytes).ok()
        } else {
            None
        };
        out[f.ord] = Some(ExactHit {
            result_json,
            result_ref: parse_ref(&f.result_ref)?,
            saved_ms: f.cost_ms,
            entry_key: hex::encode(&f.entry_key),
        });
    }
    for (r, o) in reqs.iter().zip(&out) {
        if o.is_none() {
            metrics::counter!(m::LOOKUPS, "node_type" => m::node_type_label(&r.node_type), "outcome" => "miss").increment(1);
        }
    }
    Ok(out)
}

struct ExactProbe {
    workspace_id: String,
    permission: Permission,
    node_type: String,
    config_hash: [u8; 32],
    inputs_hash: [u8; 32],
    prompt: Option<String>,
    requester: String,
    request_id: String,
}

fn parse_ref(s: &str) -> Result<CasRef, CacheError> {
    s.parse()
        .map_err(|e| CacheError::Invalid(format!("stored result_ref: {e}")))
}

/// One exact candidate with what its audit row needs.
struct ExactFound {
    found: Found,
    workspace_id: String,
    node_type: String,
    owner: String,
    requester: String,
    request_id: String,
    perm: i16,
}

/// The exact path: one read-only statement finds the candidates, then the blob reads and the
/// hit bookkeeping (hit counts, audit rows: one statement) run at the same time, so a hit
/// costs one statement plus the slower of a CAS read and a write, not their sum. Entries
/// whose blob is bad are deleted with their audit rows afterwards, as in [`verify`].
async fn exact_find_verify(
    conn: &mut PgConnection,
    cas: &Cas,
    probes: &[ExactProbe],
) -> Result<Vec<(Found, Bytes)>, CacheError> {
    let found = exact_probe(conn, probes).await?;
    if found.is_empty() {
        return Ok(Vec::new());
    }
    let refs: Vec<Option<CasRef>> = found
        .iter()
        .map(|f| f.found.result_ref.parse().ok())
        .collect();
    let (recorded, reads) = tokio::join!(record_exact_hits(conn, &found), read_blobs(cas, refs));
    recorded?;
    settle(
        conn,
        found.into_iter().map(|f| f.found).collect(),
        reads,
        "exact",
    )
    .await
}

async fn exact_probe(
    conn: &mut PgConnection,
    probes: &[ExactProbe],
) -> Result<Vec<ExactFound>, CacheError> {
    if probes.is_empty() {
        return Ok(Vec::new());
    }
    // One row per (probe, level at or below the requester's): the key binds the level.
    let (mut keys, mut ords, mut wss, mut perms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, p) in probes.iter().enumerate() {
        for level in p.permission.and_below() {
            keys.push(
                entry_key(
                    &p.workspace_id,
                    level,
                    &p.node_type,
                    &p.config_hash,
                    &p.inputs_hash,
                    p.prompt.as_deref(),
                )
                .to_vec(),
            );
            ords.push(i as i32);
            wss.push(p.workspace_id.to_string());
            perms.push(p.permission.level());
        }
    }
    let rows = sqlx::query!(
        r#"SELECT DISTINCT ON (r.ord) r.ord AS "ord!", e.entry_key, e.workspace_id, e.node_type,
                  e.owner, e.result_ref, e.cost_ms
           FROM UNNEST($1::bytea[], $2::int4[], $3::text[], $4::int2[])
                    AS r(entry_key, ord, workspace_id, perm)
           JOIN cache_entries e ON e.entry_key = r.entry_key
           WHERE e.workspace_id = r.workspace_id
             AND e.required_permission <= r.perm
             AND e.expires_at > now()
           ORDER BY r.ord, e.required_permission DESC"#,
        &keys,
        &ords,
        &wss,
        &perms,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let p = &probes[r.ord as usize];
            ExactFound {
                found: Found {
                    ord: r.ord as usize,
                    entry_key: r.entry_key,
                    result_ref: r.result_ref,
                    cost_ms: r.cost_ms,
                    audit_id: Uuid::now_v7(),
                    similarity: None,
                },
                workspace_id: r.workspace_id,
                node_type: r.node_type,
                owner: r.owner,
                requester: p.requester.clone(),
                request_id: p.request_id.clone(),
                perm: p.permission.level(),
            }
        })
        .collect())
}

/// Hit counts and audit rows of exact hits, in one statement.
async fn record_exact_hits(
    conn: &mut PgConnection,
    found: &[ExactFound],
) -> Result<(), CacheError> {
    let col = |f: fn(&ExactFound) -> String| found.iter().map(f).collect::<Vec<String>>();
    let keys: Vec<Vec<u8>> = found.iter().map(|f| f.found.entry_key.clone()).collect();
    let ids: Vec<Uuid> = found.iter().map(|f| f.found.audit_id).collect();
    let perms: Vec<i16> = found.iter().map(|f| f.perm).collect();
    let costs: Vec<i64> = found.iter().map(|f| f.found.cost_ms).collect();
    sqlx::query!(
        r#"WITH h AS (
               SELECT * FROM UNNEST($1::bytea[], $2::uuid[], $3::text[], $4::text[], $5::text[],
                                    $6::text[], $7::int2[], $8::text[], $9::int8[])
                   AS h(entry_key, audit_id, workspace_id, node_type, owner, requester, perm,
                        request_id, cost_ms)
           ), bump AS (
               UPDATE cache_entries e SET hit_count = e.hit_count + c.n, last_hit_at = now()
               FROM (SELECT entry_key, count(*) AS n FROM h GROUP BY entry_key) c
               WHERE e.entry_key = c.entry_key
           )
           INSERT INTO cache_audit (id, workspace_id, node_type, kind, entry_key, owner, requester,
                                    requester_permission, request_id, similarity, saved_ms)
           SELECT audit_id, workspace_id, node_type, 'exact', entry_key, owner, requester, perm,
                  request_id, NULL, cost_ms
           FROM h"#,
        &keys,
        &ids,
        &col(|f| f.workspace_id.clone()),
        &col(|f| f.node_type.clone()),
        &col(|f| f.owner.clone()),
        &col(|f| f.requester.clone()),
        &perms,
        &col(|f| f.request_id.clone()),
        &costs,
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Reads and verifies the blobs of `found` concurrently; deletes the entries (and takes back
/// the audit rows) of those missing or corrupt. Returns the good ones with their bytes.
async fn verify(
    conn: &mut PgConnection,
    cas: &Cas,
    found: Vec<Found>,
    kind: &'static str,
) -> Result<Vec<(Found, Bytes)>, CacheError> {
    let refs: Vec<Option<CasRef>> = found.iter().map(|f| f.result_ref.parse().ok()).collect();
    let reads = read_blobs(cas, refs).await;
    settle(conn, found, reads, kind).await
}

/// Pairs candidates with their blob reads; deletes the entries (and their audit rows) whose
/// blob is missing or corrupt.
async fn settle(
    conn: &mut PgConnection,
    found: Vec<Found>,
    reads: Vec<Result<Option<Bytes>, CasError>>,
    kind: &'static str,
) -> Result<Vec<(Found, Bytes)>, CacheError> {
    let mut good = Vec::with_capacity(found.len());
    let (mut bad_keys, mut bad_audits) = (Vec::new(), Vec::new());
    for (f, read) in found.into_iter().zip(reads) {
        match read? {
            Some(b) => good.push((f, b)),
            None => {
                tracing::warn!(entry_key = %hex::encode(&f.entry_key), result_ref = %f.result_ref, kind, "cache entry's blob is missing or corrupt; deleting the entry");
                metrics::counter!(m::BAD_BLOB, "kind" => kind).increment(1);
                bad_keys.push(f.entry_key);
                bad_audits.push(f.audit_id);
            }
        }
    }
    if !bad_keys.is_empty() {
        sqlx::query!(
            r#"WITH a AS (DELETE FROM cache_audit WHERE id = ANY($1::uuid[])),
                    e AS (DELETE FROM cache_entries WHERE entry_key = ANY($2::bytea[]))
               DELETE FROM cache_semantic WHERE entry_key = ANY($2::bytea[])"#,
            &bad_audits,
            &bad_keys,
        )
        .execute(&mut *conn)
        .await?;
    }
    Ok(good)
}

/// Reads and verifies blobs concurrently: `Ok(None)` for an unparsable ref, a missing or a
/// corrupt blob; other CAS errors as they are.
async fn read_blobs(cas: &Cas, refs: Vec<Option<CasRef>>) -> Vec<Result<Option<Bytes>, CasError>> {
    async fn read(cas: &Cas, r: Option<CasRef>) -> Result<Option<Bytes>, CasError> {
        let Some(r) = r else { return Ok(None) };
        match cas.get(&r).await {
            Ok(b) => Ok(Some(b)),
            Err(CasError::NotFound(_) | CasError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
    // A single read (a synchronous lookup) stays on this task: a spawn would add a wake-up
    // on another worker thread to the latency of every hit.
    if refs.len() == 1 {
        let r = refs.into_iter().next().flatten();
        return vec![read(cas, r).await];
    }
    let tasks: Vec<_> = refs
        .into_iter()
        .map(|r| {
            let cas = cas.clone();
            tokio::spawn(async move { read(&cas, r).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in join_all(tasks).await {
        out.push(t.unwrap_or_else(|e| Err(CasError::Task(e.to_string()))));
    }
    out
}

/// Puts blobs concurrently.
async fn put_blobs(cas: &Cas, blobs: Vec<Bytes>) -> Vec<Result<CasRef, CasError>> {
    let tasks: Vec<_> = blobs
        .into_iter()
        .map(|b| {
            let cas = cas.clone();
            tokio::spawn(async move { cas.put(b).await })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in join_all(tasks).await {
        out.push(t.unwrap_or_else(|e| Err(CasError::Task(e.to_string()))));
    }
    out
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

/// One row of the semantic lookup statement.
#[derive(sqlx::FromRow)]
struct SemanticRow {
    ord: i32,
    #[sqlx(rename = "entry_key")]
    key: Vec<u8>,
    result_ref: String,
    cost_ms: i64,
    similarity: f64,
    hit: bool,
    audit_id: Uuid,
}

/// Text form of a vector for a `::vector` cast. Public for `weir bench cache`, which seeds
/// the semantic table in bulk with the same form.
pub fn vector_text(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 10 + 2);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push(']');
    s
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

    /// One synchronous store: its own transaction.
    /// A rejected request is [`StoreOutcome::Rejected`]; nothing of it is written.
    pub async fn store(&self, req: &StoreRequest) -> Result<StoreOutcome, CacheError> {
        let mut tx = self.pool.begin().await?;
        let mut out = self.store_in(&mut tx, std::slice::from_ref(req)).await?;
        tx.commit().await?;
        out.pop().ok_or(CacheError::Internal(
            "a store of one request returned no outcome",
        ))
    }

    /// The unit vectors of the requests that need one (`wanted`: semantic node types with a
    /// prompt or a vector), embedding the missing ones in one batched call: per request
    /// `None` (not wanted), a vector, or `Err(reason)` when the request's own vector or
    /// prompt cannot give one. `Err` of the whole call only for the embedder as a whole.
    async fn embeddings(
        &self,
        items: Vec<(Option<String>, Option<Vec<f32>>, bool)>,
    ) -> Result<Vec<Option<Embedded>>, CacheError> {
        let dims = self.cfg.dimensions as usize;
        let mut out: Vec<Option<Embedded>> = vec![None; items.len()];
        let mut todo = Vec::new();
        for (i, (prompt, given, wanted)) in items.into_iter().enumerate() {
            if !wanted {
                continue;
            }
            match (given, prompt) {
                (Some(v), _) => out[i] = Some(validate_vector(v, dims)),
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
            for ((i, _), v) in todo.into_iter().zip(vectors) {
                // The embedders validate their vectors; checked again because a vector that
                // reaches SQL must be a unit vector of this deployment's dimension.
                out[i] = Some(v.and_then(|v| validate_vector(v, dims)));
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
        let probes: Vec<ExactProbe> = reqs
            .iter()
            .map(|r| ExactProbe {
                workspace_id: r.workspace_id.clone(),
                permission: r.permission,
                node_type: r.node_type.clone(),
                config_hash: json_hash(&r.config),
                inputs_hash: json_hash(&r.inputs),
                prompt: r.prompt.clone(),
                requester: r.requester.clone(),
                request_id: r.request_id.clone(),
            })
            .collect();
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
            let mut sem: Vec<(usize, Vec<f32>)> = Vec::new();
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

    /// Iterative index scans keep filtered lookups from coming back empty: the scan goes on
    /// past ef_search candidates until one passes the workspace/permission/expiry filter.
    /// set_config(.., true) is SET LOCAL: it ends with the caller's transaction.
    async fn tune(&self, conn: &mut PgConnection) -> Result<(), CacheError> {
        let ef_search = self.cfg.hnsw_ef_search.clamp(1, 1000).to_string();
        sqlx::query!(
            r#"SELECT set_config('hnsw.iterative_scan', 'strict_order', true) AS "a!",
                      set_config('hnsw.ef_search', $1, true) AS "b!""#,
            ef_search
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(())
    }

    /// EXPLAIN ANALYZE of the semantic statement for one vector, on a lookup session (for
    /// `weir bench cache`; it runs the statement, so a hit writes its audit row).
    pub async fn explain_semantic(
        &self,
        workspace: &str,
        node_type: &str,
        v: &[f32],
    ) -> Result<String, CacheError> {
        let mut conn = self.lookup_pool.acquire().await?;
        let sql = format!("EXPLAIN (ANALYZE, BUFFERS) {}", self.semantic_sql);
        let rows: Vec<sqlx::postgres::PgRow> = sqlx::query(&sql)
            .bind(vec![0i32])
            .bind(vec![workspace.to_string()])
            .bind(vec![node_type.to_string()])
            .bind(vec![Permission::Admin.level()])
            .bind(vec!["explain".to_string()])
            .bind(vec!["explain".to_string()])
            .bind(vec![Uuid::now_v7()])
            .bind(vec![2.0f64])
            .bind(vec![vector_text(v)])
            .bind(vec![json_hash(&serde_json::json!({})).to_vec()])
            .fetch_all(&mut *conn)
            .await?;
        let mut lines = Vec::with_capacity(rows.len());
        for r in &rows {
            lines.push(sqlx::Row::try_get::<String, _>(r, 0)?);
        }
        Ok(lines.join("\n"))
    }

    /// The best semantic match of each request in `sem` (index into `reqs`, unit vector), in
    /// one statement; those at or above their threshold are hits (hit count bumped, audit row
    /// written by the same statement). Returns the hits and every request's best similarity.
    async fn semantic_probe(
        &self,
        conn: &mut PgConnection,
        reqs: &[LookupRequest],
        sem: &[(usize, Vec<f32>)],
        tuned: bool,
    ) -> Result<(Vec<Found>, Vec<(usize, f64)>), CacheError> {
        if sem.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        if !tuned {
            self.tune(conn).await?;
        }
        let n = sem.len();
        let (
            mut ords,
            mut wss,
            mut types,
            mut perms,
            mut requesters,
            mut request_ids,
            mut audits,
            mut thresholds,
            mut embs,
            mut configs,
        ) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (i, v) in sem {
            let r = &reqs[*i];
            ords.push(*i as i32);
            wss.push(r.workspace_id.clone());
            types.push(r.node_type.clone());
            perms.push(r.permission.level());
            requesters.push(r.requester.clone());
            request_ids.push(r.request_id.clone());
            audits.push(Uuid::now_v7());
            thresholds.push(threshold(&self.cfg, &r.workspace_id, &r.node_type));
            embs.push(vector_text(v));
            configs.push(json_hash(&r.config).to_vec());
        }
        // The dimension is part of the statement text (the index is an expression index on
        // embedding::vector(D)), so this one statement is built at start, not checked by sqlx.
        let sql: Arc<str> = self.semantic_sql.clone();
        let query = sqlx::query(&sql)
            .bind(ords)
            .bind(wss)
            .bind(types)
            .bind(perms)
            .bind(requesters)
            .bind(request_ids)
            .bind(audits)
            .bind(thresholds)
            .bind(embs)
            .bind(configs);
        let rows: Vec<sqlx::postgres::PgRow> = query.fetch_all(&mut *conn).await?;
        let rows = rows
            .iter()
            .map(SemanticRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let mut found = Vec::new();
        let mut best = Vec::new();
        for SemanticRow {
            ord,
            key,
            result_ref,
            cost_ms,
            similarity,
            hit,
            audit_id,
        } in rows
        {
            best.push((ord as usize, similarity));
            // The statement already refuses NaN; a hit must be a number in any case.
            if hit && similarity.is_finite() {
                found.push(Found {
                    ord: ord as usize,
                    entry_key: key,
                    result_ref,
                    cost_ms,
                    audit_id,
                    similarity: Some(similarity),
                });
            }
        }
        Ok((found, best))
    }

    /// Stores `reqs` on `conn` (inside the caller's transaction). In order: rejections (a
    /// required permission above the producer's, a bad prompt), refusals (node type, blob,
    /// size, PII), the vectors of semantic entries (a prompt or vector that gives none
    /// rejects its request) — all before anything is written — then the blobs, all exact
    /// entries in one statement, all semantic entries in one statement, and one audit row
    /// per stored or refused request in one statement.
    pub async fn store_in(
        &self,
        conn: &mut PgConnection,
        reqs: &[StoreRequest],
    ) -> Result<Vec<StoreOutcome>, CacheError> {
        let mut outcomes: Vec<Option<StoreOutcome>> = vec![None; reqs.len()];
        for (i, r) in reqs.iter().enumerate() {
            if r.required_permission > r.permission {
                outcomes[i] = Some(StoreOutcome::Rejected(format!(
                    "a {} producer cannot store an entry requiring {}",
                    r.permission.as_str(),
                    r.required_permission.as_str()
                )));
            } else if let Err(e) = check_prompt(&self.cfg, r.prompt.as_deref()) {
                outcomes[i] = Some(StoreOutcome::Rejected(e.to_string()));
            }
        }
        // Result bytes: inline JSON as given, referenced blobs read (and verified) for the guard.
        // A ref is read only if the store's workspace owns the blob (weir_cas_owners): another
        // tenant's ref is refused as a bad blob, unread, whether or not that blob exists.
        let asked: Vec<(String, String)> = reqs
            .iter()
            .filter_map(|r| match &r.result {
                StoreResult::Ref(rf) => Some((r.workspace_id.clone(), rf.to_string())),
                StoreResult::Json(_) => None,
            })
            .collect();
        let owned_refs = weir_runtime::cas::owners::owned(&mut *conn, &asked).await?;
        let given: Vec<Option<CasRef>> = reqs
            .iter()
            .zip(&outcomes)
            .map(|(r, o)| match (&r.result, o) {
                (StoreResult::Ref(rf), None)
                    if is_cacheable(&self.cfg, &r.node_type)
                        && owned_refs.contains(&(r.workspace_id.clone(), rf.to_string())) =>
                {
                    Some(*rf)
                }
                _ => None,
            })
            .collect();
        let blobs = read_blobs(&self.cas, given).await;
        let mut contents: Vec<Option<Bytes>> = vec![None; reqs.len()];
        for (i, (r, b)) in reqs.iter().zip(blobs).enumerate() {
            if outcomes[i].is_some() {
                continue;
            }
            let content = match &r.result {
                StoreResult::Json(text) => Some(Bytes::from(text.clone())),
                StoreResult::Ref(_) => b?,
            };
            let refusal = if !is_cacheable(&self.cfg, &r.node_type) {
                Some(Refusal::NotCacheable)
            } else {
                match content {
                    None => Some(Refusal::BadBlob),
                    Some(b) if b.len() > self.cfg.max_result_bytes => Some(Refusal::TooLarge),
                    // Bounded by max_result_bytes just above: the scan is linear in it.
                    Some(b) => match scan_off_runtime(b.clone()).await {
                        Some(kind) => Some(Refusal::Pii(kind)),
                        None => {
                            contents[i] = Some(b);
                            None
                        }
                    },
                }
            };
            if let Some(refusal) = refusal {
                let nt = node_label(&self.cfg, &r.node_type);
                match refusal {
                    Refusal::Pii(kind) => metrics::counter!(m::PII_REFUSED, "node_type" => nt, "pattern" => kind.as_str()).increment(1),
                    other => metrics::counter!(m::REFUSED, "reason" => other.as_str()).increment(1),
                }
                outcomes[i] = Some(StoreOutcome::Refused(refusal));
            }
        }
        // Vectors of the semantic entries, before anything is written.
        let wanted: Vec<bool> = reqs
            .iter()
            .zip(&outcomes)
            .map(|(r, o)| {
                o.is_none()
                    && is_semantic(&self.cfg, &r.node_type)
                    && (r.prompt.is_some() || r.embedding.is_some())
            })
            .collect();
        let items = embedding_items(reqs.iter().map(|r| (&r.prompt, &r.embedding)), &wanted);
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; reqs.len()];
        for (i, v) in self.embeddings(items).await?.into_iter().enumerate() {
            match v {
                Some(Ok(v)) => vectors[i] = Some(v),
                Some(Err(reason)) => {
                    contents[i] = None;
                    outcomes[i] = Some(StoreOutcome::Rejected(reason));
                }
                None => {}
            }
        }
        // What is left is stored: the blobs of inline results first.
        let mut refs: Vec<Option<CasRef>> = vec![None; reqs.len()];
        let mut owned_puts = Vec::new();
        // (workspace, ref) of each blob put, for weir_cas_owners.
        let mut put_owners: Vec<(String, CasRef)> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let Some(b) = contents[i].take() else {
                continue;
            };
            match &r.result {
                StoreResult::Json(_) => {
                    let rf = CasRef::of(&b);
                    refs[i] = Some(rf);
                    put_owners.push((r.workspace_id.clone(), rf));
                    owned_puts.push(b);
                }
                StoreResult::Ref(rf) => refs[i] = Some(*rf),
            }
        }
        // Touch before put: the GC's grace period then covers the window until commit.
        if !owned_puts.is_empty() {
            let owned: Vec<String> = owned_puts
                .iter()
                .map(|b| CasRef::of(b).to_string())
                .collect();
            sqlx::query!(
                r#"INSERT INTO cache_blobs (result_ref)
                   SELECT DISTINCT r FROM UNNEST($1::text[]) AS t(r) ORDER BY r
                   ON CONFLICT (result_ref) DO UPDATE SET last_referenced_at = now()"#,
                &owned
            )
            .execute(&mut *conn)
            .await?;
            // Owned by the storing workspaces, unpinned: the collector may delete the blob
            // once nothing references it (maintenance::gc_once).
            weir_runtime::cas::owners::record(&mut *conn, &put_owners, false).await?;
            for res in put_blobs(&self.cas, owned_puts).await {
                res?;
            }
        }

        let mut exact = EntryRows::default();
        let mut sem = EntryRows::default();
        let mut s_embs = Vec::new();
        let mut s_configs = Vec::new();
        let mut audit = AuditRows::default();
        for (i, r) in reqs.iter().enumerate() {
            let config_hash = json_hash(&r.config);
            let key = entry_key(
                &r.workspace_id,
                r.required_permission,
                &r.node_type,
                &config_hash,
                &json_hash(&r.inputs),
                r.prompt.as_deref(),
            );
            let Some(rf) = refs[i] else {
                if let Some(StoreOutcome::Refused(refusal)) = &outcomes[i] {
                    audit.push(r, &key, "refused", Some(refusal.as_str().to_string()));
                }
                continue;
            };
            exact.push(r, key.to_vec(), rf, exact_ttl(&self.cfg, &r.node_type));
            let mut semantic = false;
            if let Some(v) = &vectors[i] {
                sem.push(
                    r,
                    semantic_entry_key(r, &config_hash).to_vec(),
                    rf,
                    semantic_ttl(&self.cfg, &r.node_type),
                );
                s_embs.push(vector_text(v));
                s_configs.push(config_hash.to_vec());
                semantic = true;
            }
            audit.push(r, &key, "store", semantic.then(|| "semantic".to_string()));
            outcomes[i] = Some(StoreOutcome::Stored {
                entry_key: hex::encode(key),
                semantic,
            });
        }
        if !exact.keys.is_empty() {
            // A later store of the same key replaces the entry (and its expiry); the last row
            // of a batch wins, hence DISTINCT ON over the reversed order.
            sqlx::query!(
                r#"INSERT INTO cache_entries (entry_key, workspace_id, node_type, required_permission, owner,
                                              result_ref, cost_ms, expires_at)
                   SELECT DISTINCT ON (k) k, ws, nt, lvl, own, rf, cost, now() + ttl * interval '1 second'
                   FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[], $7::int8[], $8::float8[])
                        WITH ORDINALITY AS t(k, ws, nt, lvl, own, rf, cost, ttl, ord)
                   ORDER BY k, ord DESC
                   ON CONFLICT (entry_key) DO UPDATE SET
                       owner = EXCLUDED.owner, result_ref = EXCLUDED.result_ref, cost_ms = EXCLUDED.cost_ms,
                       created_at = now(), expires_at = EXCLUDED.expires_at"#,
                &exact.keys,
                &exact.wss,
                &exact.types,
                &exact.levels,
                &exact.owners,
                &exact.refs,
                &exact.costs,
                &exact.ttls,
            )
            .execute(&mut *conn)
            .await?;
            for t in &exact.types {
                metrics::counter!(m::STORED, "node_type" => node_label(&self.cfg, t), "kind" => "exact")
                    .increment(1);
            }
        }
        if !sem.keys.is_empty() {
            sqlx::query!(
                r#"INSERT INTO cache_semantic (entry_key, workspace_id, node_type, required_permission, owner,
                                               result_ref, cost_ms, expires_at, dims, embedding, config_hash)
                   SELECT DISTINCT ON (k) k, ws, nt, lvl, own, rf, cost, now() + ttl * interval '1 second',
                          vector_dims(emb::vector), emb::vector, cfg
                   FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[], $7::int8[], $8::float8[], $9::text[], $10::bytea[])
                        WITH ORDINALITY AS t(k, ws, nt, lvl, own, rf, cost, ttl, emb, cfg, ord)
                   ORDER BY k, ord DESC
                   ON CONFLICT (entry_key) DO UPDATE SET
                       owner = EXCLUDED.owner, result_ref = EXCLUDED.result_ref, cost_ms = EXCLUDED.cost_ms,
                       created_at = now(), expires_at = EXCLUDED.expires_at, dims = EXCLUDED.dims,
                       embedding = EXCLUDED.embedding, config_hash = EXCLUDED.config_hash"#,
                &sem.keys,
                &sem.wss,
                &sem.types,
                &sem.levels,
                &sem.owners,
                &sem.refs,
                &sem.costs,
                &sem.ttls,
                &s_embs,
                &s_configs,
            )
            .execute(&mut *conn)
            .await?;
            for t in &sem.types {
                metrics::counter!(m::STORED, "node_type" => node_label(&self.cfg, t), "kind" => "semantic")
                    .increment(1);
            }
        }
        if !audit.ids.is_empty() {
            // Same transaction as the entries: a store is audited exactly when it happened.
            sqlx::query!(
                r#"INSERT INTO cache_audit (id, workspace_id, node_type, kind, entry_key, owner, requester,
                                            requester_permission, request_id, similarity, saved_ms, detail)
                   SELECT id, ws, nt, kind, k, who, who, perm, rid, NULL, cost, detail
                   FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bytea[], $6::text[],
                               $7::int2[], $8::text[], $9::int8[], $10::text[])
                        AS t(id, ws, nt, kind, k, who, perm, rid, cost, detail)"#,
                &audit.ids,
                &audit.wss,
                &audit.types,
                &audit.kinds,
                &audit.keys,
                &audit.requesters,
                &audit.perms,
                &audit.request_ids,
                &audit.costs,
                &audit.details as &[Option<String>],
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(StoreOutcome::Refused(Refusal::NotCacheable)))
            .collect())
    }
}

/// Results up to this size are scanned for PII on the calling task; larger ones (up to
/// `cache.max_result_bytes`) on tokio's blocking pool, so a megabyte-sized regex scan never
/// holds an async worker.
const INLINE_SCAN_BYTES: usize = 64 * 1024;

/// [`pii::scan_result`], off the async workers for large results. A scan that panics counts
/// as a match: the guard errs on the side of not caching.
async fn scan_off_runtime(b: Bytes) -> Option<pii::PiiKind> {
    if b.len() <= INLINE_SCAN_BYTES {
        return pii::scan_result(&b);
    }
    tokio::task::spawn_blocking(move || pii::scan_result(&b))
        .await
        .unwrap_or(Some(pii::PiiKind::Secret))
}

/// Columns of the exact or semantic entries of one store statement.
#[derive(Default)]
struct EntryRows {
    keys: Vec<Vec<u8>>,
    wss: Vec<String>,
    types: Vec<String>,
    levels: Vec<i16>,
    owners: Vec<String>,
    refs: Vec<String>,
    costs: Vec<i64>,
    ttls: Vec<f64>,
}

impl EntryRows {
    fn push(&mut self, r: &StoreRequest, key: Vec<u8>, rf: CasRef, ttl: Duration) {
        self.keys.push(key);
        self.wss.push(r.workspace_id.clone());
        self.types.push(r.node_type.clone());
        self.levels.push(r.required_permission.level());
        self.owners.push(r.requester.clone());
        self.refs.push(rf.to_string());
        self.costs.push(r.cost_ms.max(0));
        self.ttls.push(ttl.as_secs_f64());
    }
}

/// Columns of the audit rows of one store statement.
#[derive(Default)]
struct AuditRows {
    ids: Vec<Uuid>,
    wss: Vec<String>,
    types: Vec<String>,
    kinds: Vec<String>,
    keys: Vec<Vec<u8>>,
    requesters: Vec<String>,
    perms: Vec<i16>,
    request_ids: Vec<String>,
    costs: Vec<i64>,
    details: Vec<Option<String>>,
}

impl AuditRows {
    fn push(&mut self, r: &StoreRequest, key: &[u8; 32], kind: &str, detail: Option<String>) {
        self.ids.push(Uuid::now_v7());
        self.wss.push(r.workspace_id.clone());
        self.types.push(r.node_type.clone());
        self.kinds.push(kind.to_string());
        self.keys.push(key.to_vec());
        self.requesters.push(r.requester.clone());
        self.perms.push(r.permission.level());
        self.request_ids.push(r.request_id.clone());
        self.costs.push(r.cost_ms.max(0));
        self.details.push(detail);
    }
}

/// (prompt, given vector, wanted) per request, owned, for [`Cache::embeddings`].
fn embedding_items<'a>(
    reqs: impl Iterator<Item = (&'a Option<String>, &'a Option<Vec<f32>>)>,
    wanted: &[bool],
) -> Vec<(Option<String>, Option<Vec<f32>>, bool)> {
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

fn semantic_entry_key(r: &StoreRequest, config_hash: &[u8; 32]) -> [u8; 32] {
    // Keyed by the prompt; a producer that sent only a vector is keyed by the exact key's
    // inputs instead (same inputs, same entry). Tagged, so a prompt that spells some inputs'
    // JSON is not the same entry.
    let basis = match &r.prompt {
        Some(p) => format!("prompt:{p}"),
        None => format!(
            "inputs:{}",
            crate::key::canonical_json_normalized_numbers(&r.inputs)
        ),
    };
    semantic_key(
        &r.workspace_id,
        r.required_permission,
        &r.node_type,
        config_hash,
        &basis,
    )
}

/// The semantic lookup statement for dimension `d`: per request, the nearest unexpired entry
/// of its workspace, node type and config that its level may see, with hit = similarity >=
/// threshold (and not NaN: Postgres sorts NaN above every number, so `NaN >= 0.92` is true);
/// hits bump hit_count and get their audit row in the same statement.
fn semantic_statement(d: u32) -> String {
    format!(
        r#"WITH req AS (
               -- The vector is parsed once here, not once per candidate row.
               SELECT ord, workspace_id, node_type, perm, requester, request_id, audit_id, threshold,
                      emb::vector({d}) AS emb, config_hash
               FROM UNNEST($1::int4[], $2::text[], $3::text[], $4::int2[], $5::text[], $6::text[], $7::uuid[], $8::float8[], $9::text[], $10::bytea[])
                   AS r(ord, workspace_id, node_type, perm, requester, request_id, audit_id, threshold, emb, config_hash)
           ), best AS (
               SELECT r.ord, r.workspace_id, r.node_type, r.perm, r.requester, r.request_id, r.audit_id, r.threshold,
                      s.entry_key, s.owner, s.result_ref, s.cost_ms, (1 - s.dist)::float8 AS similarity
               FROM req r CROSS JOIN LATERAL (
                   SELECT c.entry_key, c.owner, c.result_ref, c.cost_ms,
                          c.embedding::vector({d}) <=> r.emb AS dist
                   FROM cache_semantic c
                   WHERE c.dims = {d}
                     AND c.workspace_id = r.workspace_id
                     AND c.node_type = r.node_type
                     AND c.config_hash = r.config_hash
                     AND c.required_permission <= r.perm
                     AND c.expires_at > now()
                   ORDER BY c.embedding::vector({d}) <=> r.emb
                   LIMIT 1
               ) s
           ), hit AS (
               SELECT * FROM best WHERE similarity >= threshold AND similarity <> 'NaN'::float8
           ), bump AS (
               UPDATE cache_semantic c SET hit_count = c.hit_count + h.n, last_hit_at = now()
               FROM (SELECT entry_key, count(*) AS n FROM hit GROUP BY entry_key) h
               WHERE c.entry_key = h.entry_key
           ), audit AS (
               INSERT INTO cache_audit (id, workspace_id, node_type, kind, entry_key, owner, requester,
                                        requester_permission, request_id, similarity, saved_ms)
               SELECT audit_id, workspace_id, node_type, 'semantic', entry_key, owner, requester, perm,
                      request_id, similarity, cost_ms
               FROM hit
           )
           SELECT ord, entry_key, result_ref, cost_ms, similarity,
                  similarity >= threshold AND similarity <> 'NaN'::float8 AS hit, audit_id
           FROM best"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_semantic_hit_needs_the_same_config_and_a_number() {
        let sql = semantic_statement(384);
        // The config is matched in the WHERE clause of the nearest-neighbour scan itself,
        // next to the workspace, node type and permission filters.
        let scan = &sql[sql.find("FROM cache_semantic c").unwrap()..sql.find("LIMIT 1").unwrap()];
        for filter in [
            "c.workspace_id = r.workspace_id",
            "c.node_type = r.node_type",
            "c.config_hash = r.config_hash",
            "c.required_permission <= r.perm",
            "c.expires_at > now()",
        ] {
            assert!(scan.contains(filter), "{filter} missing from:\n{scan}");
        }
        // NaN >= threshold is true in Postgres: both the hit set and the flag exclude it.
        assert_eq!(
            sql.matches("similarity <> 'NaN'::float8").count(),
            2,
            "{sql}"
        );
    }

    #[test]
    fn prompts_are_bounded_and_labels_are_not_caller_chosen() {
        let cfg = CacheConfig {
            max_prompt_bytes: 8,
            ..CacheConfig::default()
        };
        assert!(check_prompt(&cfg, None).is_ok());
        assert!(check_prompt(&cfg, Some("12345678")).is_ok());
        for bad in ["", "  \n", "123456789"] {
            let e = check_prompt(&cfg, Some(bad)).unwrap_err();
            assert_eq!(
                e.disposition(),
                weir_runtime::Disposition::DeadLetter,
                "{e}"
            );
        }
        assert_eq!(node_label(&cfg, "agent"), "agent");
        assert_eq!(node_label(&cfg, "human-x-123"), "other");
    }

    #[tokio::test]
    async fn large_results_are_scanned_too() {
        let mut text = "{\"pad\":\"".to_string() + &"a".repeat(INLINE_SCAN_BYTES);
        text.push_str("\",\"to\":\"jane\\u0040example.com\"}");
        assert_eq!(
            scan_off_runtime(Bytes::from(text)).await,
            Some(pii::PiiKind::Email)
        );
    }
}
