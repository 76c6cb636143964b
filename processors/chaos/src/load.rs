//! The sustained mixed workload of `weir chaos`, driven through the public gateway as users'
//! services would drive it, while the driver injects faults.
//!
//! Open loop: every kind of work has a ticker at its offered rate, and each tick spawns its
//! request whatever happened to the earlier ones (no coordinated omission: a latency is
//! measured from the tick, so time spent waiting for a sick gateway counts). A request that
//! cannot connect, times out or gets 503 is retried on the next gateway with the same
//! Idempotency-Key (bounded tries, exponential backoff, `Retry-After` honoured), so a retried
//! request counts once. Every answer is recorded with its wall-clock time.
//!
//! The workload, in a workspace of its own (`chaos-<seed>-<random>`, with an admin key):
//! - patches across `workflows` small workflows (`wf-<i>`, created by a PUT on first use): most
//!   replace a value and must apply; some carry a failing `test` and must be rejected by the
//!   materializer; some are over the patch budget and must be refused with 422 by the gateway;
//! - runs of four fan-out/fan-in workflows (`flow-<k>`: split → 4 scores → join), answered by
//!   simulated workers that read NodeReady from Kafka and post completions through the
//!   gateway, failing some first attempts on purpose so the coordinator retries;
//! - cache entries (`POST /v1/cache/entries`) and exact lookups of earlier entries;
//! - poison: undecodable bytes produced straight to the input topics, which must end in the DLQ.
//!
//! Invariants: what the [`Ledger`] calls acknowledged got a 202 (the gateway's "durable"
//! promise) or a broker acknowledgement (poison); the ledger holds per request a few dozen
//! bytes, so a 10-minute run at the default rates stays in tens of MB.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;
use weir_runtime::codec::Codec;
use weir_runtime::config::{Config, Secret};
use weir_runtime::events::{
    CacheEvent, CompletionEvent, NodeReady, PatchSubmitted, RunEvent, TopicEvent, WorkflowEvent,
};
use weir_runtime::{Classify as _, Disposition};
use weir_tools::worker::{completion_path, Failures, Worker};

/// What the workload does. All rates are offered rates (open loop), spread over the gateways.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Base URLs of gateway processes; a request that cannot connect or gets 503 is retried
    /// on another one (same Idempotency-Key).
    pub gateways: Vec<String>,
    /// Seed of every random choice of the workload.
    pub seed: u64,
    /// Distinct workflows patched.
    pub workflows: usize,
    /// Patches offered per second.
    pub patches_per_sec: f64,
    /// Fan-out/fan-in runs offered per second, answered by simulated workers.
    pub runs_per_sec: f64,
    /// Cache entries and lookups offered per second.
    pub cache_ops_per_sec: f64,
    /// Records sent on purpose that must end in the DLQ, per minute.
    pub poison_per_min: f64,
}

impl Default for LoadConfig {
    /// The rates the full run offers on a shared 2-core machine (see docs/reliability.md).
    fn default() -> Self {
        Self {
            gateways: vec!["http://127.0.0.1:8080".into()],
            seed: 1,
            workflows: 2_000,
            patches_per_sec: 100.0,
            runs_per_sec: 4.0,
            cache_ops_per_sec: 20.0,
            poison_per_min: 6.0,
        }
    }
}

/// A cheap view of the workload while it runs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Answers by HTTP status, cumulative; 0 = no connection (or no answer in time).
    pub answers_by_status: BTreeMap<u16, u64>,
    /// Requests acknowledged (202) so far.
    pub acknowledged: u64,
    /// p99 of patch→visible over the last 5 s.
    pub recent_p99_ms: Option<f64>,
}

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// When it arrived.
    pub at: SystemTime,
    /// What was asked: `put`, `patch`, `run`, `completion`, `cache_entry`, `cache_lookup`,
    /// `get`, or [`OVER_BUDGET`] (a patch refused on purpose: its 4xx is expected).
    pub kind: &'static str,
    /// HTTP status; 0 = no connection or no answer in time.
    pub status: u16,
    /// Whether it carried `Retry-After`.
    pub retry_after: bool,
}

/// The [`Answer::kind`] of patches over the budget, sent on purpose: 422 is their answer.
pub const OVER_BUDGET: &str = "patch_over_budget";

/// What the materializer must decide for an acknowledged patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Expect {
    /// It applies (a PUT, or a `replace` of a value that always exists).
    Applied,
    /// It is rejected (a failing `test`).
    Rejected,
}

/// A patch (or PUT) the gateway acknowledged.
#[derive(Debug, Clone)]
pub struct PatchAck {
    /// The workflow.
    pub workflow_id: String,
    /// The patch id the gateway answered.
    pub patch_id: Uuid,
    /// The decision it must get.
    pub expect: Expect,
    /// When it was offered.
    pub at: SystemTime,
}

