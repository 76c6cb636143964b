//! `weir bench materialize`: the materializer against the local stack, side by side with a
//! naive path (one transaction per patch, as a synchronous design would do it) and with the
//! raw write limit of Postgres (COPY of as many rows), all in the same run.
//!
//! Phases, on a random topic prefix and workflow ids, in tables of its own (copies of the patch
//! log, the heads and the outbox in a private schema, dropped at the end with the topics):
//! 0. warm-up (not measured), on workflows of its own: a drain of the same mix, then steady
//!    rounds of about two seconds until a round's p99 is within a quarter of the previous
//!    round's (at most `warmup_time`).
//!
//! Then phases 1–4 run `repeat` times, each repetition on workflows of its own and from the
//! same state: the previous repetition's rows deleted, the outbox emptied, the tables
//! vacuumed and analyzed, a checkpoint and an OS `sync` (see [`super::common::settle`]). The
//! tables' autovacuum is off (the benchmark vacuums them itself), so no vacuum starts inside
//! a measured phase. The result is the first repetition's fields with each figure's median,
//! and the spread and targets over the repetitions.
//! 1. throughput: the consumers join their group, then N patches over W workflows are
//!    produced as a backlog and drained; patches_per_sec = N / (first record produced ..
//!    last decision committed).
//! 2. latency: the stream goes on over the same workflows (the next rounds of changes),
//!    produced at a steady 80 % of the measured throughput while the materializer runs;
//!    p50/p99 are patch produced (event time) → its decision committed.
//! 3. naive: patches of the same mix (the same share of creates) applied one transaction
//!    each, reading and writing the head, the patch log and the outbox per patch.
//! 4. limit: COPY of N rows shaped like the patch log into a scratch table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::{self, PatchSubmitted};
use weir_runtime::{telemetry, BatchConsumer};

use weir_model::definition::Limits;
use weir_model::fold::{self, Decision, Head, Submitted};
use weir_model::patch::Patch;

use super::common::{delete_rows, own_maintenance, settle, summarize, topics_left, Figure};
use crate::common::{create_topics, group_stable, register_schemas, round, scratch_config};

/// The tables the materializer writes, copied into the benchmark's own schema.
const OWN_TABLES: [&str; 5] = [
    "weir_workflow_heads",
    "weir_workflow_patches",
    "weir_outbox",
    "weir_outbox_dead",
    "weir_relays",
];
/// Of those, the ones a repetition writes (vacuumed before each).
const WRITTEN: [&str; 3] = [
    "weir_workflow_heads",
    "weir_workflow_patches",
    "weir_outbox",
];

/// The figures summarized over repetitions, with their targets.
pub const FIGURES: [Figure; 7] = [
    Figure::higher("/patches_per_sec").target(25_000.0),
    Figure::higher("/speedup_vs_naive").target(20.0),
    Figure::lower("/p99_ms").target(250.0),
    Figure::lower("/p50_ms"),
    Figure::higher("/latency_load_patches_per_sec"),
    Figure::higher("/naive_patches_per_sec"),
    Figure::higher("/pg_copy_rows_per_sec"),
];

/// Benchmark parameters.
#[derive(Debug, Clone)]
pub struct Params {
    /// Patches drained before the measured phases, on workflows of their own (not measured).
    pub warmup_patches: usize,
    /// Longest time the warm-up's steady rounds may take.
    pub warmup_time: Duration,
    /// Patches in the throughput phase.
    pub patches: usize,
    /// Workflows they are spread over.
    pub workflows: usize,
    /// Patches in the latency phase.
    pub latency_patches: usize,
    /// Patches in the naive phase.
    pub naive_patches: usize,
    /// Repetitions of phases 1–4 (at least 1).
    pub repeat: usize,
}

fn create_ops(w: usize) -> Value {
    json!([{"op": "add", "path": "", "value": {
        "nodes": {
            "fetch": {"type": "http_request", "config": {"url": format!("https://example.com/{w}"), "n": 0},
                      "retry": {"max_attempts": 3, "backoff_ms": 500}, "deadline_ms": 30000},
            "summarize": {"type": "agent", "config": {"model": "small", "prompt": "Summarize the page."}},
            "store": {"type": "database_query", "config": {"sql": "insert into results values ($1)"}}
        },
        "edges": [{"from": "fetch", "to": "summarize"}, {"from": "summarize", "to": "store"}],
        "settings": {"max_hops": 100}
    }}])
}

