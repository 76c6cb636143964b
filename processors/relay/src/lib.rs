//! The outbox relay: publishes the rows of `weir_outbox` to Kafka, in per-key order, with as
//! many relays running at once as wanted. `docs/relay.md` has the full design and failure
//! analysis; this is the short form.
//!
//! # Lanes
//! Every outbox row has `lane = lane_of(key) mod outbox.lanes`, so all rows of one key share a
//! lane. A lane is held by at most one relay at a time: a Postgres session-level advisory lock
//! `(LOCK_NAMESPACE, lane)` taken on the relay's ONE dedicated session. That session also runs
//! every batch, so if it dies the locks are gone and the batch's DELETE fails with it.
//!
//! # Invariants
//! 1. A batch reads only rows of lanes its session holds at that very statement (the SELECT
//!    reads `pg_locks` for `pg_backend_pid()` itself), lowest ids first.
//! 2. Rows are queued to one idempotent (acks=all) producer in id order, and the producer never
//!    expires a message (`message.timeout.ms = 0`, gap-less guarantee on, see [`producer`]):
//!    what reaches a partition from one relay is an in-order prefix of what it queued, with no
//!    gaps. (A message timeout can drop message 2 and still deliver 3; librdkafka documents it.)
//! 3. A row is deleted only once the broker acknowledged it, and what a batch deletes is, per
//!    (topic, key), a prefix of that (topic, key)'s rows in the batch
//!    ([`destinations::deletable`]). So the undeleted rows of every (topic, key) are always a
//!    suffix of its rows in id order, and the next batch starts from its lowest undeleted id.
//!    Rows of other (topic, key)s acknowledged in the same batch are deleted even when some
//!    row failed: a failure holds back only its own (topic, key) (see 5), never the batch.
//! 4. Lanes are given up only between batches, never while rows of a batch are in flight.
//! 5. A destination topic that is missing or unauthorized is blocked as a whole
//!    ([`destinations`]): none of its rows is queued, every other topic of every lane flows.
//!    When it stays so for `relay.missing_destination_dead_after_ms`, its rows move to
//!    `weir_outbox_dead` with the reason (`weir_relay_dead_total{reason}`). Transient broker
//!    errors block nothing: the batch backs off and is retried, acknowledged rows deleted.
//!    A delivery awaited longer than `STALL_CHECK` (2 s) whose topic turns out missing (deleted
//!    under the relay) is given up and the producer replaced, since librdkafka would retry it
//!    forever; while the topic exists or the broker does not answer, the relay waits.
//!
//! Together: the first occurrence of every event in Kafka respects outbox id order per
//! (topic, key), also when a relay dies at any point (its successor starts from the lowest
//! undeleted id of the lane; at worst a suffix is published twice). Kafka orders nothing
//! across topics, and neither does the relay: the events of one key on two topics may reach
//! them in either order. Consumers de-duplicate by the `event_id` header. Writers must give
//! the events of one key increasing ids in commit order, which the batch consumer guarantees
//! (one transaction per partition at a time).
//!
//! # Balance and wake-up
//! Each relay heartbeats into `weir_relays` every `relay.rebalance_interval_ms`, counts the
//! live relays (fresh heartbeat and a live backend) and moves towards its fair share
//! `ceil(lanes / live)`: it releases extra lanes and tries free ones (never waiting). A crashed
//! relay's lanes are free as soon as Postgres ends its session. An AFTER INSERT trigger
//! NOTIFYs `weir_outbox`; relays LISTEN and also poll every `relay.poll_interval_ms`; after a
//! full batch they go again at once.
//!
//! # Panics
//! None of the functions here panic.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::types::RDKafkaErrorCode;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{Connection as _, PgConnection, PgPool, Row as _};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};
use weir_runtime::config::{Config, KafkaConfig};
use weir_runtime::telemetry::Health;
use weir_runtime::Classify as _;

pub mod destinations;
pub mod error;
pub mod metrics;
mod sql;

use destinations::{Check, Destinations, Problem, RowStatus, Verdict};

pub use error::{Disposition, RelayError};

/// First key of every lane lock, `pg_advisory_lock(LOCK_NAMESPACE, lane)`: "WEIR" in ASCII.
/// Every relay of one outbox must use the same value, or two of them could hold one lane.
pub const LOCK_NAMESPACE: i32 = 0x5745_4952;

/// The NOTIFY channel of the outbox trigger (`sql/20261127000003_relay.sql`).
pub const CHANNEL: &str = "weir_outbox";

/// Producer settings of the relay: the runtime's (idempotent, acks=all, the `kafka.producer`
/// pass-through options) with two overrides that per-key order depends on, applied last:
///
/// - `message.timeout.ms = 0` (never expire): an expired message leaves a gap that later
///   messages of the same partition jump over; the relay instead waits for the broker, with
///   rows left in place, and librdkafka retries in order.
/// - `enable.gapless.guarantee = true`: any other error that could leave a gap is fatal for
///   the producer (the relay stops) instead of silently reordering.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = weir_runtime::kafka::producer_config(cfg);
    c.remove("delivery.timeout.ms")
        .set("message.timeout.ms", "0")
        .set("enable.idempotence", "true")
        .set("enable.gapless.guarantee", "true")
        .set("acks", "all")
        .set("client.id", "weir-relay");
    c
}

/// A producer with [`producer_config`]: the one to give [`Relay::new`].
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    producer_config(cfg).create()
}

/// The lanes one relay should hold when `live` relays share `lanes`: `ceil(lanes / live)`.
pub fn fair_share(lanes: i32, live: i64) -> usize {
    let lanes = i64::from(lanes.max(0));
    let live = live.max(1);
    usize::try_from((lanes + live - 1) / live).unwrap_or(usize::MAX)
}

