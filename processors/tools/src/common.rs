//! What the benchmarks and the demo share: latency samples and their percentiles, rounding of
//! reported figures, the scratch configuration and topics a run works in, consumer-group and
//! watermark probes, and the one JSON line a command prints last.
//!
//! Invariants: a percentile is the sample at rank `round((n - 1) · q)` of the sorted samples
//! (so `q = 1` is the maximum), 0 when there is none; warm-up samples are never counted.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use serde_json::Value;
use weir_runtime::config::Config;

use crate::private::PrivateOutbox;

/// The `q` quantile (0 ≤ q ≤ 1) of `sorted` (ascending), by nearest rank over `n - 1`; 0 when
/// empty.
pub fn percentile<T: Copy + Into<f64>>(sorted: &[T], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].into()
}

/// `x` rounded to `decimals` decimal places, for reported figures.
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Milliseconds since `t`.
pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Awaits `fut` and returns its output with the milliseconds it took.
pub async fn timed<T>(fut: impl Future<Output = T>) -> (T, f64) {
    let t = Instant::now();
    let out = fut.await;
    (out, ms_since(t))
}

/// Latency samples in ms, the first `warmup` of them not counted.
#[derive(Debug, Default)]
pub struct Samples {
    warmup: usize,
    seen: usize,
    ms: Vec<f64>,
}

impl Samples {
    /// Samples that skip the first `warmup` values (caches, plans and connections settle).
    pub fn after_warmup(warmup: usize) -> Self {
        Self {
            warmup,
            ..Self::default()
        }
    }

    /// Adds one sample; false while it is a warm-up sample (not counted).
    pub fn add(&mut self, ms: f64) -> bool {
        self.seen += 1;
        if self.seen <= self.warmup {
            return false;
        }
        self.ms.push(ms);
        true
    }

    /// p50 and p99 in ms, rounded to µs.
    pub fn p50_p99(mut self) -> (f64, f64) {
        self.ms.sort_by(f64::total_cmp);
        (
            round(percentile(&self.ms, 0.5), 3),
            round(percentile(&self.ms, 0.99), 3),
        )
    }
}

/// A run's configuration: `base` with its topics and consumer groups under `topic_prefix`,
/// so a deployment running beside it (another prefix) never shares a topic or a group.
pub fn scratch_config(base: &Config, topic_prefix: String) -> Config {
    let mut cfg = base.clone();
    cfg.kafka.topic_prefix = topic_prefix;
    cfg
}

/// Creates the topics of `cfg`'s prefix (existing ones are kept).
pub async fn create_topics(cfg: &Config) -> anyhow::Result<()> {
    weir_runtime::kafka::create_topics(&cfg.kafka)
        .await
        .context("creating the benchmark's topics")?;
    Ok(())
}

/// Registers the bundled schemas for the topics of `cfg`'s prefix.
pub async fn register_schemas(cfg: &Config) -> anyhow::Result<()> {
    let schemas = weir_runtime::ops::load_schemas(None).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        weir_runtime::ops::register_schemas(cfg, &schemas).await?,
        "registering schemas"
    );
    Ok(())
}

/// A gateway of a benchmark's own, under `cfg`'s topic prefix: its topics made and schemas
/// registered, its state built, and a fresh workspace with a key of `permission`.
pub struct OwnGateway {
    pub state: weir_gateway::AppState,
    pub pool: sqlx::PgPool,
    pub workspace: String,
    pub key: String,
}

/// Makes an [`OwnGateway`] (not yet listening: hand `state` to `weir_gateway::spawn`).
pub async fn own_gateway(
    cfg: &std::sync::Arc<Config>,
    permission: weir_model::Permission,
) -> anyhow::Result<OwnGateway> {
    create_topics(cfg).await?;
    register_schemas(cfg).await?;
    let state = weir_gateway::state(cfg.clone(), weir_gateway::Sources::default()).await?;
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let workspace = format!("bench-{}", uuid::Uuid::now_v7().simple());
    let key = weir_gateway::auth::create_key(&pool, &workspace, permission)
        .await?
        .key;
    Ok(OwnGateway {
        state,
        pool,
        workspace,
        key,
    })
}

/// An outbox of the run's own beside the deployment's (see [`PrivateOutbox`]).
pub async fn own_outbox(cfg: &Config, label: &str) -> anyhow::Result<PrivateOutbox> {
    PrivateOutbox::create(&cfg.postgres, label)
        .await
        .context("creating the benchmark's own outbox")
}

/// `VACUUM (ANALYZE)` of `tables`: earlier runs deleted what they wrote; every run starts from
/// vacuumed tables with fresh statistics, so the paths compared meet the same database.
pub async fn vacuum_analyze(pool: &sqlx::PgPool, tables: &[&str]) -> anyhow::Result<()> {
    for table in tables {
        sqlx::query(&format!("VACUUM (ANALYZE) {table}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Whether the consumer group `base` (under `cfg`'s prefix) is stable with `members` members,
/// or with any member when `None`. Blocking (librdkafka): call it from `spawn_blocking`.
pub fn group_stable(cfg: &Config, base: &str, members: Option<usize>) -> anyhow::Result<bool> {
    let group = cfg.kafka.group(base);
    let state = weir_runtime::kafka::group_state(&cfg.kafka, &group, Duration::from_secs(10))?;
    Ok(matches!(state, Some((s, n)) if s == "Stable" && members.map_or(n > 0, |m| n == m)))
}

/// The high watermark (next offset) of every partition of `topic`, read with `consumer`.
/// Blocking (librdkafka).
pub fn high_watermarks(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let meta = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("metadata of {topic}"))?;
    let mut out = BTreeMap::new();
    for t in meta.topics() {
        for p in t.partitions() {
            let (_, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .with_context(|| format!("watermarks of {topic}"))?;
            out.insert(p.id(), high);
        }
    }
    Ok(out)
}

/// Prints a command's result: pretty first unless `json_only`, then always as the last line,
/// one JSON object (what scripts and docs/benchmarks.md read).
pub fn print_result(result: &Value, json_only: bool) -> anyhow::Result<()> {
    if !json_only {
        println!("{}", serde_json::to_string_pretty(result)?);
    }
    println!("{result}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_is_the_nearest_rank_over_n_minus_one() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile::<f64>(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7u32], 0.99), 7.0);
    }

    #[test]
    fn warmup_samples_are_not_counted() {
        let mut s = Samples::after_warmup(2);
        assert!(!s.add(1000.0));
        assert!(!s.add(1000.0));
        for ms in [3.0, 1.0, 2.0] {
            assert!(s.add(ms));
        }
        assert_eq!(s.p50_p99(), (2.0, 3.0));
        assert_eq!(round(1.23456, 3), 1.235);
        assert_eq!(round(12.34, 0), 12.0);
    }
}