/// The `round`-th change to a workflow (round ≥ 1), patch `i` of the stream: a realistic
/// mix, 2 % of them failing a `test`.
fn change_ops(round: usize, i: usize) -> Value {
    if i % 50 == 17 {
        return json!([{"op": "test", "path": "/settings/max_hops", "value": -1},
                       {"op": "replace", "path": "/settings/max_hops", "value": 5}]);
    }
    match round % 4 {
        1 => json!([
            {"op": "add", "path": "/nodes/review", "value": {"type": "human", "config": {"queue": "ops"}}},
            {"op": "add", "path": "/edges/-", "value": {"from": "store", "to": "review"}}]),
        2 => json!([
            {"op": "remove", "path": "/edges/2"},
            {"op": "remove", "path": "/nodes/review"}]),
        _ => json!([{"op": "replace", "path": "/nodes/fetch/config/n", "value": round}]),
    }
}

/// Patches `from..from + count` of the stream over `workflows` workflows: one create per
/// workflow first, then changes round-robin (so 1 in `patches / workflows` is a create).
fn stream(prefix: &str, from: usize, count: usize, workflows: usize) -> Vec<PatchSubmitted> {
    let workflows = workflows.max(1);
    (from..from + count)
        .map(|i| {
            let w = i % workflows;
            let round = i / workflows;
            let ops = if round == 0 {
                create_ops(w)
            } else {
                change_ops(round, i)
            };
            weir_materializer::processor::patch_submitted(
                &format!("{prefix}wf-{w}"),
                &format!("ws-{}", w % 16),
                "bench",
                None,
                &ops,
            )
        })
        .collect()
}

async fn decided(pool: &sqlx::PgPool, topic: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM weir_workflow_patches WHERE source_topic = $1"#,
        topic
    )
    .fetch_one(pool)
    .await?)
}

