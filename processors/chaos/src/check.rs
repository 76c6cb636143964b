//! The invariants checked after a chaos run, with real clients reading Kafka and Postgres.
//!
//! [`check`] first drains: it waits until every weir consumer group has applied every record
//! of its input topic (the positions in Postgres, which move in the same transaction as the
//! effects, and the offsets committed to Kafka) and the outbox holds no row of this
//! deployment's topics. Then it gathers what the system holds ([`Observed`]: the patch log,
//! heads, runs and nodes of the workload's workspace, every record of the output topics and
//! the DLQ, an exact lookup of every cache entry acknowledged) and [`verify`] compares that
//! with the [`Ledger`]; `verify` is pure, so its judgement is unit-tested on synthetic input.
//!
//! Counting: `lost` is an acknowledged input without its effect (no decision for a patch, no
//! run for a run request, no dead letter for a poison record, no cache entry) or an effect
//! whose output event never reached its topic. `duplicated_effects` is an input applied twice:
//! two versions (or two different materialization events) for one patch, two dispatches of
//! one (run, node, attempt) with different event ids, two different terminal events of a run.
//! Redelivery of the *same* event (same event_id) is the relay's documented at-least-once
//! behaviour and is not a duplicate effect.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::Value;
use uuid::Uuid;
use weir_model::definition::{canonical_json_verbatim_numbers, Limits};
use weir_model::fold::{self, Decision, Head, Submitted};
use weir_model::patch::{json_equal, Budget, Patch};
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;
use weir_runtime::events::{
    CacheEvent, CompletionEvent, DeadLetter, NodeReady, PatchSubmitted, RunEvent, TopicEvent,
    WorkflowEvent,
};

use crate::load::{cache_lookup, Expect, Ledger, OVER_BUDGET};

/// What the check found.
#[derive(Debug, Default, serde::Serialize)]
pub struct CheckReport {
    /// Every invariant, whether it holds, and the first offenders.
    pub invariants: Vec<Invariant>,
    /// Requests the gateway acknowledged (202) and poison records the broker acknowledged.
    pub acknowledged: u64,
    /// Acknowledged inputs that took no effect, or whose output event is missing.
    pub lost: u64,
    /// Inputs that took effect more than once.
    pub duplicated_effects: u64,
}

impl CheckReport {
    /// Whether every invariant holds and nothing was lost or duplicated.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated_effects == 0 && self.invariants.iter().all(|i| i.holds)
    }
}

/// One invariant.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Invariant {
    /// Short name.
    pub name: String,
    /// Whether it holds.
    pub holds: bool,
    /// Counts, and the first offenders when it does not hold.
    pub detail: String,
}

/// The input topics weir consumes and the base names of their consumer groups.
const GROUPS: [(&str, &str); 3] = [
    (weir_materializer::processor::GROUP, PatchSubmitted::TOPIC),
    ("weir-coordinator", CompletionEvent::TOPIC),
    ("weir-cache", CacheEvent::TOPIC),
];

/// Total lag (records) of weir's consumer groups (topic_prefix-aware), from the offsets they
/// committed to Kafka (which follow the Postgres positions within the auto-commit interval).
/// Blocking (librdkafka); call it from `spawn_blocking`.
pub fn consumer_lag(cfg: &Config) -> anyhow::Result<i64> {
    Ok(kafka_lag(cfg)?.iter().map(|(_, _, lag)| lag).sum())
}

/// Lag per (group, topic) from the offsets committed to Kafka; a partition without a
/// committed offset counts from its low watermark.
fn kafka_lag(cfg: &Config) -> anyhow::Result<Vec<(String, String, i64)>> {
    let timeout = Duration::from_secs(10);
    let mut out = Vec::new();
    for (base, topic) in GROUPS {
        let group = cfg.kafka.group(base);
        let topic = cfg.kafka.topic(topic);
        let consumer = offsets_reader(cfg, &group)?;
        let meta = consumer
            .fetch_metadata(Some(&topic), timeout)
            .with_context(|| format!("metadata of {topic}"))?;
        let mut tpl = TopicPartitionList::new();
        for t in meta.topics() {
            for p in t.partitions() {
                tpl.add_partition(&topic, p.id());
            }
        }
        let committed = consumer
            .committed_offsets(tpl, timeout)
            .with_context(|| format!("committed offsets of {group}"))?;
        let mut lag = 0;
        for e in committed.elements() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, e.partition(), timeout)
                .with_context(|| format!("watermarks of {topic}"))?;
            let at = match e.offset() {
                Offset::Offset(o) => o,
                _ => low,
            };
            lag += (high - at).max(0);
        }
        out.push((group, topic, lag));
    }
    Ok(out)
}

/// A consumer of `group` that never subscribes, so it does not join the group: it only reads
/// offsets. Kept per (brokers, group) because the driver asks every half second, and a new
/// client per question would churn connections on a broker that is being restarted.
pub(crate) fn offsets_reader(cfg: &Config, group: &str) -> anyhow::Result<Arc<BaseConsumer>> {
    type Readers = Mutex<HashMap<(String, String), Arc<BaseConsumer>>>;
    static READERS: OnceLock<Readers> = OnceLock::new();
    let key = (cfg.kafka.bootstrap_servers.clone(), group.to_string());
    let mut readers = READERS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(c) = readers.get(&key) {
        return Ok(c.clone());
    }
    let consumer: BaseConsumer = weir_runtime::kafka::consumer_config(&cfg.kafka, group, 0)
        .create()
        .context("kafka consumer")?;
    let consumer = Arc::new(consumer);
    readers.insert(key, consumer.clone());
    Ok(consumer)
}

/// Lag per (group, topic) from the positions in Postgres, which move with the effects.
async fn postgres_lag(cfg: &Config, pool: &sqlx::PgPool) -> anyhow::Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for (base, topic) in GROUPS {
        let group = cfg.kafka.group(base);
        let topic = cfg.kafka.topic(topic);
        let positions: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, next_offset FROM weir_consumer_positions
             WHERE consumer_group = $1 AND topic = $2",
        )
        .bind(&group)
        .bind(&topic)
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
        let highs = {
            let (cfg, topic) = (cfg.clone(), topic.clone());
            tokio::task::spawn_blocking(move || crate::load::high_watermarks(&cfg, &topic))
                .await??
        };
        let lag = highs
            .iter()
            .map(|(p, high)| (high - positions.get(p).copied().unwrap_or(0)).max(0))
            .sum();
        out.push((group, lag));
    }
    Ok(out)
}

