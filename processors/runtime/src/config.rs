//! Layered configuration: built-in defaults, then an optional TOML file, then the standard
//! service variables that `infra/local/env` prints (`DATABASE_URL`, `KAFKA_BOOTSTRAP_SERVERS`,
//! ...), then `WEIR__SECTION__KEY` variables. Later layers win.
//!
//! Invariants: unknown keys are errors (every struct denies unknown fields); loading reports
//! every problem at once rather than the first; secrets are wrapped in [`Secret`] and never
//! appear in `Debug` or `Display` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// A value that must never be printed (passwords, keys, URLs that embed credentials).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Self {
        Self(value)
    }
    /// The wrapped value; call only where it is handed to a client library.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

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

/// Kafka settings. Its `Debug` output (`weir config`, logs) hides the value of every
/// secret-looking key of the librdkafka maps ([`is_secret_key`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers (env: KAFKA_BOOTSTRAP_SERVERS).
    pub bootstrap_servers: String,
    /// Prefix put in front of every topic name and every processor's consumer group, to run
    /// several environments on one cluster.
    pub topic_prefix: String,
    /// Partitions of each topic that `weir topics create` makes, unless overridden below.
    pub partitions: i32,
    /// Partition count per topic (unprefixed name), overriding `partitions`.
    pub topic_partitions: BTreeMap<String, i32>,
    /// Replication factor of created topics (3 on MSK, 1 on the local single broker).
    pub replication_factor: i32,
    /// Topic-level configs applied to every created topic (e.g. `retention.ms`).
    pub topic_config: BTreeMap<String, String>,
    /// librdkafka options for consumers, passed through as is (e.g. `fetch.wait.max.ms`).
    pub consumer: BTreeMap<String, String>,
    /// librdkafka options for producers, passed through as is (e.g. `linger.ms`).
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            partitions: 6,
            topic_partitions: BTreeMap::new(),
            replication_factor: 1,
            topic_config: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// Whether a librdkafka (or topic) option holds a secret: `sasl.password`,
/// `ssl.key.password`, `ssl.keystore.password`, `sasl.oauthbearer.client.secret`,
/// `ssl.key.pem`, `sasl.jaas.config`, ... Errs on the side of hiding: any key naming a
/// password, secret, token, credential or private key, or ending in `key`/`pem`.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "jaas",
        "private",
        "sasl.oauthbearer.config",
        "sasl.kerberos.keytab",
    ]
    .iter()
    .any(|w| k.contains(w))
        || k.ends_with("key")
        || k.ends_with(".pem")
        || k.ends_with("key.pem")
}

/// A librdkafka map as `Debug` prints it: secret-looking values replaced by `***`.
struct RedactedMap<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &str = if is_secret_key(k) { "***" } else { v };
                (k, shown)
            }))
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("topic_partitions", &self.topic_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("topic_config", &RedactedMap(&self.topic_config))
            .field("consumer", &RedactedMap(&self.consumer))
            .field("producer", &RedactedMap(&self.producer))
            .finish()
    }
}

impl KafkaConfig {
    /// The full topic name of a default topic name, with the environment prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The consumer group of a processor's base group name, with the environment prefix:
    /// deployments sharing a Kafka cluster under different prefixes (staging beside dev,
    /// test runs) never share a group, so one's joins and slow members never stall another's
    /// rebalances. With no prefix it is the base name.
    pub fn group(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }
}

/// Postgres settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (env: DATABASE_URL); secret because it usually embeds a password.
    pub url: Secret<String>,
    /// Upper bound of pooled connections per process.
    pub max_connections: u32,
    /// How long to wait for a pooled connection before the batch is retried, in ms.
    pub acquire_timeout_ms: u64,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            url: Secret::new("postgres://weir:weir@127.0.0.1:5432/weir".into()),
            max_connections: 16,
            acquire_timeout_ms: 5_000,
        }
    }
}

/// Which kind of object store the `s3` section talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum S3Profile {
    /// Amazon S3 (or any store configured explicitly): no endpoint means AWS, no region or
    /// key means the AWS SDK's default chains (environment, profile, container or instance
    /// role), and the local stack's development credentials are refused.
    Aws,
    /// The local stack (`infra/local/env` sets it): endpoint `http://127.0.0.1:9000`,
    /// region `us-east-1` and path-style addressing unless set, development credentials
    /// allowed.
    Local,
}

/// The local stack's S3 secret key (infra/local/lib.sh, infra/docker-compose.yml): refused
/// outside `s3.profile = "local"`, so a deployment cannot run on it by accident.
pub const LOCAL_DEV_S3_SECRET: &str = "weir-secret-key";

