//! `weir bench coordinator`: N runs of root → fan-out of 8 → join → tail (11 nodes, 11
//! completions per run) through the coordinator's real processor path, side by side with a
//! naive path (one transaction per completion) on the same DAG, in the same run.
//!
//! The loop plays the runtime and the workers: it hands batches of completion records
//! (`runtime.max_batch`) to [`Processor::apply`] inside a transaction with the outbox flush and
//! commits, exactly as the batch consumer does (minus Kafka). Simulated workers then take the
//! committed NodeReady rows out of the outbox, decode them through the registry like a real
//! worker and answer each at once with a successful NodeCompleted, which joins the queue.
//! Every run starts at once (a backlog), so hop latency here includes queueing behind the
//! whole population.
//!
//! `seconds` (and the rates from it) count the time inside the coordinator's batch
//! transactions: apply, outbox flush and commit, as the batch consumer would spend it. The
//! simulated workers' time (reading the outbox, decoding, building the answers) is not the
//! coordinator's and is reported apart as `wall_seconds` / `wall_completions_per_sec`.
//!
//! Both paths run `repeat` times, each repetition from the same state: the previous
//! repetition's runs deleted, the run tables and the outbox vacuumed and analyzed, a
//! checkpoint and an OS `sync` (see [`super::common::settle`]). The run tables are the
//! deployment's (their foreign keys and cascades are part of the cost), so the benchmark
//! vacuums them again after deleting its rows: it leaves no dead tuples for autovacuum to find
//! during the next benchmark. The result is the first repetition's fields with each figure's
//! median, and the spread and targets over the repetitions.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use uuid::Uuid;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::{
    self, new_event, CompletionEvent, Envelope, NodeCompleted, NodeReady, NodeStatus, RunRequested,
};
use weir_runtime::{Coordinates, Outbox, Processor, Record};

use weir_coordinator::processor::Coordinator;

use super::common::{delete_rows, own_maintenance, settle, summarize, Figure};
use crate::common::{own_outbox, percentile, register_schemas, scratch_config, vacuum_analyze};

/// The tables a repetition writes (`weir_outbox` is the benchmark's own).
const WRITTEN: [&str; 5] = [
    "weir_runs",
    "weir_run_nodes",
    "weir_run_timers",
    "weir_coordinator_definitions",
    "weir_outbox",
];

/// The figures summarized over repetitions, with their targets.
pub const FIGURES: [Figure; 7] = [
    Figure::higher("/completions_per_sec").target(10_000.0),
    Figure::higher("/wall_completions_per_sec"),
    Figure::higher("/runs_per_sec"),
    Figure::lower("/hop_p50_ms"),
    Figure::lower("/hop_p99_ms"),
    Figure::higher("/naive_completions_per_sec"),
    Figure::higher("/speedup_vs_naive"),
];

/// The benchmark DAG: root → f0..f7 → join → tail.
pub fn dag() -> Value {
    let mut nodes = serde_json::Map::new();
    nodes.insert(
        "root".into(),
        json!({"type": "http_request", "config": {"url": "https://example.com/in"}}),
    );
    let mut edges = Vec::new();
    for i in 0..8 {
        nodes.insert(
            format!("f{i}"),
            json!({"type": "agent", "config": {"model": "small", "shard": i},
                   "retry": {"max_attempts": 3, "backoff_ms": 200}}),
        );
        edges.push(json!({"from": "root", "to": format!("f{i}")}));
        edges.push(json!({"from": format!("f{i}"), "to": "join"}));
    }
    nodes.insert("join".into(), json!({"type": "pure", "config": {}}));
    nodes.insert(
        "tail".into(),
        json!({"type": "database_query", "config": {"sql": "insert into results values ($1)"}}),
    );
    edges.push(json!({"from": "join", "to": "tail"}));
    json!({"nodes": nodes, "edges": edges, "settings": {"max_hops": 10}})
}