/// A run the gateway acknowledged.
#[derive(Debug, Clone)]
pub struct RunAck {
    /// The run id the gateway answered.
    pub run_id: String,
    /// Its workflow.
    pub workflow_id: String,
    /// When it was offered.
    pub at: SystemTime,
}

/// A poison record the broker acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Poison {
    /// Full topic name.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Its key.
    pub key: String,
}

/// Everything acknowledged and everything answered, with wall-clock times (for fault windows).
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every HTTP answer.
    pub answers: Vec<Answer>,
    /// `(when, kind, latency)`, kind `patch_visible` or `next_node_ready`.
    pub latencies: Vec<(SystemTime, &'static str, Duration)>,
    /// The workload's workspace.
    pub workspace: String,
    /// The gateways it used.
    pub gateways: Vec<String>,
    /// Its admin key (the checker looks the cache entries up with it).
    pub api_key: Secret<String>,
    /// Patches and PUTs answered 202.
    pub patches: Vec<PatchAck>,
    /// Runs answered 202.
    pub runs: Vec<RunAck>,
    /// Completions answered 202.
    pub completions: u64,
    /// Cache entries answered 202, by sequence number (see [`cache_entry`]).
    pub cache_entries: Vec<u64>,
    /// Cache lookups answered 200, and how many hit.
    pub cache_lookups: u64,
    /// Lookups that hit.
    pub cache_hits: u64,
    /// Poison records the broker acknowledged.
    pub poison: Vec<Poison>,
    /// Keys of poison records whose produce failed: they may or may not be in the topic.
    pub poison_unsure: Vec<String>,
    /// Requests that were never acknowledged after every try (not counted as acknowledged).
    pub gave_up: u64,
    /// Ticks not offered because too many requests were already in flight.
    pub shed: u64,
    /// NodeReady events the workers answered, and attempts they failed on purpose.
    pub nodes_answered: u64,
    /// Attempts failed on purpose.
    pub nodes_failed_on_purpose: u64,
    /// Acknowledged runs that had not ended when [`Load::finish`] returned.
    pub runs_unfinished: u64,
}

impl Ledger {
    /// Requests acknowledged: 202 answers that count (patches, runs, completions, cache
    /// entries) and poison records acknowledged by the broker.
    pub fn acknowledged(&self) -> u64 {
        (self.patches.len() + self.runs.len() + self.cache_entries.len() + self.poison.len()) as u64
            + self.completions
    }
}

/// Most tries of one request (each on the next gateway).
const MAX_TRIES: u32 = 8;
/// Most tries of a worker's completion: a run waits for it, so the worker insists longer.
const COMPLETION_TRIES: u32 = 40;
/// Requests in flight at once (HTTP connections stay under the gateway's per-client cap).
const HTTP_CONCURRENCY: usize = 512;
/// How long a gateway that did not answer is passed over by new requests (a killed or
/// paused process would otherwise take every n-th request for a connect error or a timeout).
const SUSPECT_FOR: Duration = Duration::from_secs(2);
/// Ticks waiting or in flight at once; more are shed (counted), memory stays bounded.
const MAX_IN_FLIGHT: usize = 20_000;
/// Workflows the runs use.
const FLOWS: usize = 4;
/// Fan-out of each flow.
const SCORES: usize = 4;

/// State of a patched workflow.
const WF_NONE: u8 = 0;
const WF_CREATING: u8 = 1;
const WF_CREATED: u8 = 2;
const WF_VISIBLE: u8 = 3;

/// The run ids the workers have seen, for the finish line and the latencies.
#[derive(Default)]
struct RunBook {
    /// Acknowledged and not yet ended.
    open: HashMap<String, ()>,
    /// Ended (seen on the run-events topic), whether or not the 202 arrived yet.
    ended: HashMap<String, ()>,
    /// The last succeeded completion acknowledged per run, for completion→next NodeReady.
    last_completion: HashMap<String, SystemTime>,
}

/// State shared by every task of the workload.
struct Shared {
    cfg: Arc<Config>,
    codec: Arc<Codec>,
    http: reqwest::Client,
    gateways: Vec<String>,
    key: String,
    workspace: String,
    seed: u64,
    http_slots: Semaphore,
    next_gateway: AtomicUsize,
    /// Per gateway: until when (ms after `epoch`) it is passed over.
    suspect_until: Vec<AtomicU64>,
    epoch: Instant,
    in_flight: AtomicUsize,
    acknowledged: AtomicU64,
    by_status: Mutex<BTreeMap<u16, u64>>,
    ledger: Mutex<Ledger>,
    recent: Mutex<VecDeque<(Instant, f64)>>,
    /// Patches offered and acknowledged, not yet seen on the workflows topic: when offered.
    pending: Mutex<HashMap<Uuid, SystemTime>>,
    workflows: Vec<AtomicU8>,
    runs: Mutex<RunBook>,
    /// Cache entries acknowledged, for lookups.
    cache_stored: Mutex<Vec<u64>>,
}

