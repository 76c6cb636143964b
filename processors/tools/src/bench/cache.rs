//! `weir bench cache --entries N --json`: exact and semantic lookup latency at N entries,
//! recall@1 of the filtered semantic lookup against an exact scan, and the local embedder's
//! throughput.
//!
//! 1. N exact entries and N semantic entries are loaded with set-based INSERTs (the store
//!    path's PII scan and CAS puts are skipped: all entries share one verified blob) over 100
//!    workspaces, so one workspace holds 1% of the rows. The vectors are SYNTHETIC: random
//!    unit vectors around 1,000 random cluster centres (Gaussian noise), clusters shared by
//!    all workspaces, so most of a query's global nearest neighbours belong to other
//!    workspaces — the case where a post-filtered HNSW scan loses recall. The HNSW index is
//!    rebuilt after the load (timed). Entries, audit rows and index live in a private schema
//!    (`weir_runtime::db::PrivateSchema`) dropped at the end: a live deployment's cache
//!    tables and index are left alone.
//! 2. Exact: `queries` lookups of random stored keys through [`Cache::lookup`] — the
//!    gateway's path: its own transaction, the lookup statement with its audit row, the CAS
//!    read and verification. p50/p99 of the whole call.
//! 3. Semantic: `queries` lookups through [`Cache::lookup`] with a vector near a random entry
//!    of a random workspace (the exact probe misses first, then the semantic statement runs;
//!    threshold set to -1 so that every lookup returns its best match). Recall@1: the
//!    returned entry is the best match of an exact scan of the workspace's vectors (computed
//!    in memory from the same data).
//! 4. embeddings_per_sec: the real all-MiniLM-L6-v2 on 512 short sentences in batches of
//!    `cache.embed_batch` (null when the model files are not installed).
//!
//! Phases 2–4 run `repeat` times over the same load, each repetition from the same state: the
//! earlier repetitions' audit rows truncated, the private tables vacuumed and analyzed (autovacuum is off on them, so none starts inside a
//! phase), a checkpoint and an OS `sync` (see [`super::common::settle`]). The result is the
//! first repetition's fields with each figure's median, and the spread and targets over the
//! repetitions.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use weir_runtime::cas::Cas;
use weir_runtime::config::{CacheConfig, Config, EmbedderKind};

use weir_cache::cache::hnsw_index_name;
use weir_cache::embed::{dot, normalize, Embedder};
use weir_cache::key::{entry_key, json_hash, semantic_key};
use weir_cache::{Cache, LookupRequest, UnitVector};
use weir_model::Permission;

use super::common::{own_maintenance, settle, summarize, Figure};
use crate::common::{round, timed, Samples};

/// The benchmark's own copies of the cache tables.
const OWN_TABLES: [&str; 4] = [
    "cache_entries",
    "cache_semantic",
    "cache_audit",
    "cache_embedding_space",
];

/// The figures summarized over repetitions, with their targets.
pub const FIGURES: [Figure; 9] = [
    Figure::lower("/exact_p99_ms").target(2.0),
    Figure::lower("/semantic_p99_ms").target(10.0),
    Figure::higher("/recall_at_1").target(0.98),
    Figure::lower("/exact_p50_ms"),
    Figure::lower("/semantic_p50_ms"),
    Figure::lower("/exact_batch1_p99_ms"),
    Figure::lower("/cas_get_p99_ms"),
    Figure::higher("/exact_hits"),
    Figure::higher("/embeddings_per_sec"),
];

/// Workspaces the entries are spread over (one holds 1%).
pub const WORKSPACES: usize = 100;
/// Cluster centres of the synthetic vectors.
pub const CLUSTERS: usize = 1_000;
const CHUNK: usize = 5_000;
/// The node type of every entry (the semantic cache's typical one).
const NODE_TYPE: &str = "agent";

fn gaussian(rng: &mut StdRng) -> f32 {
    // Box–Muller; 1 - u keeps the logarithm's argument in (0, 1].
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random::<f64>();
    ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
}

fn random_unit(rng: &mut StdRng, d: usize) -> Vec<f32> {
    normalize((0..d).map(|_| gaussian(rng)).collect())
}

fn near(rng: &mut StdRng, c: &[f32], sigma: f32) -> Vec<f32> {
    normalize(c.iter().map(|x| x + sigma * gaussian(rng)).collect())
}

