//! The demo workload of the README's first command (`infra/local/demo` → `weir demo`).
//!
//! Everything goes through the public HTTP gateway, as a user's services would: it creates
//! workflows (PUT), patches them (one patch is meant to be rejected), starts runs, plays the
//! workers (reads NodeReady from Kafka and posts completions, failing some first attempts so
//! retries show), runs the same inputs a second time so the coordinator serves cacheable nodes
//! from the cache, and exercises the exact and semantic cache lookups. It prints progress and
//! ends with a summary read back from the system (gateway, Kafka watermarks, /metrics).
//!
//! Invariant: the demo works in a workspace of its own (`demo-<random>`), so it never touches
//! or counts other data in a shared database, and running it twice is safe.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::{NodeReady, ALL_TOPICS};

use crate::common::{self, group_stable};
use crate::worker::{self, Failures, Worker};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of the gateway, e.g. `http://127.0.0.1:8080`.
    pub gateway: String,
    /// Runs per wave (two waves: the second repeats the first one's inputs).
    pub runs: usize,
    /// Where the processors' /metrics are served (for the summary's pointer).
    pub metrics_url: String,
    /// How long to wait for the whole workload before giving up.
    pub timeout: Duration,
}

/// What the demo saw, also printed as the summary.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    /// The demo's workspace.
    pub workspace: String,
    /// Workflow id → its head version at the end.
    pub versions: BTreeMap<String, i64>,
    /// Patches applied and rejected (including the create).
    pub patches_applied: u64,
    /// Patches the materializer rejected.
    pub patches_rejected: u64,
    /// Runs that completed, failed, or were cancelled.
    pub runs_completed: u64,
    /// Runs that failed.
    pub runs_failed: u64,
    /// Runs that were cancelled.
    pub runs_cancelled: u64,
    /// NodeReady events the simulated workers handled.
    pub nodes_dispatched: u64,
    /// Node attempts the workers failed on purpose (retried by the coordinator).
    pub nodes_failed_on_purpose: u64,
    /// Nodes that succeeded without being dispatched: served from the exact cache.
    pub nodes_from_cache: u64,
    /// Cache lookups through the gateway and how many hit.
    pub cache_lookups: u64,
    /// Lookups answered with a hit.
    pub cache_hits: u64,
    /// Similarity of the semantic hit on the paraphrased prompt.
    pub semantic_similarity: Option<f64>,
    /// Work the lookup hits saved, in ms (the entries' cost).
    pub cache_saved_ms: i64,
    /// Events appended to each topic during the demo.
    pub events_per_topic: BTreeMap<String, i64>,
    /// Wall time.
    pub seconds: f64,
}

struct Api {
    http: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = res.status().as_u16();
        let text = res.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, value))
    }

    /// A call that must be accepted (2xx); anything else stops the demo with the problem body.
    async fn ok(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let (status, value) = self.call(method.clone(), path, body).await?;
        if !(200..300).contains(&status) {
            bail!("{method} {path} answered {status}: {value}");
        }
        Ok(value)
    }
}

/// The three demo workflows: a pipeline with a cacheable fetch, a fan-out of eight, and an
/// agent flow with a human review.
fn definitions() -> Vec<(&'static str, Value)> {
    let mut fan_nodes = serde_json::Map::new();
    let mut fan_edges = Vec::new();
    fan_nodes.insert(
        "split".into(),
        json!({"type": "function", "config": {"fn": "split"}}),
    );
    fan_nodes.insert(
        "join".into(),
        json!({"type": "function", "config": {"fn": "join"}}),
    );
    fan_nodes.insert("publish".into(), json!({"type": "http_request", "config": {"url": "https://example.invalid/publish", "method": "POST"}}));
    for i in 0..8 {
        let id = format!("score_{i}");
        fan_nodes.insert(
            id.clone(),
            json!({"type": "pure", "config": {"model": "score", "shard": i}}),
        );
        fan_edges.push(json!({"from": "split", "to": id}));
        fan_edges.push(json!({"from": id, "to": "join"}));
    }
    fan_edges.push(json!({"from": "join", "to": "publish"}));
    vec![
        (
            "etl",
            json!({
                "nodes": {
                    "fetch": {"type": "http_request", "config": {"url": "https://example.invalid/orders"},
                              "retry": {"max_attempts": 3, "backoff_ms": 200}, "deadline_ms": 30000},
                    "parse": {"type": "function", "config": {"fn": "parse_orders", "fail_attempts": 1},
                              "retry": {"max_attempts": 3, "backoff_ms": 100}},
                    "load": {"type": "database_query", "config": {"sql": "INSERT INTO orders ..."}}
                },
                "edges": [{"from": "fetch", "to": "parse"}, {"from": "parse", "to": "load"}],
                "settings": {"max_hops": 20}
            }),
        ),
        ("fanout", json!({"nodes": fan_nodes, "edges": fan_edges})),
        (
            "review",
            json!({
                "nodes": {
                    "draft": {"type": "agent", "config": {"model": "small", "prompt": "Draft a reply"}},
                    "approve": {"type": "human", "config": {"queue": "reviewers"}}
                },
                "edges": [{"from": "draft", "to": "approve"}]
            }),
        ),
    ]
}