/// The running workload.
pub struct Load {
    shared: Arc<Shared>,
    stop: CancellationToken,
    offered: TaskTracker,
    readers: CancellationToken,
    reader: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Creates its own workspace(s) and keys, then starts the workload tasks.
pub async fn start(
    cfg: &Config,
    load: LoadConfig,
    stop: CancellationToken,
) -> anyhow::Result<Load> {
    anyhow::ensure!(!load.gateways.is_empty(), "no gateway to load");
    let cfg = Arc::new(cfg.clone());
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let workspace = format!(
        "chaos-{}-{}",
        load.seed,
        &Uuid::now_v7().simple().to_string()[20..]
    );
    let key = weir_gateway::create_key(&pool, &workspace, weir_model::Permission::Admin)
        .await
        .context("creating the workload's API key (has `weir migrate` run?)")?
        .key;
    pool.close().await;
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()?;
    let shared = Arc::new(Shared {
        http,
        gateways: load.gateways.clone(),
        key: key.clone(),
        workspace: workspace.clone(),
        seed: load.seed,
        http_slots: Semaphore::new(HTTP_CONCURRENCY),
        next_gateway: AtomicUsize::new(0),
        suspect_until: load.gateways.iter().map(|_| AtomicU64::new(0)).collect(),
        epoch: Instant::now(),
        in_flight: AtomicUsize::new(0),
        acknowledged: AtomicU64::new(0),
        by_status: Mutex::new(BTreeMap::new()),
        ledger: Mutex::new(Ledger {
            workspace,
            gateways: load.gateways.clone(),
            api_key: Secret::new(key),
            ..Ledger::default()
        }),
        recent: Mutex::new(VecDeque::new()),
        pending: Mutex::new(HashMap::new()),
        workflows: (0..load.workflows.max(1))
            .map(|_| AtomicU8::new(WF_NONE))
            .collect(),
        runs: Mutex::new(RunBook::default()),
        cache_stored: Mutex::new(Vec::new()),
        codec,
        cfg,
    });

    // Wait for a ready gateway (the driver may just have started the processes).
    let ready_by = Instant::now() + Duration::from_secs(120);
    'ready: loop {
        for g in &shared.gateways {
            let ok = shared.http.get(format!("{g}/readyz")).send().await;
            if ok.is_ok_and(|r| r.status().is_success()) {
                break 'ready;
            }
        }
        anyhow::ensure!(Instant::now() < ready_by, "no gateway became ready");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The readers start at the topics' ends before anything is offered, so no answer of
    // this workload is missed.
    let readers = CancellationToken::new();
    let starts = {
        let cfg = shared.cfg.clone();
        tokio::task::spawn_blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for topic in [
                cfg.kafka.topic(NodeReady::TOPIC),
                cfg.kafka.topic(RunEvent::TOPIC),
                cfg.kafka.topic(WorkflowEvent::TOPIC),
            ] {
                for (p, high) in high_watermarks(&cfg, &topic)? {
                    tpl.add_partition_offset(&topic, p, Offset::Offset(high))?;
                }
            }
            anyhow::Ok(tpl)
        })
        .await??
    };
    let reader = tokio::spawn(read_outputs(shared.clone(), starts, readers.clone()));

    // The run workflows exist and are visible before any run is offered.
    for k in 0..FLOWS {
        let id = format!("flow-{k}");
        let body = serde_json::to_vec(&flow_definition())?;
        let (status, _) = shared
            .send(Request {
                kind: "put",
                method: reqwest::Method::PUT,
                path: format!("/v1/workflows/{id}"),
                body: Some(body),
                idempotency_key: Some(format!("put-{id}")),
                tries: 40,
            })
            .await;
        anyhow::ensure!(status == 202, "PUT of {id} answered {status}");
    }
    for k in 0..FLOWS {
        let path = format!("/v1/workflows/flow-{k}");
        loop {
            let (status, _) = shared.get(&path).await;
            if status == 200 {
                break;
            }
            anyhow::ensure!(Instant::now() < ready_by, "{path} never became visible");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let offered = TaskTracker::new();
    let tickers = [
        ("patch", load.patches_per_sec),
        ("run", load.runs_per_sec),
        ("cache", load.cache_ops_per_sec),
        ("poison", load.poison_per_min / 60.0),
    ];
    for (i, (kind, rate)) in tickers.into_iter().enumerate() {
        if rate > 0.0 && rate.is_finite() {
            offered.spawn(ticker(
                shared.clone(),
                kind,
                rate,
                load.seed.wrapping_add(i as u64 * 7919),
                stop.clone(),
                offered.clone(),
            ));
        }
    }
    Ok(Load {
        shared,
        stop,
        offered,
        readers,
        reader,
    })
}

impl Load {
    /// Cheap snapshot while running.
    pub fn snapshot(&self) -> Snapshot {
        let by_status = self.shared.by_status.lock().expect("poisoned").clone();
        let recent_p99_ms = {
            let mut recent = self.shared.recent.lock().expect("poisoned");
            let horizon = Instant::now() - Duration::from_secs(5);
            while recent.front().is_some_and(|(t, _)| *t < horizon) {
                recent.pop_front();
            }
            let mut v: Vec<f64> = recent.iter().map(|(_, ms)| *ms).collect();
            percentile(&mut v, 0.99)
        };
        Snapshot {
            answers_by_status: by_status,
            acknowledged: self.shared.acknowledged.load(Ordering::Relaxed),
            recent_p99_ms,
        }
    }

    /// The workload's workspace.
    pub fn workspace(&self) -> &str {
        &self.shared.workspace
    }

    /// After `stop` is cancelled: stops offering new work, lets the workers answer every
    /// NodeReady of acknowledged runs until they end (or `timeout`), returns the ledger.
    pub async fn finish(self, timeout: Duration) -> anyhow::Result<Ledger> {
        let deadline = Instant::now() + timeout;
        self.stop.cancel();
        self.offered.close();
        // Requests already offered finish their tries (bounded by MAX_TRIES).
        let _ = tokio::time::timeout_at(deadline.into(), self.offered.wait()).await;
        loop {
            let open = self.shared.runs.lock().expect("poisoned").open.len();
            if open == 0 || Instant::now() >= deadline || self.reader.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.readers.cancel();
        match self.reader.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the workload's reader stopped"),
            Err(e) => tracing::warn!(error = %e, "the workload's reader panicked"),
        }
        // Requests still trying past the timeout keep their Arc; the ledger is taken as is.
        let mut ledger = std::mem::take(&mut *self.shared.ledger.lock().expect("poisoned"));
        ledger.runs_unfinished = self.shared.runs.lock().expect("poisoned").open.len() as u64;
        Ok(ledger)
    }
}

/// The `q` quantile of `v` (sorted in place); `None` when empty.
pub(crate) fn percentile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// One request to the gateways.
struct Request {
    kind: &'static str,
    method: reqwest::Method,
    path: String,
    body: Option<Vec<u8>>,
    idempotency_key: Option<String>,
    tries: u32,
}

impl Request {
    /// A POST of `body` as JSON.
    fn post(
        kind: &'static str,
        path: &str,
        body: &Value,
        idempotency_key: Option<String>,
        tries: u32,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            kind,
            method: reqwest::Method::POST,
            path: path.to_string(),
            body: Some(serde_json::to_vec(body)?),
            idempotency_key,
            tries,
        })
    }
}