/// S3 settings for the content-addressed store.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// `aws` (default) or `local` (env: WEIR__S3__PROFILE; `infra/local/env` sets `local`).
    pub profile: S3Profile,
    /// Endpoint of an S3-compatible server (env: S3_ENDPOINT_URL); empty means AWS itself
    /// (or the local stack's server under the `local` profile).
    pub endpoint_url: String,
    /// Bucket name (env: S3_BUCKET).
    pub bucket: String,
    /// Region (env: AWS_REGION); empty means the AWS SDK's region chain (`us-east-1` under
    /// the `local` profile).
    pub region: String,
    /// Access key id (env: AWS_ACCESS_KEY_ID); empty means the default AWS credential chain.
    pub access_key_id: String,
    /// Secret access key (env: AWS_SECRET_ACCESS_KEY).
    pub secret_access_key: Secret<String>,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatible servers;
    /// always on under the `local` profile.
    pub force_path_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            profile: S3Profile::Aws,
            endpoint_url: String::new(),
            bucket: "weir-cas".into(),
            region: String::new(),
            access_key_id: String::new(),
            secret_access_key: Secret::default(),
            force_path_style: false,
        }
    }
}

impl S3Config {
    /// The endpoint to use, if not AWS's own.
    pub fn effective_endpoint(&self) -> Option<&str> {
        match (self.endpoint_url.as_str(), self.profile) {
            ("", S3Profile::Local) => Some("http://127.0.0.1:9000"),
            ("", S3Profile::Aws) => None,
            (url, _) => Some(url),
        }
    }

    /// The region to use; `None` leaves it to the AWS SDK's chain.
    pub fn effective_region(&self) -> Option<&str> {
        match (self.region.as_str(), self.profile) {
            ("", S3Profile::Local) => Some("us-east-1"),
            ("", S3Profile::Aws) => None,
            (region, _) => Some(region),
        }
    }

    /// Whether to address buckets by path.
    pub fn path_style(&self) -> bool {
        self.force_path_style || self.profile == S3Profile::Local
    }

    fn problems(&self, p: &mut Vec<String>) {
        if !self.endpoint_url.is_empty() && !self.endpoint_url.starts_with("http") {
            p.push("s3.endpoint_url: must be an http(s) URL or empty".into());
        }
        if self.profile != S3Profile::Local
            && self.secret_access_key.expose() == LOCAL_DEV_S3_SECRET
        {
            p.push(
                "s3.secret_access_key: the local stack's development credentials are refused \
                 outside s3.profile = \"local\" (infra/local/env sets WEIR__S3__PROFILE=local); \
                 use real credentials or leave them empty for the AWS default chain"
                    .into(),
            );
        }
        if self.access_key_id.is_empty() != self.secret_access_key.expose().is_empty() {
            p.push(
                "s3.access_key_id/secret_access_key: set both, or neither for the AWS default \
                 credential chain"
                    .into(),
            );
        }
    }
}

/// Schema registry settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Base URL of the Confluent-compatible API (env: SCHEMA_REGISTRY_URL).
    pub url: String,
    /// Basic-auth user, if the registry needs one.
    pub username: String,
    /// Basic-auth password.
    pub password: Secret<String>,
    /// Timeout of one registry call, in ms.
    pub timeout_ms: u64,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8081/apis/ccompat/v7".into(),
            username: String::new(),
            password: Secret::default(),
            timeout_ms: 5_000,
        }
    }
}

/// How processors consume.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Most records in one batch (one Postgres transaction).
    pub max_batch: usize,
    /// Longest time a batch waits for more records once it has its first, in ms. Small, so
    /// an idle system answers quickly; under load batches fill to `max_batch` before it.
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
            max_wait_ms: 5,
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

/// Where CAS blobs live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CasBackend {
    /// The S3 bucket of the `s3` section.
    S3,
    /// A local directory (`cas.local_dir`): single-machine deployments and tools.
    Local,
}

/// CAS settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CasConfig {
    /// `s3` or `local`.
    pub backend: CasBackend,
    /// Directory of the local backend.
    pub local_dir: String,
    /// Key prefix of blobs in the bucket.
    pub key_prefix: String,
    /// zstd level used to compress blobs (1 fast .. 19 small).
    pub compression_level: i32,
    /// Blobs whose compressed size is above this are uploaded in parts, in bytes.
    pub multipart_threshold_bytes: u64,
    /// Size of one part of a multipart upload, in bytes (S3's minimum is 5 MiB).
    pub multipart_part_bytes: u64,
    /// Server-side encryption: "" (bucket default), "AES256" or "aws:kms".
    pub server_side_encryption: String,
    /// KMS key id when `server_side_encryption` is "aws:kms"; empty means the AWS managed key.
    pub kms_key_id: String,
}