/// A synthetic vector as the cache takes it (validated, unit length).
fn unit(v: Vec<f32>, d: usize) -> anyhow::Result<UnitVector> {
    UnitVector::new(v, d).map_err(anyhow::Error::msg)
}

/// Lookups before each measured phase, not counted.
const WARMUP: usize = 50;

/// A lookup of `workspace_id` by a reader; `semantic` with `embedding`.
fn lookup_request(
    request_id: String,
    workspace_id: String,
    inputs: serde_json::Value,
    embedding: Option<UnitVector>,
) -> LookupRequest {
    LookupRequest {
        request_id,
        workspace_id,
        requester: "bench".into(),
        permission: Permission::Read,
        node_type: NODE_TYPE.into(),
        config: json!({}),
        inputs,
        prompt: None,
        semantic: embedding.is_some(),
        embedding,
    }
}

/// Runs the benchmark; returns the JSON object described in the module docs.
pub async fn run(
    cfg: Arc<Config>,
    entries: usize,
    queries: usize,
    repeat: usize,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(
        entries >= WORKSPACES,
        "--entries must be at least {WORKSPACES}"
    );
    // The run's entries, audit rows and HNSW index live in a schema of their own: a live
    // deployment's lookups never walk them and its index is never dropped or rebuilt.
    let private =
        weir_runtime::db::PrivateSchema::create(&cfg.postgres, "bench_cache", &OWN_TABLES)
            .await
            .context("creating the benchmark's own cache tables")?;
    let result = measure(&cfg, &private, entries, queries, repeat).await;
    private.drop_all().await?;
    result
}

