//! The sections every processor shares: `runtime` (batching, retries, shutdown), `outbox`,
//! `relay` and `telemetry`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// How processors consume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Most records in one batch (one Postgres transaction).
    pub max_batch: usize,
    /// Longest time a batch waits for more records once it has its first, in ms. The
    /// default, 0, takes what has already been fetched and applies it at once: an idle
    /// processor waits on no timer, and under load records pile up while the previous batch
    /// commits, so batches grow with the load up to `max_batch` by themselves. A larger value
    /// only trades latency for fewer, larger batches at a moderate load.
    pub max_wait_ms: u64,
    /// First delay before retrying a batch after a transient failure, in ms.
    pub retry_initial_ms: u64,
    /// Cap of the exponential retry delay, in ms.
    pub retry_max_ms: u64,
    /// On SIGINT/SIGTERM, how long the in-flight batch may take before it is rolled back, in ms.
    pub shutdown_deadline_ms: u64,
    /// Whether undecodable or rejected records go to the dead-letter topic (else the batch stops).
    pub dead_letter: bool,
    /// How often a batch is retried on an error that only looks transient (an unknown or
    /// internal SQLSTATE, a statement timeout, out of memory) before it is bisected like a
    /// data error, so a record whose content causes it ends in the dead-letter topic instead
    /// of stopping its partitions. Clearly environmental errors (connections, deadlocks,
    /// failovers) are retried for as long as they last.
    pub suspect_retries: u32,
    /// Consumers per processor in one process. Each is a member of the group, so partitions
    /// spread over them and their batches run concurrently: one batch's folding overlaps
    /// another's Postgres work. The default, 2, suits the 2-core machines weir is sized for
    /// (one batch computing while the other waits on Postgres); 1 on a single core.
    pub consumers: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_batch: 2_000,
            max_wait_ms: 0,
            retry_initial_ms: 100,
            retry_max_ms: 10_000,
            shutdown_deadline_ms: 15_000,
            dead_letter: true,
            suspect_retries: 5,
            consumers: 2,
        }
    }
}

impl RuntimeConfig {
    /// Delay before retry number `attempt` (1-based): exponential from `retry_initial_ms`,
    /// capped at `retry_max_ms`, with jitter in the upper half so that many consumers or
    /// relays failing together do not retry in lockstep.
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let exp = self
            .retry_initial_ms
            .saturating_mul(1u64 << attempt.min(20))
            .min(self.retry_max_ms);
        std::time::Duration::from_millis(rand::random_range(exp / 2..=exp.max(1)))
    }
}

/// Outbox settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Number of ordering lanes; a key always maps to the same lane (hash of the key).
    pub lanes: i32,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self { lanes: 64 }
    }
}

/// Outbox relay settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Most outbox rows published per transaction.
    pub batch_size: usize,
    /// Poll interval when no NOTIFY arrives (the fallback wake-up), in ms.
    pub poll_interval_ms: u64,
    /// How often a relay re-balances its lanes against the live relays, in ms.
    pub rebalance_interval_ms: u64,
    /// A relay whose heartbeat is older than this is considered gone, in ms.
    pub heartbeat_timeout_ms: u64,
    /// How long a destination topic may stay missing (unknown topic or partition) or
    /// unauthorized (topic authorization failed) before the relay moves its outbox rows to
    /// `weir_outbox_dead`, in ms. Until then its rows wait (other topics flow) and are
    /// published in order if the topic appears; after it, its rows are dead-lettered with the
    /// reason (`weir_relay_dead_total{reason}`). Transient broker errors never count.
    pub missing_destination_dead_after_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            poll_interval_ms: 500,
            rebalance_interval_ms: 1_000,
            heartbeat_timeout_ms: 5_000,
            missing_destination_dead_after_ms: 60_000,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Telemetry settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `human` or `json`.
    pub log_format: LogFormat,
    /// tracing filter directive, e.g. `info,weir_runtime=debug` (RUST_LOG wins if set).
    pub log_filter: String,
    /// Address of the HTTP server for /metrics, /healthz and /readyz.
    pub listen: SocketAddr,
    /// How often librdkafka reports statistics (consumer lag), in ms.
    pub stats_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Human,
            log_filter: "info".into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            stats_interval_ms: 5_000,
        }
    }
}
