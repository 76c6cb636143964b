//! Layered configuration: built-in defaults, then an optional TOML file, then the standard
//! service variables that `infra/local/env` prints (`DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`,
//! ...), then `WEIR__SECTION__KEY` variables. Later layers win.
//!
//! The `config` crate merges the layers; `layers.rs` keeps the checks it cannot make as weir
//! needs (its module doc says why, one line each). One file per group of sections holds the
//! structs, their defaults and their field docs; [`Config::validate`] the checks across them;
//! [`Config::to_toml_redacted`] prints the configuration as the file it loads from
//! (`weir config`).
//!
//! Invariants: unknown keys are errors (every struct denies unknown fields); loading reports
//! every problem at once rather than the first; secrets are wrapped in [`Secret`] and never
//! appear in `Debug` or `Display` output, nor in [`Config::to_toml_redacted`]'s.

mod kafka;
mod layers;
mod postgres;
mod processors;
mod registry;
mod runtime;
mod s3;
mod secret;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use kafka::{is_secret_key, KafkaConfig};
pub use postgres::PostgresConfig;
pub use processors::{
    CacheConfig, CoordinatorConfig, EmbedderKind, GatewayConfig, MaterializerConfig,
};
pub use registry::RegistryConfig;
pub use runtime::{LogFormat, OutboxConfig, RelayConfig, RuntimeConfig, TelemetryConfig};
pub use s3::{CasBackend, CasConfig, S3Config, S3Profile, LOCAL_DEV_S3_SECRET};
pub use secret::Secret;

/// The whole configuration of a weir process.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Kafka connection, topic names and librdkafka pass-through options.
    pub kafka: KafkaConfig,
    /// The Postgres database that holds state, consumer positions and the outbox.
    pub postgres: PostgresConfig,
    /// The S3 bucket of the content-addressed store.
    pub s3: S3Config,
    /// The Confluent-compatible schema registry.
    pub schema_registry: RegistryConfig,
    /// How processors consume: batch sizes, retries, shutdown.
    pub runtime: RuntimeConfig,
    /// The transactional outbox.
    pub outbox: OutboxConfig,
    /// Logs, metrics and health endpoints.
    pub telemetry: TelemetryConfig,
    /// The content-addressed blob store.
    pub cas: CasConfig,
    /// The outbox relay.
    pub relay: RelayConfig,
    /// The patch materializer.
    pub materializer: MaterializerConfig,
    /// The HTTP ingestion gateway.
    pub gateway: GatewayConfig,
    /// The run coordinator.
    pub coordinator: CoordinatorConfig,
    /// The result cache (exact and semantic).
    pub cache: CacheConfig,
}

/// Every problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem, each naming the key.
    pub problems: Vec<String>,
}

impl Config {
    /// Loads defaults ← `file` ← standard variables ← `WEIR__*` variables from the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// The configuration as the TOML file it would be loaded from: what `weir config` prints.
    /// Secrets, and the secret-looking keys of the Kafka maps, are commented out and shown as
    /// `"***"`, so a file made from the output loads back to this configuration with its
    /// secrets taken from the environment (or filled in).
    pub fn to_toml_redacted(&self) -> Result<String, toml::ser::Error> {
        let text = secret::redacting(|| toml::to_string(self))?;
        let marker = format!(" = {}", toml::Value::String(secret::REDACTED.into()));
        let mut out = String::with_capacity(text.len());
        for line in text.lines() {
            match line.strip_suffix(marker.as_str()) {
                Some(key) => out.push_str(&format!("# {key} = \"***\"  # secret, not shown")),
                None => out.push_str(line),
            }
            out.push('\n');
        }
        Ok(out)
    }

