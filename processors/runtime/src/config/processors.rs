//! The sections of one processor each: `materializer`, `gateway`, `coordinator`, `cache`.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::Secret;

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
    /// `fetch.min.bytes` of the materializer's consumers: the broker answers a fetch once
    /// this many bytes are there, or after `fetch.wait.max.ms` (100 ms by default). The
    /// default, 1, answers as soon as one patch is there, so an idle pipeline waits on no
    /// timer; under load each fetch returns what arrived since the previous one. A larger
    /// value means fewer fetch requests for the broker at a high sustained rate, for up to
    /// `fetch.wait.max.ms` more latency per patch when the rate is low: set that lower too
    /// (the previous defaults were 65536 with `kafka.consumer."fetch.wait.max.ms" = "10"`).
    /// `kafka.consumer."fetch.min.bytes"` still wins over it.
    pub fetch_min_bytes: u32,
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
            fetch_min_bytes: 1,
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
    /// Accept queue length of the listening socket (`listen(2)` backlog): connections the
    /// kernel completes while the gateway is busy. The kernel caps it at
    /// `net.core.somaxconn` (infra/os sets 8192); 0 is taken as 1.
    pub listen_backlog: u32,
    /// Most open event streams (`GET .../events`) on this gateway instance; beyond it, 503
    /// with Retry-After.
    pub max_streams: usize,
    /// Most open event streams of one workspace on this gateway instance; beyond it, 429
    /// with Retry-After.
    pub max_streams_per_workspace: usize,
    /// Interval of an event stream's heartbeat comment, in ms; each heartbeat also reads the
    /// stream's state again, so a change no event announced is sent within this time.
    pub stream_heartbeat_ms: u64,
    /// Change notifications one stream may have pending; a stream whose client does not keep
    /// up fills it and is closed (the client reconnects with Last-Event-ID).
    pub stream_buffer: usize,
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
            listen_backlog: 4096,
            max_streams: 10_000,
            max_streams_per_workspace: 1_000,
            stream_heartbeat_ms: 15_000,
            stream_buffer: 64,
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