impl Shared {
    fn record(&self, kind: &'static str, status: u16, retry_after: bool) {
        *self
            .by_status
            .lock()
            .expect("poisoned")
            .entry(status)
            .or_default() += 1;
        self.ledger.lock().expect("poisoned").answers.push(Answer {
            at: SystemTime::now(),
            kind,
            status,
            retry_after,
        });
    }

    /// Sends `req`, retrying on another gateway while it cannot connect, times out or gets
    /// 503; every answer is recorded. Returns the last status (0: none) and body.
    async fn send(&self, req: Request) -> (u16, Value) {
        let mut last = (0, Value::Null);
        for attempt in 0..req.tries {
            let gw = self.pick_gateway();
            let base = &self.gateways[gw];
            let (status, retry_after, body) = {
                let _slot = self.http_slots.acquire().await.expect("never closed");
                let mut r = self
                    .http
                    .request(req.method.clone(), format!("{base}{}", req.path))
                    .bearer_auth(&self.key);
                if let Some(k) = &req.idempotency_key {
                    r = r.header("idempotency-key", k);
                }
                if let Some(b) = &req.body {
                    r = r.header("content-type", "application/json").body(b.clone());
                }
                match r.send().await {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        let retry_after = res.headers().contains_key("retry-after");
                        let text = res.text().await.unwrap_or_default();
                        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                        (status, retry_after, body)
                    }
                    Err(_) => (0, false, Value::Null),
                }
            };
            self.record(req.kind, status, retry_after);
            if status == 0 {
                let until = self.epoch.elapsed() + SUSPECT_FOR;
                self.suspect_until[gw].store(until.as_millis() as u64, Ordering::Relaxed);
            }
            last = (status, body);
            if status != 0 && status != 503 {
                break;
            }
            // Back off (Retry-After is 1 s by default; without it 100 ms doubling to 2 s).
            let backoff = if retry_after {
                Duration::from_millis(1000)
            } else {
                Duration::from_millis((100u64 << attempt.min(5)).min(2000))
            };
            let jitter = rand::random::<f64>() * 0.5 + 0.75;
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
        }
        last
    }

    /// The next gateway in turn that is not suspect (any, when all are).
    fn pick_gateway(&self) -> usize {
        let n = self.gateways.len();
        let first = self.next_gateway.fetch_add(1, Ordering::Relaxed);
        let now = self.epoch.elapsed().as_millis() as u64;
        (0..n)
            .map(|i| (first + i) % n)
            .find(|g| self.suspect_until[*g].load(Ordering::Relaxed) <= now)
            .unwrap_or(first % n)
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.send(Request {
            kind: "get",
            method: reqwest::Method::GET,
            path: path.to_string(),
            body: None,
            idempotency_key: None,
            tries: 3,
        })
        .await
    }

    fn acknowledged(&self) {
        self.acknowledged.fetch_add(1, Ordering::Relaxed);
    }

    fn gave_up(&self) {
        self.ledger.lock().expect("poisoned").gave_up += 1;
    }

    fn latency(&self, kind: &'static str, offered: SystemTime) {
        let now = SystemTime::now();
        let d = now.duration_since(offered).unwrap_or_default();
        if kind == "patch_visible" {
            self.recent
                .lock()
                .expect("poisoned")
                .push_back((Instant::now(), d.as_secs_f64() * 1e3));
        }
        self.ledger
            .lock()
            .expect("poisoned")
            .latencies
            .push((now, kind, d));
    }
}