struct Phase {
    completions: usize,
    /// Time inside the coordinator's batch transactions (apply + outbox flush + commit).
    seconds: f64,
    /// Wall time including the simulated workers.
    wall_seconds: f64,
    hops_ms: Vec<f64>,
    batches: usize,
    runs_completed: i64,
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: &Config,
    pool: &sqlx::PgPool,
    codec: &Codec,
    coordinator: &Coordinator,
    workflow_id: &str,
    runs: usize,
    batch: usize,
    tag: &str,
) -> anyhow::Result<Phase> {
    let topic = codec.topic::<CompletionEvent>();
    let ready_topic = codec.topic::<NodeReady>();
    let runs_topic = codec.topic::<weir_runtime::events::RunEvent>();
    let mut queue: VecDeque<CompletionEvent> = (0..runs)
        .map(|_| {
            CompletionEvent::RunRequested(new_event!(RunRequested {
                envelope: Envelope::at_ingress("ws-bench", "", None),
                run_id: format!("{tag}-{}", Uuid::now_v7()),
                workflow_id: workflow_id.into(),
                version: None,
                requester: "bench".into(),
                permission: "write".into(),
                inputs_json: Some("{\"q\":1}".into()),
                inputs_ref: None,
                idempotency_key: None,
            }))
        })
        .collect();
    // When each node's completion happened: (run, node) → µs.
    let mut completed_at: HashMap<(String, String), i64> = HashMap::new();
    let mut hops_ms = Vec::new();
    let mut completions = 0usize;
    let mut offset = 0i64;
    let mut batches = 0usize;
    let mut in_coordinator = 0f64;
    let start = Instant::now();
    while !queue.is_empty() {
        let n = queue.len().min(batch);
        let records: Vec<Record<CompletionEvent>> = queue
            .drain(..n)
            .map(|event| {
                offset += 1;
                Record {
                    coords: Coordinates {
                        topic: topic.clone(),
                        partition: 0,
                        offset,
                    },
                    key: None,
                    timestamp_ms: None,
                    event,
                }
            })
            .collect();
        completions += records
            .iter()
            .filter(|r| matches!(r.event, CompletionEvent::NodeCompleted(_)))
            .count();
        let t = Instant::now();
        let mut tx = pool.begin().await?;
        let mut outbox = Outbox::new(codec, cfg.outbox.lanes);
        let rejected = coordinator.apply(&mut tx, &records, &mut outbox).await?;
        anyhow::ensure!(rejected.is_empty(), "bench records rejected: {rejected:?}");
        outbox.flush(&mut tx).await?;
        tx.commit().await?;
        in_coordinator += t.elapsed().as_secs_f64();
        let committed = events::now_micros();
        batches += 1;

        // The workers: take the committed NodeReady rows, answer each at once.
        // Run events are taken out too: nothing of the benchmark is left for a relay, even
        // if it is interrupted.
        let rows = sqlx::query!(
            "DELETE FROM weir_outbox WHERE topic = ANY($1::text[]) RETURNING topic, payload",
            &[ready_topic.clone(), runs_topic.clone()]
        )
        .fetch_all(pool)
        .await?;
        for row in rows {
            if row.topic != ready_topic {
                continue;
            }
            let ready: NodeReady = codec.decode(&row.payload).await?;
            if let Some(cause) = ready
                .inputs
                .iter()
                .filter_map(|i| completed_at.get(&(ready.run_id.clone(), i.node_id.clone())))
                .max()
            {
                hops_ms.push((committed - cause) as f64 / 1e3);
            }
            let now = events::now_micros();
            completed_at.insert((ready.run_id.clone(), ready.node_id.clone()), now);
            queue.push_back(CompletionEvent::NodeCompleted(new_event!(NodeCompleted {
                envelope: Envelope::new(ready.workspace_id, ready.traceparent, None).at(now),
                run_id: ready.run_id,
                node_id: ready.node_id,
                attempt: ready.attempt,
                status: NodeStatus::Succeeded,
                output_json: Some("{\"ok\":true}".into()),
                output_ref: None,
                error: None,
                duration_ms: 0,
                worker_id: "bench-worker".into(),
                from_cache: false,
            })));
        }
    }
    let wall_seconds = start.elapsed().as_secs_f64();
    let runs_completed: i64 = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM weir_runs WHERE workspace_id = 'ws-bench' AND workflow_id = $1 AND run_id LIKE $2 AND status = 'completed'"#,
        workflow_id,
        format!("{tag}-%"),
    )
    .fetch_one(pool)
    .await?;
    hops_ms.sort_by(f64::total_cmp);
    Ok(Phase {
        completions,
        seconds: in_coordinator,
        wall_seconds,
        hops_ms,
        batches,
        runs_completed,
    })
}

