//! The sustained mixed workload of `weir chaos`, driven through the gateway (being written).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;
use weir_runtime::config::Config;

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
    /// Records sent on purpose that must end in the DLQ or be rejected, per minute.
    pub poison_per_min: f64,
}

/// The running workload.
pub struct Load {
    _private: (),
}

/// A cheap view of the workload while it runs.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Answers by HTTP status, cumulative; 0 = no connection.
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
    /// What was asked: `put`, `patch`, `run`, `completion`, `cache_entry`, `cache_lookup`.
    pub kind: &'static str,
    /// HTTP status; 0 = no connection.
    pub status: u16,
    /// Whether it carried `Retry-After`.
    pub retry_after: bool,
}

/// Everything acknowledged and everything answered, with wall-clock times.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Every HTTP answer.
    pub answers: Vec<Answer>,
    /// `(when, kind, latency)`, kind `patch_visible` or `next_node_ready`.
    pub latencies: Vec<(SystemTime, &'static str, Duration)>,
}

/// Creates its own workspace(s) and keys, then starts the workload tasks.
pub async fn start(
    _cfg: &Config,
    _load: LoadConfig,
    _stop: CancellationToken,
) -> anyhow::Result<Load> {
    anyhow::bail!("the workload is being written")
}

impl Load {
    /// Cheap snapshot while running.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::default()
    }

    /// After `stop` is cancelled: stops offering new work, lets the workers answer every
    /// NodeReady of acknowledged runs until they end (or `timeout`), returns the ledger.
    pub async fn finish(self, _timeout: Duration) -> anyhow::Result<Ledger> {
        Ok(Ledger::default())
    }
}