/// Kafka headers from the outbox's jsonb object: strings as their UTF-8 bytes, `null` as a
/// header without value, anything else as its JSON text. A non-object gives no headers.
pub fn kafka_headers(headers: &serde_json::Value) -> OwnedHeaders {
    let Some(map) = headers.as_object() else {
        return OwnedHeaders::new();
    };
    let mut out = OwnedHeaders::new_with_capacity(map.len());
    for (key, value) in map {
        out = match value {
            serde_json::Value::String(s) => out.insert(Header {
                key,
                value: Some(s.as_bytes()),
            }),
            serde_json::Value::Null => out.insert(Header::<&[u8]> { key, value: None }),
            other => {
                let text = other.to_string();
                out.insert(Header {
                    key,
                    value: Some(text.as_bytes()),
                })
            }
        };
    }
    out
}

/// One outbox row as read by a batch.
#[derive(Debug, Clone)]
struct OutboxRow {
    id: i64,
    topic: String,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    headers: serde_json::Value,
    age_s: f64,
}

impl OutboxRow {
    fn from_row(r: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: r.try_get("id")?,
            topic: r.try_get("topic")?,
            key: r.try_get("key")?,
            payload: r.try_get("payload")?,
            headers: r.try_get("headers")?,
            age_s: r.try_get::<Option<f64>, _>("age_s")?.unwrap_or(0.0),
        })
    }
}

/// What the producer did with a batch.
#[derive(Debug, Default)]
struct Published {
    /// One per row of the batch.
    status: Vec<RowStatus>,
    /// Destinations the producer refused or failed as missing or unauthorized, with the
    /// error, in the order first seen.
    problems: Vec<(String, Problem, String)>,
    /// The first failure that is not about a destination (broker down, ...), and how many
    /// rows failed so: the batch is retried after a backoff.
    transient: Option<(usize, KafkaError)>,
    /// The producer failed fatally (idempotence or gap-less guarantee broken).
    fatal: Option<String>,
    /// Deliveries for a vanished destination were given up: the producer still holds their
    /// messages and must be replaced.
    stuck: bool,
    /// The topics whose pending deliveries were given up.
    given_up: Vec<String>,
}

/// Most metadata checks of destinations one batch makes; the rows of topics beyond them wait
/// for the next batch (first batches after a start see many topics at once).
const MAX_CHECKS_PER_BATCH: usize = 32;
/// How long one metadata check of a destination may take; no answer is a transient problem.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows one statement moves to the dead table when a destination reaches its bound.
const DEAD_CHUNK: i64 = 10_000;
/// How long a delivery report may be awaited before the row's destination is checked (a
/// healthy broker answers in milliseconds).
const STALL_CHECK: Duration = Duration::from_secs(2);

/// What a batch did.
#[derive(Debug, Default, Clone, Copy)]
struct BatchOutcome {
    /// Rows the SELECT returned.
    selected: usize,
}

/// The relay's dedicated Postgres session and the lanes it holds.
struct Session {
    conn: PgConnection,
    /// Lanes held, as last read from `pg_locks`.
    owned: Vec<i32>,
    /// Rebalances done on this session.
    rebalances: u64,
}

/// Aborts the LISTEN task when the relay ends, also when the relay's future is dropped.
struct ListenerTask(JoinHandle<()>);

impl Drop for ListenerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One outbox relay. Any number may run against one database, in one or many processes.
pub struct Relay {
    cfg: Arc<Config>,
    pool: PgPool,
    /// The producer; replaced (see [`Relay::replace_producer`]) when messages for a vanished
    /// destination are stuck in it. Never held across an await: clone it out.
    producer: std::sync::Mutex<FutureProducer>,
    health: Health,
    relay_id: String,
    /// First key of the lane locks: [`LOCK_NAMESPACE`] unless a benchmark isolates its relays.
    namespace: i32,
    /// Blocked and verified destinations. Only the relay's own loop uses it (one batch at a
    /// time); the mutex is never held across an await.
    destinations: std::sync::Mutex<Destinations>,
}

impl Relay {
    /// Prepares a relay; nothing connects until [`Relay::run`]. `producer` should come from
    /// [`producer`] (see there why). `relay_id` names the relay in `weir_relays` and logs and
    /// must be unique among running relays (e.g. host and pid).
    pub fn new(
        cfg: Arc<Config>,
        pool: PgPool,
        producer: FutureProducer,
        health: Health,
        relay_id: String,
    ) -> Self {
        let dead_after = Duration::from_millis(cfg.relay.missing_destination_dead_after_ms);
        Self {
            cfg,
            pool,
            producer: std::sync::Mutex::new(producer),
            health,
            relay_id,
            namespace: LOCK_NAMESPACE,
            destinations: std::sync::Mutex::new(Destinations::new(dead_after)),
        }
    }

    /// Uses `namespace` instead of [`LOCK_NAMESPACE`] as the first key of the lane locks.
    /// Only for relays of a separate outbox (a benchmark's own tables): relays of one outbox
    /// must share the namespace, or two of them could hold one lane.
    pub fn with_lock_namespace(mut self, namespace: i32) -> Self {
        self.namespace = namespace;
        self
    }

