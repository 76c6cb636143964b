//! Every metric name the relay emits, in one place. One relay runs per process and the scrape
//! target tells relays apart, so the metrics carry no labels, except [`DEAD`]'s bounded
//! `reason` ([`REASON_REJECTED`], [`REASON_MISSING_TOPIC`], [`REASON_UNAUTHORIZED_TOPIC`]).

/// Rows the broker acknowledged and the relay deleted from the outbox (counter). Rows
/// published again after a crash count again.
pub const PUBLISHED: &str = "weir_relay_published_total";
/// Time of one non-empty batch, from its SELECT to the DELETE of its rows (histogram, seconds).
pub const BATCH_SECONDS: &str = "weir_relay_batch_seconds";
/// Lanes this relay holds (gauge).
pub const LANES_OWNED: &str = "weir_relay_lanes_owned";
/// Age of the oldest outbox row the latest batch saw, by the database clock; 0 when the
/// relay's lanes are empty (gauge, seconds). Alert when it stays high.
pub const OUTBOX_LAG: &str = "weir_relay_outbox_lag_seconds";
/// Batch, rebalance or connection attempts that failed transiently and were retried (counter).
pub const RETRIES: &str = "weir_relay_retries_total";
/// Rows moved to `weir_outbox_dead` (counter), with the label `reason`: [`REASON_REJECTED`],
/// [`REASON_MISSING_TOPIC`] or [`REASON_UNAUTHORIZED_TOPIC`]. Alert on any increase.
pub const DEAD: &str = "weir_relay_dead_total";
/// `reason` of [`DEAD`]: the producer refused the row itself (larger than `message.max.bytes`,
/// invalid topic name): it can never be published as it is.
pub const REASON_REJECTED: &str = "rejected";
/// `reason` of [`DEAD`]: the destination topic stayed missing past
/// `relay.missing_destination_dead_after_ms`.
pub const REASON_MISSING_TOPIC: &str = "missing_topic";
/// `reason` of [`DEAD`]: writing to the destination topic stayed unauthorized past
/// `relay.missing_destination_dead_after_ms`.
pub const REASON_UNAUTHORIZED_TOPIC: &str = "unauthorized_topic";
/// Destination topics this relay holds rows back for because they are missing or
/// unauthorized (gauge). Non-zero for longer than a topic creation takes means rows wait and
/// will be dead-lettered at the bound.
pub const BLOCKED_DESTINATIONS: &str = "weir_relay_blocked_destinations";
/// Outbox rows waiting to be published, counted up to [`PENDING_CAP`], sampled every
/// [`SAMPLE_EVERY`] by the relay process apart from its batches, so it moves even when
/// publishing is stuck (gauge).
pub const OUTBOX_PENDING: &str = "weir_outbox_pending_rows";
/// Age of the oldest outbox row (lowest id), by the database clock, sampled with
/// [`OUTBOX_PENDING`]; 0 when the outbox is empty (gauge, seconds).
pub const OUTBOX_OLDEST_AGE: &str = "weir_outbox_oldest_age_seconds";
/// Sampler queries that failed (counter).
pub const OUTBOX_SAMPLE_FAILURES: &str = "weir_outbox_sample_failures_total";

/// How far [`OUTBOX_PENDING`] counts: the count reads at most this many index entries, so a
/// backlog of millions costs the sampler no more than this.
pub const PENDING_CAP: i64 = 100_000;
/// How often the outbox is sampled.
pub const SAMPLE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The sampler's one statement: rows (capped) and the age of the lowest id (ids grow with
/// time, so it is the oldest row to within the commit order of concurrent writers). Both
/// read the primary key index only.
const SAMPLE_SQL: &str = "SELECT
    (SELECT count(*) FROM (SELECT 1 FROM weir_outbox LIMIT $1) AS s)::bigint AS pending,
    COALESCE((SELECT EXTRACT(EPOCH FROM now() - created_at)::float8
              FROM weir_outbox ORDER BY id LIMIT 1), 0)::float8 AS age";

/// Samples the outbox into [`OUTBOX_PENDING`] and [`OUTBOX_OLDEST_AGE`] every
/// [`SAMPLE_EVERY`] until `stop`. Runs beside the relay's loop, not in it: the gauges say
/// "rows are waiting" even while the relay publishes nothing.
pub async fn sample_outbox(pool: sqlx::PgPool, stop: tokio_util::sync::CancellationToken) {
    // At 0 from the start: `increase()` misses the first increment of a new series.
    for reason in [
        REASON_REJECTED,
        REASON_MISSING_TOPIC,
        REASON_UNAUTHORIZED_TOPIC,
    ] {
        ::metrics::counter!(DEAD, "reason" => reason).increment(0);
    }
    ::metrics::counter!(PUBLISHED).increment(0);
    ::metrics::counter!(RETRIES).increment(0);
    ::metrics::counter!(OUTBOX_SAMPLE_FAILURES).increment(0);
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sampled: Result<(i64, f64), sqlx::Error> = tokio::select! {
            _ = stop.cancelled() => return,
            r = sqlx::query_as(SAMPLE_SQL).bind(PENDING_CAP).fetch_one(&pool) => r,
        };
        match sampled {
            Ok((pending, age)) => {
                ::metrics::gauge!(OUTBOX_PENDING).set(pending as f64);
                ::metrics::gauge!(OUTBOX_OLDEST_AGE).set(age.max(0.0));
            }
            Err(e) => {
                ::metrics::counter!(OUTBOX_SAMPLE_FAILURES).increment(1);
                tracing::debug!(error = %e, "outbox sample failed");
            }
        }
    }
}

/// Help text and units of the relay's metrics. Call once at start, after the recorder is
/// installed (`weir_runtime::telemetry::metrics_handle`).
pub fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(PUBLISHED, Unit::Count,
        "Outbox rows the broker acknowledged and the relay deleted (rows published again after a crash count again).");
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Seconds of one non-empty relay batch, from its SELECT to the DELETE of its rows."
    );
    describe_gauge!(LANES_OWNED, Unit::Count, "Outbox lanes this relay holds.");
    describe_gauge!(OUTBOX_LAG, Unit::Seconds,
        "Age of the oldest outbox row the relay's latest batch saw (its own lanes), by the database clock; 0 when its lanes are empty.");
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Relay batch, rebalance or connection attempts that failed transiently and were retried."
    );
    describe_counter!(
        DEAD,
        Unit::Count,
        "Outbox rows moved to weir_outbox_dead because the broker can never accept them, by reason (rejected, missing_topic, unauthorized_topic)."
    );
    describe_gauge!(
        BLOCKED_DESTINATIONS,
        Unit::Count,
        "Destination topics whose outbox rows this relay holds back because they are missing or unauthorized."
    );
    describe_gauge!(OUTBOX_PENDING, Unit::Count,
        "Outbox rows waiting to be published (all lanes), counted up to 100000, sampled every 5 s by the relay process.");
    describe_gauge!(OUTBOX_OLDEST_AGE, Unit::Seconds,
        "Age of the oldest outbox row (all lanes), by the database clock, sampled every 5 s by the relay process; 0 when empty.");
    describe_counter!(
        OUTBOX_SAMPLE_FAILURES,
        Unit::Count,
        "Outbox sampler queries that failed."
    );
}
