//! The batch consumer: the one way every weir processor reads Kafka.
//!
//! A batch is up to `runtime.max_batch` records, gathered for at most `runtime.max_wait_ms`
//! after the first one arrives (a processor may set its own, see [`Processor::max_batch`]).
//! With the default wait of 0 a batch is what librdkafka has already fetched: nothing waits
//! on a timer when the pipeline is idle, and under load the records that arrive while one
//! batch is applied make the next one, so batches grow with the load.
//! Each batch is applied in ONE Postgres transaction that also (a) locks and advances the
//! consumer positions of its partitions and (b) writes the processor's outbox rows.
//! Invariants:
//!
//! - Effectively once: a record whose offset is below the stored position was applied
//!   already and is skipped; positions move only in the transaction that applied the records.
//!   Two consumers that both believe they own a partition serialize on the position row lock,
//!   and the second one sees the advanced position.
//! - Positions are the truth: a newly assigned partition is paused until it has been sought
//!   to the next offset stored in Postgres (the beginning if none is stored), so a database
//!   restored behind Kafka re-applies what it lost instead of skipping it, and a Kafka
//!   committed offset behind Postgres costs no redelivery.
//! - Kafka offsets are stored only after the commit and only report lag.
//! - Per-partition order: records are handed to the processor in offset order per partition.
//! - Poison records (undecodable, unknown schema, rejected by the processor, or a record that
//!   makes the batch fail with a data error) go to the dead-letter topic with their original
//!   bytes; the batch carries on. Dead letters are acknowledged by the broker before the
//!   transaction commits (at least once into the DLQ; its headers carry the coordinates).
//! - One bad record costs one record: a batch that fails on a data error is bisected (halves
//!   tried in offset order, recursively), so the good records still commit in batches and k
//!   poison records in n cost O(k log n) transactions, not n ([`Bisection`]).
//! - Transient failures roll the batch back and retry it with capped exponential backoff;
//!   nothing new is read meanwhile, which is the backpressure. A failure that only looks
//!   transient ([`ApplyError::is_suspect`]) is retried `runtime.suspect_retries` times and
//!   then bisected like a data error, so no record can stop its partitions forever.
//! - No batch straddles a revoke: records of a partition revoked while a batch was being
//!   gathered are dropped from it before it is applied.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use sqlx::{PgConnection, PgPool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::codec::Codec;
use crate::config::Config;
use crate::error::{
    ApplyError, Classify as _, ConsumerError, Coordinates, Disposition, RuntimeError,
};
use crate::events::{new_event, DeadLetter, Envelope, Header as DeadLetterHeader, TopicEvent};
use crate::metrics as m;
use crate::outbox::Outbox;
use crate::telemetry::Health;

/// One decoded record handed to a processor.
#[derive(Debug, Clone)]
pub struct Record<E> {
    /// Where it came from (the idempotency key).
    pub coords: Coordinates,
    /// Kafka key.
    pub key: Option<Vec<u8>>,
    /// Broker timestamp in ms, if any.
    pub timestamp_ms: Option<i64>,
    /// The decoded event.
    pub event: E,
}

/// A record the processor refuses as invalid: dead-lettered, its effects not applied.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Index into the slice given to [`Processor::apply`].
    pub index: usize,
    /// Why, for the dead letter.
    pub reason: String,
}

/// What a processor implements: how one batch changes Postgres.
#[async_trait]
pub trait Processor: Send + Sync + 'static {
    /// The events of the topic it consumes.
    type Event: TopicEvent;

    /// Consumer group; also the owner of the positions in Postgres.
    fn group(&self) -> String;

    /// Applies `records` (in partition order) inside the batch transaction on `conn`, pushing
    /// output events to `outbox`. Returns the records it rejects as invalid; their effects
    /// must not have been written. An error rolls the whole batch back.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<Self::Event>],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError>;

    /// librdkafka settings this processor's consumers start from, over weir's defaults and
    /// under `kafka.consumer` from the configuration. None by default; a throughput-bound
    /// processor may offer a setting of its own to trade a few milliseconds of fetch delay
    /// for fewer, larger fetches.
    fn consumer_defaults(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// This processor's own cap on records per batch, if it has one; else
    /// `runtime.max_batch`.
    fn max_batch(&self) -> Option<usize> {
        None
    }

    /// This processor's own wait for more records once a batch has its first, in ms, if it
    /// has one; else `runtime.max_wait_ms`.
    fn max_wait_ms(&self) -> Option<u64> {
        None
    }
}

/// A record as read from Kafka, before decoding.
#[derive(Debug, Clone)]
struct Raw {
    coords: Coordinates,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    headers: Vec<(String, Option<Vec<u8>>)>,
    timestamp_ms: Option<i64>,
    /// Rebalance generation when it was received.
    generation: u64,
}

#[derive(Default)]
struct RebalanceLog {
    generation: u64,
    /// Partition → generation of its latest revoke, assignment or seek: records of the
    /// partition received before it are stale and dropped from a batch.
    fenced_at: HashMap<i32, u64>,
    /// Partitions assigned and paused, not yet sought to their position in Postgres.
    unpositioned: BTreeSet<i32>,
    assigned: usize,
}