async fn measure(
    cfg: &Config,
    private: &weir_runtime::db::PrivateSchema,
    entries: usize,
    queries: usize,
    repeat: usize,
) -> anyhow::Result<serde_json::Value> {
    let pool = private.pool().clone();
    own_maintenance(&pool, private.schema(), &OWN_TABLES).await?;
    let cas = Cas::from_config(cfg).await?;
    let d = cfg.cache.dimensions as usize;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let ws_name = |w: usize| format!("bench-{run_id}-{w:03}");
    let node_type = NODE_TYPE;
    let mut cache_cfg: CacheConfig = cfg.cache.clone();
    cache_cfg.similarity_threshold = -1.0; // every lookup returns its best match (see docs)
    let cache = Cache::new(pool.clone(), cas.clone(), Arc::new(cache_cfg), None).await?;
    let result = cas
        .put_json(&json!({"answer": "a cached result", "tokens": 512}))
        .await?;

    // 1. Load.
    let mut rng = StdRng::seed_from_u64(7);
    let centres: Vec<Vec<f32>> = (0..CLUSTERS).map(|_| random_unit(&mut rng, d)).collect();
    let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(entries);
    let mut owners: Vec<usize> = Vec::with_capacity(entries);
    let started = Instant::now();
    // The copies' indexes were made from the deployment's (any HNSW index included, under
    // another name): drop the vector ones, always naming the private schema.
    let copied: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = $1 AND indexdef ILIKE '%USING hnsw%'",
    )
    .bind(private.schema())
    .fetch_all(&pool)
    .await?;
    let ours = hnsw_index_name(d as u32);
    for index in copied.iter().chain([&ours]) {
        sqlx::query(&format!(
            "DROP INDEX IF EXISTS {}",
            private.qualified(index)
        ))
        .execute(&pool)
        .await?;
    }
    for start in (0..entries).step_by(CHUNK) {
        let end = (start + CHUNK).min(entries);
        let (mut keys, mut skeys, mut wss, mut embs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in start..end {
            let w = i % WORKSPACES;
            let ws = ws_name(w);
            let c = &centres[rng.random_range(0..CLUSTERS)];
            let v = near(&mut rng, c, 0.05);
            keys.push(
                entry_key(
                    &ws,
                    Permission::Read,
                    node_type,
                    &json_hash(&json!({})),
                    &json_hash(&json!({"i": i})),
                    None,
                )
                .to_vec(),
            );
            skeys.push(
                semantic_key(
                    &ws,
                    Permission::Read,
                    node_type,
                    &json_hash(&json!({})),
                    &format!("prompt {i}"),
                )
                .to_vec(),
            );
            embs.push(unit(v.clone(), d)?.to_pg());
            wss.push(ws);
            vectors.push(v);
            owners.push(w);
        }
        sqlx::query(
            "INSERT INTO cache_entries (entry_key, workspace_id, node_type, required_permission, owner, result_ref, cost_ms, expires_at)
             SELECT k, ws, 'agent', 1, 'bench', $3, 1000, now() + interval '1 day' FROM UNNEST($1::bytea[], $2::text[]) AS t(k, ws)",
        )
        .bind(&keys)
        .bind(&wss)
        .bind(result.to_string())
        .execute(&pool)
        .await?;
        sqlx::query(
            "INSERT INTO cache_semantic (entry_key, workspace_id, node_type, required_permission, owner, result_ref, cost_ms, expires_at, dims, embedding, config_hash)
             SELECT k, ws, 'agent', 1, 'bench', $4, 1000, now() + interval '1 day', $5, e, $6
             FROM UNNEST($1::bytea[], $2::text[], $3::vector[]) AS t(k, ws, e)",
        )
        .bind(&skeys)
        .bind(&wss)
        .bind(&embs)
        .bind(result.to_string())
        .bind(d as i32)
        .bind(json_hash(&json!({})).to_vec())
        .execute(&pool)
        .await?;
    }
    let load_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    sqlx::raw_sql("SET maintenance_work_mem = '512MB'")
        .execute(&pool)
        .await
        .ok();
    cache.prepare().await.context("rebuilding the HNSW index")?;
    sqlx::query("ANALYZE cache_semantic").execute(&pool).await?;
    sqlx::query("ANALYZE cache_entries").execute(&pool).await?;
    let index_secs = started.elapsed().as_secs_f64();

    let probe = near(&mut rng, &vectors[3], 0.03);
    let plan = cache
        .explain_semantic(&ws_name(3), node_type, &unit(probe, d)?)
        .await?;
    eprintln!("semantic lookup plan (workspace holding 1% of the rows):\n{plan}");

    let mut reps = Vec::new();
    for rep in 1..=repeat.max(1) {
        // Every repetition meets the same tables: the entries as loaded, no audit rows yet.
        sqlx::query(&format!("TRUNCATE {}", private.qualified("cache_audit")))
            .execute(&pool)
            .await?;
        let start_state = settle(&pool, &OWN_TABLES[..3], &format!("repetition {rep}")).await?;
        // The CAS read + verification alone (part of every hit).
        let mut cas_gets = Samples::after_warmup(0);
        for _ in 0..500 {
            let (got, ms) = timed(cas.get(&result)).await;
            got?;
            cas_gets.add(ms);
        }

        // 2. Exact lookups (all hits), after a short warm-up.
        let mut exact = Samples::after_warmup(WARMUP);
        let mut exact_hits = 0;
        for q in 0..queries + WARMUP {
            let i = rng.random_range(0..entries);
            let req = lookup_request(
                format!("bench-exact-{q}"),
                ws_name(owners[i]),
                json!({"i": i}),
                None,
            );
            let (a, ms) = timed(cache.lookup(&req)).await;
            let a = a?;
            if exact.add(ms) {
                exact_hits += usize::from(a.hit);
            }
        }

        // The coordinator's path for comparison: exact_lookup_batch of one request on a plain
        // pooled connection (autocommit, durable commit, like the gateway's lookups now).
        let mut batch = Samples::after_warmup(0);
        for q in 0..queries / 4 {
            let i = rng.random_range(0..entries);
            let req = weir_cache::ExactRequest {
                workspace_id: ws_name(owners[i]),
                permission: Permission::Read,
                node_type: node_type.into(),
                config: json!({}),
                inputs: json!({"i": i}),
                prompt: None,
                requester: "bench".into(),
                request_id: format!("bench-batch-{q}"),
            };
            let mut conn = pool.acquire().await?;
            let (hit, ms) = timed(weir_cache::exact_lookup_batch(
                &mut conn,
                &cas,
                std::slice::from_ref(&req),
            ))
            .await;
            let hit = hit?;
            batch.add(ms);
            anyhow::ensure!(hit[0].is_some(), "a stored key missed");
        }

        // 3. Semantic lookups and recall@1.
        let mut semantic = Samples::after_warmup(WARMUP);
        let mut correct = 0usize;
        let mut answered = 0usize;
        for q in 0..queries + WARMUP {
            let w = rng.random_range(0..WORKSPACES);
            let i = w + WORKSPACES * rng.random_range(0..entries / WORKSPACES);
            let qv = near(&mut rng, &vectors[i], 0.03);
            let req = lookup_request(
                format!("bench-sem-{q}"),
                ws_name(w),
                json!({"q": q}),
                Some(unit(qv.clone(), d)?),
            );
            let (a, ms) = timed(cache.lookup(&req)).await;
            let a = a?;
            if !semantic.add(ms) {
                continue;
            }
            // Exact scan of the workspace (same data, in memory).
            let best = (w..entries)
                .step_by(WORKSPACES)
                .max_by(|a, b| dot(&vectors[*a], &qv).total_cmp(&dot(&vectors[*b], &qv)))
                .map(|j| {
                    hex::encode(semantic_key(
                        &ws_name(w),
                        Permission::Read,
                        node_type,
                        &json_hash(&json!({})),
                        &format!("prompt {j}"),
                    ))
                });
            if let Some(key) = a.entry_key {
                answered += 1;
                correct += usize::from(Some(key) == best);
            }
        }

        // 4. The real embedder.
        let embeddings_per_sec = match embed_rate(&cfg.cache).await {
            Ok(r) => json!(round(r, 1)),
            Err(e) => {
                tracing::warn!(error = %e, "embedder unavailable; embeddings_per_sec is null");
                serde_json::Value::Null
            }
        };

        // The run's rows and index go with the private schema (dropped by the caller).

        let (exact_p50, exact_p99) = exact.p50_p99();
        let (cas_p50, cas_p99) = cas_gets.p50_p99();
        let (batch_p50, batch_p99) = batch.p50_p99();
        let (sem_p50, sem_p99) = semantic.p50_p99();
        let figures = json!({
            "repetition": rep,
            "entries": entries,
            "workspaces": WORKSPACES,
            "queries": queries,
            "vectors": format!("synthetic: {d}-dim unit vectors around {CLUSTERS} random centres"),
            "load_secs": round(load_secs, 2),
            "index_build_secs": round(index_secs, 2),
            "exact_p50_ms": exact_p50,
            "exact_p99_ms": exact_p99,
            "exact_hits": exact_hits,
            "exact_batch1_p50_ms": batch_p50,
            "exact_batch1_p99_ms": batch_p99,
            "cas_get_p50_ms": cas_p50,
            "cas_get_p99_ms": cas_p99,
            "cas_backend": cas.backend_name(),
            "semantic_p50_ms": sem_p50,
            "semantic_p99_ms": sem_p99,
            "semantic_answered": answered,
            "recall_at_1": if answered == 0 { 0.0 } else { round(correct as f64 / queries as f64, 4) },
            "embeddings_per_sec": embeddings_per_sec,
            "start_state": start_state,
        });
        eprintln!(
        "repetition {rep}: exact p50/p99 {exact_p50}/{exact_p99} ms, semantic p50/p99 {sem_p50}/{sem_p99} ms, recall@1 {}",
        figures["recall_at_1"]
    );
        reps.push(figures);
    }
    Ok(summarize(reps, &FIGURES))
}

/// Sentences embedded per second by the local model (512 short sentences).
async fn embed_rate(cfg: &CacheConfig) -> anyhow::Result<f64> {
    let mut local = cfg.clone();
    local.embedder = EmbedderKind::Local;
    local.dimensions = 384;
    let e = Embedder::from_config(&local).await?;
    let subjects = [
        "the invoice",
        "a customer",
        "the weather in Paris",
        "our quarterly report",
        "the deployment",
        "a new user",
        "the database",
        "this contract",
    ];
    let verbs = [
        "summarize",
        "translate",
        "explain",
        "classify",
        "review",
        "rewrite",
        "check",
        "describe",
    ];
    let texts: Vec<String> = (0..512)
        .map(|i| {
            format!(
                "Please {} {} for ticket number {i}, briefly.",
                verbs[i % 8],
                subjects[(i / 8) % 8]
            )
        })
        .collect();
    e.embed(texts[..32].to_vec()).await?; // warm-up
    let t = Instant::now();
    let v = e.embed(texts.clone()).await?;
    anyhow::ensure!(
        v.len() == texts.len(),
        "embedder returned {} vectors for {}",
        v.len(),
        texts.len()
    );
    Ok(texts.len() as f64 / t.elapsed().as_secs_f64())
}