/// The base consumer groups of the processors the demo drives.
const GROUPS: [&str; 3] = [
    weir_materializer::processor::GROUP,
    weir_coordinator::GROUP,
    weir_cache::processor::GROUP,
];

/// Whether every processor's consumer group is stable with members (owns its partitions), so
/// events produced now are processed at once rather than after a rebalance.
fn groups_stable(cfg: &Config) -> anyhow::Result<bool> {
    for group in GROUPS {
        if !group_stable(cfg, group, None)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Records of `topic` (all partitions) the `group` has applied, from its positions in
/// Postgres (moved in the same transaction as the effects), and the topic's high watermarks.
async fn applied_and_produced(
    cfg: &Config,
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
) -> anyhow::Result<(i64, i64)> {
    let applied = weir_runtime::consumer::applied_records(pool, group, topic).await?;
    let (cfg, topic) = (cfg.clone(), topic.to_string());
    let produced = tokio::task::spawn_blocking(move || high_watermarks(&cfg, &topic))
        .await??
        .values()
        .sum();
    Ok((applied, produced))
}

/// The high watermark (next offset) of every partition of `topic`.
fn high_watermarks(cfg: &Config, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let consumer: BaseConsumer =
        weir_runtime::kafka::consumer_config(&cfg.kafka, "weir-demo-watermarks", 0)
            .create()
            .context("kafka consumer")?;
    common::high_watermarks(&consumer, topic)
}

/// Sum of the high watermarks of every weir topic (events ever appended).
fn watermarks(cfg: &Config) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for (topic, _) in ALL_TOPICS {
        let sum = high_watermarks(cfg, &cfg.kafka.topic(topic))?
            .values()
            .sum();
        out.insert(topic.to_string(), sum);
    }
    Ok(out)
}

/// The demo's workers: nodes whose config says `fail_attempts` fail that many attempts; the
/// run's inputs decide the output, so the second wave's reruns are comparable.
const WORKER: Worker = Worker {
    id: "demo-worker",
    work: Duration::from_millis(5),
    failures: Failures::FromConfig,
    echo_run_inputs: true,
};

#[derive(Default)]
struct WorkerStats {
    dispatched: AtomicU64,
    failed: AtomicU64,
}

/// The simulated workers: read NodeReady of this workspace from the end of the topic as it
/// was before any run started, "work" a few ms, report the completion through the gateway.
async fn workers(
    cfg: Arc<Config>,
    api: Arc<Api>,
    workspace: String,
    start: BTreeMap<i32, i64>,
    stats: Arc<WorkerStats>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let codec = Codec::new(&cfg.schema_registry, &cfg.kafka)?;
    let topic = codec.topic::<NodeReady>();
    let consumer: StreamConsumer =
        weir_runtime::kafka::consumer_config(&cfg.kafka, "weir-demo-workers", 0)
            .set("enable.auto.commit", "false")
            .create()?;
    let mut tpl = TopicPartitionList::new();
    for (p, offset) in &start {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*offset))?;
    }
    consumer.assign(&tpl)?;
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = consumer.recv() => m?,
        };
        let Some(payload) = msg.payload() else {
            continue;
        };
        let ready: NodeReady = match codec.decode(payload).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable NodeReady skipped");
                continue;
            }
        };
        if ready.workspace_id != workspace {
            continue;
        }
        stats.dispatched.fetch_add(1, Ordering::Relaxed);
        let fail = WORKER.fails(&ready);
        if fail {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        let api = api.clone();
        tasks.spawn(async move {
            WORKER.work().await;
            let body = WORKER.completion(&ready, fail);
            let path = worker::completion_path(&ready);
            if let Err(e) = api.ok(reqwest::Method::POST, &path, Some(&body)).await {
                tracing::warn!(error = %e, "completion not accepted");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    Ok(())
}

fn say(started: Instant, line: impl AsRef<str>) {
    println!(
        "[{:>6.1}s] {}",
        started.elapsed().as_secs_f64(),
        line.as_ref()
    );
}

/// Runs the demo; prints progress and returns the summary.
pub async fn run(
    cfg: Arc<Config>,
    opts: Options,
    shutdown: CancellationToken,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let workspace = format!("demo-{}", &uuid::Uuid::now_v7().simple().to_string()[24..]);
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let admin = weir_gateway::create_key(&pool, &workspace, weir_model::Permission::Admin)
        .await
        .context("creating the demo's API key (has `weir migrate` run?)")?;
    let reader = weir_gateway::create_key(&pool, &workspace, weir_model::Permission::Read).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let api = Arc::new(Api {
        http: http.clone(),
        base: opts.gateway.clone(),
        key: admin.key,
    });
    let read_api = Api {
        http,
        base: opts.gateway.clone(),
        key: reader.key,
    };
    let mut summary = Summary {
        workspace: workspace.clone(),
        ..Summary::default()
    };
    say(
        started,
        format!("workspace {workspace}; gateway {}", opts.gateway),
    );
    // `weir dev` may still be starting: wait until the gateway says it is ready.
    loop {
        let ready = api
            .http
            .get(format!("{}/readyz", opts.gateway))
            .send()
            .await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        wait_tick(
            started + Duration::from_secs(90),
            &shutdown,
            "the gateway to be ready",
        )
        .await?;
    }
    let mut waited = false;
    loop {
        let c = cfg.clone();
        if tokio::task::spawn_blocking(move || groups_stable(&c)).await?? {
            break;
        }
        if !waited {
            say(
                started,
                "waiting for the processors to own their partitions (consumer groups stable)",
            );
            waited = true;
        }
        wait_tick(
            started + Duration::from_secs(120),
            &shutdown,
            "the processors' consumer groups",
        )
        .await?;
    }

    let before = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || watermarks(&cfg)).await??
    };
    let node_ready_start = {
        let cfg = cfg.clone();
        let topic = cfg.kafka.topic("weir.node-ready.v1");
        tokio::task::spawn_blocking(move || high_watermarks(&cfg, &topic)).await??
    };
    let stats = Arc::new(WorkerStats::default());
    let stop_workers = shutdown.child_token();
    let worker_task = tokio::spawn(workers(
        cfg.clone(),
        api.clone(),
        workspace.clone(),
        node_ready_start,
        stats.clone(),
        stop_workers.clone(),
    ));

    let result = drive(
        &cfg,
        &pool,
        &api,
        &read_api,
        &opts,
        &mut summary,
        &stats,
        started,
        deadline,
        &shutdown,
    )
    .await;
    stop_workers.cancel();
    worker_task.await.context("workers")??;
    result?;

    // Let the relay publish the last outbox rows before counting events.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || watermarks(&cfg)).await??
    };
    for (topic, high) in after {
        let delta = high - before.get(&topic).copied().unwrap_or(0);
        summary.events_per_topic.insert(topic, delta);
    }
    summary.nodes_dispatched = stats.dispatched.load(Ordering::Relaxed);
    summary.nodes_failed_on_purpose = stats.failed.load(Ordering::Relaxed);
    summary.seconds = started.elapsed().as_secs_f64();
    print_summary(&summary, &opts);
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: &Config,
    pool: &sqlx::PgPool,
    api: &Api,
    read_api: &Api,
    opts: &Options,
    summary: &mut Summary,
    stats: &WorkerStats,
    started: Instant,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    use reqwest::Method;
    let wf = |name: &str| format!("{}-{name}", summary.workspace);

    // 1. Workflows: create, then patch.
    let defs = definitions();
    for (name, def) in &defs {
        api.ok(
            Method::PUT,
            &format!("/v1/workflows/{}", wf(name)),
            Some(def),
        )
        .await?;
    }
    say(
        started,
        format!("created {} workflows (PUT /v1/workflows/...)", defs.len()),
    );
    let patches: Vec<(&str, Value)> = vec![
        (
            "etl",
            json!([{"op": "add", "path": "/nodes/notify", "value": {"type": "http_request", "config": {"url": "https://example.invalid/notify"}}},
                       {"op": "add", "path": "/edges/-", "value": {"from": "load", "to": "notify"}}]),
        ),
        (
            "etl",
            json!([{"op": "replace", "path": "/nodes/load/config/sql", "value": "INSERT INTO orders_v2 ..."}]),
        ),
        (
            "review",
            json!([{"op": "test", "path": "/nodes/draft/type", "value": "human"},
                          {"op": "remove", "path": "/nodes/approve"}]),
        ),
        (
            "review",
            json!([{"op": "add", "path": "/edges/-", "value": {"from": "approve", "to": "draft"}}]),
        ),
    ];
    let mut patch_ids = Vec::new();
    for (name, ops) in &patches {
        let v = api
            .ok(
                Method::POST,
                &format!("/v1/workflows/{}/patches", wf(name)),
                Some(ops),
            )
            .await?;
        patch_ids.push((
            wf(name),
            v["patch_id"].as_str().unwrap_or_default().to_string(),
        ));
    }
    // A reader may look but not write: the gateway answers 403.
    let (status, _) = read_api
        .call(
            Method::POST,
            &format!("/v1/workflows/{}/patches", wf("etl")),
            Some(&json!([])),
        )
        .await?;
    say(
        started,
        format!(
            "submitted {} patches (a read-only key was refused with {status})",
            patches.len()
        ),
    );
    let mut decided = HashMap::new();
    while decided.len() < patch_ids.len() {
        wait_tick(deadline, shutdown, "patch decisions").await?;
        for (w, id) in &patch_ids {
            if decided.contains_key(id) {
                continue;
            }
            let v = api
                .ok(
                    Method::GET,
                    &format!("/v1/workflows/{w}/patches/{id}"),
                    None,
                )
                .await?;
            if v["status"] != "pending" {
                decided.insert(id.clone(), v);
            }
        }
    }
    for v in decided.values() {
        match v["status"].as_str() {
            Some("applied") => summary.patches_applied += 1,
            Some("rejected") => {
                summary.patches_rejected += 1;
                say(
                    started,
                    format!(
                        "  rejected as intended: {}",
                        v["reason"].as_str().unwrap_or("")
                    ),
                );
            }
            _ => {}
        }
    }
    summary.patches_applied += defs.len() as u64;
    for (name, _) in &defs {
        let v = api
            .ok(Method::GET, &format!("/v1/workflows/{}", wf(name)), None)
            .await?;
        summary
            .versions
            .insert(wf(name), v["version"].as_i64().unwrap_or(0));
    }
    say(started, format!("materialized: {:?}", summary.versions));

    // 2. Runs, two waves with the same inputs: the second is served from the cache where the
    //    node type is cacheable.
    let names: Vec<&str> = defs.iter().map(|(n, _)| *n).collect();
    for wave in 1..=2 {
        let dispatched_before = stats.dispatched.load(Ordering::Relaxed);
        let failed_before = stats.failed.load(Ordering::Relaxed);
        let mut runs = Vec::new();
        for i in 0..opts.runs {
            let name = names[i % names.len()];
            let body =
                json!({"workflow_id": wf(name), "inputs": {"customer": format!("c{}", i % 4)}});
            let v = api.ok(Method::POST, "/v1/runs", Some(&body)).await?;
            runs.push(v["run_id"].as_str().unwrap_or_default().to_string());
        }
        say(started, format!("wave {wave}: started {} runs", runs.len()));
        if let (1, Some(first)) = (wave, runs.first()) {
            // The key is in the fragment, which the browser keeps to itself (never sent, never
            // logged); the page sends it in the Authorization header.
            say(
                started,
                format!(
                    "watch a run live: {}/ui/run#run={first}&key={}",
                    opts.gateway, read_api.key
                ),
            );
        }
        let mut done: HashMap<String, Value> = HashMap::new();
        let mut last_print = Instant::now();
        while done.len() < runs.len() {
            wait_tick(deadline, shutdown, "runs").await?;
            for id in &runs {
                if done.contains_key(id) {
                    continue;
                }
                let (status, v) = api
                    .call(Method::GET, &format!("/v1/runs/{id}"), None)
                    .await?;
                if status == 200 && v["status"] != "running" {
                    done.insert(id.clone(), v);
                }
            }
            if last_print.elapsed() > Duration::from_secs(2) {
                last_print = Instant::now();
                say(started, format!("  wave {wave}: {}/{} runs finished, {} node attempts dispatched to workers",
                    done.len(), runs.len(), stats.dispatched.load(Ordering::Relaxed) - dispatched_before));
            }
        }
        let mut succeeded_nodes = 0u64;
        for v in done.values() {
            match v["status"].as_str() {
                Some("failed") => summary.runs_failed += 1,
                Some("cancelled") => summary.runs_cancelled += 1,
                _ => {}
            }
            summary.runs_completed += 1;
            succeeded_nodes += v["nodes"].as_array().map_or(0, |n| {
                n.iter().filter(|n| n["status"] == "succeeded").count() as u64
            });
        }
        let dispatched = stats.dispatched.load(Ordering::Relaxed) - dispatched_before;
        let failed = stats.failed.load(Ordering::Relaxed) - failed_before;
        // A succeeded node was either a worker's successful attempt or a cache hit.
        let from_cache = succeeded_nodes.saturating_sub(dispatched.saturating_sub(failed));
        summary.nodes_from_cache += from_cache;
        say(
            started,
            format!(
                "wave {wave}: {} runs finished; {succeeded_nodes} nodes succeeded: {} by workers \
            ({failed} attempts failed on purpose and were retried), {from_cache} from the cache",
                done.len(),
                dispatched - failed
            ),
        );
        if wave == 1 {
            // The coordinator offered wave 1's results to the cache (CacheStore events): let
            // the cache processor apply them before wave 2 asks for the same work.
            let topic = cfg.kafka.topic("weir.cache.v1");
            loop {
                let (applied, produced) = applied_and_produced(
                    cfg,
                    pool,
                    &cfg.kafka.group(weir_cache::processor::GROUP),
                    &topic,
                )
                .await?;
                if applied >= produced {
                    say(
                        started,
                        format!("the cache processor has applied all {produced} events of {topic}"),
                    );
                    break;
                }
                wait_tick(deadline, shutdown, "the cache processor").await?;
            }
        }
    }

    // 3. The caches, directly: an exact entry and a semantic (agent prompt) entry.
    let exact = json!({"node_type": "http_request", "config": {"url": "https://example.invalid/rates"},
                       "inputs": {"currency": "EUR"}, "result": {"rate": 1.08}, "cost_ms": 850});
    let semantic = json!({"node_type": "agent", "config": {"model": "small"}, "inputs": {},
                          "prompt": "Summarize the quarterly sales report for the EMEA region",
                          "result": {"summary": "EMEA sales grew 12% quarter over quarter."}, "cost_ms": 2400});
    api.ok(Method::POST, "/v1/cache/entries", Some(&exact))
        .await?;
    api.ok(Method::POST, "/v1/cache/entries", Some(&semantic))
        .await?;
    say(
        started,
        "stored an exact and a semantic cache entry (POST /v1/cache/entries)",
    );
    let lookups = [
        (
            "exact, same request",
            json!({"node_type": "http_request", "config": {"url": "https://example.invalid/rates"}, "inputs": {"currency": "EUR"}}),
        ),
        (
            "semantic, paraphrased prompt",
            json!({"node_type": "agent", "config": {"model": "small"}, "inputs": {"x": 1},
            "prompt": "Summarize the EMEA region's quarterly sales report", "semantic": true}),
        ),
        (
            "semantic, unrelated prompt",
            json!({"node_type": "agent", "config": {"model": "small"}, "inputs": {"x": 2},
            "prompt": "Translate the onboarding checklist into German", "semantic": true}),
        ),
    ];
    // The entries are stored by the cache processor from the events: wait for the first hit.
    for (label, body) in &lookups {
        let expect_hit = !label.contains("unrelated");
        let mut v = api.ok(Method::POST, "/v1/cache/lookup", Some(body)).await?;
        while expect_hit && v["hit"] != true && Instant::now() < deadline {
            wait_tick(deadline, shutdown, "cache entries").await?;
            v = api.ok(Method::POST, "/v1/cache/lookup", Some(body)).await?;
        }
        summary.cache_lookups += 1;
        if v["hit"] == true {
            summary.cache_hits += 1;
            summary.cache_saved_ms += v["saved_ms"].as_i64().unwrap_or(0);
            if label.starts_with("semantic") {
                summary.semantic_similarity = v["similarity"].as_f64();
            }
        }
        say(
            started,
            format!(
                "  lookup {label}: {}",
                if v["hit"] == true {
                    format!(
                        "hit ({}, similarity {}, saved {} ms)",
                        v["kind"].as_str().unwrap_or("?"),
                        v["similarity"]
                            .as_f64()
                            .map_or("-".into(), |s| format!("{s:.3}")),
                        v["saved_ms"]
                    )
                } else {
                    format!(
                        "miss (best similarity {})",
                        v["similarity"]
                            .as_f64()
                            .map_or("-".into(), |s| format!("{s:.3}"))
                    )
                }
            ),
        );
    }
    Ok(())
}