/// librdkafka callbacks: rebalances (recorded for the loop) and statistics (lag gauges).
struct Ctx {
    group: String,
    log: Arc<Mutex<RebalanceLog>>,
    /// Wakes the loop out of a wait for records when partitions were assigned: they are
    /// paused until the loop seeks them, and may be all it has.
    wake: Arc<Notify>,
}

impl Ctx {
    fn lock(&self) -> std::sync::MutexGuard<'_, RebalanceLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ClientContext for Ctx {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in stats.topics {
            for (partition, p) in t.partitions {
                if partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!(m::CONSUMER_LAG, "group" => self.group.clone(),
                        "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut log = self.lock();
        log.generation += 1;
        let generation = log.generation;
        if let Rebalance::Revoke(tpl) = rebalance {
            metrics::counter!(m::REBALANCES, "group" => self.group.clone(), "kind" => "revoke")
                .increment(1);
            for e in tpl.elements() {
                log.fenced_at.insert(e.partition(), generation);
                log.unpositioned.remove(&e.partition());
            }
            log.assigned = log.assigned.saturating_sub(tpl.count());
            info!(group = %self.group, partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut log = self.lock();
        log.generation += 1;
        let generation = log.generation;
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!(m::REBALANCES, "group" => self.group.clone(), "kind" => "assign")
                    .increment(1);
                log.assigned += tpl.count();
                // Kafka starts the partitions at its committed offsets; Postgres decides.
                // SQL cannot run in this callback, so the loop seeks them (seek_to_positions)
                // and resumes them; until then nothing is fetched from them.
                if let Err(e) = consumer.pause(tpl) {
                    warn!(group = %self.group, error = %e, "pausing assigned partitions");
                }
                for e in tpl.elements() {
                    log.fenced_at.insert(e.partition(), generation);
                    log.unpositioned.insert(e.partition());
                }
                self.wake.notify_one();
                info!(group = %self.group, partitions = tpl.count(), "partitions assigned");
            }
            Rebalance::Error(e) => {
                metrics::counter!(m::REBALANCES, "group" => self.group.clone(), "kind" => "error")
                    .increment(1);
                warn!(group = %self.group, error = %e, "rebalance error");
            }
            Rebalance::Revoke(_) => {}
        }
        metrics::gauge!(m::ASSIGNED_PARTITIONS, "group" => self.group.clone())
            .set(log.assigned as f64);
    }
}

/// A dead letter to send: the raw record and why.
struct Poison<'a> {
    raw: &'a Raw,
    class: &'static str,
    message: String,
}

/// What a committed batch did.
#[derive(Debug, Default)]
struct Outcome {
    applied: usize,
    duplicates: usize,
    dead: usize,
    next: BTreeMap<i32, i64>,
}

/// Runs one processor against its topic until shutdown.
pub struct BatchConsumer<P: Processor> {
    cfg: Arc<Config>,
    processor: Arc<P>,
    pool: PgPool,
    codec: Arc<Codec>,
    producer: FutureProducer,
    health: Health,
    group: String,
    topic: String,
    dlq_topic: String,
}

/// Records of `topic` that `group` has applied (or dead-lettered): the sum of its stored next
/// offsets, which move in the same transaction as the effects. A few rows, cheap to poll.
pub async fn applied_records(pool: &PgPool, group: &str, topic: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar!(
        r#"SELECT coalesce(sum(next_offset), 0)::int8 AS "n!" FROM weir_consumer_positions
           WHERE consumer_group = $1 AND topic = $2"#,
        group,
        topic
    )
    .fetch_one(pool)
    .await
}

impl<P: Processor> BatchConsumer<P> {
    /// Prepares a consumer; nothing connects until [`BatchConsumer::run`].
    pub fn new(
        cfg: Arc<Config>,
        processor: Arc<P>,
        pool: PgPool,
        codec: Arc<Codec>,
        producer: FutureProducer,
        health: Health,
    ) -> Self {
        let group = processor.group();
        let topic = codec.topic::<P::Event>();
        let dlq_topic = codec.topic::<DeadLetter>();
        Self {
            cfg,
            processor,
            pool,
            codec,
            producer,
            health,
            group,
            topic,
            dlq_topic,
        }
    }

    /// Consumes until `shutdown` is cancelled; then the in-flight batch commits or rolls back
    /// (bounded by `runtime.shutdown_deadline_ms`), offsets are committed and the consumer
    /// leaves its group.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let log = Arc::new(Mutex::new(RebalanceLog::default()));
        let wake = Arc::new(Notify::new());
        let ctx = Ctx {
            group: self.group.clone(),
            log: log.clone(),
            wake: wake.clone(),
        };
        let defaults = self.processor.consumer_defaults();
        let defaults: Vec<(&str, &str)> = defaults.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let consumer: StreamConsumer<Ctx> = crate::kafka::consumer_config_with(
            &self.cfg.kafka,
            &self.group,
            self.cfg.telemetry.stats_interval_ms,
            &defaults,
        )
        .create_with_context(ctx)?;
        let component = self.component();
        self.health.register(&component);
        self.wait_until_ready(&consumer, &shutdown).await?;
        consumer.subscribe(&[&self.topic])?;
        m::register_consumer(&self.group, &self.topic);
        self.health.set(&component, true);
        info!(group = %self.group, topic = %self.topic, "consuming");