/// Offers `kind` at `rate` per second until `stop`; each tick is its own task.
async fn ticker(
    shared: Arc<Shared>,
    kind: &'static str,
    rate: f64,
    seed: u64,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    // Burst: ticks missed while this task was not scheduled are offered at once (open loop).
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = interval.tick() => {}
        }
        seq += 1;
        if shared.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            shared.ledger.lock().expect("poisoned").shed += 1;
            continue;
        }
        let offered = SystemTime::now();
        let roll: f64 = rng.random();
        let pick = rng.random_range(0..shared.workflows.len());
        let s = shared.clone();
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        tracker.spawn(async move {
            let result = match kind {
                "patch" => offer_patch(&s, seq, pick, roll, offered).await,
                "run" => offer_run(&s, seq, offered).await,
                "cache" => offer_cache(&s, seq, roll, pick).await,
                _ => offer_poison(&s, seq).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, kind, "offer failed");
            }
            s.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The definition of a patched workflow.
fn small_definition() -> Value {
    json!({"nodes": {"a": {"type": "function", "config": {"n": 0}}}, "edges": []})
}

/// The definition of a run workflow: split → `SCORES` scores → join, every node retried.
fn flow_definition() -> Value {
    let retry = json!({"max_attempts": 4, "backoff_ms": 100});
    let mut nodes = serde_json::Map::new();
    let mut edges = Vec::new();
    nodes.insert(
        "split".into(),
        json!({"type": "function", "config": {"fn": "split"}, "retry": retry, "deadline_ms": 60000}),
    );
    nodes.insert(
        "join".into(),
        json!({"type": "function", "config": {"fn": "join"}, "retry": retry, "deadline_ms": 60000}),
    );
    for i in 0..SCORES {
        let id = format!("score_{i}");
        nodes.insert(
            id.clone(),
            json!({"type": "function", "config": {"fn": "score", "shard": i}, "retry": retry, "deadline_ms": 60000}),
        );
        edges.push(json!({"from": "split", "to": id}));
        edges.push(json!({"from": id, "to": "join"}));
    }
    json!({"nodes": nodes, "edges": edges, "settings": {"max_hops": 10}})
}

/// One patch tick: creates the picked workflow on first use, else patches it.
async fn offer_patch(
    s: &Shared,
    seq: u64,
    pick: usize,
    roll: f64,
    offered: SystemTime,
) -> anyhow::Result<()> {
    let state = &s.workflows[pick];
    let workflow_id = format!("wf-{pick}");
    match state.load(Ordering::Acquire) {
        WF_NONE => {
            if state
                .compare_exchange(WF_NONE, WF_CREATING, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Ok(());
            }
            let (status, body) = s
                .send(Request {
                    kind: "put",
                    method: reqwest::Method::PUT,
                    path: format!("/v1/workflows/{workflow_id}"),
                    body: Some(serde_json::to_vec(&small_definition())?),
                    idempotency_key: Some(format!("put-{workflow_id}")),
                    tries: MAX_TRIES,
                })
                .await;
            if status == 202 {
                let patch_id = patch_id_of(&body)?;
                state.store(WF_CREATED, Ordering::Release);
                s.acknowledged_patch(workflow_id, patch_id, Expect::Applied, offered);
            } else {
                // Another tick tries again (same key: counted once if it did land).
                state.store(WF_NONE, Ordering::Release);
                s.gave_up();
            }
            Ok(())
        }
        WF_VISIBLE => {
            // 5 % fail a `test` (rejected by the materializer), 3 % are over the pointer
            // budget (422 at the gateway), the rest replace a value that always exists.
            let (ops, expect) = if roll < 0.05 {
                (
                    json!([{"op": "test", "path": "/nodes/a/type", "value": "human"},
                           {"op": "remove", "path": "/nodes/a"}]),
                    Some(Expect::Rejected),
                )
            } else if roll < 0.08 {
                let long = format!("/nodes/{}", "x".repeat(5000));
                (json!([{"op": "add", "path": long, "value": 1}]), None)
            } else {
                (
                    json!([{"op": "replace", "path": "/nodes/a/config/n", "value": seq}]),
                    Some(Expect::Applied),
                )
            };
            let (status, body) = s
                .send(Request {
                    kind: if expect.is_none() {
                        OVER_BUDGET
                    } else {
                        "patch"
                    },
                    method: reqwest::Method::POST,
                    path: format!("/v1/workflows/{workflow_id}/patches"),
                    body: Some(serde_json::to_vec(&ops)?),
                    idempotency_key: Some(format!("patch-{}-{seq}", s.seed)),
                    tries: MAX_TRIES,
                })
                .await;
            match (status, expect) {
                (202, Some(expect)) => {
                    s.acknowledged_patch(workflow_id, patch_id_of(&body)?, expect, offered)
                }
                (0 | 503, _) => s.gave_up(),
                _ => {}
            }
            Ok(())
        }
        // Created but not seen materialized yet: patches wait (through another gateway
        // they would be 404 until then).
        _ => Ok(()),
    }
}

fn patch_id_of(body: &Value) -> anyhow::Result<Uuid> {
    body["patch_id"]
        .as_str()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("202 without a patch_id: {body}"))
}