/// Runs the benchmark and returns its figures as one JSON object.
pub async fn run(
    base: Arc<Config>,
    runs: usize,
    naive_runs: usize,
    repeat: usize,
) -> anyhow::Result<Value> {
    let id = Uuid::now_v7().simple().to_string();
    let cfg = Arc::new(scratch_config(&base, format!("bench-{id}.")));
    register_schemas(&cfg).await?;
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    weir_runtime::db::MIGRATOR.run(&pool).await?;
    // NodeReady and run events go to an outbox of the benchmark's own (dropped at the end),
    // where the simulated workers take them: a deployment's relays running beside it never
    // see them (they would publish them to topics that do not exist, or take them from the
    // workers).
    let private = own_outbox(&cfg, "bench_coordinator").await?;
    let pool = private.pool().clone();
    own_maintenance(
        &pool,
        private.schema(),
        &["weir_outbox", "weir_outbox_dead", "weir_relays"],
    )
    .await?;
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?);
    let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
    let workflow_id = format!("bench-{id}-wf");
    let definition = dag();
    let sha = weir_model::fold::sha256_hex(
        &weir_model::definition::canonical_json_verbatim_numbers(&definition),
    );
    sqlx::query!(
        "INSERT INTO weir_workflow_heads (workflow_id, workspace_id, version, definition, definition_sha256)
         VALUES ($1, 'ws-bench', 1, $2, $3)",
        workflow_id,
        definition,
        sha,
    )
    .execute(&pool)
    .await
    .context("creating the benchmark workflow")?;

    let history = Arc::new(weir_wiring::PatchLogReplay::new(pool.clone(), cas.clone()));
    let coordinator = Coordinator::new(cfg.clone(), cas, history);
    let result = repetitions(
        &cfg,
        &pool,
        &codec,
        &coordinator,
        &workflow_id,
        (runs, naive_runs, repeat),
        &id,
    )
    .await;

    // Leave nothing behind: the runs (their nodes and timers cascade), the definition and the
    // workflow, then a vacuum so that no dead tuples of the benchmark wake autovacuum later.
    sqlx::query!(
        "DELETE FROM weir_runs WHERE workspace_id = 'ws-bench' AND workflow_id = $1",
        workflow_id
    )
    .execute(&pool)
    .await?;
    sqlx::query!(
        "DELETE FROM weir_coordinator_definitions WHERE workspace_id = 'ws-bench' AND workflow_id = $1",
        workflow_id
    )
    .execute(&pool)
    .await?;
    sqlx::query!(
        "DELETE FROM weir_workflow_heads WHERE workspace_id = 'ws-bench' AND workflow_id = $1",
        workflow_id
    )
    .execute(&pool)
    .await?;
    vacuum_analyze(&pool, &WRITTEN[..4]).await?;
    // The outbox rows go with the benchmark's own outbox.
    private.drop_all().await?;
    result
}

/// Both paths `repeat` times from the same state; the summary of the repetitions.
async fn repetitions(
    cfg: &Config,
    pool: &sqlx::PgPool,
    codec: &Codec,
    coordinator: &Coordinator,
    workflow_id: &str,
    (runs, naive_runs, repeat): (usize, usize, usize),
    id: &str,
) -> anyhow::Result<Value> {
    let batch = cfg.runtime.max_batch;
    let mut reps = Vec::new();
    for rep in 1..=repeat.max(1) {
        let start_state = settle(pool, &WRITTEN, &format!("repetition {rep}")).await?;
        eprintln!("repetition {rep}: coordinating {runs} runs in batches of up to {batch} ...");
        let fast = drive(
            cfg,
            pool,
            codec,
            coordinator,
            workflow_id,
            runs,
            batch,
            &format!("{id}-r{rep}-b"),
        )
        .await?;
        eprintln!("naive path: {naive_runs} runs, one transaction per completion ...");
        let naive = drive(
            cfg,
            pool,
            codec,
            coordinator,
            workflow_id,
            naive_runs,
            1,
            &format!("{id}-r{rep}-n"),
        )
        .await?;
        // The repetition's runs go (nodes and timers cascade); the next one vacuums.
        delete_rows(
            pool,
            &["DELETE FROM weir_runs WHERE workspace_id = 'ws-bench' AND workflow_id = $1"],
            workflow_id,
        )
        .await?;
        anyhow::ensure!(
            fast.runs_completed == runs as i64 && naive.runs_completed == naive_runs as i64,
            "not every run completed: {} of {runs}, naive {} of {naive_runs}",
            fast.runs_completed,
            naive.runs_completed
        );
        let cps = fast.completions as f64 / fast.seconds;
        let naive_cps = naive.completions as f64 / naive.seconds;
        reps.push(json!({
            "repetition": rep,
            "bench": "coordinator",
            "dag": "root -> fan-out 8 -> join -> tail (11 nodes)",
            "runs": runs,
            "completions": fast.completions,
            "seconds": fast.seconds,
            "wall_seconds": fast.wall_seconds,
            "wall_completions_per_sec": fast.completions as f64 / fast.wall_seconds,
            "batches": fast.batches,
            "max_batch": batch,
            "completions_per_sec": cps,
            "runs_per_sec": runs as f64 / fast.seconds,
            "hop_p50_ms": percentile(&fast.hops_ms, 0.5),
            "hop_p99_ms": percentile(&fast.hops_ms, 0.99),
            "naive_runs": naive_runs,
            "naive_completions": naive.completions,
            "naive_seconds": naive.seconds,
            "naive_wall_seconds": naive.wall_seconds,
            "naive_completions_per_sec": naive_cps,
            "naive_hop_p50_ms": percentile(&naive.hops_ms, 0.5),
            "speedup_vs_naive": cps / naive_cps,
            "start_state": start_state,
        }));
        eprintln!(
            "repetition {rep}: {cps:.0} completions/s, hop p50/p99 {:.0}/{:.0} ms, {:.1}x naive",
            percentile(&fast.hops_ms, 0.5),
            percentile(&fast.hops_ms, 0.99),
            cps / naive_cps,
        );
    }
    Ok(summarize(reps, &FIGURES))
}
