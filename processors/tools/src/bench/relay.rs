//! `weir bench relay --events N --relays R --json`: the relay's throughput with one relay
//! killed during the run, and the proof that per-key order survived it.
//!
//! 1. N rows are COPYed into `weir_outbox` for a fresh topic (6 partitions) under a random
//!    name, over `N / 100` keys (at least 1, at most 10,000); each payload carries the row's
//!    global index, its key and its sequence number within the key.
//! 2. R relays start (each its own producer and Postgres session, as separate processes would
//!    have). When a third of the events has reached Kafka, relay 0 is aborted (its session
//!    closes mid-whatever, its lanes free up) and a replacement starts.
//! 3. `seconds` runs from the relays' start until no row of the topic is left in the outbox:
//!    every event acknowledged by the broker and deleted (`published_seconds`: until the
//!    consumer below had read every event back).
//! 4. A consumer reads the topic from the beginning (concurrently) and checks, per key, that
//!    the FIRST occurrences of the events come in sequence order (`order_violations`), counts
//!    re-publications (`duplicates`) and events never seen (`missing`).
//!
//! A running deployment is left alone: the rows go to a [`PrivateOutbox`] (its own schema
//! with its own `weir_outbox`, `weir_relays` and lane-lock namespace, dropped at the end), so
//! the deployment's relays never see them and the benchmark's relays never take the
//! deployment's lanes. `deployment_relays` reports how many live relays of the deployment
//! ran beside it (they compete for the machine, not for the rows).
//!
//! Each of `repeat` repetitions starts from a state of its own making: a new private outbox
//! with autovacuum off (an autovacuum of the freshly loaded table would otherwise start at a
//! random moment of some runs), a new topic, and before the COPY a checkpoint and an OS
//! `sync` (see [`super::common::settle`]): the WAL and dirty pages of whatever ran before
//! (another benchmark, the previous repetition) are written before, not during, the run. The
//! COPY comes after the checkpoint, so deleting its rows writes no full-page images. The
//! result is the first repetition's fields with each figure's median, and the spread and
//! targets over the repetitions.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_runtime::config::Config;
use weir_runtime::outbox::lane_of;
use weir_runtime::telemetry::Health;

use super::common::{own_maintenance, settle, summarize, topics_left, Figure};
use crate::common::own_outbox;
use crate::private::PrivateOutbox;
use weir_relay::{Relay, RelayError};

/// Partitions of the benchmark topic.
const PARTITIONS: i32 = 6;
/// Bytes of each event's payload (index, key, sequence, then filler).
const PAYLOAD_BYTES: usize = 128;
/// Rows per COPY chunk sent to Postgres.
const COPY_CHUNK: usize = 20_000;

/// The figures summarized over repetitions, with their targets.
pub const FIGURES: [Figure; 6] = [
    Figure::higher("/events_per_sec").target(50_000.0),
    Figure::lower("/order_violations").target(0.0),
    Figure::lower("/missing").target(0.0),
    Figure::lower("/duplicates"),
    Figure::lower("/seconds"),
    Figure::lower("/published_seconds"),
];

/// Runs the benchmark against the stack `cfg` points at (migrations applied) and returns
/// `{"events","relays","seconds","events_per_sec","order_violations","duplicates","missing",..}`.
pub async fn run(
    cfg: Arc<Config>,
    events: usize,
    relays: usize,
    repeat: usize,
) -> anyhow::Result<serde_json::Value> {
    anyhow::ensure!(events > 0, "--events must be at least 1");
    anyhow::ensure!(relays > 0, "--relays must be at least 1");
    let deployment = weir_runtime::db::pool(&cfg.postgres)?;
    let migrated: bool =
        sqlx::query_scalar("SELECT to_regclass('weir_relays') IS NOT NULL AS migrated")
            .fetch_one(&deployment)
            .await
            .context("connecting to Postgres")?;
    anyhow::ensure!(migrated, "the relay tables are missing: run `weir migrate`");
    // Live relays of the deployment, left alone: reported with the result.
    let deployment_relays: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_relays r
         WHERE seen_at > now() - interval '10 seconds'
           AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = r.pid)",
    )
    .fetch_one(&deployment)
    .await?;
    deployment.close().await;
    let mut reps = Vec::new();
    for rep in 1..=repeat.max(1) {
        let private = own_outbox(&cfg, "bench_relay").await?;
        let result = measure(cfg.clone(), &private, events, relays, deployment_relays).await;
        if let Err(e) = private.drop_all().await {
            tracing::warn!(error = %e, "dropping the benchmark's own outbox");
        }
        let mut result = result?;
        result["repetition"] = serde_json::json!(rep);
        eprintln!(
            "repetition {rep}: {:.0} events/s, {} order violations, {} duplicates, {} missing",
            result["events_per_sec"].as_f64().unwrap_or_default(),
            result["order_violations"],
            result["duplicates"],
            result["missing"]
        );
        reps.push(result);
    }
    Ok(summarize(reps, &FIGURES))
}