impl Shared {
    fn acknowledged_patch(
        &self,
        workflow_id: String,
        patch_id: Uuid,
        expect: Expect,
        offered: SystemTime,
    ) {
        self.acknowledged();
        if expect == Expect::Applied {
            self.pending
                .lock()
                .expect("poisoned")
                .insert(patch_id, offered);
        }
        self.ledger
            .lock()
            .expect("poisoned")
            .patches
            .push(PatchAck {
                workflow_id,
                patch_id,
                expect,
                at: offered,
            });
    }
}

/// One run tick.
async fn offer_run(s: &Shared, seq: u64, offered: SystemTime) -> anyhow::Result<()> {
    let workflow_id = format!("flow-{}", seq as usize % FLOWS);
    // Inputs unique per run, so no node is served from the result cache: every node is
    // dispatched to the workers.
    let body = json!({"workflow_id": workflow_id, "inputs": {"n": seq, "seed": s.seed},
                      "idempotency_key": format!("run-{}-{seq}", s.seed)});
    let (status, answer) = s
        .send(Request::post("run", "/v1/runs", &body, None, MAX_TRIES)?)
        .await;
    if status != 202 {
        if matches!(status, 0 | 503) {
            s.gave_up();
        }
        return Ok(());
    }
    let run_id = answer["run_id"]
        .as_str()
        .with_context(|| format!("202 without a run_id: {answer}"))?
        .to_string();
    s.acknowledged();
    {
        let mut book = s.runs.lock().expect("poisoned");
        if !book.ended.contains_key(&run_id) {
            book.open.insert(run_id.clone(), ());
        }
    }
    s.ledger.lock().expect("poisoned").runs.push(RunAck {
        run_id,
        workflow_id,
        at: offered,
    });
    Ok(())
}

/// The body of cache entry `n` (the checker looks each acknowledged one up after the run).
pub fn cache_entry(n: u64) -> Value {
    json!({"node_type": "function", "config": {"fn": "chaos", "bucket": n % 64},
           "inputs": {"n": n}, "result": {"v": n}, "cost_ms": 7})
}

/// The lookup of cache entry `n`.
pub fn cache_lookup(n: u64) -> Value {
    json!({"node_type": "function", "config": {"fn": "chaos", "bucket": n % 64},
           "inputs": {"n": n}})
}

