//! Every metric name the runtime emits, in one place, with [`describe`] giving each its help
//! text and unit. Labels: `group` (consumer group), `topic` (a configured topic),
//! `partition` (a partition of a configured topic), `class` (error class), `pool` (which
//! process pool: `main` or `gateway`), `site` (where a connection was taken). Every label
//! takes a value from a fixed list or from the configuration, never from a record: a caller
//! cannot grow the number of series.
//!
//! Histogram buckets are chosen by name suffix in [`crate::telemetry::metrics_handle`]:
//! `_seconds` for latencies in seconds, `_ms` for latencies in milliseconds, `_records` for
//! counts per batch, `_similarity` for cosine similarities. A histogram whose name ends
//! otherwise would be rendered as a summary, which cannot be aggregated across instances;
//! [`HISTOGRAM_SUFFIXES`] lists the suffixes that get buckets.

use std::time::{Duration, Instant};

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Records applied to Postgres (counter).
pub const RECORDS_APPLIED: &str = "weir_records_applied_total";
/// Records skipped because their offset was already applied: redeliveries (counter).
pub const RECORDS_DUPLICATE: &str = "weir_records_duplicate_total";
/// Records sent to the dead-letter topic, by `class` (counter).
pub const RECORDS_DEAD_LETTERED: &str = "weir_records_dead_lettered_total";
/// Batches committed (counter).
pub const BATCHES_COMMITTED: &str = "weir_batches_committed_total";
/// Batch parts split in halves after a data error, to isolate the poison record (counter).
pub const BATCH_SPLITS: &str = "weir_batch_splits_total";
/// Batch attempts that failed transiently and were retried (counter).
pub const BATCH_RETRIES: &str = "weir_batch_retries_total";
/// Records per committed batch (histogram).
pub const BATCH_SIZE: &str = "weir_batch_records";
/// Time from the start of a batch transaction to its commit (histogram, seconds).
pub const BATCH_DURATION: &str = "weir_batch_duration_seconds";
/// Consumer lag per partition, from librdkafka statistics (gauge).
pub const CONSUMER_LAG: &str = "weir_consumer_lag";
/// Age of the last record of the latest committed batch, at its commit, by `group` and
/// `topic` (gauge, seconds).
pub const CONSUMER_LAG_SECONDS: &str = "weir_consumer_lag_seconds";
/// Rebalance callbacks, by `group` and `kind` = assign | revoke | error (counter).
pub const REBALANCES: &str = "weir_consumer_rebalances_total";
/// Partitions currently assigned to this consumer (gauge).
pub const ASSIGNED_PARTITIONS: &str = "weir_assigned_partitions";
/// Offset gaps: records that were expected but not delivered, e.g. deleted by retention (counter).
pub const OFFSET_GAPS: &str = "weir_offset_gaps_total";
/// Outbox rows written (counter).
pub const OUTBOX_WRITTEN: &str = "weir_outbox_rows_written_total";
/// Connections the pool holds, open and idle together, by `pool` (gauge).
pub const DB_POOL_SIZE: &str = "weir_db_pool_connections";
/// Idle connections of the pool, by `pool` (gauge).
pub const DB_POOL_IDLE: &str = "weir_db_pool_idle_connections";
/// Connections of the pool in use (size minus idle), by `pool` (gauge).
pub const DB_POOL_IN_USE: &str = "weir_db_pool_in_use_connections";
/// The pool's configured maximum (`postgres.max_connections`), by `pool` (gauge).
pub const DB_POOL_MAX: &str = "weir_db_pool_max_connections";
/// Time to take a connection from the pool, by `pool` and `site` = batch (a consumer's batch
/// transaction) | probe (the sampler's own periodic acquire) (histogram, seconds).
pub const DB_POOL_ACQUIRE: &str = "weir_db_pool_acquire_seconds";
/// Periodic probes that could not take a connection within `postgres.acquire_timeout_ms`
/// (or Postgres refused one), by `pool` (counter).
pub const DB_POOL_ACQUIRE_FAILURES: &str = "weir_db_pool_acquire_failures_total";
/// CAS operations that failed, by `op` = get | put and `kind` = not_found | corrupt |
/// unavailable | refused | invalid (counter).
pub const CAS_ERRORS: &str = "weir_cas_errors_total";
/// 1 while every readiness component of the process reports ready (what `/readyz`
/// answers 200 for), else 0 (gauge).
pub const READY: &str = "weir_ready";