impl Default for CasConfig {
    fn default() -> Self {
        Self {
            backend: CasBackend::S3,
            local_dir: ".stack/cas".into(),
            key_prefix: "cas/".into(),
            compression_level: 3,
            multipart_threshold_bytes: 16 * 1024 * 1024,
            multipart_part_bytes: 8 * 1024 * 1024,
            server_side_encryption: String::new(),
            kms_key_id: String::new(),
        }
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

/// Materializer settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaterializerConfig {
    /// Definitions larger than this (bytes of canonical JSON) are stored in the CAS and
    /// referenced from Postgres and events (claim check).
    pub inline_definition_max_bytes: usize,
    /// Largest definition accepted, in bytes of canonical JSON.
    pub max_definition_bytes: usize,
    /// Most nodes in a definition.
    pub max_nodes: usize,
    /// Most edges in a definition.
    pub max_edges: usize,
    /// Memory for heads kept between batches, counted as their canonical JSON bytes (the
    /// parsed form takes a few times that); 0 keeps none. A cached head is used only when its
    /// version and definition sha256 equal the stored head's, so it saves loading and parsing
    /// the definition, never correctness. Full: the cache starts over. A head larger than an
    /// eighth of this is not kept.
    pub head_cache_bytes: usize,
    /// Most patches in one materializer batch; replaces `runtime.max_batch` for this
    /// processor. Batches fill only while the consumer is behind (caught up, a batch is what
    /// arrived during the previous one), so a larger cap buys throughput on a backlog; each
    /// batch commits as one transaction, so it also bounds the latency under full load.
    pub max_batch: usize,
    /// How long a materializer batch waits for more patches once it has its first, in ms;
    /// replaces `runtime.max_wait_ms` for this processor. 0 takes what has already been
    /// fetched: under load, patches pile up while the previous batch commits, so batches
    /// grow with the load by themselves, and a patch arriving at an idle materializer is
    /// applied at once instead of waiting for company.
    pub max_wait_ms: u64,
    /// Most operations in one patch; more is rejected (`budget_ops`; 422 at the gateway).
    pub patch_max_operations: usize,
    /// Most bytes (compact JSON) one patch may produce or compare: every `add`, `replace`
    /// and `test` value, every value a `copy` duplicates (`copy` from `""` doubles the
    /// document), every value a `move` nests deeper. Checked before each operation
    /// allocates; more is rejected (`budget_bytes`). At least `max_definition_bytes`, so a
    /// workflow of the largest size can be created in one operation.
    pub patch_max_bytes: usize,
    /// Deepest nesting, counted from the document root, of any value a patch places (and
    /// of `test` values), and most reference tokens in a pointer; deeper is rejected
    /// (`budget_depth`, `budget_pointer`). Bounds every recursion over a stored definition
    /// (copy, compare, serialize, validate, drop). 4 to 100: serde_json parses at most 128
    /// levels, and a stored definition is parsed again wherever it is read.
    pub patch_max_depth: usize,
    /// Longest pointer (`path`, `from`) in a patch, in bytes; longer is rejected
    /// (`budget_pointer`). Pointers end up in rejection reasons and the patch log.
    pub patch_max_pointer_bytes: usize,
    /// Most array elements one patch may shift by inserting into or removing from the
    /// middle of an array (each shift is a memory move; appending shifts none); more is
    /// rejected (`budget_work`).
    pub patch_max_array_shifts: usize,
}

impl Default for MaterializerConfig {
    fn default() -> Self {
        Self {
            inline_definition_max_bytes: 256 * 1024,
            max_definition_bytes: 4 * 1024 * 1024,
            max_nodes: 1_000,
            max_edges: 10_000,
            head_cache_bytes: 64 * 1024 * 1024,
            max_batch: 3_000,
            max_wait_ms: 0,
            patch_max_operations: 10_000,
            patch_max_bytes: 4 * 1024 * 1024,
            patch_max_depth: 64,
            patch_max_pointer_bytes: 4096,
            patch_max_array_shifts: 4 * 1024 * 1024,
        }
    }
}

/// HTTP ingestion gateway settings (`weir run gateway`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address the API listens on (also serves /healthz, /readyz, /openapi.json; /metrics is
    /// only on `telemetry.listen`).
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger bodies get 413.
    pub max_body_bytes: usize,
    /// How long a found API key is trusted from memory, in ms: a revoked key keeps working
    /// at most this long.
    pub key_cache_ttl_ms: u64,
    /// How long a key Postgres does not know is answered 401 from memory, in ms: a key
    /// created after it was tried works at most this long later.
    pub negative_key_cache_ttl_ms: u64,
    /// Most unknown keys remembered (a separate map from found keys: never evicts them).
    pub max_negative_keys: usize,
    /// Key lookups finding no key allowed per second per client address (sustained); beyond
    /// it, keys not already known are answered 429 without a lookup.
    pub unknown_key_rate_per_sec: u32,
    /// Burst of the per-client budget of lookups finding no key.
    pub unknown_key_burst: u32,
    /// Requests per second allowed per client address before authentication (sustained).
    pub client_rate_limit_per_sec: u32,
    /// Burst of the per-client request bucket.
    pub client_rate_limit_burst: u32,
    /// Take the client address from the last `X-Forwarded-For` entry (the one the load
    /// balancer in front appended) instead of the TCP peer. Only behind a trusted proxy.
    pub client_ip_from_forwarded_for: bool,
    /// Most open client connections; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// Most open connections per client address (TCP peer). Not applied with
    /// `client_ip_from_forwarded_for`: every peer is then the proxy.
    pub max_connections_per_client: usize,
    /// Time a client has to send a request's headers once it started sending them, in ms;
    /// then the connection is closed (slow-header clients).
    pub header_read_timeout_ms: u64,
    /// Time a connection may stay open with no request, in ms (keep it above the idle
    /// timeout of a load balancer in front, 60 s on an ALB).
    pub idle_timeout_ms: u64,
    /// Time a client has to send a request's body once its headers arrived, in ms; then 408.
    pub body_read_timeout_ms: u64,
    /// Largest request head (request line and headers), in bytes; larger: 431. At least 8192.
    pub max_header_bytes: usize,
    /// How long an Idempotency-Key (and the hash of the body it was first used with) is
    /// remembered, in seconds.
    pub idempotency_ttl_secs: u64,
    /// Sustained requests per second allowed per workspace (token bucket refill rate).
    pub rate_limit_per_sec: u32,
    /// Burst size of a workspace's token bucket.
    pub rate_limit_burst: u32,
    /// Most requests waiting for a broker acknowledgement at once; beyond it, 503.
    pub max_in_flight: usize,
    /// How long to wait for the broker to acknowledge an event before answering 503, in ms.
    pub produce_timeout_ms: u64,
    /// Run inputs and cache results larger than this (bytes of JSON) go to the CAS and the
    /// event carries the reference.
    pub inline_max_bytes: usize,
    /// Seconds a client is told to wait (Retry-After) after a 503 or 429.
    pub retry_after_secs: u32,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 1024 * 1024,
            key_cache_ttl_ms: 10_000,
            negative_key_cache_ttl_ms: 2_000,
            max_negative_keys: 100_000,
            unknown_key_rate_per_sec: 5,
            unknown_key_burst: 50,
            client_rate_limit_per_sec: 50_000,
            client_rate_limit_burst: 100_000,
            client_ip_from_forwarded_for: false,
            max_connections: 10_000,
            max_connections_per_client: 1_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 75_000,
            body_read_timeout_ms: 30_000,
            max_header_bytes: 16 * 1024,
            idempotency_ttl_secs: 86_400,
            rate_limit_per_sec: 50_000,
            rate_limit_burst: 100_000,
            max_in_flight: 20_000,
            produce_timeout_ms: 10_000,
            inline_max_bytes: 256 * 1024,
            retry_after_secs: 1,
        }
    }
}