/// One cache tick: half store a new entry, half look up an earlier one.
async fn offer_cache(s: &Shared, seq: u64, roll: f64, pick: usize) -> anyhow::Result<()> {
    if roll < 0.5 {
        let (status, _) = s
            .send(Request::post(
                "cache_entry",
                "/v1/cache/entries",
                &cache_entry(seq),
                Some(format!("cache-{}-{seq}", s.seed)),
                MAX_TRIES,
            )?)
            .await;
        if status == 202 {
            s.acknowledged();
            s.cache_stored.lock().expect("poisoned").push(seq);
            s.ledger.lock().expect("poisoned").cache_entries.push(seq);
        } else if matches!(status, 0 | 503) {
            s.gave_up();
        }
        return Ok(());
    }
    let n = {
        let stored = s.cache_stored.lock().expect("poisoned");
        if stored.is_empty() {
            return Ok(());
        }
        stored[pick % stored.len()]
    };
    let (status, answer) = s
        .send(Request::post(
            "cache_lookup",
            "/v1/cache/lookup",
            &cache_lookup(n),
            None,
            3,
        )?)
        .await;
    if status == 200 {
        let mut l = s.ledger.lock().expect("poisoned");
        l.cache_lookups += 1;
        if answer["hit"] == true {
            l.cache_hits += 1;
        }
    }
    Ok(())
}

/// Input topics poison goes to, in turn.
const POISON_TOPICS: [&str; 3] = [
    PatchSubmitted::TOPIC,
    CompletionEvent::TOPIC,
    CacheEvent::TOPIC,
];

/// One poison record: bytes no decoder accepts, produced straight to an input topic.
async fn offer_poison(s: &Shared, seq: u64) -> anyhow::Result<()> {
    let topic = s
        .cfg
        .kafka
        .topic(POISON_TOPICS[seq as usize % POISON_TOPICS.len()]);
    let key = format!("{}-poison-{seq}", s.workspace);
    let payload = format!("chaos poison {key}: not the Confluent wire format");
    let producer = weir_runtime::kafka::producer(&s.cfg.kafka)?;
    let delivered = producer
        .send(
            FutureRecord::to(&topic)
                .key(&key)
                .payload(payload.as_bytes()),
            Duration::from_secs(60),
        )
        .await;
    let mut l = s.ledger.lock().expect("poisoned");
    match delivered {
        Ok(d) => {
            s.acknowledged();
            l.poison.push(Poison {
                topic,
                partition: d.partition,
                offset: d.offset,
                key,
            });
        }
        Err((e, _)) => {
            tracing::warn!(error = %e, %key, "poison record not acknowledged");
            l.poison_unsure.push(key);
        }
    }
    Ok(())
}

/// The high watermark of every partition of `topic`.
pub(crate) fn high_watermarks(cfg: &Config, topic: &str) -> anyhow::Result<Vec<(i32, i64)>> {
    let consumer = crate::check::offsets_reader(cfg, "weir-chaos-watermarks")?;
    let out: Vec<(i32, i64)> = weir_tools::common::high_watermarks(&consumer, topic)?
        .into_iter()
        .collect();
    anyhow::ensure!(!out.is_empty(), "topic {topic} has no partitions");
    Ok(out)
}