/// Outbox rows (waiting, dead) of this deployment's topics.
async fn outbox_rows(cfg: &Config, pool: &sqlx::PgPool) -> anyhow::Result<(i64, i64)> {
    let prefix = &cfg.kafka.topic_prefix;
    let waiting: i64 =
        sqlx::query_scalar("SELECT count(*) FROM weir_outbox WHERE left(topic, length($1)) = $1")
            .bind(prefix)
            .fetch_one(pool)
            .await?;
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_outbox_dead WHERE left(topic, length($1)) = $1",
    )
    .bind(prefix)
    .fetch_one(pool)
    .await?;
    Ok((waiting, dead))
}

/// How the drain went.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// Whether lag and outbox reached zero within the drain time.
    pub drained: bool,
    /// How long it took (or the whole drain time).
    pub waited: Duration,
    /// Lag by group from the Postgres positions at the end.
    pub postgres_lag: Vec<(String, i64)>,
    /// Lag by group from Kafka's committed offsets at the end.
    pub kafka_lag: Vec<(String, i64)>,
    /// Outbox rows of this deployment's topics at the end.
    pub outbox: i64,
    /// Rows in `weir_outbox_dead` for this deployment's topics.
    pub outbox_dead: i64,
}

/// One record of a topic, decoded.
#[derive(Debug, Clone)]
pub struct TopicRecord<E> {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The event.
    pub event: E,
}

/// One row of `weir_workflow_patches`.
#[derive(Debug, Clone)]
pub struct PatchRow {
    /// Workflow.
    pub workflow_id: String,
    /// Patch id.
    pub patch_id: Uuid,
    /// `applied` or `rejected`.
    pub status: String,
    /// The version it made.
    pub version: Option<i64>,
    /// sha256 of that version's canonical definition.
    pub sha256: Option<String>,
    /// The operations (inline).
    pub operations: Option<Value>,
    /// The base version it asked for.
    pub base_version: Option<i64>,
    /// Why it was rejected.
    pub reason_code: Option<String>,
}

/// One row of `weir_workflow_heads`.
#[derive(Debug, Clone)]
pub struct HeadRow {
    /// Workflow.
    pub workflow_id: String,
    /// Head version.
    pub version: i64,
    /// The definition when inline.
    pub definition: Option<Value>,
    /// sha256 of its canonical JSON.
    pub sha256: String,
}

/// One row of `weir_run_nodes`.
#[derive(Debug, Clone)]
pub struct NodeRow {
    /// Run.
    pub run_id: String,
    /// Node.
    pub node_id: String,
    /// Its status.
    pub status: String,
    /// Its current attempt.
    pub attempt: i32,
    /// Whether the cache answered it.
    pub from_cache: bool,
}

/// What the system holds after the run.
#[derive(Debug, Default)]
pub struct Observed {
    /// How the drain went.
    pub drain: Drain,
    /// The workspace's patch log.
    pub patch_log: Vec<PatchRow>,
    /// The workspace's heads.
    pub heads: Vec<HeadRow>,
    /// `weir.workflows.v1`, the workspace's records, in (partition, offset) order.
    pub workflow_events: Vec<TopicRecord<WorkflowEvent>>,
    /// `(run_id, status)` of the workspace's runs.
    pub runs: Vec<(String, String)>,
    /// The nodes of the workspace's runs.
    pub nodes: Vec<NodeRow>,
    /// `weir.node-ready.v1`, the workspace's records.
    pub node_ready: Vec<TopicRecord<NodeReady>>,
    /// `weir.run-events.v1`, the workspace's records.
    pub run_events: Vec<TopicRecord<RunEvent>>,
    /// `weir.dlq.v1`, every record.
    pub dead_letters: Vec<TopicRecord<DeadLetter>>,
    /// Output records that could not be decoded: `topic partition offset: why`.
    pub undecodable: Vec<String>,
    /// Acknowledged cache entries an exact lookup did not find after the drain.
    pub cache_missing: Vec<u64>,
    /// Lookups that could not be made (no 200 answer).
    pub cache_unchecked: u64,
}

/// Waits until lag is zero and the outbox is empty (up to `drain`), then verifies every
/// invariant.
pub async fn check(cfg: &Config, ledger: &Ledger, drain: Duration) -> anyhow::Result<CheckReport> {
    let observed = gather(cfg, ledger, drain).await?;
    let limits = cfg.materializer.limits();
    let budget = cfg.materializer.budget();
    Ok(verify(ledger, &observed, &limits, &budget))
}