    /// The current producer (a cheap handle).
    fn producer(&self) -> FutureProducer {
        self.producer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Swaps in a fresh producer and destroys the old one off the runtime's threads (its
    /// drop purges what it still holds and waits up to 500 ms). Used when messages for a
    /// destination that vanished are stuck in it: librdkafka retries them forever (no message
    /// timeout) and would deliver them, out of any order the relay controls, if a topic of that
    /// name came back. Only between batches: no delivery of the old producer is awaited.
    fn replace_producer(&self) -> Result<(), RelayError> {
        let fresh = producer(&self.cfg.kafka)
            .map_err(|e| RelayError::ProducerFatal(format!("creating a new producer: {e}")))?;
        let old = std::mem::replace(
            &mut *self
                .producer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            fresh,
        );
        tokio::task::spawn_blocking(move || drop(old));
        Ok(())
    }

    fn dest(&self) -> std::sync::MutexGuard<'_, Destinations> {
        self.destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Publishes until `shutdown` is cancelled. Then the in-flight batch finishes (if the
    /// broker acknowledges it within `runtime.shutdown_deadline_ms`) or is abandoned with its
    /// rows left in place, the lanes are released and the heartbeat row removed.
    ///
    /// Transient failures (Postgres or Kafka unavailable) are retried with capped, jittered
    /// exponential backoff (`runtime.retry_initial_ms` .. `runtime.retry_max_ms`); only
    /// [`Disposition::Fatal`] errors end it early.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RelayError> {
        self.validate()?;
        let component = format!("relay {}", self.relay_id);
        self.health.register(&component);
        let wake = Arc::new(Notify::new());
        let _listener = ListenerTask(tokio::spawn(listen(
            self.pool.clone(),
            wake.clone(),
            shutdown.child_token(),
            self.cfg.clone(),
        )));
        info!(relay = %self.relay_id, lanes = self.cfg.outbox.lanes, "relay starting");

        let rebalance_every = Duration::from_millis(self.cfg.relay.rebalance_interval_ms.max(1));
        let poll_every = Duration::from_millis(self.cfg.relay.poll_interval_ms.max(1));
        let mut session: Option<Session> = None;
        let mut next_rebalance = Instant::now();
        let mut attempt = 0u32;

        let result = loop {
            if shutdown.is_cancelled() {
                break Ok(());
            }
            let step = match session.as_mut() {
                None => match self.bounded(&shutdown, self.connect()).await {
                    Some(Ok(s)) => {
                        session = Some(s);
                        next_rebalance = Instant::now();
                        continue;
                    }
                    Some(Err(e)) => Err(e),
                    None => break Ok(()),
                },
                Some(s) if Instant::now() >= next_rebalance => {
                    match self.bounded(&shutdown, self.rebalance(s)).await {
                        Some(Ok(())) => {
                            next_rebalance = Instant::now() + rebalance_every;
                            self.health.set(&component, true);
                            Ok(None)
                        }
                        Some(Err(e)) => Err(e),
                        // Abandoned: the release below ends the session if it cannot be used.
                        None => break Ok(()),
                    }
                }
                Some(s) if s.owned.is_empty() => Ok(Some(BatchOutcome::default())),
                Some(s) => match self.bounded(&shutdown, self.batch(s)).await {
                    Some(r) => r.map(Some),
                    None => {
                        // Deadline passed with the batch in flight: abandon it. Its rows stay
                        // for the next holder of their lanes, which starts from the lowest id;
                        // anything of it still in the producer can only arrive as a duplicate.
                        warn!(relay = %self.relay_id, "shutdown deadline passed mid-batch; rows left for the next holder");
                        break Ok(());
                    }
                },
            };
            match step {
                // A rebalance ran: go straight on to a batch.
                Ok(None) => {}
                Ok(Some(outcome)) => {
                    attempt = 0;
                    if outcome.selected >= self.cfg.relay.batch_size {
                        // A full batch: more rows are likely waiting.
                        continue;
                    }
                    let owned = session.as_ref().is_some_and(|s| !s.owned.is_empty());
                    let until = if owned {
                        next_rebalance.min(Instant::now() + poll_every)
                    } else {
                        next_rebalance
                    };
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = wake.notified(), if owned => {}
                        _ = tokio::time::sleep_until(until) => {}
                    }
                }
                Err(e) => {
                    if e.disposition() == Disposition::Fatal {
                        error!(relay = %self.relay_id, error = %e, "relay failed fatally");
                        break Err(e);
                    }
                    attempt = attempt.saturating_add(1);
                    ::metrics::counter!(metrics::RETRIES).increment(1);
                    self.health.set(&component, false);
                    if e.drops_session() {
                        if let Some(s) = session.take() {
                            // Closing ends the session, which releases every lane it held.
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), s.conn.close()).await;
                        }
                        ::metrics::gauge!(metrics::LANES_OWNED).set(0.0);
                    }
                    let delay = self.backoff(attempt);
                    warn!(relay = %self.relay_id, error = %e, attempt, delay_ms = delay.as_millis() as u64, "relay retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };

        if let Some(s) = session.take() {
            self.release(s).await;
        }
        ::metrics::gauge!(metrics::LANES_OWNED).set(0.0);
        self.health.set(&component, false);
        info!(relay = %self.relay_id, "relay stopped");
        result
    }

    fn validate(&self) -> Result<(), RelayError> {
        let mut problems = Vec::new();
        if self.cfg.outbox.lanes < 1 {
            problems.push("outbox.lanes must be at least 1");
        }
        if self.cfg.relay.batch_size < 1 || i64::try_from(self.cfg.relay.batch_size).is_err() {
            problems.push("relay.batch_size must be at least 1");
        }
        if self.relay_id.is_empty() {
            problems.push("the relay id must not be empty");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RelayError::Config(problems.join("; ")))
        }
    }

    /// Runs `fut` to completion unless `shutdown` fires; then lets it finish for at most
    /// `runtime.shutdown_deadline_ms`. `None` means it was abandoned.
    async fn bounded<F: Future>(&self, shutdown: &CancellationToken, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        tokio::select! {
            r = &mut fut => return Some(r),
            _ = shutdown.cancelled() => {}
        }
        let deadline = Duration::from_millis(self.cfg.runtime.shutdown_deadline_ms);
        tokio::time::timeout(deadline, fut).await.ok()
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.cfg.runtime.backoff(attempt)
    }

    /// Opens the dedicated session. It is detached from the pool: it must never be handed to
    /// anyone else while it holds lane locks.
    async fn connect(&self) -> Result<Session, RelayError> {
        let mut conn = self.pool.acquire().await?.detach();
        let app = format!("weir-relay {}", self.relay_id);
        sqlx::query(sql::SESSION_SETUP)
            .bind(app)
            .bind(idle_session_timeout_ms(&self.cfg).to_string())
            .bind(STATEMENT_TIMEOUT_MS.to_string())
            .execute(&mut conn)
            .await?;
        debug!(relay = %self.relay_id, "relay session open");
        Ok(Session {
            conn,
            owned: Vec::new(),
            rebalances: 0,
        })
    }

    /// Heartbeat, then move towards the fair share: release extra lanes or try free ones.
    /// Runs only between batches, so no row of a released lane is in flight.
    async fn rebalance(&self, s: &mut Session) -> Result<(), RelayError> {
        let lanes = self.cfg.outbox.lanes;
        let live: i64 = sqlx::query_scalar(sql::HEARTBEAT)
            .bind(&self.relay_id)
            .bind(i64::try_from(self.cfg.relay.heartbeat_timeout_ms).unwrap_or(i64::MAX))
            .bind(i32::try_from(s.owned.len()).unwrap_or(i32::MAX))
            .fetch_one(&mut s.conn)
            .await?;
        let fair = fair_share(lanes, live);
        let held = held_lanes(&mut s.conn, self.namespace).await?;
        if held.len() > fair {
            let mut extra = held.clone();
            shuffle(&mut extra);
            extra.truncate(held.len() - fair);
            sqlx::query(sql::RELEASE_LANES)
                .bind(self.namespace)
                .bind(&extra)
                .execute(&mut s.conn)
                .await?;
        } else if held.len() < fair {
            sqlx::query(sql::TAKE_LANES)
                .bind(self.namespace)
                .bind(lanes)
                .bind(&held)
                .bind(i64::try_from(fair - held.len()).unwrap_or(i64::MAX))
                .fetch_all(&mut s.conn)
                .await?;
        }
        let now_held = if held.len() == fair {
            held
        } else {
            held_lanes(&mut s.conn, self.namespace).await?
        };
        if now_held != s.owned {
            debug!(relay = %self.relay_id, live, fair, lanes = now_held.len(), "lanes changed");
        }
        s.owned = now_held;
        ::metrics::gauge!(metrics::LANES_OWNED).set(s.owned.len() as f64);
        if s.owned.is_empty() {
            // No batch will run to refresh it.
            ::metrics::gauge!(metrics::OUTBOX_LAG).set(0.0);
        }

        if s.rebalances.is_multiple_of(STRAY_CHECK_EVERY) {
            let top: Option<i32> = sqlx::query_scalar(sql::TOP_LANE)
                .fetch_optional(&mut s.conn)
                .await?;
            if let Some(top) = top.filter(|t| *t >= lanes) {
                error!(relay = %self.relay_id, lanes, top, "outbox rows in lanes >= outbox.lanes: a writer uses more lanes than this relay; they will not be published until outbox.lanes match");
            }
        }
        s.rebalances = s.rebalances.wrapping_add(1);
        Ok(())
    }

    /// One batch: read (leaving out blocked destinations), check destinations not verified
    /// lately, publish, wait for every acknowledgement, delete what was acknowledged (a
    /// per-(topic, key) prefix), move what must go to `weir_outbox_dead`.
    async fn batch(&self, s: &mut Session) -> Result<BatchOutcome, RelayError> {
        let started = std::time::Instant::now();
        let limit = i64::try_from(self.cfg.relay.batch_size).unwrap_or(i64::MAX);
        let excluded = self.dest().excluded(Instant::now());
        let rows = sqlx::query(sql::SELECT_BATCH)
            .bind(self.namespace)
            .bind(limit)
            .bind(&excluded)
            .fetch_all(&mut s.conn)
            .await?
            .iter()
            .map(OutboxRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let selected = rows.len();
        let oldest = rows.iter().map(|r| r.age_s).fold(0.0, f64::max);
        ::metrics::gauge!(metrics::OUTBOX_LAG).set(oldest);
        if rows.is_empty() {
            ::metrics::gauge!(metrics::BLOCKED_DESTINATIONS).set(excluded.len() as f64);
            return Ok(BatchOutcome { selected });
        }
        let span = info_span!("relay.batch",
            messaging.system = "kafka",
            messaging.operation.type = "publish",
            messaging.batch.message_count = selected,
            relay.id = %self.relay_id,
            outbox.first_id = rows.first().map_or(0, |r| r.id));
        async {
            let (held, dead_topics) = self.check_destinations(&rows).await;
            for (topic, reason, label) in &dead_topics {
                self.dead_letter_topic(s, topic, reason, label).await?;
            }
            let published = self.publish(&rows, &held).await?;

            // Acknowledged rows end their topic's episode; problems found on the way block it.
            let now = Instant::now();
            let mut late_dead = Vec::new();
            {
                let mut d = self.dest();
                for (row, st) in rows.iter().zip(&published.status) {
                    if *st == RowStatus::Acked {
                        d.acknowledged(&row.topic);
                    }
                }
                for (topic, problem, detail) in &published.problems {
                    match d.problem(topic, *problem, detail, now, |n| self.backoff(n)) {
                        Verdict::Wait if d.sightings(topic) == 1 => {
                            warn!(topic = %topic, problem = ?problem, error = %detail, "destination missing or unauthorized: its rows wait, other topics flow");
                        }
                        Verdict::Wait => {
                            debug!(topic = %topic, problem = ?problem, error = %detail, "destination still missing or unauthorized");
                        }
                        Verdict::Dead { reason, label } => {
                            late_dead.push((topic.clone(), reason, label));
                        }
                    }
                }
                ::metrics::gauge!(metrics::BLOCKED_DESTINATIONS).set(d.blocked_count() as f64);
            }

            let deletable = destinations::deletable(
                rows.iter()
                    .map(|r| (r.id, r.topic.as_str(), r.key.as_deref())),
                &published.status,
            );
            if !deletable.is_empty() {
                sqlx::query(sql::DELETE_PUBLISHED)
                    .bind(&deletable)
                    .execute(&mut s.conn)
                    .await?;
            }
            let (dead_ids, dead_reasons): (Vec<i64>, Vec<String>) = rows
                .iter()
                .zip(&published.status)
                .filter_map(|(r, st)| match st {
                    RowStatus::Dead(reason) => Some((r.id, reason.clone())),
                    _ => None,
                })
                .unzip();
            if let (Some(id), Some(reason)) = (dead_ids.first(), dead_reasons.first()) {
                error!(outbox.id = id, rows = dead_ids.len(), %reason, "outbox rows can never be published; moved to weir_outbox_dead");
                let moved = sqlx::query(sql::MOVE_TO_DEAD)
                    .bind(&dead_ids)
                    .bind(&dead_reasons)
                    .execute(&mut s.conn)
                    .await?
                    .rows_affected();
                ::metrics::counter!(metrics::DEAD, "reason" => metrics::REASON_REJECTED)
                    .increment(moved);
            }
            for (topic, reason, label) in &late_dead {
                self.dead_letter_topic(s, topic, reason, label).await?;
            }
            if published.stuck {
                self.replace_producer()?;
            }
            ::metrics::counter!(metrics::PUBLISHED).increment(deletable.len() as u64);
            ::metrics::histogram!(metrics::BATCH_SECONDS).record(started.elapsed().as_secs_f64());
            debug!(published = deletable.len(), held = held.len(), "batch published");
            if let Some(fatal) = published.fatal {
                return Err(RelayError::ProducerFatal(fatal));
            }
            if let Some((failed, first)) = published.transient {
                return Err(RelayError::Delivery {
                    failed,
                    total: rows.len(),
                    first,
                });
            }
            Ok(BatchOutcome { selected })
        }
        .instrument(span)
        .await
    }

    /// Checks the destinations of `rows` that were not verified lately (at most
    /// [`MAX_CHECKS_PER_BATCH`]). Returns the topics whose rows must not be queued in this
    /// batch (blocked, or not checked yet) and the blocked topics whose rows must go to the
    /// dead table now, with the reason and its metric label.
    async fn check_destinations(
        &self,
        rows: &[OutboxRow],
    ) -> (HashSet<String>, Vec<(String, String, &'static str)>) {
        let now = Instant::now();
        let mut topics: Vec<&str> = Vec::new();
        let mut seen = HashSet::new();
        for r in rows {
            if seen.insert(r.topic.as_str()) {
                topics.push(r.topic.as_str());
            }
        }
        let to_check: Vec<&str> = {
            let d = self.dest();
            topics
                .iter()
                .copied()
                .filter(|t| d.needs_check(t, now))
                .collect()
        };
        let mut held = HashSet::new();
        let mut dead = Vec::new();
        let mut answering = true;
        for (i, topic) in to_check.into_iter().enumerate() {
            if i >= MAX_CHECKS_PER_BATCH {
                held.insert(topic.to_owned());
                continue;
            }
            if !answering {
                // The broker did not answer the previous check: the others would wait as
                // long (up to METADATA_TIMEOUT each) and delay recovery; publish their rows
                // unchecked, as before any check (a vanished topic is still caught when its
                // deliveries stall).
                continue;
            }
            let check = self.check_topic(topic).await;
            answering = check != Check::Unknown;
            let now = Instant::now();
            match check {
                Check::Exists => {
                    if self.dest().exists(topic, now) {
                        info!(topic, "destination is back: publishing its rows");
                    }
                }
                Check::Problem(problem, detail) => {
                    let (verdict, sightings) = {
                        let mut d = self.dest();
                        let v = d.problem(topic, problem, &detail, now, |n| self.backoff(n));
                        (v, d.sightings(topic))
                    };
                    match verdict {
                        Verdict::Wait if sightings == 1 => {
                            warn!(topic, ?problem, error = %detail, "destination missing or unauthorized: its rows wait, other topics flow");
                        }
                        Verdict::Wait => {
                            debug!(topic, ?problem, error = %detail, "destination still missing or unauthorized");
                        }
                        Verdict::Dead { reason, label } => {
                            dead.push((topic.to_owned(), reason, label));
                        }
                    }
                }
                // No answer either way (broker down, leader election): publish as always;
                // the producer waits for the broker.
                Check::Unknown => {}
            }
        }
        let d = self.dest();
        for t in topics {
            if d.is_blocked(t) {
                held.insert(t.to_owned());
            }
        }
        (held, dead)
    }

    /// One metadata request for `topic` (blocking client call, off the runtime's threads).
    async fn check_topic(&self, topic: &str) -> Check {
        let producer = self.producer();
        let name = topic.to_owned();
        let answer = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), METADATA_TIMEOUT)
                .map(|md| {
                    // One topic was asked for; the answer holds that one.
                    md.topics()
                        .first()
                        .map(|t| (t.error().map(RDKafkaErrorCode::from), t.partitions().len()))
                })
        })
        .await;
        match answer {
            Ok(Ok(Some((err, partitions)))) => classify_topic(err, partitions),
            Ok(Ok(None)) => Check::Unknown,
            Ok(Err(e)) => match e.rdkafka_error_code() {
                Some(code) => classify_topic(Some(code), 0),
                None => Check::Unknown,
            },
            Err(e) => {
                debug!(topic, error = %e, "destination check task");
                Check::Unknown
            }
        }
    }

    /// Moves every row of `topic` in this session's lanes to `weir_outbox_dead` with `reason`.
    async fn dead_letter_topic(
        &self,
        s: &mut Session,
        topic: &str,
        reason: &str,
        label: &'static str,
    ) -> Result<(), RelayError> {
        let mut total = 0u64;
        loop {
            let moved = sqlx::query(sql::MOVE_TOPIC_TO_DEAD)
                .bind(self.namespace)
                .bind(topic)
                .bind(DEAD_CHUNK)
                .bind(reason)
                .execute(&mut s.conn)
                .await?
                .rows_affected();
            total = total.saturating_add(moved);
            ::metrics::counter!(metrics::DEAD, "reason" => label).increment(moved);
            if moved < DEAD_CHUNK.unsigned_abs() {
                break;
            }
        }
        error!(topic, rows = total, %reason, "destination stayed missing or unauthorized past relay.missing_destination_dead_after_ms: its rows moved to weir_outbox_dead");
        Ok(())
    }

    /// Queues the rows of `rows` in id order, except those of `held` topics and of topics the
    /// producer refuses as missing or unauthorized on the way, and waits for every
    /// acknowledgement. A row the producer can never accept becomes [`RowStatus::Dead`]; a
    /// transient refusal stops queueing (the rest stays for the next batch). Rows of other
    /// (topic, key)s are unaffected by any row's failure.
    async fn publish(
        &self,
        rows: &[OutboxRow],
        held: &HashSet<String>,
    ) -> Result<Published, RelayError> {
        let mut out = Published {
            status: vec![RowStatus::Held; rows.len()],
            ..Published::default()
        };
        let producer = self.producer();
        let mut blocked: HashSet<&str> = HashSet::new();
        let mut pending = VecDeque::with_capacity(rows.len());
        // With span export on: a publish span per row, a child of the row's trace context.
        let mut spans = Vec::new();
        'rows: for (i, row) in rows.iter().enumerate() {
            if held.contains(&row.topic) || blocked.contains(row.topic.as_str()) {
                continue;
            }
            if weir_runtime::trace::enabled() {
                let header = |k: &str| row.headers.get(k).and_then(serde_json::Value::as_str);
                spans.extend(
                    weir_runtime::trace::PublishSpan::start(
                        header(weir_runtime::trace::TRACEPARENT),
                        header(weir_runtime::trace::TRACESTATE),
                        &row.topic,
                        row.id,
                    )
                    .map(|span| (i, span)),
                );
            }
            loop {
                let mut record = FutureRecord::to(&row.topic)
                    .payload(&row.payload)
                    .headers(kafka_headers(&row.headers));
                if let Some(key) = &row.key {
                    record = record.key(key);
                }
                match producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push_back((i, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // Backpressure: wait for the oldest message, then queue again.
                        match pending.pop_front() {
                            Some((j, delivery)) => {
                                self.await_delivery(rows, j, delivery, &mut out, &mut blocked)
                                    .await
                            }
                            // The queue is full of messages for a vanished destination: end
                            // the batch here; the producer is replaced after it.
                            None if out.stuck => break 'rows,
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    }
                    Err((e, _)) => {
                        if let Some(problem) = error::destination_problem(&e) {
                            blocked.insert(&row.topic);
                            out.problem(&row.topic, problem, e.to_string());
                            break;
                        }
                        match error::enqueue_disposition(&e) {
                            Disposition::DeadLetter => {
                                out.status[i] = RowStatus::Dead(e.to_string());
                                break;
                            }
                            Disposition::Fatal => return Err(self.fatal_or(e, row.id)),
                            Disposition::Retry => {
                                out.transient(e);
                                break 'rows;
                            }
                        }
                    }
                }
            }
        }
        while let Some((j, delivery)) = pending.pop_front() {
            self.await_delivery(rows, j, delivery, &mut out, &mut blocked)
                .await;
        }
        for (i, span) in spans {
            span.end(matches!(out.status.get(i), Some(RowStatus::Acked)));
        }
        if out.transient.is_some() || !out.problems.is_empty() {
            if let Some((code, reason)) = producer.client().fatal_error() {
                out.fatal = Some(format!("{code:?}: {reason}"));
            }
        }
        Ok(out)
    }

    /// Waits for the delivery report of row `j`. Every [`STALL_CHECK`] without one, checks
    /// the row's destination: a topic deleted while its messages were queued leaves them
    /// retried forever (no message timeout), so if it is missing or unauthorized the row is
    /// given up (held, its topic blocked, `out.stuck` set: the producer is replaced after the
    /// batch). Otherwise (broker down, slow) it keeps waiting, as order requires.
    async fn await_delivery<'a>(
        &self,
        rows: &'a [OutboxRow],
        j: usize,
        mut delivery: rdkafka::producer::DeliveryFuture,
        out: &mut Published,
        blocked: &mut HashSet<&'a str>,
    ) {
        let Some(row) = rows.get(j) else {
            return;
        };
        loop {
            if blocked.contains(row.topic.as_str()) && out.given_up(&row.topic) {
                // Its topic was given up while this row was queued: do not wait for it.
                return;
            }
            match tokio::time::timeout(STALL_CHECK, &mut delivery).await {
                Ok(result) => {
                    settle(rows, j, result, out, blocked);
                    return;
                }
                Err(_) => match self.check_topic(&row.topic).await {
                    Check::Problem(problem, detail) => {
                        warn!(topic = %row.topic, ?problem, error = %detail, "deliveries stuck on a destination that vanished: giving them up");
                        blocked.insert(&row.topic);
                        out.problem(&row.topic, problem, detail);
                        out.stuck = true;
                        out.give_up(&row.topic);
                        return;
                    }
                    Check::Exists | Check::Unknown => {}
                },
            }
        }
    }

    fn fatal_or(&self, e: KafkaError, id: i64) -> RelayError {
        match self.producer().client().fatal_error() {
            Some((code, reason)) => RelayError::ProducerFatal(format!("{code:?}: {reason}")),
            None => RelayError::Enqueue { id, source: e },
        }
    }

    /// Graceful end: release every lane, remove the heartbeat, close the session.
    async fn release(&self, mut s: Session) {
        let deadline = Duration::from_millis(self.cfg.runtime.shutdown_deadline_ms.max(100));
        let done = tokio::time::timeout(deadline, async {
            sqlx::query(sql::RELEASE_ALL).execute(&mut s.conn).await?;
            sqlx::query(sql::DELETE_HEARTBEAT)
                .bind(&self.relay_id)
                .execute(&mut s.conn)
                .await?;
            s.conn.close().await
        })
        .await;
        match done {
            Ok(Ok(())) => debug!(relay = %self.relay_id, "lanes released"),
            // The session ends anyway when the connection drops, which frees the lanes.
            Ok(Err(e)) => warn!(relay = %self.relay_id, error = %e, "releasing lanes"),
            Err(_) => warn!(relay = %self.relay_id, "releasing lanes timed out"),
        }
    }
}