/// Name suffixes that get histogram buckets (see the module docs).
pub const HISTOGRAM_SUFFIXES: &[&str] = &["_seconds", "_ms", "_records", "_similarity"];
/// Buckets of `_seconds` histograms: 0.5 ms to 10 s.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets of `_ms` histograms: fine steps up to a second, where a healthy hop falls (1, 5,
/// 10, 25, 50, 100, 250, 500, 1000 ms), then up to a minute so a slow hop is still placed.
pub const MS_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0,
];
/// Buckets of `_records` histograms: batch sizes.
pub const RECORDS_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
];
/// Buckets of `_similarity` histograms: cosine similarity near the match threshold.
pub const SIMILARITY_BUCKETS: &[f64] = &[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95, 0.98, 1.0];

/// How often [`watch_pool`] samples a pool.
pub const POOL_SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Help text and units of the runtime's metrics (and the CAS's). Call once at start, after
/// [`crate::telemetry::metrics_handle`] installed the recorder (before, they are lost).
pub fn describe() {
    describe_counter!(
        RECORDS_APPLIED,
        Unit::Count,
        "Records applied to Postgres, by group and topic."
    );
    describe_counter!(RECORDS_DUPLICATE, Unit::Count,
        "Records skipped because their offset was already applied (redeliveries), by group and topic.");
    describe_counter!(RECORDS_DEAD_LETTERED, Unit::Count,
        "Records sent to the dead-letter topic, by group, topic and class (the bounded reason: decode, schema, invalid, ...).");
    describe_counter!(
        BATCHES_COMMITTED,
        Unit::Count,
        "Batches committed, by group and topic."
    );
    describe_counter!(
        BATCH_SPLITS,
        Unit::Count,
        "Batch parts split in halves after a data error, to isolate the poison record, by group."
    );
    describe_counter!(
        BATCH_RETRIES,
        Unit::Count,
        "Batch attempts that failed transiently and were retried, by group."
    );
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Records per committed batch, by group and topic."
    );
    describe_histogram!(
        BATCH_DURATION,
        Unit::Seconds,
        "Seconds from the start of a batch transaction to its commit, by group and topic."
    );
    describe_gauge!(CONSUMER_LAG, Unit::Count,
        "Records between the consumer's position and the partition's end, from librdkafka statistics (telemetry.stats_interval_ms), by group, topic and partition.");
    describe_gauge!(CONSUMER_LAG_SECONDS, Unit::Seconds,
        "Seconds between the Kafka timestamp of the last record of the latest committed batch and that commit, by group and topic. Not refreshed while no batch commits: read it with weir_consumer_lag.");
    describe_counter!(
        REBALANCES,
        Unit::Count,
        "Consumer group rebalance callbacks, by group and kind (assign, revoke, error)."
    );
    describe_gauge!(
        ASSIGNED_PARTITIONS,
        Unit::Count,
        "Partitions currently assigned to this consumer, by group."
    );
    describe_counter!(
        OFFSET_GAPS,
        Unit::Count,
        "Records that were expected but not delivered (e.g. deleted by retention), by group."
    );
    describe_counter!(
        OUTBOX_WRITTEN,
        Unit::Count,
        "Outbox rows written by this process's batches."
    );
    describe_gauge!(
        DB_POOL_SIZE,
        Unit::Count,
        "Connections the Postgres pool holds (in use and idle), sampled every 5 s, by pool."
    );
    describe_gauge!(
        DB_POOL_IDLE,
        Unit::Count,
        "Idle connections of the Postgres pool, sampled every 5 s, by pool."
    );
    describe_gauge!(
        DB_POOL_IN_USE,
        Unit::Count,
        "Connections of the Postgres pool in use (size minus idle), sampled every 5 s, by pool."
    );
    describe_gauge!(
        DB_POOL_MAX,
        Unit::Count,
        "The Postgres pool's maximum size (postgres.max_connections), by pool."
    );
    describe_histogram!(DB_POOL_ACQUIRE, Unit::Seconds,
        "Seconds to take a connection from the Postgres pool, by pool and site: batch (each consumer batch's transaction) or probe (one acquire every 5 s by the sampler). Waiters are not counted by the pool; a rising acquire time is the sign of them.");
    describe_counter!(
        DB_POOL_ACQUIRE_FAILURES,
        Unit::Count,
        "Sampler probes that got no connection (pool timeout or Postgres refused), by pool."
    );
    describe_counter!(
        crate::cas::metrics::PUTS,
        Unit::Count,
        "CAS blobs put, by backend and outcome (stored, deduplicated)."
    );
    describe_counter!(
        crate::cas::metrics::GETS,
        Unit::Count,
        "CAS blobs read, by backend and outcome (ok, not_found, corrupt)."
    );
    describe_counter!(
        crate::cas::metrics::CORRUPT,
        Unit::Count,
        "CAS blobs refused on read because their content does not match their ref, by backend."
    );
    describe_counter!(
        crate::cas::metrics::BYTES_STORED,
        Unit::Bytes,
        "Compressed bytes written by CAS puts that stored a blob, by backend."
    );
    describe_counter!(CAS_ERRORS, Unit::Count,
        "CAS operations that failed, by op (get, put) and kind (not_found, corrupt, unavailable, refused, invalid).");
    describe_gauge!(
        READY,
        Unit::Count,
        "1 while every readiness component of the process is ready (/readyz answers 200), else 0."
    );
}