/// Decodes `payload` as `E`, waiting while the registry is unreachable (the driver stops it);
/// `None` for a record that cannot be decoded.
async fn decode<E: TopicEvent>(
    codec: &Codec,
    payload: &[u8],
    stop: &CancellationToken,
) -> Option<E> {
    let mut wait = Duration::from_millis(100);
    loop {
        match codec.decode::<E>(payload).await {
            Ok(e) => return Some(e),
            Err(e) if e.disposition() == Disposition::Retry && !stop.is_cancelled() => {
                tracing::debug!(error = %e, "registry unavailable; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::warn!(error = %e, "undecodable output record skipped");
                return None;
            }
        }
    }
}

/// Reads the output topics from where they ended at the start: NodeReady (answered by the
/// simulated workers), run events (the finish line) and workflow events (patch→visible).
async fn read_outputs(
    s: Arc<Shared>,
    starts: TopicPartitionList,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let group = format!("weir-chaos-workers-{}", s.workspace);
    let consumer: StreamConsumer = weir_runtime::kafka::consumer_config(&s.cfg.kafka, &group, 0)
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.assign(&starts)?;
    let node_ready = s.cfg.kafka.topic(NodeReady::TOPIC);
    let run_events = s.cfg.kafka.topic(RunEvent::TOPIC);
    let workers = TaskTracker::new();
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => break,
            m = consumer.recv() => match m {
                Ok(m) => m,
                Err(e) => {
                    // Broker down: librdkafka reconnects by itself.
                    tracing::debug!(error = %e, "workload reader");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let Some(payload) = msg.payload() else {
            continue;
        };
        if msg.topic() == node_ready {
            let Some(ready) = decode::<NodeReady>(&s.codec, payload, &stop).await else {
                continue;
            };
            if ready.workspace_id != s.workspace {
                continue;
            }
            if ready.attempt == 1 && !ready.inputs.is_empty() {
                let last = s
                    .runs
                    .lock()
                    .expect("poisoned")
                    .last_completion
                    .get(&ready.run_id)
                    .copied();
                if let Some(at) = last {
                    s.latency("next_node_ready", at);
                }
            }
            let s = s.clone();
            workers.spawn(async move { answer_node(&s, ready).await });
        } else if msg.topic() == run_events {
            let Some(event) = decode::<RunEvent>(&s.codec, payload, &stop).await else {
                continue;
            };
            let (ws, run_id) = match &event {
                RunEvent::RunCompleted(e) => (&e.workspace_id, &e.run_id),
                RunEvent::RunFailed(e) => (&e.workspace_id, &e.run_id),
                RunEvent::RunCancelled(e) => (&e.workspace_id, &e.run_id),
                _ => continue,
            };
            if *ws != s.workspace {
                continue;
            }
            let mut book = s.runs.lock().expect("poisoned");
            book.open.remove(run_id);
            book.last_completion.remove(run_id);
            book.ended.insert(run_id.clone(), ());
        } else {
            let Some(event) = decode::<WorkflowEvent>(&s.codec, payload, &stop).await else {
                continue;
            };
            match event {
                WorkflowEvent::WorkflowMaterialized(m) if m.workspace_id == s.workspace => {
                    if let Some(i) = m
                        .workflow_id
                        .strip_prefix("wf-")
                        .and_then(|i| i.parse::<usize>().ok())
                    {
                        if let Some(state) = s.workflows.get(i) {
                            state.store(WF_VISIBLE, Ordering::Release);
                        }
                    }
                    for p in &m.patch_ids {
                        let offered = s.pending.lock().expect("poisoned").remove(p);
                        if let Some(at) = offered {
                            s.latency("patch_visible", at);
                        }
                    }
                }
                WorkflowEvent::PatchRejected(r) if r.workspace_id == s.workspace => {
                    s.pending.lock().expect("poisoned").remove(&r.patch_id);
                }
                _ => {}
            }
        }
    }
    workers.close();
    workers.wait().await;
    Ok(())
}

/// The workload's simulated worker: one node's first attempt in eight fails on purpose,
/// fixed by the run and node so a redelivered NodeReady gets the same answer.
fn worker(seed: u64) -> Worker {
    Worker {
        id: "chaos-worker",
        work: Duration::from_millis(3),
        failures: Failures::OneInEight { seed },
        echo_run_inputs: false,
    }
}

/// A simulated worker's answer to one NodeReady: a few ms of "work", then the completion
/// through the gateway (same Idempotency-Key and bytes on every try and redelivery).
async fn answer_node(s: &Shared, ready: NodeReady) {
    let worker = worker(s.seed);
    let fail = worker.fails(&ready);
    {
        let mut l = s.ledger.lock().expect("poisoned");
        l.nodes_answered += 1;
        if fail {
            l.nodes_failed_on_purpose += 1;
        }
    }
    worker.work().await;
    let body = worker.completion(&ready, fail);
    let Ok(bytes) = serde_json::to_vec(&body) else {
        return;
    };
    if !fail {
        // completion→next NodeReady is measured from the completion's POST.
        s.runs
            .lock()
            .expect("poisoned")
            .last_completion
            .insert(ready.run_id.clone(), SystemTime::now());
    }
    let (status, _) = s
        .send(Request {
            kind: "completion",
            method: reqwest::Method::POST,
            path: completion_path(&ready),
            body: Some(bytes),
            idempotency_key: Some(format!("completion-{}", ready.attempt)),
            tries: COMPLETION_TRIES,
        })
        .await;
    if status == 202 {
        s.acknowledged();
        s.ledger.lock().expect("poisoned").completions += 1;
    } else {
        tracing::warn!(status, run = %ready.run_id, node = %ready.node_id, "completion not acknowledged");
        s.gave_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_picks_the_upper_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.99), Some(99.0));
        assert_eq!(percentile(&mut v, 1.0), Some(100.0));
        assert_eq!(percentile(&mut [], 0.99), None);
        assert_eq!(percentile(&mut [5.0], 0.5), Some(5.0));
    }

    #[test]
    fn the_flow_is_a_valid_definition() {
        let limits = weir_model::definition::Limits::default();
        weir_model::definition::check(&flow_definition(), &limits).unwrap();
        weir_model::definition::check(&small_definition(), &limits).unwrap();
    }
}