/// The stray-lane check runs on the first rebalance of a session and every this many after.
const STRAY_CHECK_EVERY: u64 = 30;

/// Upper bound of one relay statement; a statement that hangs longer fails and is retried.
const STATEMENT_TIMEOUT_MS: u64 = 60_000;

/// How long the relay's session may sit idle before Postgres ends it (freeing its lanes):
/// three times the longest pause a healthy relay makes between statements, at least 15 s.
pub fn idle_session_timeout_ms(cfg: &Config) -> u64 {
    let longest = cfg
        .relay
        .poll_interval_ms
        .max(cfg.relay.rebalance_interval_ms)
        .max(cfg.relay.heartbeat_timeout_ms)
        .max(cfg.runtime.retry_max_ms);
    longest.saturating_mul(3).max(15_000)
}

async fn held_lanes(conn: &mut PgConnection, namespace: i32) -> Result<Vec<i32>, sqlx::Error> {
    sqlx::query_scalar(sql::HELD_LANES)
        .bind(namespace)
        .fetch_one(conn)
        .await
}

impl Published {
    /// Notes that `topic` is missing or unauthorized (once per topic).
    fn problem(&mut self, topic: &str, problem: Problem, detail: String) {
        if !self.problems.iter().any(|(t, _, _)| t == topic) {
            self.problems.push((topic.to_owned(), problem, detail));
        }
    }