/// Run coordinator settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// A running run with no attempt started or ended for this long is stalled: a RunStalled
    /// event and the stalled metric, once per idle period. In ms.
    pub stall_after_ms: u64,
    /// How often the timer loop looks for due timers and stalled runs, in ms.
    pub timer_poll_ms: u64,
    /// Most runs whose timers one timer transaction applies.
    pub timer_batch: i64,
    /// Cap of one retry delay (exponential backoff stops growing here), in ms.
    pub max_backoff_ms: u64,
    /// Compiled definitions kept in memory (pinned versions never change).
    pub definition_cache: usize,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            stall_after_ms: 600_000,
            timer_poll_ms: 250,
            timer_batch: 500,
            max_backoff_ms: 300_000,
            definition_cache: 10_000,
        }
    }
}

/// Which embedder computes prompt embeddings for the semantic cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbedderKind {
    /// all-MiniLM-L6-v2 in-process (candle, CPU), 384 dimensions, from `cache.model_dir`.
    Local,
    /// An OpenAI-compatible `/v1/embeddings` endpoint (`cache.openai_*`).
    Openai,
}

/// Result cache settings. Per-node-type tables (`ttl_secs`, `semantic_ttl_secs`,
/// `cost_per_hit`, `threshold_overrides`) are set in the file; their keys are free-form.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Node types whose results may be cached (exact); any other type is never cached.
    pub cacheable_node_types: Vec<String>,
    /// Exact-entry time to live per node type, in seconds, fixed at store time.
    pub ttl_secs: BTreeMap<String, u64>,
    /// TTL of an exact entry of a cacheable node type missing from `ttl_secs`, in seconds.
    pub default_ttl_secs: u64,
    /// Semantic-entry (prompt embedding) time to live per node type, in seconds.
    pub semantic_ttl_secs: BTreeMap<String, u64>,
    /// Node types whose lookups may be answered by a semantic (prompt) match.
    pub semantic_node_types: Vec<String>,
    /// Default cosine similarity a semantic match needs (0..1].
    pub similarity_threshold: f64,
    /// Thresholds overriding the default, keyed `"<workspace>/<node_type>"`, `"<workspace>/*"`
    /// or `"*/<node_type>"` (most specific wins).
    pub threshold_overrides: BTreeMap<String, f64>,
    /// Cost saved by one hit, per node type (any unit, e.g. US cents), for the saved-cost metric.
    pub cost_per_hit: BTreeMap<String, f64>,
    /// `local` (built-in all-MiniLM-L6-v2) or `openai`.
    pub embedder: EmbedderKind,
    /// Embedding dimensions of this deployment: 384 for `local`, the model's size for `openai`
    /// (1536 for text-embedding-3-small). Stored entries and event vectors must match it.
    pub dimensions: u32,
    /// Directory holding model.safetensors, config.json and tokenizer.json of the local model
    /// (`infra/local/prereqs` fills `~/.cache/weir/models/all-MiniLM-L6-v2`); "" means that one.
    pub model_dir: String,
    /// Most prompts embedded in one model call.
    pub embed_batch: usize,
    /// Base URL of the OpenAI-compatible API (the path `/v1/embeddings` is appended).
    pub openai_base_url: String,
    /// Embedding model name for the `openai` embedder.
    pub openai_model: String,
    /// API key for the `openai` embedder (env: WEIR__CACHE__OPENAI_API_KEY).
    pub openai_api_key: Secret<String>,
    /// Longest prompt accepted, in bytes (UTF-8). A longer prompt is refused before it is
    /// hashed or embedded: a dead letter on weir.cache.v1, 422 at the gateway.
    pub max_prompt_bytes: usize,
    /// HNSW `ef_search` for semantic lookups (candidate list size; higher is slower, better recall).
    pub hnsw_ef_search: u32,
    /// Results larger than this are not cached, in bytes.
    pub max_result_bytes: usize,
    /// How often the sweeper deletes expired entries, in ms.
    pub sweep_interval_ms: u64,
    /// Most expired entries deleted per sweeper statement.
    pub sweep_batch: i64,
    /// A CAS blob the cache stored is deleted only once no owner has used it for this long
    /// (and the cache has not stored it for this long plus the longest TTL), in seconds:
    /// longer than any event may wait on Kafka before it is applied (docs/cas.md).
    pub gc_grace_secs: u64,
    /// How often the CAS garbage collector runs, in ms.
    pub gc_interval_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_string()).collect::<Vec<_>>();
        let t = |v: &[(&str, u64)]| {
            v.iter()
                .map(|(k, x)| ((*k).to_string(), *x))
                .collect::<BTreeMap<_, _>>()
        };
        Self {
            cacheable_node_types: s(&[
                "function",
                "pure",
                "http_request",
                "database_query",
                "agent",
            ]),
            ttl_secs: t(&[
                ("function", 7 * 86_400),
                ("pure", 30 * 86_400),
                ("http_request", 3_600),
                ("database_query", 300),
                ("agent", 7 * 86_400),
            ]),
            default_ttl_secs: 3_600,
            semantic_ttl_secs: t(&[("agent", 86_400)]),
            semantic_node_types: s(&["agent"]),
            similarity_threshold: 0.92,
            threshold_overrides: BTreeMap::new(),
            cost_per_hit: BTreeMap::new(),
            embedder: EmbedderKind::Local,
            dimensions: 384,
            model_dir: String::new(),
            embed_batch: 32,
            openai_base_url: "https://api.openai.com".into(),
            openai_model: "text-embedding-3-small".into(),
            openai_api_key: Secret::default(),
            max_prompt_bytes: 32 * 1024,
            hnsw_ef_search: 100,
            max_result_bytes: 16 * 1024 * 1024,
            sweep_interval_ms: 60_000,
            sweep_batch: 5_000,
            gc_grace_secs: 86_400,
            gc_interval_ms: 3_600_000,
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

/// Every problem found while loading the configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    /// One line per problem, each naming the key.
    pub problems: Vec<String>,
}