    /// Checks values that parse but make no sense; returns one line per problem.
    pub fn validate(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.kafka.bootstrap_servers.trim().is_empty() {
            p.push("kafka.bootstrap_servers: must not be empty".into());
        }
        if self.kafka.partitions < 1 {
            p.push("kafka.partitions: must be at least 1".into());
        }
        for (topic, n) in &self.kafka.topic_partitions {
            if *n < 1 {
                p.push(format!(
                    "kafka.topic_partitions.{topic}: must be at least 1"
                ));
            }
        }
        if self.kafka.replication_factor < 1 {
            p.push("kafka.replication_factor: must be at least 1".into());
        }
        let url = self.postgres.url.expose();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            p.push("postgres.url: must start with postgres:// (value hidden)".into());
        }
        if self.postgres.max_connections < 2 {
            p.push("postgres.max_connections: must be at least 2".into());
        }
        if !(1..=64).contains(&self.runtime.consumers) {
            p.push("runtime.consumers: 1 to 64".into());
        }
        if self.runtime.max_batch == 0 {
            p.push("runtime.max_batch: must be at least 1".into());
        }
        if self.materializer.max_batch == 0 {
            p.push("materializer.max_batch: must be at least 1".into());
        }
        if self.runtime.retry_initial_ms == 0
            || self.runtime.retry_max_ms < self.runtime.retry_initial_ms
        {
            p.push("runtime.retry_initial_ms/retry_max_ms: need 0 < initial <= max".into());
        }
        if self.outbox.lanes < 1 {
            p.push("outbox.lanes: must be at least 1".into());
        }
        if !self.schema_registry.url.starts_with("http") {
            p.push("schema_registry.url: must be an http(s) URL".into());
        }
        self.s3.problems(&mut p);
        if self.cas.multipart_part_bytes < 5 * 1024 * 1024 {
            p.push("cas.multipart_part_bytes: S3 needs at least 5 MiB".into());
        }
        if !["", "AES256", "aws:kms"].contains(&self.cas.server_side_encryption.as_str()) {
            p.push("cas.server_side_encryption: one of \"\", \"AES256\", \"aws:kms\"".into());
        }
        if !(1..=22).contains(&self.cas.compression_level) {
            p.push("cas.compression_level: 1 to 22".into());
        }
        if self.relay.batch_size == 0 {
            p.push("relay.batch_size: must be at least 1".into());
        }
        let m = &self.materializer;
        if m.patch_max_operations == 0 {
            p.push("materializer.patch_max_operations: must be at least 1".into());
        }
        if m.patch_max_bytes < m.max_definition_bytes {
            p.push("materializer.patch_max_bytes: must be at least max_definition_bytes".into());
        }
        if !(4..=100).contains(&m.patch_max_depth) {
            p.push("materializer.patch_max_depth: 4 to 100".into());
        }
        // librdkafka's range for fetch.min.bytes.
        if !(1..=100_000_000).contains(&m.fetch_min_bytes) {
            p.push("materializer.fetch_min_bytes: 1 to 100000000".into());
        }
        if m.patch_max_pointer_bytes < 256 {
            p.push("materializer.patch_max_pointer_bytes: must be at least 256".into());
        }
        if self.materializer.inline_definition_max_bytes > self.materializer.max_definition_bytes {
            p.push(
                "materializer.inline_definition_max_bytes: must not exceed max_definition_bytes"
                    .into(),
            );
        }
        if self.gateway.max_body_bytes < 1024 {
            p.push("gateway.max_body_bytes: must be at least 1024".into());
        }
        if self.gateway.rate_limit_per_sec == 0 || self.gateway.rate_limit_burst == 0 {
            p.push("gateway.rate_limit_per_sec/rate_limit_burst: must be at least 1".into());
        }
        if self.gateway.max_in_flight == 0 {
            p.push("gateway.max_in_flight: must be at least 1".into());
        }
        let g = &self.gateway;
        if g.client_rate_limit_per_sec == 0
            || g.client_rate_limit_burst == 0
            || g.unknown_key_rate_per_sec == 0
            || g.unknown_key_burst == 0
        {
            p.push(
                "gateway.client_rate_limit_*/unknown_key_*: rates and bursts must be at least 1"
                    .into(),
            );
        }
        if g.max_connections == 0 || g.max_connections_per_client == 0 || g.max_negative_keys == 0 {
            p.push(
                "gateway.max_connections/max_connections_per_client/max_negative_keys: must be at least 1"
                    .into(),
            );
        }
        if g.header_read_timeout_ms == 0 || g.idle_timeout_ms == 0 || g.body_read_timeout_ms == 0 {
            p.push(
                "gateway.header_read_timeout_ms/idle_timeout_ms/body_read_timeout_ms: must be at least 1"
                    .into(),
            );
        }
        if g.max_header_bytes < 8192 {
            p.push("gateway.max_header_bytes: must be at least 8192".into());
        }
        if self.coordinator.timer_poll_ms == 0 || self.coordinator.timer_batch < 1 {
            p.push("coordinator.timer_poll_ms/timer_batch: must be at least 1".into());
        }
        if !(self.cache.similarity_threshold > 0.0 && self.cache.similarity_threshold <= 1.0) {
            p.push("cache.similarity_threshold: must be in (0, 1]".into());
        }
        for (k, v) in &self.cache.threshold_overrides {
            if !(*v > 0.0 && *v <= 1.0) {
                p.push(format!("cache.threshold_overrides.{k}: must be in (0, 1]"));
            }
        }
        if !(1..=16_000).contains(&self.cache.dimensions) {
            p.push("cache.dimensions: 1 to 16000".into());
        }
        if self.cache.embedder == EmbedderKind::Local && self.cache.dimensions != 384 {
            p.push("cache.dimensions: the local embedder (all-MiniLM-L6-v2) has 384".into());
        }
        if !(1..=1 << 20).contains(&self.cache.max_prompt_bytes) {
            p.push("cache.max_prompt_bytes: 1 to 1048576".into());
        }
        if self.cache.embed_batch == 0 || self.cache.sweep_batch < 1 {
            p.push("cache.embed_batch/sweep_batch: must be at least 1".into());
        }
        if self.s3.bucket.is_empty() {
            p.push("s3.bucket: must not be empty".into());
        }
        p
    }
}