    fn give_up(&mut self, topic: &str) {
        if !self.given_up(topic) {
            self.given_up.push(topic.to_owned());
        }
    }

    fn given_up(&self, topic: &str) -> bool {
        self.given_up.iter().any(|t| t == topic)
    }

    /// Notes a failure that is not about a destination.
    fn transient(&mut self, e: KafkaError) {
        match &mut self.transient {
            Some((n, _)) => *n += 1,
            None => self.transient = Some((1, e)),
        }
    }
}

/// Records the delivery report of row `i`: acknowledged; failed for its destination (the topic
/// is blocked for the rest of the batch); or failed otherwise, or dropped by the producer.
fn settle<'a, E>(
    rows: &'a [OutboxRow],
    i: usize,
    result: Result<OwnedDeliveryResult, E>,
    out: &mut Published,
    blocked: &mut HashSet<&'a str>,
) {
    let Some(row) = rows.get(i) else {
        return;
    };
    match result {
        Ok(Ok(_)) => {
            if let Some(st) = out.status.get_mut(i) {
                *st = RowStatus::Acked;
            }
        }
        Ok(Err((e, _))) => match error::destination_problem(&e) {
            Some(problem) => {
                blocked.insert(&row.topic);
                out.problem(&row.topic, problem, e.to_string());
            }
            None => out.transient(e),
        },
        Err(_) => out.transient(KafkaError::Canceled),
    }
}