/// Dead-letter classes of the consumer (`class` of [`RECORDS_DEAD_LETTERED`]): decode
/// failures, records a forced dead-lettering took (`apply`), records the processor rejected.
pub const DEAD_LETTER_CLASSES: &[&str] = &["framing", "unknown_schema", "avro", "apply", "invalid"];
/// `kind` values of [`CAS_ERRORS`] ([`crate::cas::CasError::kind`]).
pub const CAS_ERROR_KINDS: &[&str] = &["not_found", "corrupt", "unavailable", "refused", "invalid"];

/// Creates a consumer's error counters at 0 when it starts. Prometheus' `increase()` cannot
/// see the first increment of a series that appears with it, so an alert on dead letters
/// would miss the first one; and a dashboard panel shows 0 rather than nothing.
pub fn register_consumer(group: &str, topic: &str) {
    for class in DEAD_LETTER_CLASSES {
        metrics::counter!(RECORDS_DEAD_LETTERED, "group" => group.to_string(),
            "topic" => topic.to_string(), "class" => *class)
        .increment(0);
    }
    for kind in ["assign", "revoke", "error"] {
        metrics::counter!(REBALANCES, "group" => group.to_string(), "kind" => kind).increment(0);
    }
    metrics::counter!(BATCH_RETRIES, "group" => group.to_string()).increment(0);
    metrics::counter!(BATCH_SPLITS, "group" => group.to_string()).increment(0);
}

/// Creates the CAS error counters at 0 (see [`register_consumer`] for why), for the
/// configured backend.
pub fn register_cas(cfg: &crate::config::Config) {
    let backend = match cfg.cas.backend {
        crate::config::CasBackend::S3 => "s3",
        crate::config::CasBackend::Local => "local",
    };
    metrics::counter!(crate::cas::metrics::CORRUPT, "backend" => backend).increment(0);
    for op in ["get", "put"] {
        for kind in CAS_ERROR_KINDS {
            metrics::counter!(CAS_ERRORS, "op" => op, "kind" => *kind).increment(0);
        }
    }
}