/// Sections whose values are free-form maps (librdkafka and topic options).
const FREE_FORM: &[&str] = &[
    "kafka.topic_partitions",
    "kafka.topic_config",
    "kafka.consumer",
    "kafka.producer",
    "cache.ttl_secs",
    "cache.semantic_ttl_secs",
    "cache.threshold_overrides",
    "cache.cost_per_hit",
];

/// Standard variables that operators already set for other tools, mapped to config keys.
const STANDARD_ENV: &[(&str, &str)] = &[
    ("KAFKA_BOOTSTRAP_SERVERS", "kafka.bootstrap_servers"),
    ("DATABASE_URL", "postgres.url"),
    ("S3_ENDPOINT_URL", "s3.endpoint_url"),
    ("S3_BUCKET", "s3.bucket"),
    ("AWS_REGION", "s3.region"),
    ("AWS_ACCESS_KEY_ID", "s3.access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "s3.secret_access_key"),
    ("SCHEMA_REGISTRY_URL", "schema_registry.url"),
];

impl Config {
    /// Loads defaults ← `file` ← standard variables ← `WEIR__*` variables from the process
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let defaults = serde_json::to_value(Config::default()).map_err(|e| ConfigError {
            problems: vec![format!("defaults: {e}")],
        })?;
        let mut merged = defaults.clone();

        if let Some(path) = file {
            match std::fs::read_to_string(path) {
                Ok(text) => match toml::from_str::<toml::Value>(&text) {
                    Ok(value) => match serde_json::to_value(value) {
                        Ok(json) => merge(&mut merged, json),
                        Err(e) => problems.push(format!("{}: {e}", path.display())),
                    },
                    Err(e) => problems.push(format!("{}: {e}", path.display())),
                },
                Err(e) => problems.push(format!("{}: cannot read: {e}", path.display())),
            }
        }

        let env: Vec<(String, String)> = env.into_iter().collect();
        for (var, key) in STANDARD_ENV {
            if let Some((_, value)) = env.iter().find(|(k, _)| k == var) {
                set_path(&mut merged, key, Json::String(value.clone()));
            }
        }
        let mut weir_env: Vec<_> = env
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("WEIR__").map(|rest| (rest, v)))
            .collect();
        weir_env.sort();
        for (rest, value) in weir_env {
            let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if parts.len() < 2 || parts.iter().any(String::is_empty) {
                problems.push(format!(
                    "WEIR__{rest}: expected WEIR__SECTION__KEY (two or more parts)"
                ));
                continue;
            }
            let mut key = parts[..2].join(".");
            if parts.len() > 2 {
                // librdkafka option names use dots, which variable names cannot hold.
                key = format!("{key}.{}", parts[2..].join("_").replace('_', "."));
            }
            let free = FREE_FORM.iter().any(|f| key.starts_with(&format!("{f}.")));
            let typed = if free {
                Json::String(value.clone())
            } else {
                typed_like(lookup(&defaults, &key), value)
            };
            set_path(&mut merged, &key, typed);
        }

        unknown_keys(&defaults, &merged, "", &mut problems);
        field_errors(&defaults, &merged, &mut problems);

        if !problems.is_empty() {
            return Err(ConfigError { problems });
        }
        let config: Config = serde_json::from_value(merged).map_err(|e| ConfigError {
            problems: vec![e.to_string()],
        })?;
        let invalid = config.validate();
        if invalid.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems: invalid })
        }
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