/// Waits until `n` records of `topic` are committed, then checks that each has its decision
/// (`removed` of them were deleted since, with their repetition).
async fn wait_decided(
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
    (n, removed): (usize, usize),
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    // Committed offsets, not the patch log: counting decisions would scan the log every poll
    // and take CPU from the Postgres being measured.
    while weir_runtime::consumer::applied_records(pool, group, topic).await? < n as i64 {
        anyhow::ensure!(
            start.elapsed() < timeout,
            "timed out waiting for {n} decisions on {topic}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = decided(pool, topic).await?;
    anyhow::ensure!(
        d + removed as i64 == n as i64,
        "{n} records of {topic} committed but {d} decisions recorded ({removed} removed)"
    );
    Ok(())
}

/// Produces `events` at a steady `rate` per second (in 10 ms ticks), each stamped with the
/// time it is produced; returns when the first was stamped.
async fn steady(
    producer: &rdkafka::producer::FutureProducer,
    codec: &Codec,
    events: &[PatchSubmitted],
    rate: f64,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let start = chrono::Utc::now();
    let tick = Duration::from_millis(10);
    let per_tick = ((rate * tick.as_secs_f64()).ceil() as usize).max(1);
    let mut interval = tokio::time::interval(tick);
    for chunk in events.chunks(per_tick) {
        interval.tick().await;
        let now = events::now_micros();
        let chunk: Vec<PatchSubmitted> = chunk
            .iter()
            .cloned()
            .map(|mut e| {
                e.occurred_at = now;
                e
            })
            .collect();
        weir_runtime::kafka::produce_in_order(producer, codec, &chunk).await?;
    }
    Ok(start)
}

/// p50 and p99 in ms of patch produced → `end` (its decision, see `run`) over the patches of
/// workflows matching `workflows` (a LIKE pattern) submitted since `since`.
async fn percentiles(
    pool: &sqlx::PgPool,
    topic: &str,
    end: &str,
    workflows: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<(f64, f64)> {
    Ok(sqlx::query_as(&format!(
        r#"SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
           FROM (SELECT extract(epoch FROM {end} - submitted_at) * 1000 AS ms
                 FROM weir_workflow_patches
                 WHERE source_topic = $1 AND workflow_id LIKE $2 AND submitted_at >= $3) t"#
    ))
    .bind(topic)
    .bind(workflows)
    .bind(since)
    .fetch_one(pool)
    .await?)
}

/// Waits until the materializer's consumer group is stable with `members` members.
async fn wait_group_stable(cfg: &Config, members: usize, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let c = cfg.clone();
        if tokio::task::spawn_blocking(move || {
            group_stable(&c, weir_materializer::processor::GROUP, Some(members))
        })
        .await??
        {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "consumer group {} not stable with {members} members",
            cfg.kafka.group(weir_materializer::processor::GROUP)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The benchmark's configuration: `base` with its topics and consumer groups under
/// `<prefix>bench-<run_id>.`, so a deployment running beside it (same prefix) never shares a
/// topic or a consumer group with it.
pub fn bench_config(base: &Config, run_id: &str) -> Config {
    scratch_config(base, format!("{}bench-{run_id}.", base.kafka.topic_prefix))
}

/// Runs the benchmark and returns its figures as one JSON object.
pub async fn run(base: Arc<Config>, params: Params) -> anyhow::Result<Value> {
    let run_id = Uuid::now_v7().simple().to_string();
    let cfg = Arc::new(bench_config(&base, &run_id));
    create_topics(&cfg).await?;
    register_schemas(&cfg).await?;
    let deployment = weir_runtime::db::pool(&cfg.postgres)?;
    weir_runtime::db::MIGRATOR.run(&deployment).await?;
    deployment.close().await;
    // The patch log, the heads and the outbox are copies of the benchmark's own (dropped at
    // the end): no dead tuples of its making are left for the deployment's autovacuum to find
    // during the next benchmark, none of the deployment's rows are in its way, and a
    // deployment's relays never see its outbox rows.
    let private =
        weir_runtime::db::PrivateSchema::create(&cfg.postgres, "bench_materialize", &OWN_TABLES)
            .await?;
    let result = measure(&cfg, &private, &run_id, &params).await;
    let dropped = private.drop_all().await;
    let deleted = weir_runtime::kafka::delete_planned_topics(&cfg.kafka).await;
    let mut result = result?;
    dropped?;
    deleted?;
    let left = topics_left(&cfg, &cfg.kafka.topic_prefix, Duration::from_secs(10)).await?;
    if !left.is_empty() {
        eprintln!("topics still listed after deletion: {left:?}");
    }
    result["topics_left"] = json!(left.len());
    Ok(result)
}

/// Everything but the setup and the cleanup of [`run`], in `private`'s tables.
async fn measure(
    cfg: &Arc<Config>,
    private: &weir_runtime::db::PrivateSchema,
    run_id: &str,
    params: &Params,
) -> anyhow::Result<Value> {
    let pool = private.pool().clone();
    own_maintenance(&pool, private.schema(), &OWN_TABLES).await?;
    // A patch is done when the transaction that decided it commits: the end of its latency and
    // of the throughput window. The server keeps commit times only with track_commit_timestamp
    // (the local stack turns it on); without it the row's insertion time stands in, a few
    // milliseconds early.
    let commit_times: bool =
        sqlx::query_scalar("SELECT current_setting('track_commit_timestamp')::bool")
            .fetch_one(&pool)
            .await?;
    let end = if commit_times {
        "pg_xact_commit_timestamp(xmin)"
    } else {
        eprintln!("track_commit_timestamp is off: patches count as done at their row's insertion");
        "decided_at"
    };
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?);
    // Patches reach weir.patches.v1 through the gateway, whose producer does not compress
    // (small batches; see weir_gateway::produce): produce them the same way, unless the
    // configuration says otherwise.
    let mut producer_config = weir_runtime::kafka::producer_config(&cfg.kafka);
    if !cfg.kafka.producer.contains_key("compression.type") {
        producer_config.set("compression.type", "none");
    }
    let producer: rdkafka::producer::FutureProducer = producer_config.create()?;
    let cas = weir_runtime::cas::Cas::from_config(cfg).await?;
    let topic = codec.topic::<PatchSubmitted>();
    let group = cfg.kafka.group(weir_materializer::processor::GROUP);

    // Phase 1 (throughput on a backlog) needs the consumers started first and the backlog
    // produced once their group is stable with every member assigned: otherwise the first
    // consumer to join takes all partitions and the second one's join revokes them a few
    // seconds into the run (the local broker forms groups without the initial rebalance
    // delay), and the figure measures group formation instead of the materializer. Producing
    // (~200,000 patches/s) stays ahead of consuming, so the consumers never starve. They run
    // through every repetition (idle during the naive and COPY phases).
    let shutdown = CancellationToken::new();
    // Whatever way this function returns, the consumers stop.
    let _stop_consumers_on_return = shutdown.clone().drop_guard();
    let mut tasks = Vec::new();
    for _ in 0..cfg.runtime.consumers {
        let consumer = BatchConsumer::new(
            cfg.clone(),
            Arc::new(weir_materializer::Materializer::new(
                cfg.clone(),
                cas.clone(),
            )),
            pool.clone(),
            codec.clone(),
            producer.clone(),
            telemetry::Health::default(),
        );
        tasks.push(tokio::spawn(consumer.run(shutdown.clone())));
    }
    wait_group_stable(cfg, cfg.runtime.consumers, Duration::from_secs(60)).await?;
    let workflows = params.workflows.clamp(1, params.patches.max(1));

    // Phase 0, not measured: a drain of the same mix on workflows of its own, so the figures
    // describe the stack at work rather than its first seconds (a freshly started broker's
    // JIT compiler, empty buffer caches, the first batches' query plans).
    let warmup = params.warmup_patches;
    let warmup_started = Instant::now();
    // Records of the topic committed so far, and decisions deleted with their repetition.
    let mut done = 0usize;
    let mut removed = 0usize;
    if warmup > 0 {
        let warmup_workflows = (warmup * workflows / params.patches.max(1)).max(1);
        let events = stream(&format!("{run_id}-w-"), 0, warmup, warmup_workflows);
        eprintln!("warming up with {warmup} patches ...");
        let t = Instant::now();
        weir_runtime::kafka::produce_in_order(&producer, &codec, &events).await?;
        wait_decided(&pool, &group, &topic, (warmup, 0), Duration::from_secs(300)).await?;
        done = warmup;
        // Then a steady stream in rounds of about two seconds, until the p99 of a round is
        // within a quarter of the previous one's (or `warmup_seconds` pass): a freshly
        // started broker answers the latency phase's small requests several times slower for
        // its first minute or so.
        let rate = (warmup as f64 / t.elapsed().as_secs_f64() * 0.8).max(100.0);
        let round = (rate * 2.0) as usize;
        let mut previous: Option<f64> = None;
        while round > 0 && warmup_started.elapsed() < params.warmup_time {
            let events = stream(&format!("{run_id}-w-"), done, round, warmup_workflows);
            let since = steady(&producer, &codec, &events, rate).await?;
            done += round;
            wait_decided(&pool, &group, &topic, (done, 0), Duration::from_secs(300)).await?;
            let (_, p99) = percentiles(&pool, &topic, end, &format!("{run_id}-w-%"), since).await?;
            eprintln!("warm-up round at {rate:.0}/s: p99 {p99:.1} ms");
            if previous.is_some_and(|p| (p99 - p).abs() <= 0.25 * p) {
                break;
            }
            previous = Some(p99);
        }
    }
    let warmup_secs = warmup_started.elapsed().as_secs_f64();
    let warmup_total = done;

    let mut reps = Vec::new();
    for rep in 1..=params.repeat.max(1) {
        // The same start for every repetition: the warm-up's heads and patch log (so the
        // planner's statistics describe a table in use), an empty outbox (a relay keeps a
        // deployment's near empty; nothing drains this one), vacuumed and analyzed tables,
        // a checkpoint and an OS sync.
        sqlx::query(&format!("TRUNCATE {}", private.qualified("weir_outbox")))
            .execute(&pool)
            .await?;
        let start_state = settle(&pool, &WRITTEN, &format!("repetition {rep}")).await?;
        let prefix = format!("{run_id}-r{rep}-");
        let backlog = stream(&format!("{prefix}t-"), 0, params.patches, workflows);
        eprintln!(
            "repetition {rep}: producing {} patches over {} workflows ...",
            params.patches, workflows
        );
        let t = Instant::now();
        let drain_start = chrono::Utc::now();
        weir_runtime::kafka::produce_in_order(&producer, &codec, &backlog).await?;
        let produce_secs = t.elapsed().as_secs_f64();
        drop(backlog);

        eprintln!("materializing ...");
        done += params.patches;
        wait_decided(
            &pool,
            &group,
            &topic,
            (done, removed),
            Duration::from_secs(900),
        )
        .await?;
        let last: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(&format!(
            "SELECT max({end}) FROM weir_workflow_patches WHERE source_topic = $1"
        ))
        .bind(&topic)
        .fetch_one(&pool)
        .await?;
        // From the first record produced (the consumers are already waiting for it) to the
        // last decision committed: the first batch's own time counts too.
        let drain_secs = (last - drain_start).as_seconds_f64().max(1e-3);
        let patches_per_sec = params.patches as f64 / drain_secs;
        let applied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM weir_workflow_patches
             WHERE source_topic = $1 AND status = 'applied' AND workflow_id LIKE $2",
        )
        .bind(&topic)
        .bind(format!("{prefix}t-%"))
        .fetch_one(&pool)
        .await?;

        // Phase 2: latency at a steady 80 % of the measured capacity, on the same workload:
        // the stream goes on over the same workflows (the next rounds of changes).
        let rate = (patches_per_sec * 0.8).max(100.0);
        let latency_events = stream(
            &format!("{prefix}t-"),
            params.patches,
            params.latency_patches,
            workflows,
        );
        eprintln!(
            "latency phase: {} patches at {:.0}/s ...",
            latency_events.len(),
            rate
        );
        let latency_start = steady(&producer, &codec, &latency_events, rate).await?;
        done += latency_events.len();
        wait_decided(
            &pool,
            &group,
            &topic,
            (done, removed),
            Duration::from_secs(600),
        )
        .await?;
        let (p50, p99) =
            percentiles(&pool, &topic, end, &format!("{prefix}t-%"), latency_start).await?;

        // Phase 3: the naive path, on the same mix (the same share of creates).
        let naive_workflows = (params.naive_patches * workflows / params.patches.max(1)).max(1);
        let naive = stream(
            &format!("{prefix}n-"),
            0,
            params.naive_patches,
            naive_workflows,
        );
        let limits = Limits::default();
        let t = Instant::now();
        for e in &naive {
            naive_apply(&pool, &topic, e, &limits).await?;
        }
        let naive_patches_per_sec = naive.len() as f64 / t.elapsed().as_secs_f64();

        // Phase 4: the write limit of Postgres.
        let copy_rows_per_sec = copy_limit(&pool, params.patches).await?;

        // The repetition's rows go; the next one vacuums what they leave.
        let deleted = delete_rows(
            &pool,
            &[
                // The `t-` workflows' patches came through the topic; the `n-` ones naive.
                "DELETE FROM weir_workflow_patches WHERE workflow_id LIKE $1 || 't-%'",
                "DELETE FROM weir_workflow_patches WHERE workflow_id LIKE $1 || 'n-%'",
                "DELETE FROM weir_workflow_heads WHERE workflow_id LIKE $1 || '%'",
            ],
            &prefix,
        )
        .await?;
        removed += deleted[0] as usize;

        let result = json!({
            "repetition": rep,
            "warmup_patches": warmup_total,
            "warmup_seconds": round(warmup_secs, 1),
            "patches": params.patches,
            "workflows": params.workflows,
            "consumers": cfg.runtime.consumers,
            "applied": applied,
            "seconds": drain_secs,
            "patches_per_sec": patches_per_sec.round(),
            "produce_seconds": produce_secs,
            "latency_patches": params.latency_patches,
            "latency_load_patches_per_sec": rate.round(),
            "measured_to": if commit_times { "commit" } else { "row insert" },
            "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1),
            "naive_patches": naive.len(),
            "naive_patches_per_sec": naive_patches_per_sec.round(),
            "speedup_vs_naive": round(patches_per_sec / naive_patches_per_sec, 1),
            "pg_copy_rows_per_sec": copy_rows_per_sec.round(),
            "fraction_of_limit": round(patches_per_sec / copy_rows_per_sec, 3),
            "start_state": start_state,
        });
        eprintln!(
            "repetition {rep}: {} patches/s, p50/p99 {p50:.1}/{p99:.1} ms at {rate:.0}/s, {:.1}x naive",
            result["patches_per_sec"], result["speedup_vs_naive"]
        );
        reps.push(result);
    }
    shutdown.cancel();
    for task in tasks {
        task.await??;
    }
    Ok(summarize(reps, &FIGURES))
}

/// One patch, one transaction: what a synchronous design does for every patch.
async fn naive_apply(
    pool: &sqlx::PgPool,
    topic: &str,
    e: &PatchSubmitted,
    limits: &Limits,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, i64, Value)> = sqlx::query_as(
        "SELECT workspace_id, version, definition FROM weir_workflow_heads
         WHERE workspace_id = $1 AND workflow_id = $2 FOR UPDATE",
    )
    .bind(&e.workspace_id)
    .bind(&e.workflow_id)
    .fetch_optional(&mut *tx)
    .await?;
    let mut head = match row {
        Some((ws, version, definition)) => Head {
            workspace_id: ws,
            version,
            definition,
        },
        None => Head::empty(&e.workspace_id),
    };
    let submitted = Submitted {
        workspace_id: e.workspace_id.clone(),
        base_version: e.base_version,
        operations: serde_json::from_str(&e.operations_json)
            .map_err(|x| weir_model::patch::PatchError::InvalidJson {
                message: x.to_string(),
            })
            .and_then(|v| Patch::from_value(&v)),
    };
    let decision = fold::step(&mut head, &submitted, limits);
    let (status, version, sha, code) = match &decision {
        Decision::Applied {
            version, sha256, ..
        } => ("applied", Some(*version), Some(sha256.clone()), None),
        Decision::Rejected { code, .. } => ("rejected", None, None, Some(code.to_string())),
    };
    if let Decision::Applied {
        version, sha256, ..
    } = &decision
    {
        sqlx::query(
            "INSERT INTO weir_workflow_heads (workflow_id, workspace_id, version, definition, definition_sha256)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (workspace_id, workflow_id) DO UPDATE SET version = EXCLUDED.version,
               definition = EXCLUDED.definition, definition_sha256 = EXCLUDED.definition_sha256, updated_at = now()",
        )
        .bind(&e.workflow_id)
        .bind(&head.workspace_id)
        .bind(version)
        .bind(&head.definition)
        .bind(sha256)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO weir_workflow_patches (workflow_id, patch_id, workspace_id, author, base_version, head_version,
           status, version, definition_sha256, operations, reason_code, reason, source_topic, source_partition,
           source_offset, submitted_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::jsonb, $11, $11, $12, 0, 0, now())",
    )
    .bind(&e.workflow_id)
    .bind(e.patch_id)
    .bind(&e.workspace_id)
    .bind(&e.author)
    .bind(e.base_version)
    .bind(head.version)
    .bind(status)
    .bind(version)
    .bind(sha)
    .bind(&e.operations_json)
    .bind(code)
    .bind(format!("{topic}.naive"))
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO weir_outbox (lane, topic, key, payload) VALUES (0, $1, $2, $3)")
        .bind(format!("{topic}.naive"))
        .bind(e.workflow_id.as_bytes())
        .bind(head.definition.to_string().as_bytes())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// COPY `rows` rows shaped like the patch log into a scratch table; rows per second.
async fn copy_limit(pool: &sqlx::PgPool, rows: usize) -> anyhow::Result<f64> {
    let mut conn = pool.acquire().await?;
    let table = format!("weir_bench_copy_{}", Uuid::now_v7().simple());
    sqlx::query(&format!(
        "CREATE TABLE {table} (LIKE weir_workflow_patches INCLUDING DEFAULTS)"
    ))
    .execute(&mut *conn)
    .await?;
    let mut text = String::with_capacity(rows * 200);
    for i in 0..rows {
        text.push_str(&format!(
            "wf-{}\t{}\tws\tbench\t\\N\t{}\tapplied\t{}\t{}\t[{{\"op\": \"replace\", \"path\": \"/a\", \"value\": {i}}}]\t\\N\t\\N\t\\N\ttopic\t0\t{i}\t2026-01-01 00:00:00+00\t2026-01-01 00:00:00+00\n",
            i % 10_000,
            Uuid::now_v7(),
            i,
            i + 1,
            fold::sha256_hex(&i.to_string()),
        ));
    }
    let t = Instant::now();
    let mut copy = conn
        .copy_in_raw(&format!(
            "COPY {table} (workflow_id, patch_id, workspace_id, author, base_version, head_version, status, version,
              definition_sha256, operations, operations_ref, reason_code, reason, source_topic, source_partition,
              source_offset, submitted_at, decided_at) FROM STDIN"
        ))
        .await?;
    copy.send(text.as_bytes()).await?;
    copy.finish().await?;
    let secs = t.elapsed().as_secs_f64();
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&mut *conn)
        .await?;
    Ok(rows as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_groups_and_topics_are_never_the_deployments() {
        for prefix in ["", "dev.", "prod-eu."] {
            let mut base = Config::default();
            base.kafka.topic_prefix = prefix.into();
            let cfg = bench_config(&base, "0190abc");
            let group = cfg.kafka.group(weir_materializer::processor::GROUP);
            assert_ne!(group, base.kafka.group(weir_materializer::processor::GROUP));
            assert_eq!(group, format!("{prefix}bench-0190abc.weir-materializer"));
            assert_ne!(
                cfg.kafka.topic("weir.patches.v1"),
                base.kafka.topic("weir.patches.v1")
            );
        }
    }
}