/// Drains, then reads everything [`verify`] needs.
pub async fn gather(cfg: &Config, ledger: &Ledger, drain: Duration) -> anyhow::Result<Observed> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let mut obs = Observed {
        drain: drain_until_quiet(cfg, &pool, drain).await,
        ..Observed::default()
    };
    let ws = ledger.workspace.as_str();

    type PatchTuple = (
        String,
        Uuid,
        String,
        Option<i64>,
        Option<String>,
        Option<Value>,
        Option<i64>,
        Option<String>,
    );
    obs.patch_log = sqlx::query_as::<_, PatchTuple>(
        "SELECT workflow_id, patch_id, status, version, definition_sha256, operations,
                base_version, reason_code
         FROM weir_workflow_patches WHERE workspace_id = $1",
    )
    .bind(ws)
    .fetch_all(&pool)
    .await
    .context("reading the patch log")?
    .into_iter()
    .map(
        |(
            workflow_id,
            patch_id,
            status,
            version,
            sha256,
            operations,
            base_version,
            reason_code,
        )| {
            PatchRow {
                workflow_id,
                patch_id,
                status,
                version,
                sha256,
                operations,
                base_version,
                reason_code,
            }
        },
    )
    .collect();
    obs.heads = sqlx::query_as::<_, (String, i64, Option<Value>, String)>(
        "SELECT workflow_id, version, definition, definition_sha256
         FROM weir_workflow_heads WHERE workspace_id = $1",
    )
    .bind(ws)
    .fetch_all(&pool)
    .await
    .context("reading the heads")?
    .into_iter()
    .map(|(workflow_id, version, definition, sha256)| HeadRow {
        workflow_id,
        version,
        definition,
        sha256,
    })
    .collect();
    obs.runs = sqlx::query_as("SELECT run_id, status FROM weir_runs WHERE workspace_id = $1")
        .bind(ws)
        .fetch_all(&pool)
        .await
        .context("reading the runs")?;
    obs.nodes = sqlx::query_as::<_, (String, String, String, i32, bool)>(
        "SELECT n.run_id, n.node_id, n.status, n.attempt, n.from_cache
         FROM weir_run_nodes n JOIN weir_runs r USING (run_id) WHERE r.workspace_id = $1",
    )
    .bind(ws)
    .fetch_all(&pool)
    .await
    .context("reading the run nodes")?
    .into_iter()
    .map(|(run_id, node_id, status, attempt, from_cache)| NodeRow {
        run_id,
        node_id,
        status,
        attempt,
        from_cache,
    })
    .collect();
    // What the rows above wrote to the outbox is published before the topics are read, so
    // a row read from Postgres always finds its event (the drain waited already; this covers
    // timers that fired since).
    let settle = Instant::now() + Duration::from_secs(30);
    while outbox_rows(cfg, &pool).await.map(|(w, _)| w).unwrap_or(1) > 0 && Instant::now() < settle
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pool.close().await;

    let codec = Codec::new(&cfg.schema_registry, &cfg.kafka)?;
    let keep = |w: &str| w == ws;
    obs.workflow_events = read_topic::<WorkflowEvent>(cfg, &codec, &mut obs.undecodable)
        .await?
        .into_iter()
        .filter(|r| keep(r.event.workspace_id()))
        .collect();
    obs.node_ready = read_topic::<NodeReady>(cfg, &codec, &mut obs.undecodable)
        .await?
        .into_iter()
        .filter(|r| keep(&r.event.workspace_id))
        .collect();
    obs.run_events = read_topic::<RunEvent>(cfg, &codec, &mut obs.undecodable)
        .await?
        .into_iter()
        .filter(|r| keep(r.event.workspace_id()))
        .collect();
    obs.dead_letters = read_topic::<DeadLetter>(cfg, &codec, &mut obs.undecodable).await?;

    // Every acknowledged cache entry must be found by an exact lookup.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let key = ledger.api_key.expose().clone();
    let gateways = ledger.gateways.clone();
    let answers: Vec<(u64, Option<bool>)> = futures::stream::iter(ledger.cache_entries.clone())
        .map(|n| {
            let (http, key, gateways) = (&http, &key, &gateways);
            async move {
                // Each try on the next gateway: one may be down when the check runs.
                for attempt in 0..(5 * gateways.len().max(1)) {
                    let base = gateways
                        .get(attempt % gateways.len().max(1))
                        .cloned()
                        .unwrap_or_default();
                    let res = http
                        .post(format!("{base}/v1/cache/lookup"))
                        .bearer_auth(key)
                        .json(&cache_lookup(n))
                        .send()
                        .await;
                    if let Ok(res) = res {
                        if res.status().as_u16() == 200 {
                            let v: Value = res.json().await.unwrap_or(Value::Null);
                            return (n, Some(v["hit"] == true));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                (n, None)
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (n, hit) in answers {
        match hit {
            Some(true) => {}
            Some(false) => obs.cache_missing.push(n),
            None => obs.cache_unchecked += 1,
        }
    }
    obs.cache_missing.sort_unstable();
    Ok(obs)
}

/// Polls until every group's lag (Postgres and Kafka) is zero and the outbox holds none of
/// this deployment's rows, twice in a row a second apart, or `limit` passed.
async fn drain_until_quiet(cfg: &Config, pool: &sqlx::PgPool, limit: Duration) -> Drain {
    let started = Instant::now();
    let mut quiet_since: Option<Instant> = None;
    loop {
        let pg = postgres_lag(cfg, pool).await;
        let kafka = {
            let cfg = cfg.clone();
            tokio::task::spawn_blocking(move || kafka_lag(&cfg))
                .await
                .map_err(anyhow::Error::from)
                .and_then(|r| r)
        };
        let outbox = outbox_rows(cfg, pool).await;
        let mut drain = Drain {
            waited: started.elapsed(),
            ..Drain::default()
        };
        let mut quiet = false;
        if let (Ok(pg), Ok(kafka), Ok((outbox, dead))) = (&pg, &kafka, &outbox) {
            quiet = pg.iter().all(|(_, l)| *l == 0)
                && kafka.iter().all(|(_, _, l)| *l == 0)
                && *outbox == 0;
            drain.postgres_lag = pg.clone();
            drain.kafka_lag = kafka.iter().map(|(g, _, l)| (g.clone(), *l)).collect();
            drain.outbox = *outbox;
            drain.outbox_dead = *dead;
        } else {
            tracing::debug!(?pg, ?kafka, ?outbox, "drain: not readable yet");
            drain.outbox = -1;
        }
        if quiet {
            match quiet_since {
                Some(t) if t.elapsed() >= Duration::from_secs(1) => {
                    drain.drained = true;
                    return drain;
                }
                None => quiet_since = Some(Instant::now()),
                _ => {}
            }
        } else {
            quiet_since = None;
        }
        if started.elapsed() >= limit {
            return drain;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every record of `E`'s topic up to its high watermarks, decoded, in (partition, offset)
/// order; records that cannot be decoded are listed in `undecodable`.
async fn read_topic<E: TopicEvent>(
    cfg: &Config,
    codec: &Codec,
    undecodable: &mut Vec<String>,
) -> anyhow::Result<Vec<TopicRecord<E>>> {
    let topic = cfg.kafka.topic(E::TOPIC);
    let raw = {
        let (cfg, topic) = (cfg.clone(), topic.clone());
        tokio::task::spawn_blocking(move || read_raw(&cfg, &topic)).await??
    };
    let mut out = Vec::with_capacity(raw.len());
    for (partition, offset, payload) in raw {
        let Some(payload) = payload else {
            undecodable.push(format!("{topic} {partition} {offset}: no value"));
            continue;
        };
        match codec.decode::<E>(&payload).await {
            Ok(event) => out.push(TopicRecord {
                partition,
                offset,
                event,
            }),
            Err(e) => undecodable.push(format!("{topic} {partition} {offset}: {e}")),
        }
    }
    Ok(out)
}

/// `(partition, offset, value)` of one record.
type RawRecord = (i32, i64, Option<Vec<u8>>);

/// `(partition, offset, value)` of every record of `topic` below its high watermarks.
fn read_raw(cfg: &Config, topic: &str) -> anyhow::Result<Vec<RawRecord>> {
    let highs = crate::load::high_watermarks(cfg, topic)?;
    let group = format!("weir-chaos-check-{}", Uuid::now_v7().simple());
    let consumer: BaseConsumer = weir_runtime::kafka::consumer_config(&cfg.kafka, &group, 0)
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    let mut left: HashMap<i32, i64> = HashMap::new();
    for (p, high) in &highs {
        if *high > 0 {
            tpl.add_partition_offset(topic, *p, Offset::Beginning)?;
            left.insert(*p, *high);
        }
    }
    let mut out = Vec::new();
    if left.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !left.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading {topic}: partitions {:?} not read to their end",
            left.keys().collect::<Vec<_>>()
        );
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            // Partitions whose remaining records were all compacted or are transaction
            // markers: the position tells.
            if let Ok(pos) = consumer.position() {
                for e in pos.elements() {
                    if let (Offset::Offset(o), Some(high)) = (e.offset(), left.get(&e.partition()))
                    {
                        if o >= *high {
                            left.remove(&e.partition());
                        }
                    }
                }
            }
            continue;
        };
        let m = m.with_context(|| format!("reading {topic}"))?;
        let (p, o) = (m.partition(), m.offset());
        if let Some(high) = left.get(&p).copied() {
            if o < high {
                out.push((p, o, m.payload().map(<[u8]>::to_vec)));
            }
            if o + 1 >= high {
                left.remove(&p);
            }
        }
    }
    out.sort_by_key(|(p, o, _)| (*p, *o));
    Ok(out)
}

/// Builds the report of one invariant with the first offenders.
struct Tally {
    name: &'static str,
    checked: u64,
    offenders: Vec<String>,
    offences: u64,
}

impl Tally {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            checked: 0,
            offenders: Vec::new(),
            offences: 0,
        }
    }

    fn offence(&mut self, what: impl FnOnce() -> String) {
        self.offences += 1;
        if self.offenders.len() < 5 {
            self.offenders.push(what());
        }
    }

    fn done(self, summary: String) -> Invariant {
        let detail = if self.offences == 0 {
            format!("{} checked; {summary}", self.checked)
        } else {
            format!(
                "{} of {} wrong; {summary}; first: {}",
                self.offences,
                self.checked,
                self.offenders.join(" | ")
            )
        };
        Invariant {
            name: self.name.to_string(),
            holds: self.offences == 0,
            detail,
        }
    }
}

/// Judges what the system holds against what was acknowledged.
pub fn verify(ledger: &Ledger, obs: &Observed, limits: &Limits, budget: &Budget) -> CheckReport {
    let mut report = CheckReport {
        acknowledged: ledger.acknowledged(),
        ..CheckReport::default()
    };
    let mut lost = 0u64;
    let mut dup = 0u64;

    // The drain, the lag and the outbox.
    let d = &obs.drain;
    report.invariants.push(Invariant {
        name: "lag back to zero for every group".into(),
        holds: d.drained
            && d.postgres_lag.iter().all(|(_, l)| *l == 0)
            && d.kafka_lag.iter().all(|(_, l)| *l == 0),
        detail: format!(
            "drained: {} after {:.1} s; postgres lag {:?}; kafka lag {:?}",
            d.drained,
            d.waited.as_secs_f64(),
            d.postgres_lag,
            d.kafka_lag
        ),
    });
    report.invariants.push(Invariant {
        name: "outbox empty".into(),
        holds: d.outbox == 0 && d.outbox_dead == 0,
        detail: format!(
            "{} rows waiting, {} dead for this deployment's topics",
            d.outbox, d.outbox_dead
        ),
    });
    lost += d.outbox_dead.max(0) as u64;

    // Patches: one decision each, as sent.
    let log: HashMap<(&str, Uuid), &PatchRow> = obs
        .patch_log
        .iter()
        .map(|r| ((r.workflow_id.as_str(), r.patch_id), r))
        .collect();
    let mut decided = Tally::new("every patch answered 202 has exactly one decision");
    let mut outcome = Tally::new("every patch decided as sent (applied, or rejected by its test)");
    let mut seen_acks = HashSet::new();
    for p in &ledger.patches {
        if !seen_acks.insert((p.workflow_id.as_str(), p.patch_id)) {
            continue;
        }
        decided.checked += 1;
        outcome.checked += 1;
        match log.get(&(p.workflow_id.as_str(), p.patch_id)) {
            None => {
                lost += 1;
                decided.offence(|| format!("{} {} has no decision", p.workflow_id, p.patch_id));
            }
            Some(row) => {
                let ok = match p.expect {
                    Expect::Applied => row.status == "applied",
                    Expect::Rejected => {
                        row.status == "rejected"
                            && row.reason_code.as_deref() == Some("test_failed")
                    }
                };
                if !ok {
                    outcome.offence(|| {
                        format!(
                            "{} {}: expected {:?}, got {} {:?}",
                            p.workflow_id, p.patch_id, p.expect, row.status, row.reason_code
                        )
                    });
                }
            }
        }
    }
    let rejected = ledger
        .patches
        .iter()
        .filter(|p| p.expect == Expect::Rejected)
        .count();
    report
        .invariants
        .push(decided.done(format!("{} acknowledged patches", ledger.patches.len())));
    report
        .invariants
        .push(outcome.done(format!("{rejected} rejected on purpose")));

    // Versions contiguous, heads equal to an independent fold of their applied patches.
    let mut by_workflow: BTreeMap<&str, Vec<&PatchRow>> = BTreeMap::new();
    for r in &obs.patch_log {
        if r.status == "applied" {
            by_workflow.entry(&r.workflow_id).or_default().push(r);
        }
    }
    let heads: HashMap<&str, &HeadRow> = obs
        .heads
        .iter()
        .map(|h| (h.workflow_id.as_str(), h))
        .collect();
    let mut contiguous = Tally::new("versions contiguous per workflow");
    let mut folded = Tally::new("every head equals an independent fold of its applied patches");
    let mut unfoldable = 0u64;
    for (workflow, rows) in &mut by_workflow {
        rows.sort_by_key(|r| r.version);
        contiguous.checked += 1;
        folded.checked += 1;
        let versions: Vec<i64> = rows.iter().filter_map(|r| r.version).collect();
        let head = heads.get(workflow);
        let expected: Vec<i64> = (1..=versions.len() as i64).collect();
        if versions != expected || head.map(|h| h.version) != versions.last().copied() {
            contiguous.offence(|| {
                format!(
                    "{workflow}: applied versions {:?}.., head {:?}",
                    &versions[..versions.len().min(8)],
                    head.map(|h| h.version)
                )
            });
        }
        if rows.iter().any(|r| r.operations.is_none()) {
            // Operations held in the CAS: not folded here (the workload sends none).
            unfoldable += 1;
            continue;
        }
        let mut state = Head::empty(&ledger.workspace);
        let mut wrong = None;
        for r in rows.iter() {
            let ops = r.operations.clone().unwrap_or(Value::Null);
            let submitted = Submitted {
                workspace_id: ledger.workspace.clone(),
                base_version: r.base_version,
                operations: Patch::from_owned(ops),
            };
            match fold::step_with(&mut state, &submitted, limits, budget) {
                Decision::Applied {
                    version, sha256, ..
                } if Some(version) == r.version && Some(&sha256) == r.sha256.as_ref() => {}
                other => {
                    wrong = Some(format!(
                        "{workflow} patch {} (version {:?}): the fold gives {other:?}",
                        r.patch_id, r.version
                    ));
                    break;
                }
            }
        }
        if wrong.is_none() {
            match head {
                None => wrong = Some(format!("{workflow}: no head")),
                Some(h) => {
                    let sha = fold::sha256_hex(&canonical_json_verbatim_numbers(&state.definition));
                    let same_doc = h
                        .definition
                        .as_ref()
                        .is_none_or(|d| json_equal(d, &state.definition));
                    if h.sha256 != sha || !same_doc || h.version != state.version {
                        wrong = Some(format!(
                            "{workflow}: head v{} {} differs from the fold v{} {sha}",
                            h.version, h.sha256, state.version
                        ));
                    }
                }
            }
        }
        if let Some(w) = wrong {
            folded.offence(|| w);
        }
    }
    for h in &obs.heads {
        if !by_workflow.contains_key(h.workflow_id.as_str()) {
            contiguous.offence(|| format!("{}: a head without applied patches", h.workflow_id));
        }
    }
    report
        .invariants
        .push(contiguous.done(format!("{} heads", obs.heads.len())));
    report.invariants.push(folded.done(format!(
        "{} applied patches folded; {unfoldable} workflows with CAS-held operations skipped",
        by_workflow.values().map(Vec::len).sum::<usize>()
    )));

    // The workflows topic: each decision published, once per effect, in per-key order.
    let mut materialized: HashMap<(&str, i64), BTreeSet<Uuid>> = HashMap::new();
    let mut patch_versions: HashMap<Uuid, BTreeSet<(&str, i64)>> = HashMap::new();
    let mut rejections: HashMap<Uuid, BTreeSet<Uuid>> = HashMap::new();
    let mut order = Tally::new("weir.workflows.v1 in per-key order (versions rise per workflow)");
    let mut last_version: HashMap<&str, i64> = HashMap::new();
    let mut first_seen: HashSet<Uuid> = HashSet::new();
    for r in &obs.workflow_events {
        match &r.event {
            WorkflowEvent::WorkflowMaterialized(m) => {
                materialized
                    .entry((m.workflow_id.as_str(), m.version))
                    .or_default()
                    .insert(m.event_id);
                for p in &m.patch_ids {
                    patch_versions
                        .entry(*p)
                        .or_default()
                        .insert((m.workflow_id.as_str(), m.version));
                }
                if first_seen.insert(m.event_id) {
                    order.checked += 1;
                    let last = last_version.entry(&m.workflow_id).or_insert(0);
                    if m.version <= *last {
                        let was = *last;
                        order.offence(|| {
                            format!(
                                "{}: version {} first published after version {was}",
                                m.workflow_id, m.version
                            )
                        });
                    }
                    *last = (*last).max(m.version);
                }
            }
            WorkflowEvent::PatchRejected(x) => {
                rejections.entry(x.patch_id).or_default().insert(x.event_id);
            }
        }
    }
    let mut published =
        Tally::new("every decision published on weir.workflows.v1, once per effect");
    for r in &obs.patch_log {
        published.checked += 1;
        if r.status == "applied" {
            let Some(v) = r.version else { continue };
            match materialized.get(&(r.workflow_id.as_str(), v)) {
                None => {
                    lost += 1;
                    published.offence(|| format!("{} v{v} never published", r.workflow_id));
                }
                Some(ids) if ids.len() > 1 => {
                    dup += ids.len() as u64 - 1;
                    published.offence(|| {
                        format!("{} v{v} published as {} events", r.workflow_id, ids.len())
                    });
                }
                Some(_) => {}
            }
            if let Some(vs) = patch_versions.get(&r.patch_id) {
                if vs.len() > 1 {
                    dup += vs.len() as u64 - 1;
                    published.offence(|| format!("patch {} made versions {vs:?}", r.patch_id));
                } else if !vs.contains(&(r.workflow_id.as_str(), v)) {
                    published.offence(|| {
                        format!("patch {} published as {vs:?}, logged as v{v}", r.patch_id)
                    });
                }
            }
        } else {
            match rejections.get(&r.patch_id) {
                None => {
                    lost += 1;
                    published.offence(|| format!("rejection of {} never published", r.patch_id));
                }
                Some(ids) if ids.len() > 1 => {
                    dup += ids.len() as u64 - 1;
                    published
                        .offence(|| format!("{} rejected by {} events", r.patch_id, ids.len()));
                }
                Some(_) => {}
            }
        }
    }
    report.invariants.push(published.done(format!(
        "{} materializations, {} rejections",
        materialized.len(),
        rejections.len()
    )));
    report.invariants.push(order.done(String::new()));

    // Runs: terminal, as the workers answered.
    let runs: HashMap<&str, &str> = obs
        .runs
        .iter()
        .map(|(r, s)| (r.as_str(), s.as_str()))
        .collect();
    let mut terminal = Tally::new("every run requested with 202 reaches a terminal state");
    let mut completed = Tally::new("every run completed (workers fail first attempts only)");
    let mut acked_runs = HashSet::new();
    let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &ledger.runs {
        if !acked_runs.insert(r.run_id.as_str()) {
            continue;
        }
        terminal.checked += 1;
        completed.checked += 1;
        match runs.get(r.run_id.as_str()) {
            None => {
                lost += 1;
                terminal.offence(|| format!("run {} ({}) never started", r.run_id, r.workflow_id));
            }
            Some(&"running") => {
                terminal.offence(|| format!("run {} still running", r.run_id));
            }
            Some(s) => {
                *by_status.entry(s).or_default() += 1;
                if *s != "completed" {
                    completed.offence(|| format!("run {} ended {s}", r.run_id));
                }
            }
        }
    }
    report
        .invariants
        .push(terminal.done(format!("ended: {by_status:?}")));
    report.invariants.push(completed.done(String::new()));

    // Dispatches: once per (run, node, attempt), published, in per-key order.
    let mut dispatches: HashMap<(&str, &str, i32), BTreeSet<Uuid>> = HashMap::new();
    let mut dispatch_order =
        Tally::new("weir.node-ready.v1 in per-key order (attempts rise, predecessors first)");
    let mut first_dispatch: HashMap<(&str, &str), i32> = HashMap::new();
    let mut first_seen: HashSet<Uuid> = HashSet::new();
    for r in &obs.node_ready {
        let e = &r.event;
        dispatches
            .entry((e.run_id.as_str(), e.node_id.as_str(), e.attempt))
            .or_default()
            .insert(e.event_id);
        if !first_seen.insert(e.event_id) {
            continue;
        }
        dispatch_order.checked += 1;
        for input in &e.inputs {
            if !first_dispatch.contains_key(&(e.run_id.as_str(), input.node_id.as_str())) {
                dispatch_order.offence(|| {
                    format!(
                        "run {}: {} dispatched before its predecessor {}",
                        e.run_id, e.node_id, input.node_id
                    )
                });
            }
        }
        let last = first_dispatch
            .entry((e.run_id.as_str(), e.node_id.as_str()))
            .or_insert(0);
        if e.attempt <= *last {
            let was = *last;
            dispatch_order.offence(|| {
                format!(
                    "run {} node {}: attempt {} first published after attempt {was}",
                    e.run_id, e.node_id, e.attempt
                )
            });
        }
        *last = (*last).max(e.attempt);
    }
    let mut dispatched_once = Tally::new(
        "each (run, node, attempt) dispatched once (duplicates only as redeliveries of one event_id)",
    );
    for ((run, node, attempt), ids) in &dispatches {
        dispatched_once.checked += 1;
        if ids.len() > 1 {
            dup += ids.len() as u64 - 1;
            dispatched_once.offence(|| {
                format!(
                    "run {run} node {node} attempt {attempt}: {} event ids",
                    ids.len()
                )
            });
        }
    }
    for n in &obs.nodes {
        if !acked_runs.contains(n.run_id.as_str()) && !runs.contains_key(n.run_id.as_str()) {
            continue;
        }
        // A cached attempt has no NodeReady; every other attempt up to the current one does.
        let upto = if n.from_cache {
            n.attempt - 1
        } else {
            n.attempt
        };
        for a in 1..=upto {
            if !dispatches.contains_key(&(n.run_id.as_str(), n.node_id.as_str(), a)) {
                lost += 1;
                dispatched_once.offence(|| {
                    format!(
                        "run {} node {} attempt {a} ({}) never published",
                        n.run_id, n.node_id, n.status
                    )
                });
            }
        }
    }
    report.invariants.push(dispatched_once.done(format!(
        "{} NodeReady records, {} distinct dispatches",
        obs.node_ready.len(),
        dispatches.len()
    )));
    report.invariants.push(dispatch_order.done(String::new()));

    // Run events: one start and one end per run, published, in per-key order.
    let mut starts: HashMap<&str, BTreeSet<Uuid>> = HashMap::new();
    let mut ends: HashMap<&str, BTreeMap<Uuid, &'static str>> = HashMap::new();
    let mut retried: HashMap<(&str, &str, i32), BTreeSet<Uuid>> = HashMap::new();
    let mut run_order =
        Tally::new("weir.run-events.v1 in per-key order (started first, ended last)");
    let mut started_at: HashMap<&str, usize> = HashMap::new();
    let mut ended_at: HashMap<&str, usize> = HashMap::new();
    let mut first_seen: HashSet<Uuid> = HashSet::new();
    for (i, r) in obs.run_events.iter().enumerate() {
        let (run, id, kind): (&str, Uuid, &'static str) = match &r.event {
            RunEvent::RunStarted(e) => (&e.run_id, e.event_id, "started"),
            RunEvent::RunCompleted(e) => (&e.run_id, e.event_id, "completed"),
            RunEvent::RunFailed(e) => (&e.run_id, e.event_id, "failed"),
            RunEvent::RunCancelled(e) => (&e.run_id, e.event_id, "cancelled"),
            RunEvent::NodeRetried(e) => {
                retried
                    .entry((&e.run_id, &e.node_id, e.failed_attempt))
                    .or_default()
                    .insert(e.event_id);
                (&e.run_id, e.event_id, "retried")
            }
            RunEvent::RunStalled(e) => (&e.run_id, e.event_id, "stalled"),
        };
        match kind {
            "started" => {
                starts.entry(run).or_default().insert(id);
            }
            "completed" | "failed" | "cancelled" => {
                ends.entry(run).or_default().insert(id, kind);
            }
            _ => {}
        }
        if !first_seen.insert(id) {
            continue;
        }
        run_order.checked += 1;
        if kind == "started" {
            started_at.entry(run).or_insert(i);
        } else if !started_at.contains_key(run) {
            run_order.offence(|| format!("run {run}: {kind} before its start"));
        }
        if let Some(end) = ended_at.get(run) {
            if kind != "stalled" {
                let end = *end;
                run_order.offence(|| format!("run {run}: {kind} after its end (record {end})"));
            }
        }
        if matches!(kind, "completed" | "failed" | "cancelled") {
            ended_at.entry(run).or_insert(i);
        }
    }
    let mut run_events = Tally::new("every run's start and end published once");
    for (run, status) in &obs.runs {
        run_events.checked += 1;
        match starts.get(run.as_str()).map(BTreeSet::len) {
            Some(1) => {}
            None => {
                lost += 1;
                run_events.offence(|| format!("run {run}: RunStarted never published"));
            }
            Some(n) => {
                dup += n as u64 - 1;
                run_events.offence(|| format!("run {run}: started by {n} events"));
            }
        }
        if status == "running" {
            continue;
        }
        match ends.get(run.as_str()) {
            None => {
                lost += 1;
                run_events.offence(|| format!("run {run} ({status}): its end never published"));
            }
            Some(ids) => {
                if ids.len() > 1 {
                    dup += ids.len() as u64 - 1;
                    run_events.offence(|| format!("run {run}: ended by {:?}", ids.values()));
                }
                if ids.values().any(|k| k != status) {
                    run_events
                        .offence(|| format!("run {run} is {status}, published {:?}", ids.values()));
                }
            }
        }
    }
    for ((run, node, attempt), ids) in &retried {
        if ids.len() > 1 {
            dup += ids.len() as u64 - 1;
            run_events.offence(|| format!("run {run} node {node} attempt {attempt} retried twice"));
        }
    }
    report.invariants.push(run_events.done(format!(
        "{} records, {} retries",
        obs.run_events.len(),
        retried.len()
    )));
    report.invariants.push(run_order.done(String::new()));

    // The DLQ holds exactly the poison sent on purpose.
    let mut dlq = Tally::new("the DLQ holds exactly the poison records sent on purpose");
    let sent: HashSet<(&str, i32, i64)> = ledger
        .poison
        .iter()
        .map(|p| (p.topic.as_str(), p.partition, p.offset))
        .collect();
    let unsure: HashSet<&[u8]> = ledger.poison_unsure.iter().map(|k| k.as_bytes()).collect();
    let mut letters: HashSet<(&str, i32, i64)> = HashSet::new();
    for r in &obs.dead_letters {
        let e = &r.event;
        let at = (e.source_topic.as_str(), e.source_partition, e.source_offset);
        if !letters.insert(at) {
            continue; // at least once into the DLQ: a redelivered letter
        }
        dlq.checked += 1;
        let expected = sent.contains(&at)
            || e.original_key
                .as_deref()
                .is_some_and(|k| unsure.contains(k));
        if !expected {
            dlq.offence(|| {
                format!(
                    "{} {} {}: {} {}",
                    e.source_topic,
                    e.source_partition,
                    e.source_offset,
                    e.error_class,
                    e.error_message.chars().take(160).collect::<String>()
                )
            });
        }
    }
    for p in &ledger.poison {
        if !letters.contains(&(p.topic.as_str(), p.partition, p.offset)) {
            lost += 1;
            dlq.offence(|| {
                format!(
                    "poison {} at {} {} {} not dead-lettered",
                    p.key, p.topic, p.partition, p.offset
                )
            });
        }
    }
    report.invariants.push(dlq.done(format!(
        "{} poison sent ({} unsure), {} letters",
        ledger.poison.len(),
        ledger.poison_unsure.len(),
        letters.len()
    )));

    // The gateway's answers.
    let mut answers = Tally::new(
        "the gateway answered only 2xx, the 4xx sent on purpose, or 503 with Retry-After",
    );
    let mut counts: BTreeMap<(&str, u16), u64> = BTreeMap::new();
    for a in &ledger.answers {
        answers.checked += 1;
        *counts.entry((a.kind, a.status)).or_default() += 1;
        let ok = match a.status {
            0 => true, // no connection: the process was down
            200..=299 => true,
            503 => a.retry_after,
            422 => a.kind == OVER_BUDGET,
            404 => a.kind == "get", // a workflow polled before it is materialized
            _ => false,
        };
        if !ok {
            answers.offence(|| format!("{} answered {} at {:?}", a.kind, a.status, a.at));
        }
    }
    let over_budget = counts
        .iter()
        .filter(|((k, s), _)| *k == OVER_BUDGET && *s == 422)
        .map(|(_, n)| n)
        .sum::<u64>();
    let mut statuses: BTreeMap<u16, u64> = BTreeMap::new();
    for ((_, s), n) in &counts {
        *statuses.entry(*s).or_default() += n;
    }
    report.invariants.push(answers.done(format!(
        "by status {statuses:?}; {over_budget} refused on purpose (422); {} gave up",
        ledger.gave_up
    )));

    // Cache entries.
    let mut cache = Tally::new("every cache entry answered 202 is found by an exact lookup");
    cache.checked = ledger.cache_entries.len() as u64;
    for n in &obs.cache_missing {
        lost += 1;
        cache.offence(|| format!("entry {n} not found"));
    }
    if obs.cache_unchecked > 0 {
        let u = obs.cache_unchecked;
        cache.offence(|| format!("{u} entries could not be looked up"));
    }
    report.invariants.push(cache.done(format!(
        "{} lookups during the run, {} hits",
        ledger.cache_lookups, ledger.cache_hits
    )));

    let mut decodable = Tally::new("every output record decodes");
    decodable.checked = (obs.workflow_events.len()
        + obs.node_ready.len()
        + obs.run_events.len()
        + obs.dead_letters.len()) as u64;
    for u in &obs.undecodable {
        decodable.offence(|| u.clone());
    }
    report.invariants.push(decodable.done(String::new()));

    report.lost = lost;
    report.duplicated_effects = dup;
    report
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use serde_json::json;
    use weir_runtime::events::{NodeReady, PatchRejected, WorkflowMaterialized};

    use super::*;
    use crate::load::{Answer, PatchAck, RunAck};

    const WS: &str = "chaos-test";

    fn limits() -> (Limits, Budget) {
        let limits = Limits::default();
        let budget = fold::default_budget(&limits);
        (limits, budget)
    }

    fn materialized(workflow: &str, version: i64, patch: Uuid) -> WorkflowEvent {
        WorkflowEvent::WorkflowMaterialized(WorkflowMaterialized {
            event_id: Uuid::now_v7(),
            occurred_at: 0,
            workspace_id: WS.into(),
            traceparent: String::new(),
            tracestate: None,
            workflow_id: workflow.into(),
            version,
            definition_json: None,
            definition_ref: None,
            patch_ids: vec![patch],
            definition_sha256: String::new(),
        })
    }

    fn ready(run: &str, node: &str, attempt: i32, inputs: &[&str]) -> NodeReady {
        NodeReady {
            event_id: Uuid::now_v7(),
            occurred_at: 0,
            workspace_id: WS.into(),
            traceparent: String::new(),
            tracestate: None,
            run_id: run.into(),
            workflow_id: "flow-0".into(),
            version: 1,
            node_id: node.into(),
            node_type: "function".into(),
            config_json: "{}".into(),
            inputs: inputs
                .iter()
                .map(|n| weir_runtime::events::NodeInput {
                    node_id: (*n).into(),
                    output_json: Some("{}".into()),
                    output_ref: None,
                })
                .collect(),
            attempt,
            hop: 1,
            deadline_at: None,
            run_inputs_json: None,
            run_inputs_ref: None,
        }
    }

    fn run_event(run: &str, kind: &str) -> RunEvent {
        let (event_id, occurred_at, workspace_id, traceparent, tracestate) =
            (Uuid::now_v7(), 0, WS.to_string(), String::new(), None);
        let (run_id, workflow_id, version) = (run.to_string(), "flow-0".to_string(), 1);
        match kind {
            "started" => RunEvent::RunStarted(weir_runtime::events::RunStarted {
                event_id,
                occurred_at,
                workspace_id,
                traceparent,
                tracestate,
                run_id,
                workflow_id,
                version,
                requester: "k".into(),
            }),
            _ => RunEvent::RunCompleted(weir_runtime::events::RunCompleted {
                event_id,
                occurred_at,
                workspace_id,
                traceparent,
                tracestate,
                run_id,
                workflow_id,
                version,
                duration_ms: 1,
                outputs_json: None,
                outputs_ref: None,
            }),
        }
    }

    fn rec<E>(offset: i64, event: E) -> TopicRecord<E> {
        TopicRecord {
            partition: 0,
            offset,
            event,
        }
    }

    /// A run of the workload that went right: a workflow created and patched (one patch
    /// rejected on purpose), one run of split → join, one poison record, a few answers.
    fn clean() -> (Ledger, Observed) {
        let (limits, budget) = limits();
        let (put, p2, p3) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let ops = [
            (
                put,
                json!([{"op": "add", "path": "", "value":
                {"nodes": {"a": {"type": "function", "config": {"n": 0}}}, "edges": []}}]),
            ),
            (
                p2,
                json!([{"op": "replace", "path": "/nodes/a/config/n", "value": 2}]),
            ),
            (
                p3,
                json!([{"op": "test", "path": "/nodes/a/type", "value": "human"}]),
            ),
        ];
        let mut head = Head::empty(WS);
        let mut obs = Observed {
            drain: Drain {
                drained: true,
                ..Drain::default()
            },
            ..Observed::default()
        };
        for (i, (id, ops)) in ops.iter().enumerate() {
            let d = fold::step_with(
                &mut head,
                &Submitted {
                    workspace_id: WS.into(),
                    base_version: None,
                    operations: Patch::from_value(ops),
                },
                &limits,
                &budget,
            );
            let (status, version, sha256, reason_code, event) = match d {
                Decision::Applied {
                    version, sha256, ..
                } => (
                    "applied",
                    Some(version),
                    Some(sha256),
                    None,
                    materialized("wf-1", version, *id),
                ),
                Decision::Rejected { code, .. } => (
                    "rejected",
                    None,
                    None,
                    Some(code.to_string()),
                    WorkflowEvent::PatchRejected(PatchRejected {
                        event_id: Uuid::now_v7(),
                        occurred_at: 0,
                        workspace_id: WS.into(),
                        traceparent: String::new(),
                        tracestate: None,
                        workflow_id: "wf-1".into(),
                        patch_id: *id,
                        base_version: None,
                        head_version: 2,
                        reason_code: code.into(),
                        reason: String::new(),
                    }),
                ),
            };
            obs.patch_log.push(PatchRow {
                workflow_id: "wf-1".into(),
                patch_id: *id,
                status: status.into(),
                version,
                sha256,
                operations: Some(ops.clone()),
                base_version: None,
                reason_code,
            });
            obs.workflow_events.push(rec(i as i64, event));
        }
        obs.heads.push(HeadRow {
            workflow_id: "wf-1".into(),
            version: head.version,
            definition: Some(head.definition.clone()),
            sha256: fold::sha256_hex(&canonical_json_verbatim_numbers(&head.definition)),
        });
        obs.runs.push(("r1".into(), "completed".into()));
        for (node, attempt) in [("split", 2), ("join", 1)] {
            obs.nodes.push(NodeRow {
                run_id: "r1".into(),
                node_id: node.into(),
                status: "succeeded".into(),
                attempt,
                from_cache: false,
            });
        }
        obs.node_ready = vec![
            rec(0, ready("r1", "split", 1, &[])),
            rec(1, ready("r1", "split", 2, &[])),
            rec(2, ready("r1", "join", 1, &["split"])),
        ];
        // The relay published the join twice (a redelivery: same event id).
        obs.node_ready.push(rec(3, obs.node_ready[2].event.clone()));
        obs.run_events = vec![
            rec(0, run_event("r1", "started")),
            rec(1, run_event("r1", "completed")),
        ];
        let poison = crate::load::Poison {
            topic: "t.weir.patches.v1".into(),
            partition: 1,
            offset: 7,
            key: "k".into(),
        };
        obs.dead_letters.push(rec(
            0,
            DeadLetter {
                event_id: Uuid::now_v7(),
                occurred_at: 0,
                workspace_id: String::new(),
                traceparent: String::new(),
                tracestate: None,
                source_topic: poison.topic.clone(),
                source_partition: 1,
                source_offset: 7,
                consumer_group: "g".into(),
                error_class: "decode".into(),
                error_message: "not Confluent".into(),
                original_key: Some(b"k".to_vec()),
                original_value: Some(b"x".to_vec()),
                original_headers: vec![],
            },
        ));
        let at = SystemTime::now();
        let answer = |kind, status, retry_after| Answer {
            at,
            kind,
            status,
            retry_after,
        };
        let ledger = Ledger {
            workspace: WS.into(),
            patches: vec![
                PatchAck {
                    workflow_id: "wf-1".into(),
                    patch_id: put,
                    expect: Expect::Applied,
                    at,
                },
                PatchAck {
                    workflow_id: "wf-1".into(),
                    patch_id: p2,
                    expect: Expect::Applied,
                    at,
                },
                PatchAck {
                    workflow_id: "wf-1".into(),
                    patch_id: p3,
                    expect: Expect::Rejected,
                    at,
                },
            ],
            runs: vec![RunAck {
                run_id: "r1".into(),
                workflow_id: "flow-0".into(),
                at,
            }],
            poison: vec![poison],
            answers: vec![
                answer("patch", 202, false),
                answer("patch", 503, true),
                answer("patch", 0, false),
                answer(OVER_BUDGET, 422, false),
            ],
            ..Ledger::default()
        };
        (ledger, obs)
    }

    fn failing(report: &CheckReport) -> Vec<&str> {
        report
            .invariants
            .iter()
            .filter(|i| !i.holds)
            .map(|i| i.name.as_str())
            .collect()
    }

    #[test]
    fn a_clean_run_is_clean() {
        let (ledger, obs) = clean();
        let (limits, budget) = limits();
        let report = verify(&ledger, &obs, &limits, &budget);
        assert!(report.clean(), "{report:#?}");
        assert_eq!(report.acknowledged, 5);
    }

    #[test]
    fn a_lost_patch_and_a_duplicate_are_both_reported() {
        let (mut ledger, mut obs) = clean();
        // Lost: acknowledged, never decided.
        ledger.patches.push(PatchAck {
            workflow_id: "wf-1".into(),
            patch_id: Uuid::now_v7(),
            expect: Expect::Applied,
            at: SystemTime::now(),
        });
        // Duplicated: version 2 materialized by a second, different event.
        let p2 = obs.patch_log[1].patch_id;
        obs.workflow_events
            .push(rec(9, materialized("wf-1", 2, p2)));
        // Duplicated: the join dispatched again under another event id.
        obs.node_ready
            .push(rec(9, ready("r1", "join", 1, &["split"])));
        let (limits, budget) = limits();
        let report = verify(&ledger, &obs, &limits, &budget);
        assert_eq!(report.lost, 1, "{report:#?}");
        assert_eq!(report.duplicated_effects, 2, "{report:#?}");
        let failing = failing(&report);
        assert!(failing.contains(&"every patch answered 202 has exactly one decision"));
        assert!(failing
            .iter()
            .any(|f| f.starts_with("every decision published")));
        assert!(failing
            .iter()
            .any(|f| f.starts_with("each (run, node, attempt)")));
        // Version 2 first published after version 2 (the duplicate) is also out of order.
        assert!(!report.clean());
    }

    #[test]
    fn a_wrong_head_a_500_and_a_stray_dead_letter_fail_their_invariants() {
        let (mut ledger, mut obs) = clean();
        obs.heads[0].definition = Some(json!({"nodes": {}, "edges": []}));
        ledger.answers.push(Answer {
            at: SystemTime::now(),
            kind: "run",
            status: 500,
            retry_after: false,
        });
        ledger.answers.push(Answer {
            at: SystemTime::now(),
            kind: "run",
            status: 503,
            retry_after: false,
        });
        let mut stray = obs.dead_letters[0].clone();
        stray.event.source_offset = 8;
        obs.dead_letters.push(stray);
        obs.runs[0].1 = "running".into();
        let (limits, budget) = limits();
        let report = verify(&ledger, &obs, &limits, &budget);
        let failing = failing(&report);
        for name in [
            "every head equals an independent fold of its applied patches",
            "the gateway answered only 2xx, the 4xx sent on purpose, or 503 with Retry-After",
            "the DLQ holds exactly the poison records sent on purpose",
            "every run requested with 202 reaches a terminal state",
        ] {
            assert!(failing.contains(&name), "{name}: {report:#?}");
        }
        let answers = report
            .invariants
            .iter()
            .find(|i| i.name.starts_with("the gateway answered"))
            .unwrap();
        assert!(
            answers.detail.starts_with("2 of 6 wrong"),
            "{}",
            answers.detail
        );
    }
}