fn merge(base: &mut Json, over: Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_object() && v.is_object() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

fn set_path(root: &mut Json, dotted: &str, value: Json) {
    // Free-form maps take the rest of the path as one key ("kafka.consumer.fetch.wait.max.ms").
    let head: Vec<&str> = dotted.splitn(3, '.').collect();
    let path: Vec<&str> = if head.len() == 3 && FREE_FORM.contains(&head[..2].join(".").as_str()) {
        head
    } else {
        dotted.split('.').collect()
    };
    let mut cur = root;
    for (i, part) in path.iter().enumerate() {
        if !cur.is_object() {
            *cur = Json::Object(Default::default());
        }
        let Json::Object(map) = cur else { return };
        if i + 1 == path.len() {
            map.insert((*part).to_string(), value);
            return;
        }
        cur = map
            .entry((*part).to_string())
            .or_insert_with(|| Json::Object(Default::default()));
    }
}

fn lookup<'a>(root: &'a Json, dotted: &str) -> Option<&'a Json> {
    dotted.split('.').try_fold(root, |v, k| v.get(k))
}

/// Environment values are strings; give them the type the default has so that
/// `WEIR__RUNTIME__MAX_BATCH=500` is a number.
fn typed_like(default: Option<&Json>, raw: &str) -> Json {
    match default {
        Some(Json::Number(_)) => serde_json::from_str::<serde_json::Number>(raw)
            .map(Json::Number)
            .unwrap_or_else(|_| Json::String(raw.into())),
        Some(Json::Bool(_)) => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Json::Bool(true),
            "false" | "0" | "no" => Json::Bool(false),
            _ => Json::String(raw.into()),
        },
        _ => Json::String(raw.into()),
    }
}