        let mut seek_failures = 0u32;
        while !shutdown.is_cancelled() {
            let retry_seek = self
                .seek_to_positions(&consumer, &log, &mut seek_failures)
                .await;
            let batch = tokio::select! {
                _ = shutdown.cancelled() => break,
                b = self.gather(&consumer, &log, &wake, retry_seek) => b,
            };
            if batch.is_empty() {
                continue;
            }
            self.process(&consumer, batch, &shutdown).await?;
        }

        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit, or the group is gone: lag only.
            debug!(error = %e, "final offset commit");
        }
        consumer.unsubscribe();
        self.health.set(&component, false);
        info!(group = %self.group, "consumer stopped");
        Ok(())
    }

    /// Waits until Postgres answers and the topic exists, retrying with backoff, so a
    /// process started before its dependencies comes up by itself.
    async fn wait_until_ready(
        &self,
        consumer: &StreamConsumer<Ctx>,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        let mut attempt = 0u32;
        loop {
            let pg = sqlx::query_scalar!("SELECT 1 AS \"one!\"")
                .fetch_one(&self.pool)
                .await;
            let md = consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(5));
            let problem = match (&pg, &md) {
                (Err(e), _) => Some(format!("postgres: {e}")),
                (_, Err(e)) => Some(format!("kafka: {e}")),
                (_, Ok(md)) => match md.topics().first() {
                    Some(t) if t.error().is_none() && !t.partitions().is_empty() => None,
                    _ => Some(format!(
                        "topic {} does not exist (run `weir topics create`)",
                        self.topic
                    )),
                },
            };
            let Some(problem) = problem else {
                return Ok(());
            };
            attempt += 1;
            warn!(group = %self.group, %problem, attempt, "waiting for dependencies");
            tokio::select! {
                _ = tokio::time::sleep(self.backoff(attempt)) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.cfg.runtime.backoff(attempt)
    }

    /// This consumer's name in the health registry (`/readyz`).
    fn component(&self) -> String {
        format!("consumer {}", self.group)
    }

    /// Seeks every newly assigned (paused) partition to the next offset stored in Postgres,
    /// or to the beginning when none is stored, and resumes it. Returns `None` when none is
    /// left unpositioned, else how long to wait before trying again: a partition whose
    /// fetcher has not started yet (librdkafka answers the seek with a state error until it
    /// has looked up the committed offset) is tried again shortly, Postgres being down with
    /// backoff. Meanwhile the loop keeps polling (rebalances are served only while polling),
    /// and records of unpositioned partitions are dropped from batches.
    async fn seek_to_positions(
        &self,
        consumer: &StreamConsumer<Ctx>,
        log: &Arc<Mutex<RebalanceLog>>,
        failures: &mut u32,
    ) -> Option<Duration> {
        let pending: Vec<i32> = {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.unpositioned.iter().copied().collect()
        };
        if pending.is_empty() {
            *failures = 0;
            return None;
        }
        let stored = sqlx::query!(
            r#"SELECT partition, next_offset FROM weir_consumer_positions
               WHERE consumer_group = $1 AND topic = $2 AND partition = ANY($3::int[])"#,
            &self.group,
            &self.topic,
            &pending,
        )
        .fetch_all(&self.pool)
        .await;
        let rows = match stored {
            Ok(rows) => rows,
            Err(e) => {
                *failures += 1;
                warn!(group = %self.group, error = %e, attempt = *failures,
                    "reading consumer positions; assigned partitions stay paused");
                return Some(self.backoff(*failures));
            }
        };
        let stored: HashMap<i32, i64> = rows
            .into_iter()
            .map(|r| (r.partition, r.next_offset))
            .collect();
        let mut positioned = TopicPartitionList::new();
        // The Postgres positions are also stored for Kafka's next commit: a partition taken
        // over from a process that died before its last auto-commit would otherwise report
        // the records it applied as lag until a new record arrives (forever, if none does).
        let mut report = TopicPartitionList::new();
        let mut left = 0usize;
        for p in pending {
            let offset = stored
                .get(&p)
                .map_or(Offset::Beginning, |n| Offset::Offset(*n));
            match consumer.seek(&self.topic, p, offset, Duration::from_secs(5)) {
                Ok(()) => {
                    debug!(group = %self.group, partition = p, ?offset,
                        "partition positioned from Postgres");
                    positioned.add_partition(&self.topic, p);
                    if matches!(offset, Offset::Offset(_)) {
                        let _ = report.add_partition_offset(&self.topic, p, offset);
                    }
                }
                Err(e) => {
                    debug!(group = %self.group, partition = p, error = %e,
                        "seek not possible yet");
                    left += 1;
                }
            }
        }
        {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.generation += 1;
            let generation = log.generation;
            for e in positioned.elements() {
                log.unpositioned.remove(&e.partition());
                log.fenced_at.insert(e.partition(), generation);
            }
        }
        if report.count() > 0 {
            if let Err(e) = consumer.store_offsets(&report) {
                // Lag reporting only: the positions in Postgres decide.
                debug!(group = %self.group, error = %e, "storing positions for Kafka");
            }
        }
        if positioned.count() > 0 {
            if let Err(e) = consumer.resume(&positioned) {
                warn!(group = %self.group, error = %e, "resuming partitions");
            }
        }
        *failures = 0;
        (left > 0).then_some(Duration::from_millis(50))
    }

    /// Gathers one batch: waits for the first record, then takes more for at most
    /// `max_wait_ms` or until `max_batch`. Drops records of partitions revoked meanwhile.
    /// With `retry_seek`, stops waiting for a first record after that long, so that
    /// partitions still waiting for their seek get it (nothing received is ever dropped for
    /// it: an empty batch is returned only before the first record).
    async fn gather(
        &self,
        consumer: &StreamConsumer<Ctx>,
        log: &Arc<Mutex<RebalanceLog>>,
        wake: &Notify,
        retry_seek: Option<Duration>,
    ) -> Vec<Raw> {
        let max = self
            .processor
            .max_batch()
            .unwrap_or(self.cfg.runtime.max_batch)
            .max(1);
        let mut batch = Vec::new();
        let mut deadline = None;
        while batch.len() < max {
            // An assignment ends the gathering: its partitions wait paused for their seek.
            let received = match deadline {
                None => tokio::select! {
                    r = consumer.recv() => r,
                    _ = wake.notified() => break,
                    _ = tokio::time::sleep(retry_seek.unwrap_or_default()), if retry_seek.is_some() => break,
                },
                Some(d) => tokio::select! {
                    biased;
                    r = consumer.recv() => r,
                    _ = wake.notified() => break,
                    _ = tokio::time::sleep_until(d) => break,
                },
            };
            match received {
                Ok(msg) => {
                    let generation = log.lock().unwrap_or_else(|p| p.into_inner()).generation;
                    let headers = msg
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|Header { key, value }| {
                                    (key.to_string(), value.map(<[u8]>::to_vec))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    batch.push(Raw {
                        coords: Coordinates {
                            topic: msg.topic().to_string(),
                            partition: msg.partition(),
                            offset: msg.offset(),
                        },
                        key: msg.key().map(<[u8]>::to_vec),
                        payload: msg.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp_ms: msg.timestamp().to_millis(),
                        generation,
                    });
                    deadline.get_or_insert_with(|| {
                        let wait = self
                            .processor
                            .max_wait_ms()
                            .unwrap_or(self.cfg.runtime.max_wait_ms);
                        tokio::time::Instant::now() + Duration::from_millis(wait)
                    });
                }
                Err(e) => {
                    // librdkafka reconnects by itself; errors here are informational.
                    warn!(group = %self.group, error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if !batch.is_empty() {
                        break;
                    }
                }
            }
        }
        let log = log.lock().unwrap_or_else(|p| p.into_inner());
        batch.retain(|r| {
            !log.unpositioned.contains(&r.coords.partition)
                && log
                    .fenced_at
                    .get(&r.coords.partition)
                    .is_none_or(|fenced| r.generation >= *fenced)
        });
        batch
    }

    /// Applies a batch, retrying transient failures, bisecting it when a record breaks it.
    async fn process(
        &self,
        consumer: &StreamConsumer<Ctx>,
        batch: Vec<Raw>,
        shutdown: &CancellationToken,
    ) -> Result<(), RuntimeError> {
        let mut plan = Bisection::new(batch.len());
        // Set while readiness is down for retries; any later commit, of whichever piece,
        // brings it back (a piece bisected after its retries never commits itself).
        let mut unready = false;
        while let Some(piece) = plan.next_piece() {
            let part = &batch[piece.start..piece.end];
            let mut attempt = 0u32;
            let mut suspect = 0u32;
            loop {
                let first = &part[0].coords;
                let span = info_span!("batch",
                    messaging.system = "kafka",
                    messaging.consumer.group.name = %self.group,
                    messaging.destination.name = %first.topic,
                    messaging.destination.partition.id = first.partition,
                    messaging.kafka.offset = first.offset,
                    messaging.batch.message_count = part.len() as i64,
                    otel.kind = "consumer",
                    trace_id = tracing::field::Empty,
                    span_id = tracing::field::Empty);
                // With export on: a child of the first sampled record context, linked to all.
                crate::trace::start_batch_span(
                    &span,
                    part.iter()
                        .filter_map(|r| crate::trace::header_context(&r.headers)),
                );
                let deadline = Duration::from_millis(self.cfg.runtime.shutdown_deadline_ms);
                let attempt_result = tokio::select! {
                    r = self.try_batch(part, piece.forced.as_deref()).instrument(span) => r,
                    _ = async { shutdown.cancelled().await; tokio::time::sleep(deadline).await } => {
                        warn!(group = %self.group, "shutdown deadline passed; batch rolled back");
                        return Ok(());
                    }
                };
                let e = match attempt_result {
                    Ok(outcome) => {
                        self.after_commit(consumer, outcome);
                        if unready {
                            self.health.set(&self.component(), true);
                            unready = false;
                        }
                        break;
                    }
                    Err(e) => e,
                };
                let mut disposition = e.disposition();
                // A dead-lettering attempt applies nothing of the processor's: a suspect error
                // there is the environment's, so it is retried, never bisected into Fatal.
                if piece.forced.is_none() && disposition == Disposition::Retry && e.is_suspect() {
                    suspect += 1;
                    if suspect > self.cfg.runtime.suspect_retries {
                        warn!(group = %self.group, first = %first, error = %e, suspect,
                            "batch keeps failing on an error its content may cause; bisecting it");
                        disposition = Disposition::DeadLetter;
                    }
                }
                match disposition {
                    Disposition::Retry => {
                        attempt += 1;
                        if attempt == UNREADY_AFTER_RETRIES && !unready {
                            unready = true;
                            // Postgres down, credentials rotated, a failover: not ready until
                            // a batch commits again, so a load balancer or an orchestrator
                            // sees it (the process itself keeps retrying).
                            self.health.set(&self.component(), false);
                        }
                        metrics::counter!(m::BATCH_RETRIES, "group" => self.group.clone())
                            .increment(1);
                        warn!(group = %self.group, first = %first, error = %e, attempt, "batch failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(self.backoff(attempt)) => {}
                            _ = shutdown.cancelled() => return Ok(()),
                        }
                    }
                    Disposition::DeadLetter if piece.forced.is_none() => {
                        if part.len() > 1 {
                            metrics::counter!(m::BATCH_SPLITS, "group" => self.group.clone())
                                .increment(1);
                            warn!(group = %self.group, first = %first, records = part.len(), error = %e,
                                "batch failed on a data error; bisecting it");
                        }
                        plan.failed(piece, e.to_string());
                        break;
                    }
                    // A dead-lettering attempt applies nothing of the processor's; failing
                    // on data there is weir's bug.
                    Disposition::DeadLetter | Disposition::Fatal => {
                        error!(group = %self.group, first = %first, error = %e, "batch failed fatally");
                        return Err(RuntimeError::FatalBatch {
                            first: first.clone(),
                            source: e,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// One attempt at one batch. `forced` dead-letters every record with that reason (used
    /// for a single record that makes the processor fail with a data error).
    async fn try_batch(&self, batch: &[Raw], forced: Option<&str>) -> Result<Outcome, ApplyError> {
        // Decode outside the transaction: schema lookups may hit the network.
        let mut decoded = Vec::with_capacity(batch.len());
        for raw in batch {
            let result = match (&raw.payload, forced) {
                (_, Some(reason)) => Err(("apply", reason.to_string())),
                (None, None) => Err(("framing", "empty value (tombstone)".to_string())),
                (Some(bytes), None) => match self.codec.decode::<P::Event>(bytes).await {
                    Ok(e) => Ok(e),
                    Err(e) if e.disposition() == Disposition::Retry => {
                        return Err(ConsumerError::Decode {
                            at: raw.coords.clone(),
                            source: e,
                        }
                        .into())
                    }
                    Err(e) => Err((e.class.as_str(), e.message)),
                },
            };
            decoded.push(result);
        }

        let started = Instant::now();
        let mut tx = self.pool.begin().await?;
        m::record_batch_acquire(started.elapsed());
        let mut partitions: Vec<i32> = batch.iter().map(|r| r.coords.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        // The no-op UPDATE takes the row lock: a second owner of the partition waits here.
        let rows = sqlx::query!(
            r#"INSERT INTO weir_consumer_positions (consumer_group, topic, partition, next_offset)
               SELECT $1, $2, p, 0 FROM UNNEST($3::int[]) AS p
               ON CONFLICT (consumer_group, topic, partition)
               DO UPDATE SET next_offset = weir_consumer_positions.next_offset
               RETURNING partition, next_offset"#,
            &self.group,
            &self.topic,
            &partitions,
        )
        .fetch_all(&mut *tx)
        .await?;
        let stored: HashMap<i32, i64> = rows
            .into_iter()
            .map(|r| (r.partition, r.next_offset))
            .collect();

        let mut outcome = Outcome::default();
        let mut records = Vec::new();
        let mut sources = Vec::new();
        let mut poison = Vec::new();
        for (raw, result) in batch.iter().zip(decoded) {
            let p = raw.coords.partition;
            let from = stored.get(&p).copied().unwrap_or(0);
            if raw.coords.offset < from {
                outcome.duplicates += 1;
                continue;
            }
            let expected = outcome.next.get(&p).copied().unwrap_or(from);
            if raw.coords.offset > expected && expected > 0 {
                metrics::counter!(m::OFFSET_GAPS, "group" => self.group.clone()).increment(1);
                warn!(coords = %raw.coords, expected, "offset gap: records were not delivered (retention?)");
            }
            outcome.next.insert(p, raw.coords.offset + 1);
            match result {
                Ok(event) => {
                    records.push(Record {
                        coords: raw.coords.clone(),
                        key: raw.key.clone(),
                        timestamp_ms: raw.timestamp_ms,
                        event,
                    });
                    sources.push(raw);
                }
                Err((class, message)) => poison.push(Poison {
                    raw,
                    class,
                    message,
                }),
            }
        }

        let mut outbox = Outbox::new(&self.codec, self.cfg.outbox.lanes);
        if !records.is_empty() {
            let rejected = self.processor.apply(&mut tx, &records, &mut outbox).await?;
            for r in rejected {
                let Some(raw) = sources.get(r.index) else {
                    return Err(ConsumerError::RejectedOutOfRange {
                        index: r.index,
                        len: sources.len(),
                    }
                    .into());
                };
                poison.push(Poison {
                    raw,
                    class: "invalid",
                    message: r.reason,
                });
            }
        }
        let (parts, nexts): (Vec<i32>, Vec<i64>) =
            outcome.next.iter().map(|(p, n)| (*p, *n)).unzip();
        let rows = outbox.take_rows();
        if rows.is_empty() || rows.len() > crate::outbox::SMALL_BATCH {
            if !rows.is_empty() {
                crate::outbox::copy_rows(&mut tx, &rows).await?;
            }
            sqlx::query!(
                r#"UPDATE weir_consumer_positions AS pos
                   SET next_offset = n.next_offset, updated_at = now()
                   FROM UNNEST($3::int[], $4::bigint[]) AS n(partition, next_offset)
                   WHERE pos.consumer_group = $1 AND pos.topic = $2 AND pos.partition = n.partition"#,
                &self.group,
                &self.topic,
                &parts,
                &nexts,
            )
            .execute(&mut *tx)
            .await?;
        } else {
            // A small batch's output rows and its positions in one statement: one round trip
            // less on an idle pipeline's path, where each batch is an event or a few.
            let a = crate::outbox::Arrays::of(&rows);
            sqlx::query!(
                r#"WITH written AS (
                     INSERT INTO weir_outbox (lane, topic, key, payload, headers)
                     SELECT lane, topic, key, payload, headers::jsonb
                     FROM UNNEST($5::int[], $6::text[], $7::bytea[], $8::bytea[], $9::text[])
                          WITH ORDINALITY AS r(lane, topic, key, payload, headers, ord)
                     ORDER BY ord)
                   UPDATE weir_consumer_positions AS pos
                   SET next_offset = n.next_offset, updated_at = now()
                   FROM UNNEST($3::int[], $4::bigint[]) AS n(partition, next_offset)
                   WHERE pos.consumer_group = $1 AND pos.topic = $2 AND pos.partition = n.partition"#,
                &self.group,
                &self.topic,
                &parts,
                &nexts,
                &a.lanes,
                &a.topics as &[&str],
                &a.keys as &[&[u8]],
                &a.payloads as &[&[u8]],
                &a.headers as &[&str],
            )
            .execute(&mut *tx)
            .await?;
            metrics::counter!(crate::metrics::OUTBOX_WRITTEN).increment(rows.len() as u64);
        }

        if !poison.is_empty() {
            if !self.cfg.runtime.dead_letter {
                return Err(ConsumerError::DeadLetterOff {
                    count: poison.len(),
                }
                .into());
            }
            self.dead_letter(&poison).await?;
        }
        let before_commit = started.elapsed();
        tx.commit().await?;
        debug!(
            records = batch.len(),
            apply_ms = before_commit.as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - before_commit).as_secs_f64() * 1e3,
            "batch timings"
        );

        let invalid = poison.iter().filter(|p| p.class == "invalid").count();
        outcome.dead = poison.len();
        outcome.applied = records.len() - invalid;
        let labels = [("group", self.group.clone()), ("topic", self.topic.clone())];
        metrics::histogram!(m::BATCH_DURATION, &labels).record(started.elapsed().as_secs_f64());
        metrics::histogram!(m::BATCH_SIZE, &labels).record(batch.len() as f64);
        metrics::counter!(m::BATCHES_COMMITTED, &labels).increment(1);
        metrics::counter!(m::RECORDS_APPLIED, &labels).increment(outcome.applied as u64);
        metrics::counter!(m::RECORDS_DUPLICATE, &labels).increment(outcome.duplicates as u64);
        // The batch's last record stands for its newest (O(1): nothing added per record).
        if let Some(newest) = batch.iter().rev().find_map(|r| r.timestamp_ms) {
            let now_ms = chrono::Utc::now().timestamp_millis();
            metrics::gauge!(m::CONSUMER_LAG_SECONDS, &labels)
                .set((now_ms - newest).max(0) as f64 / 1e3);
        }
        for p in &poison {
            metrics::counter!(m::RECORDS_DEAD_LETTERED, "group" => self.group.clone(),
                "topic" => self.topic.clone(), "class" => p.class)
            .increment(1);
        }
        Ok(outcome)
    }

    /// Sends dead letters and waits for the broker's acknowledgement of each.
    async fn dead_letter(&self, poison: &[Poison<'_>]) -> Result<(), ApplyError> {
        let mut pending = Vec::with_capacity(poison.len());
        // A dead letter must fit the producer's limit, or the batch would be retried forever:
        // the original value (then the original headers) is left out of a letter that would
        // not fit, with a note; the original stays readable at its coordinates until retention.
        let limit = self
            .cfg
            .kafka
            .producer
            .get("message.max.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1_000_000)
            .saturating_sub(DEAD_LETTER_OVERHEAD);
        for p in poison {
            let raw = p.raw;
            let message = bounded_reason(&p.message);
            warn!(coords = %raw.coords, class = p.class, reason = %message, "dead-lettering record");
            let header_bytes: usize = raw
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum();
            let value_bytes = raw.payload.as_ref().map_or(0, Vec::len);
            let key_bytes = raw.key.as_ref().map_or(0, Vec::len);
            let keep_value = key_bytes + 2 * header_bytes + value_bytes <= limit;
            let keep_headers = key_bytes + 2 * header_bytes <= limit;
            let mut message = message;
            if !keep_value {
                message.push_str(&format!(
                    " [original value of {value_bytes} bytes{} left out: too large for the \
                     dead-letter topic; read it at {} while retention keeps it]",
                    if keep_headers { "" } else { " and its headers" },
                    raw.coords
                ));
            }
            let kept_headers: &[(String, Option<Vec<u8>>)] =
                if keep_headers { &raw.headers } else { &[] };
            let letter = new_event!(DeadLetter {
                // Caused by a record that may not decode: no workspace, the trace context
                // of its Kafka headers.
                envelope: Envelope::new(
                    String::new(),
                    header_str(&raw.headers, "traceparent").unwrap_or_default(),
                    header_str(&raw.headers, "tracestate"),
                ),
                source_topic: raw.coords.topic.clone(),
                source_partition: raw.coords.partition,
                source_offset: raw.coords.offset,
                consumer_group: self.group.clone(),
                error_class: p.class.to_string(),
                error_message: message.clone(),
                original_key: raw.key.clone(),
                original_value: if keep_value {
                    raw.payload.clone()
                } else {
                    None
                },
                original_headers: kept_headers
                    .iter()
                    .map(|(k, v)| DeadLetterHeader {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            });
            let payload = self.codec.encode(&letter).await?;
            let partition = raw.coords.partition.to_string();
            let offset = raw.coords.offset.to_string();
            let mut headers = OwnedHeaders::new();
            for (k, v) in kept_headers {
                headers = headers.insert(Header {
                    key: k,
                    value: v.as_deref(),
                });
            }
            for (k, v) in [
                ("weir.dlq.source.topic", raw.coords.topic.as_str()),
                ("weir.dlq.source.partition", partition.as_str()),
                ("weir.dlq.source.offset", offset.as_str()),
                ("weir.dlq.consumer.group", self.group.as_str()),
                ("weir.dlq.error.class", p.class),
                ("weir.dlq.error.message", message.as_str()),
            ] {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let key = raw
                .key
                .clone()
                .unwrap_or_else(|| raw.coords.topic.clone().into_bytes());
            let record = FutureRecord::to(&self.dlq_topic)
                .key(&key)
                .payload(&payload)
                .headers(headers);
            let delivery = self.producer.send_result(record).map_err(|(source, _)| {
                ConsumerError::DeadLetterQueueFull {
                    at: raw.coords.clone(),
                    source,
                }
            })?;
            pending.push((&raw.coords, delivery));
        }
        for (at, d) in pending {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((source, _))) => {
                    return Err(ConsumerError::DeadLetterNotAcknowledged {
                        at: at.clone(),
                        source,
                    }
                    .into())
                }
                Err(_) => return Err(ConsumerError::DeadLetterDropped { at: at.clone() }.into()),
            }
        }
        Ok(())
    }

    /// Reports progress to Kafka (lag only) and to metrics once a batch committed.
    fn after_commit(&self, consumer: &StreamConsumer<Ctx>, outcome: Outcome) {
        let mut tpl = TopicPartitionList::new();
        for (p, next) in &outcome.next {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*next)) {
                debug!(error = %e, "offset list");
            }
        }
        if let Err(e) = consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile; its new owner starts from Postgres.
            debug!(error = %e, "storing offsets");
        }
        debug!(group = %self.group, applied = outcome.applied, duplicates = outcome.duplicates,
            dead = outcome.dead, "batch committed");
    }
}

/// Consecutive retries of one batch after which the consumer reports itself not ready.
const UNREADY_AFTER_RETRIES: u32 = 3;

/// Room kept in a dead letter for its own fields, headers and Avro framing, in bytes.
const DEAD_LETTER_OVERHEAD: usize = 16 * 1024;

/// Longest reason a dead letter carries, in bytes: a database error can quote the whole
/// offending value.
const MAX_REASON_BYTES: usize = 4 * 1024;

/// `reason`, cut at a character boundary to [`MAX_REASON_BYTES`].
fn bounded_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_string();
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &reason[..end], reason.len())
}

/// A contiguous part of a batch still to be applied (indices `start..end`), and, for a
/// single record that failed on its own, the reason to dead-letter it with.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Piece {
    start: usize,
    end: usize,
    forced: Option<String>,
}

/// The order in which the parts of a batch are tried. The whole batch first; a part that
/// fails on a data error is split into halves, tried in offset order (the first half commits
/// before the second is tried, so per-partition order holds); a single record that still
/// fails is dead-lettered with the error as its reason. Every good record is applied exactly
/// once, in order, and k poison records among n cost at most about 3k·log2(n) attempts,
/// each of which commits a whole part of good records.
#[derive(Debug)]
struct Bisection {
    /// Parts left, the next on top.
    stack: Vec<Piece>,
}

impl Bisection {
    fn new(len: usize) -> Self {
        let stack = if len == 0 {
            Vec::new()
        } else {
            vec![Piece {
                start: 0,
                end: len,
                forced: None,
            }]
        };
        Self { stack }
    }

    fn next_piece(&mut self) -> Option<Piece> {
        self.stack.pop()
    }

    /// `piece` failed on a data error described by `reason`.
    fn failed(&mut self, piece: Piece, reason: String) {
        if piece.end - piece.start > 1 {
            let mid = piece.start + (piece.end - piece.start) / 2;
            // Pushed second half first: the stack pops the first half next.
            self.stack.push(Piece {
                start: mid,
                end: piece.end,
                forced: None,
            });
            self.stack.push(Piece {
                start: piece.start,
                end: mid,
                forced: None,
            });
        } else {
            self.stack.push(Piece {
                forced: Some(reason),
                ..piece
            });
        }
    }
}

fn header_str(headers: &[(String, Option<Vec<u8>>)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_ref())
        .and_then(|v| String::from_utf8(v.clone()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Drives a [`Bisection`] against records of which `poison` break any part holding them;
    /// returns (what happened to each record in order: true applied, false dead-lettered,
    /// attempts made).
    fn simulate(n: usize, poison: &BTreeSet<usize>) -> (Vec<(usize, bool)>, usize) {
        let mut plan = Bisection::new(n);
        let mut done = Vec::new();
        let mut attempts = 0;
        while let Some(piece) = plan.next_piece() {
            attempts += 1;
            assert!(attempts <= 10 * n + 10, "the bisection does not end");
            if piece.forced.is_some() {
                done.extend((piece.start..piece.end).map(|i| (i, false)));
            } else if (piece.start..piece.end).any(|i| poison.contains(&i)) {
                plan.failed(piece, "poison".into());
            } else {
                done.extend((piece.start..piece.end).map(|i| (i, true)));
            }
        }
        (done, attempts)
    }

    #[test]
    fn reasons_are_bounded_at_a_character_boundary() {
        assert_eq!(bounded_reason("short"), "short");
        let long = "é".repeat(5_000);
        let cut = bounded_reason(&long);
        assert!(cut.len() < MAX_REASON_BYTES + 32, "{}", cut.len());
        assert!(cut.ends_with("(10000 bytes)"));
    }

    #[test]
    fn one_poison_record_in_three_thousand_costs_a_few_dozen_attempts() {
        let poison = BTreeSet::from([1_234]);
        let (done, attempts) = simulate(3_000, &poison);
        assert_eq!(done.len(), 3_000);
        assert!(attempts <= 30, "{attempts} attempts");
        assert_eq!(done.iter().filter(|(_, ok)| !ok).count(), 1);
    }

    proptest! {
        #[test]
        fn every_good_record_applies_once_in_order_and_every_poison_is_dead_lettered(
            n in 1usize..3_000,
            picks in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let poison: BTreeSet<usize> = picks.iter().map(|i| i.index(n)).collect();
            let (done, attempts) = simulate(n, &poison);
            let order: Vec<usize> = done.iter().map(|(i, _)| *i).collect();
            prop_assert_eq!(order, (0..n).collect::<Vec<_>>(), "each record once, in offset order");
            for (i, applied) in &done {
                prop_assert_eq!(*applied, !poison.contains(i), "record {}", i);
            }
            let k = poison.len();
            let depth = (usize::BITS - n.leading_zeros()) as usize + 1;
            prop_assert!(attempts <= 1 + 3 * k * depth, "{} attempts for k={} n={}", attempts, k, n);
        }
    }
}