async fn wait_tick(
    deadline: Instant,
    shutdown: &CancellationToken,
    what: &str,
) -> anyhow::Result<()> {
    if Instant::now() > deadline {
        bail!("gave up waiting for {what}: is every processor running (weir dev)?");
    }
    tokio::select! {
        _ = shutdown.cancelled() => bail!("interrupted"),
        _ = tokio::time::sleep(Duration::from_millis(200)) => Ok(()),
    }
}

/// What a healthy system shows after the demo; each unmet expectation is one line (used by
/// `weir demo --check`, which the test suite runs).
pub fn unmet_expectations(s: &Summary, opts: &Options) -> Vec<String> {
    let mut unmet = Vec::new();
    let mut expect = |ok: bool, what: String| {
        if !ok {
            unmet.push(what);
        }
    };
    expect(
        s.patches_applied == 5 && s.patches_rejected == 2,
        format!(
            "5 patches applied and 2 rejected, not {} and {}",
            s.patches_applied, s.patches_rejected
        ),
    );
    let runs = 2 * opts.runs as u64;
    expect(
        s.runs_completed == runs && s.runs_failed == 0 && s.runs_cancelled == 0,
        format!(
            "{runs} runs completed, not {} ({} failed, {} cancelled)",
            s.runs_completed, s.runs_failed, s.runs_cancelled
        ),
    );
    expect(
        s.nodes_failed_on_purpose > 0,
        "failed first attempts retried".into(),
    );
    expect(
        s.nodes_from_cache > 0,
        "the second wave served from the cache".into(),
    );
    expect(
        s.cache_lookups == 3 && s.cache_hits == 2,
        format!(
            "2 of 3 cache lookups hit (exact, semantic), not {} of {}",
            s.cache_hits, s.cache_lookups
        ),
    );
    expect(
        s.semantic_similarity.is_some_and(|x| x >= 0.92),
        "the paraphrased prompt hits semantically".into(),
    );
    unmet
}