fn unknown_keys(defaults: &Json, given: &Json, prefix: &str, problems: &mut Vec<String>) {
    let (Json::Object(d), Json::Object(g)) = (defaults, given) else {
        return;
    };
    for (k, v) in g {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        if FREE_FORM.contains(&path.as_str()) {
            continue;
        }
        match d.get(k) {
            None => problems.push(format!("{path}: unknown key")),
            Some(dv) => unknown_keys(dv, v, &path, problems),
        }
    }
}

/// Type-checks each given leaf on its own against the defaults, so that every wrong value is
/// reported, not just the first serde meets.
fn field_errors(defaults: &Json, merged: &Json, problems: &mut Vec<String>) {
    fn check<T: DeserializeOwned>(
        section: &str,
        defaults: &Json,
        merged: &Json,
        problems: &mut Vec<String>,
    ) {
        let (Some(Json::Object(d)), Some(Json::Object(m))) =
            (defaults.get(section), merged.get(section))
        else {
            if merged.get(section).is_some_and(|v| !v.is_object()) {
                problems.push(format!("{section}: must be a table"));
            }
            return;
        };
        for (key, value) in m {
            if !d.contains_key(key) {
                continue; // reported as unknown
            }
            let mut probe = d.clone();
            probe.insert(key.clone(), value.clone());
            if let Err(e) = serde_json::from_value::<T>(Json::Object(probe)) {
                problems.push(format!("{section}.{key}: {e}"));
            }
        }
    }
    check::<KafkaConfig>("kafka", defaults, merged, problems);
    check::<PostgresConfig>("postgres", defaults, merged, problems);
    check::<S3Config>("s3", defaults, merged, problems);
    check::<RegistryConfig>("schema_registry", defaults, merged, problems);
    check::<RuntimeConfig>("runtime", defaults, merged, problems);
    check::<OutboxConfig>("outbox", defaults, merged, problems);
    check::<TelemetryConfig>("telemetry", defaults, merged, problems);
    check::<CasConfig>("cas", defaults, merged, problems);
    check::<RelayConfig>("relay", defaults, merged, problems);
    check::<MaterializerConfig>("materializer", defaults, merged, problems);
    check::<GatewayConfig>("gateway", defaults, merged, problems);
    check::<CoordinatorConfig>("coordinator", defaults, merged, problems);
    check::<CacheConfig>("cache", defaults, merged, problems);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_and_passthrough_keys_keep_dots() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[runtime]\nmax_batch = 100\nmax_wait_ms = 7\n[kafka]\ntopic_prefix = \"dev.\"\n[kafka.consumer]\n\"fetch.wait.max.ms\" = \"20\""
        )
        .unwrap();
        let cfg = Config::load_from(
            Some(file.path()),
            env(&[
                ("DATABASE_URL", "postgres://u:p@db:5432/x"),
                ("WEIR__RUNTIME__MAX_BATCH", "250"),
                ("WEIR__KAFKA__PRODUCER__LINGER_MS", "3"),
                ("WEIR__TELEMETRY__LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.runtime.max_batch, 250, "env wins over file");
        assert_eq!(cfg.runtime.max_wait_ms, 7, "file wins over defaults");
        assert_eq!(cfg.kafka.topic("weir.patches.v1"), "dev.weir.patches.v1");
        assert_eq!(cfg.kafka.consumer["fetch.wait.max.ms"], "20");
        assert_eq!(cfg.kafka.producer["linger.ms"], "3");
        assert_eq!(cfg.telemetry.log_format, LogFormat::Json);
        assert_eq!(cfg.postgres.url.expose(), "postgres://u:p@db:5432/x");
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("u:p@"),
            "the database password must not print"
        );
        assert!(
            !shown.contains("weir-secret-key"),
            "the S3 secret must not print"
        );
    }

    #[test]
    fn s3_defaults_are_aws_and_dev_credentials_need_the_local_profile() {
        let cfg = Config::load_from(None, env(&[])).unwrap();
        assert_eq!(cfg.s3.profile, S3Profile::Aws);
        assert_eq!(cfg.s3.effective_endpoint(), None, "no endpoint: AWS itself");
        assert_eq!(
            cfg.s3.effective_region(),
            None,
            "no region: the SDK's chain"
        );
        assert!(cfg.s3.access_key_id.is_empty(), "no key: the SDK's chain");
        assert!(!cfg.s3.path_style());

        // What infra/local/env prints, without the profile: refused.
        let local = [
            ("S3_ENDPOINT_URL", "http://127.0.0.1:9000"),
            ("AWS_ACCESS_KEY_ID", "weir"),
            ("AWS_SECRET_ACCESS_KEY", LOCAL_DEV_S3_SECRET),
            ("AWS_REGION", "us-east-1"),
        ];
        let err = Config::load_from(None, env(&local))
            .unwrap_err()
            .to_string();
        assert!(err.contains("development credentials are refused"), "{err}");
        assert!(
            !err.contains(LOCAL_DEV_S3_SECRET),
            "the secret must not print: {err}"
        );

        // With it: accepted, path-style.
        let mut with_profile = local.to_vec();
        with_profile.push(("WEIR__S3__PROFILE", "local"));
        let cfg = Config::load_from(None, env(&with_profile)).unwrap();
        assert_eq!(cfg.s3.profile, S3Profile::Local);
        assert!(cfg.s3.path_style());
        assert_eq!(cfg.s3.effective_endpoint(), Some("http://127.0.0.1:9000"));

        // The local profile alone fills in the local server.
        let cfg = Config::load_from(None, env(&[("WEIR__S3__PROFILE", "local")])).unwrap();
        assert_eq!(cfg.s3.effective_endpoint(), Some("http://127.0.0.1:9000"));
        assert_eq!(cfg.s3.effective_region(), Some("us-east-1"));

        // Half a key pair is a mistake.
        let err = Config::load_from(None, env(&[("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("set both"), "{err}");
    }

    #[test]
    fn kafka_secrets_are_redacted_in_debug_output() {
        let cfg = Config::load_from(
            None,
            env(&[
                ("WEIR__KAFKA__CONSUMER__SASL__PASSWORD", "hunter2-consumer"),
                ("WEIR__KAFKA__PRODUCER__SASL__PASSWORD", "hunter2-producer"),
                ("WEIR__KAFKA__PRODUCER__SSL__KEY__PASSWORD", "keypass-1"),
                ("WEIR__KAFKA__CONSUMER__SASL__USERNAME", "weir-user"),
                ("WEIR__KAFKA__CONSUMER__FETCH__WAIT__MAX__MS", "20"),
            ]),
        )
        .unwrap();
        let mut cfg = cfg;
        for (k, v) in [
            ("ssl.keystore.password", "keystore-2"),
            ("sasl.oauthbearer.client.secret", "oauth-3"),
            ("ssl.key.pem", "-----BEGIN PRIVATE KEY-----4"),
            ("sasl.jaas.config", "jaas-5"),
            ("ssl.truststore.password", "trust-6"),
            ("sasl.oauthbearer.config", "principal=x secret-7"),
        ] {
            cfg.kafka.consumer.insert(k.into(), v.into());
        }
        let shown = format!("{cfg:#?}");
        for secret in [
            "hunter2-consumer",
            "hunter2-producer",
            "keypass-1",
            "keystore-2",
            "oauth-3",
            "PRIVATE KEY",
            "jaas-5",
            "trust-6",
            "secret-7",
        ] {
            assert!(!shown.contains(secret), "{secret} printed:\n{shown}");
        }
        assert!(shown.contains("weir-user"), "non-secrets still print");
        assert!(shown.contains("\"20\""), "non-secrets still print");
        for k in [
            "sasl.password",
            "ssl.key.password",
            "ssl.ca.pem",
            "my.api.key",
            "x.token",
        ] {
            assert!(is_secret_key(k), "{k}");
        }
        for k in [
            "sasl.username",
            "fetch.wait.max.ms",
            "security.protocol",
            "ssl.ca.location",
        ] {
            assert!(!is_secret_key(k), "{k}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(
            file,
            "[runtime]\nmax_batch = \"lots\"\nbogus = 1\n[kafka]\npartitions = 0\n[nosuch]\nx = 1"
        )
        .unwrap();
        let err = Config::load_from(
            Some(file.path()),
            env(&[
                ("WEIR__TELEMETRY__LISTEN", "not-an-address"),
                ("WEIR__X", "1"),
            ]),
        )
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "runtime.max_batch",
            "runtime.bogus: unknown key",
            "nosuch: unknown key",
            "telemetry.listen",
            "WEIR__X",
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        // Semantic checks run once the shape is right.
        let err = Config::load_from(
            None,
            env(&[
                ("WEIR__KAFKA__PARTITIONS", "0"),
                ("WEIR__MATERIALIZER__MAX_BATCH", "0"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("kafka.partitions: must be at least 1"),
            "{err}"
        );
        assert!(
            err.contains("materializer.max_batch: must be at least 1"),
            "{err}"
        );
        // The materializer's own batching settings parse from the environment.
        let cfg = Config::load_from(
            None,
            env(&[
                ("WEIR__MATERIALIZER__MAX_BATCH", "500"),
                ("WEIR__MATERIALIZER__MAX_WAIT_MS", "3"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (cfg.materializer.max_batch, cfg.materializer.max_wait_ms),
            (500, 3)
        );
    }
}