/// One measured run in the private outbox.
async fn measure(
    cfg: Arc<Config>,
    private: &PrivateOutbox,
    events: usize,
    relays: usize,
    deployment_relays: i64,
) -> anyhow::Result<serde_json::Value> {
    let pool = private.pool().clone();
    let namespace = private.namespace();

    let run = uuid::Uuid::now_v7().simple().to_string();
    let topic = format!("{}weir.bench.relay.{run}", cfg.kafka.topic_prefix);
    create_topic(&cfg, &topic).await?;
    let keys = (events / 100).clamp(1, 10_000);
    own_maintenance(
        &pool,
        private.schema(),
        &["weir_outbox", "weir_outbox_dead", "weir_relays"],
    )
    .await?;
    let start_state = settle(&pool, &["weir_outbox"], "before the COPY").await?;
    let (lo, hi) = insert(&pool, &topic, events, keys, cfg.outbox.lanes).await?;

    let check = Arc::new(std::sync::Mutex::new(OrderCheck::new(events, keys)));
    let distinct = Arc::new(AtomicUsize::new(0));
    let stop_consumer = CancellationToken::new();
    // Whatever way this function returns, its consumer and relays stop.
    let _stop_consumer_on_return = stop_consumer.clone().drop_guard();
    let consumer = tokio::spawn(consume(
        cfg.clone(),
        topic.clone(),
        check.clone(),
        distinct.clone(),
        stop_consumer.clone(),
    ));

    let shutdown = CancellationToken::new();
    let _stop_relays_on_return = shutdown.clone().drop_guard();
    let started = Instant::now();
    let mut handles: Vec<JoinHandle<Result<(), RelayError>>> = (0..relays)
        .map(|i| {
            spawn_relay(
                &cfg,
                &pool,
                namespace,
                format!("bench-{run}-{i}"),
                &shutdown,
            )
        })
        .collect::<anyhow::Result<_>>()?;
    let limit = Duration::from_secs(60 + (events / 2_000) as u64);

    // Kill relay 0 when a third of the events reached Kafka.
    let mut killed_after = None;
    while started.elapsed() < limit {
        let seen = distinct.load(Ordering::Relaxed);
        if seen >= events / 3 {
            let replacement =
                spawn_relay(&cfg, &pool, namespace, format!("bench-{run}-r"), &shutdown)?;
            if let Some(first) = handles.first_mut() {
                first.abort();
                let old = std::mem::replace(first, replacement);
                // An aborted task ends with a cancellation error: expected.
                let _ = old.await;
            }
            killed_after = Some(seen);
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    // Published: the consumer has read every event back. Only then poll Postgres (a scan of
    // the outbox while it is being drained would compete with the relays).
    let mut published_seconds = None;
    while started.elapsed() < limit {
        if distinct.load(Ordering::Relaxed) >= events {
            published_seconds = Some(started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Drained: no row of the topic left, i.e. every event acknowledged and deleted.
    let mut seconds = None;
    while started.elapsed() < limit {
        let left: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM weir_outbox WHERE id BETWEEN $1 AND $2 AND topic = $3)",
        )
        .bind(lo)
        .bind(hi)
        .bind(&topic)
        .fetch_one(&pool)
        .await?;
        if !left {
            seconds = Some(started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "bench relay failed"),
            Err(e) => tracing::warn!(error = %e, "bench relay task"),
        }
    }
    let seconds = seconds
        .with_context(|| format!("the relays did not drain {events} events within {limit:?}"))?;

    // Everything was acknowledged; give the consumer time to read it all.
    let read_by = Instant::now() + Duration::from_secs(30);
    while distinct.load(Ordering::Relaxed) < events && Instant::now() < read_by {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_consumer.cancel();
    consumer.await.context("bench consumer task")??;
    let check = check.lock().unwrap_or_else(|p| p.into_inner()).clone();
    weir_runtime::kafka::delete_topics(&cfg.kafka, std::slice::from_ref(&topic)).await?;
    let topics_left = topics_left(&cfg, &topic, Duration::from_secs(10)).await?;

    Ok(serde_json::json!({
        "events": events,
        "relays": relays,
        "seconds": seconds,
        "published_seconds": published_seconds,
        "events_per_sec": events as f64 / seconds.max(1e-9),
        "order_violations": check.violations,
        "duplicates": check.duplicates,
        "missing": events - check.distinct,
        "killed_after_events": killed_after,
        "deployment_relays": deployment_relays,
        "keys": keys,
        "lanes": cfg.outbox.lanes,
        "batch_size": cfg.relay.batch_size,
        "partitions": PARTITIONS,
        "topic": topic,
        "topics_left": topics_left.len(),
        "start_state": start_state,
    }))
}

fn spawn_relay(
    cfg: &Arc<Config>,
    pool: &PgPool,
    namespace: i32,
    relay_id: String,
    shutdown: &CancellationToken,
) -> anyhow::Result<JoinHandle<Result<(), RelayError>>> {
    let producer = weir_relay::producer(&cfg.kafka)?;
    let relay = Relay::new(
        cfg.clone(),
        pool.clone(),
        producer,
        Health::default(),
        relay_id,
    )
    .with_lock_namespace(namespace);
    Ok(tokio::spawn(relay.run(shutdown.clone())))
}

async fn create_topic(cfg: &Config, topic: &str) -> anyhow::Result<()> {
    let admin = weir_runtime::kafka::admin(&cfg.kafka)?;
    let new = NewTopic::new(
        topic,
        PARTITIONS,
        TopicReplication::Fixed(cfg.kafka.replication_factor),
    );
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics([&new], &opts).await? {
        r.map_err(|(t, code)| anyhow::anyhow!("creating topic {t}: {code}"))?;
    }
    Ok(())
}

/// The payload of event `index`: index, key, sequence within the key, then filler.
pub fn payload(index: u64, key: u32, seq: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(PAYLOAD_BYTES);
    p.extend_from_slice(&index.to_be_bytes());
    p.extend_from_slice(&key.to_be_bytes());
    p.extend_from_slice(&seq.to_be_bytes());
    p.resize(PAYLOAD_BYTES, 0xab);
    p
}

/// COPYs the events (ids in index order, so per key in sequence order); returns the id range.
async fn insert(
    pool: &PgPool,
    topic: &str,
    events: usize,
    keys: usize,
    lanes: i32,
) -> anyhow::Result<(i64, i64)> {
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw("COPY weir_outbox (lane, topic, key, payload, headers) FROM STDIN")
        .await?;
    let mut buf = Vec::with_capacity(COPY_CHUNK * (2 * PAYLOAD_BYTES + 128));
    for index in 0..events {
        let key = (index % keys) as u32;
        let seq = (index / keys) as u32;
        let key_bytes = format!("bench-key-{key}").into_bytes();
        let lane = lane_of(&key_bytes, lanes);
        let event_id = uuid::Uuid::now_v7();
        // COPY text format: tab-separated; `\\x` is bytea hex after COPY's own unescaping.
        let line = format!(
            "{lane}\t{topic}\t\\\\x{}\t\\\\x{}\t{{\"event_id\":\"{event_id}\"}}\n",
            hex::encode(&key_bytes),
            hex::encode(payload(index as u64, key, seq)),
        );
        buf.extend_from_slice(line.as_bytes());
        if (index + 1) % COPY_CHUNK == 0 {
            copy.send(std::mem::take(&mut buf)).await?;
        }
    }
    if !buf.is_empty() {
        copy.send(buf).await?;
    }
    let rows = copy.finish().await?;
    anyhow::ensure!(
        rows as usize == events,
        "COPY wrote {rows} of {events} rows"
    );
    let (lo, hi): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT min(id), max(id) FROM weir_outbox WHERE topic = $1")
            .bind(topic)
            .fetch_one(&mut *conn)
            .await?;
    Ok((lo.unwrap_or(0), hi.unwrap_or(0)))
}

async fn consume(
    cfg: Arc<Config>,
    topic: String,
    check: Arc<std::sync::Mutex<OrderCheck>>,
    distinct: Arc<AtomicUsize>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let group = format!("weir-bench-relay-{}", uuid::Uuid::now_v7().simple());
    let consumer: StreamConsumer =
        weir_runtime::kafka::consumer_config(&cfg.kafka, &group, 60_000).create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = consumer.recv() => m,
        };
        match msg {
            Ok(m) => {
                let mut c = check.lock().unwrap_or_else(|p| p.into_inner());
                c.observe(m.payload().unwrap_or_default());
                distinct.store(c.distinct, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "bench consumer");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Checks per-key order of the first occurrences of events in one topic.
#[derive(Debug, Clone)]
pub struct OrderCheck {
    seen: Vec<bool>,
    /// Per key: the sequence number of the latest first occurrence, if any.
    last_first: Vec<Option<u32>>,
    /// Events seen at least once.
    pub distinct: usize,
    /// Occurrences after the first.
    pub duplicates: usize,
    /// First occurrences whose sequence is below an earlier first occurrence of the same key.
    pub violations: usize,
    /// Payloads that do not belong to this run.
    pub foreign: usize,
}

impl OrderCheck {
    /// A check of `events` events over `keys` keys.
    pub fn new(events: usize, keys: usize) -> Self {
        Self {
            seen: vec![false; events],
            last_first: vec![None; keys],
            distinct: 0,
            duplicates: 0,
            violations: 0,
            foreign: 0,
        }
    }

    /// Records one consumed payload (see [`payload`]).
    pub fn observe(&mut self, payload: &[u8]) {
        let parsed = (|| {
            let index = u64::from_be_bytes(payload.get(0..8)?.try_into().ok()?);
            let key = u32::from_be_bytes(payload.get(8..12)?.try_into().ok()?);
            let seq = u32::from_be_bytes(payload.get(12..16)?.try_into().ok()?);
            Some((usize::try_from(index).ok()?, key as usize, seq))
        })();
        let Some((index, key, seq)) = parsed else {
            self.foreign += 1;
            return;
        };
        if index >= self.seen.len() || key >= self.last_first.len() {
            self.foreign += 1;
            return;
        }
        if self.seen[index] {
            self.duplicates += 1;
            return;
        }
        self.seen[index] = true;
        self.distinct += 1;
        match self.last_first[key] {
            Some(last) if seq < last => self.violations += 1,
            _ => self.last_first[key] = Some(seq),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_check_counts_first_occurrences_only() {
        let mut c = OrderCheck::new(6, 2);
        // key 0: seq 0 (index 0), 1 (index 2), 2 (index 4); key 1: index 1, 3, 5.
        for i in [0u64, 2, 0, 4] {
            c.observe(&payload(i, 0, (i / 2) as u32));
        }
        assert_eq!((c.distinct, c.duplicates, c.violations), (3, 1, 0));
        // key 1 out of order: seq 1 first, then seq 0.
        c.observe(&payload(3, 1, 1));
        c.observe(&payload(1, 1, 0));
        assert_eq!(c.violations, 1);
        c.observe(b"short");
        c.observe(&payload(99, 0, 0));
        assert_eq!(c.foreign, 2);
        assert_eq!(c.distinct, 5);
    }

    #[test]
    fn payload_has_the_fixed_size() {
        assert_eq!(payload(1, 2, 3).len(), PAYLOAD_BYTES);
    }
}