/// `<a><infix><b>` for each pair, joined by `sep`.
fn joined<A: std::fmt::Display, B: std::fmt::Display>(
    pairs: impl Iterator<Item = (A, B)>,
    infix: &str,
    sep: &str,
) -> String {
    let items: Vec<String> = pairs.map(|(a, b)| format!("{a}{infix}{b}")).collect();
    items.join(sep)
}

fn print_summary(s: &Summary, opts: &Options) {
    println!();
    println!(
        "==== weir demo summary ({:.1} s, workspace {}) ====",
        s.seconds, s.workspace
    );
    // One row per aspect: a label padded to 15 columns, then the figures.
    let row = |label: &str, figures: String| println!("{label:<15}{figures}");
    row("workflows", joined(s.versions.iter(), " v", ", "));
    row(
        "patches",
        format!(
            "{} applied, {} rejected",
            s.patches_applied, s.patches_rejected
        ),
    );
    row(
        "runs",
        format!(
            "{} finished ({} failed, {} cancelled)",
            s.runs_completed, s.runs_failed, s.runs_cancelled
        ),
    );
    row(
        "node attempts",
        format!(
            "{} dispatched to workers ({} failed on purpose and retried), {} nodes served from the cache",
            s.nodes_dispatched, s.nodes_failed_on_purpose, s.nodes_from_cache
        ),
    );
    let rate = if s.cache_lookups > 0 {
        s.cache_hits as f64 / s.cache_lookups as f64
    } else {
        0.0
    };
    let similarity = s
        .semantic_similarity
        .map_or(String::new(), |x| format!(", semantic similarity {x:.3}"));
    row(
        "cache lookups",
        format!(
            "{} hits of {} ({:.0} %), {} ms of work saved{similarity}",
            s.cache_hits,
            s.cache_lookups,
            rate * 100.0,
            s.cache_saved_ms
        ),
    );
    let appended = s.events_per_topic.iter().filter(|(_, n)| **n > 0);
    row("events", joined(appended, " ", " · "));
    row(
        "metrics",
        format!(
            "{} (processors and gateway); API document {}/openapi.json",
            opts.metrics_url, opts.gateway
        ),
    );
}