/// Samples `pool` every [`POOL_SAMPLE_EVERY`] into the `weir_db_pool_*` gauges, labelled
/// `pool = name`, and times one acquire per sample (`site = probe`), until `stop`. sqlx
/// does not count the tasks waiting for a connection: the acquire time stands for them.
pub async fn watch_pool(pool: PgPool, name: &'static str, stop: CancellationToken) {
    let max = pool.options().get_max_connections();
    metrics::counter!(DB_POOL_ACQUIRE_FAILURES, "pool" => name).increment(0);
    let mut tick = tokio::time::interval(POOL_SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let size = pool.size();
        let idle = u32::try_from(pool.num_idle()).unwrap_or(u32::MAX).min(size);
        metrics::gauge!(DB_POOL_MAX, "pool" => name).set(f64::from(max));
        metrics::gauge!(DB_POOL_SIZE, "pool" => name).set(f64::from(size));
        metrics::gauge!(DB_POOL_IDLE, "pool" => name).set(f64::from(idle));
        metrics::gauge!(DB_POOL_IN_USE, "pool" => name).set(f64::from(size - idle));
        let started = Instant::now();
        let acquired = tokio::select! {
            _ = stop.cancelled() => return,
            c = pool.acquire() => c,
        };
        match acquired {
            Ok(conn) => {
                drop(conn);
                metrics::histogram!(DB_POOL_ACQUIRE, "pool" => name, "site" => "probe")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => {
                metrics::counter!(DB_POOL_ACQUIRE_FAILURES, "pool" => name).increment(1);
                tracing::debug!(pool = name, error = %e, "pool probe got no connection");
            }
        }
    }
}

/// Records the time a consumer batch waited for its connection (`site = batch`).
pub fn record_batch_acquire(elapsed: Duration) {
    metrics::histogram!(DB_POOL_ACQUIRE, "pool" => "main", "site" => "batch")
        .record(elapsed.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_lists_are_sorted_and_hold_the_seed_hop_buckets() {
        for b in [
            SECONDS_BUCKETS,
            MS_BUCKETS,
            RECORDS_BUCKETS,
            SIMILARITY_BUCKETS,
        ] {
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        }
        for seed in [1.0, 5.0, 10.0, 50.0, 100.0, 500.0, 1000.0] {
            assert!(MS_BUCKETS.contains(&seed), "seed bucket {seed} missing");
        }
    }

    #[test]
    fn histograms_render_with_buckets_and_help() {
        let handle = crate::telemetry::metrics_handle();
        metrics::histogram!("weir_unit_test_hop_ms").record(7.0);
        metrics::histogram!("weir_unit_test_wait_seconds").record(0.003);
        metrics::histogram!(BATCH_SIZE, "group" => "unit-test").record(12.0);
        metrics::gauge!(READY).set(1.0);
        let text = handle.render();
        for want in [
            "weir_unit_test_hop_ms_bucket{le=\"10\"} 1",
            "weir_unit_test_hop_ms_bucket{le=\"1000\"} 1",
            "weir_unit_test_wait_seconds_bucket{le=\"0.005\"} 1",
            "weir_batch_records_bucket{group=\"unit-test\",le=\"25\"} 1",
            "# HELP weir_ready 1 while every readiness component",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(
            !text.contains("quantile="),
            "a histogram rendered as a summary:\n{text}"
        );
    }

    #[test]
    fn every_histogram_name_gets_buckets() {
        for h in [BATCH_SIZE, BATCH_DURATION, DB_POOL_ACQUIRE] {
            assert!(HISTOGRAM_SUFFIXES.iter().any(|s| h.ends_with(s)), "{h}");
        }
    }
}