/// What a metadata answer for one topic says: its error code (if any) and partition count.
fn classify_topic(err: Option<RDKafkaErrorCode>, partitions: usize) -> Check {
    match err {
        None if partitions > 0 => Check::Exists,
        None => Check::Unknown,
        Some(code) => match error::code_problem(code) {
            Some(problem) => Check::Problem(problem, format!("{code:?}")),
            None => Check::Unknown,
        },
    }
}

fn shuffle(v: &mut [i32]) {
    for i in (1..v.len()).rev() {
        let j = rand::random_range(0..=i);
        v.swap(i, j);
    }
}

/// Keeps a LISTEN on [`CHANNEL`] and turns notifications into wake-ups (coalesced: one stored
/// permit). Reconnects with backoff; after any gap it wakes the relay, since a notification
/// may have been missed (the relay polls anyway).
async fn listen(pool: PgPool, wake: Arc<Notify>, shutdown: CancellationToken, cfg: Arc<Config>) {
    let mut attempt = 0u32;
    loop {
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listen_once(&pool, &wake) => r,
        };
        wake.notify_one();
        attempt = attempt.saturating_add(1);
        let exp = cfg
            .runtime
            .retry_initial_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(cfg.runtime.retry_max_ms);
        let delay = Duration::from_millis(rand::random_range(exp / 2..=exp.max(1)));
        if let Err(e) = result {
            debug!(error = %e, "outbox LISTEN lost; polling meanwhile");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn listen_once(pool: &PgPool, wake: &Notify) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANNEL).await?;
    wake.notify_one();
    loop {
        match listener.try_recv().await? {
            Some(_) => wake.notify_one(),
            // Reconnected: notifications sent meanwhile are lost.
            None => wake.notify_one(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    #[test]
    fn fair_share_covers_every_lane() {
        assert_eq!(fair_share(64, 1), 64);
        assert_eq!(fair_share(64, 3), 22);
        assert_eq!(fair_share(64, 64), 1);
        assert_eq!(fair_share(64, 100), 1);
        assert_eq!(fair_share(64, 0), 64, "at least this relay is alive");
        for lanes in 1..100 {
            for live in 1..20 {
                assert!(fair_share(lanes, live) as i64 * live >= i64::from(lanes));
            }
        }
    }

    #[test]
    fn headers_from_jsonb() {
        let h = kafka_headers(&serde_json::json!({
            "event_id": "e-1", "n": 3, "none": null
        }));
        let got: Vec<(String, Option<Vec<u8>>)> = h
            .iter()
            .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
            .collect();
        assert_eq!(
            got,
            vec![
                ("event_id".to_string(), Some(b"e-1".to_vec())),
                ("n".to_string(), Some(b"3".to_vec())),
                ("none".to_string(), None),
            ]
        );
        assert_eq!(kafka_headers(&serde_json::json!([1])).count(), 0);
    }

    #[test]
    fn producer_never_expires_messages() {
        let mut kafka = KafkaConfig::default();
        kafka
            .producer
            .insert("delivery.timeout.ms".into(), "30000".into());
        kafka
            .producer
            .insert("message.timeout.ms".into(), "30000".into());
        let c = producer_config(&kafka);
        assert_eq!(c.get("message.timeout.ms"), Some("0"));
        assert_eq!(c.get("delivery.timeout.ms"), None);
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
    }

    #[test]
    fn idle_timeout_outlasts_every_healthy_pause() {
        let cfg = Config::default();
        let t = idle_session_timeout_ms(&cfg);
        assert!(t >= 15_000);
        assert!(t > cfg.runtime.retry_max_ms * 2);
        assert!(t > cfg.relay.poll_interval_ms * 2);
    }

    #[test]
    fn metadata_answers() {
        assert_eq!(classify_topic(None, 3), Check::Exists);
        assert_eq!(classify_topic(None, 0), Check::Unknown);
        assert_eq!(
            classify_topic(Some(RDKafkaErrorCode::UnknownTopicOrPartition), 0),
            Check::Problem(Problem::Missing, "UnknownTopicOrPartition".into())
        );
        assert!(matches!(
            classify_topic(Some(RDKafkaErrorCode::TopicAuthorizationFailed), 0),
            Check::Problem(Problem::Unauthorized, _)
        ));
        assert_eq!(
            classify_topic(Some(RDKafkaErrorCode::LeaderNotAvailable), 3),
            Check::Unknown
        );
        assert_eq!(
            classify_topic(Some(RDKafkaErrorCode::OperationTimedOut), 0),
            Check::Unknown
        );
    }

    #[test]
    fn settle_sorts_delivery_reports() {
        let row = |id: i64, topic: &str| OutboxRow {
            id,
            topic: topic.into(),
            key: None,
            payload: Vec::new(),
            headers: serde_json::Value::Null,
            age_s: 0.0,
        };
        let rows = vec![row(1, "a"), row(2, "gone"), row(3, "b"), row(4, "c")];
        let mut out = Published {
            status: vec![RowStatus::Held; rows.len()],
            ..Published::default()
        };
        let mut blocked = HashSet::new();
        let failed = |code| {
            Ok::<OwnedDeliveryResult, ()>(Err((
                KafkaError::MessageProduction(code),
                rdkafka::message::OwnedMessage::new(
                    None,
                    None,
                    "t".into(),
                    rdkafka::Timestamp::NotAvailable,
                    0,
                    0,
                    None,
                ),
            )))
        };
        let delivered = rdkafka::producer::future_producer::Delivery {
            partition: 0,
            offset: 0,
            timestamp: rdkafka::Timestamp::NotAvailable,
        };
        settle(
            &rows,
            0,
            Ok::<OwnedDeliveryResult, ()>(Ok(delivered)),
            &mut out,
            &mut blocked,
        );
        settle(
            &rows,
            1,
            failed(RDKafkaErrorCode::UnknownTopic),
            &mut out,
            &mut blocked,
        );
        settle(
            &rows,
            2,
            failed(RDKafkaErrorCode::MessageTimedOut),
            &mut out,
            &mut blocked,
        );
        settle(&rows, 3, Err(()), &mut out, &mut blocked);
        assert_eq!(out.status[0], RowStatus::Acked);
        assert_eq!(
            &out.status[1..],
            &[RowStatus::Held, RowStatus::Held, RowStatus::Held]
        );
        assert!(blocked.contains("gone"));
        assert_eq!(out.problems.len(), 1);
        assert_eq!(out.problems[0].1, Problem::Missing);
        assert!(matches!(out.transient, Some((2, _))), "{:?}", out.transient);
    }

    #[test]
    fn shuffle_keeps_elements() {
        let mut v: Vec<i32> = (0..50).collect();
        shuffle(&mut v);
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
