//! The command line: every command, its arguments and their help text (clap derive). What
//! a command does is in [`crate::commands`]; `weir --help` is generated from the doc comments
//! here, so they are written for the user.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "weir: event-sourced stream processing for workflow orchestration"
)]
pub struct Cli {
    /// TOML configuration file (layered over the defaults, under the environment).
    #[arg(long, global = true, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Apply the SQL migrations in sql/ (embedded in this binary).
    Migrate,
    /// Kafka topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Avro schemas in the schema registry.
    Schemas {
        #[command(subcommand)]
        command: SchemasCommand,
    },
    /// Check every dependency and print what to fix.
    Doctor,
    /// Print the effective configuration as a TOML file (secrets hidden, as comments).
    Config,
    /// Run every processor and the relay in this one process, with /metrics, /healthz and
    /// /readyz, until interrupted.
    Dev,
    /// Run one processor until interrupted.
    Run {
        /// Which one.
        #[arg(value_enum)]
        processor: ProcessorName,
    },
    /// JSON Patch tools.
    Patch {
        #[command(subcommand)]
        command: PatchCommand,
    },
    /// Workflow tools.
    Workflows {
        #[command(subcommand)]
        command: WorkflowsCommand,
    },
    /// The result cache: explicit invalidation and upkeep.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// API keys of the HTTP gateway.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Drive the demo workload through the gateway (with `weir dev` running): workflows,
    /// patches, runs with simulated workers, both caches; ends with a summary.
    Demo {
        /// Gateway base URL; default: the configured gateway.listen.
        #[arg(long)]
        gateway: Option<String>,
        /// Runs per wave (two waves with the same inputs).
        #[arg(long, default_value_t = 24)]
        runs: usize,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 180)]
        timeout_secs: u64,
        /// Also print the summary as one JSON line at the end.
        #[arg(long)]
        json: bool,
        /// Exit 1 unless the summary shows what a healthy system does (for the test suite).
        #[arg(long)]
        check: bool,
    },
    /// The dead-letter topic: what was dead-lettered and why, and sending records back.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Benchmarks against the local stack (the last line printed is one JSON object).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Fault injection: several weir processes under load while processes, Kafka, Postgres,
    /// S3 and the registry fail; then the invariants and a report (needs a stack of its own;
    /// see docs/reliability.md).
    Chaos(weir_chaos::Args),
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ProcessorName {
    /// Folds patches into workflow versions.
    Materializer,
    /// Publishes the outbox to Kafka.
    Relay,
    /// The HTTP ingestion gateway.
    Gateway,
    /// Advances workflow runs from completion events (with its timer loop).
    Coordinator,
    /// Answers result-cache lookups and stores results (weir.cache.v1).
    Cache,
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// Delete every cache entry of a workspace (exact and semantic), or of one node type.
    Purge {
        /// Workspace whose entries go.
        #[arg(long)]
        workspace: String,
        /// Only entries of this node type.
        #[arg(long)]
        node_type: Option<String>,
    },
    /// Delete expired entries now, then collect unreferenced blobs older than the grace period.
    Sweep,
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key and print it (once: only its hash is stored).
    Create {
        /// The workspace the key is confined to.
        #[arg(long)]
        workspace: String,
        /// read, write or admin.
        #[arg(long, value_parser = weir_model::Permission::parse)]
        permission: weir_model::Permission,
    },
    /// List keys (id, workspace, permission, created, revoked); never a key or its hash.
    List {
        /// Only the keys of this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by its id (the part after `weir_`). Gateways refuse it as soon as the
    /// revocation commits (Postgres notifies them), at the latest after
    /// `gateway.key_cache_ttl_ms` (10 s by default).
    Revoke {
        /// The key's id, as `weir keys list` shows it.
        key_id: String,
    },
}

#[derive(Subcommand)]
pub enum PatchCommand {
    /// Apply PATCH (an RFC 6902 array) to DOC with the materializer's engine; print the result.
    Apply {
        /// The document (JSON file; `-` for standard input).
        doc: PathBuf,
        /// The patch (JSON file).
        patch: PathBuf,
        /// Do not check that the result is a valid workflow definition.
        #[arg(long)]
        no_validate: bool,
    },
}

#[derive(Subcommand)]
pub enum WorkflowsCommand {
    /// Rebuild a workflow from its patch log and report any difference from the stored head.
    Replay {
        /// Workflow id (unique within its workspace only).
        workflow_id: String,
        /// Workspace owning the workflow.
        #[arg(long)]
        workspace: String,
        /// Stop at this version and print it.
        #[arg(long)]
        to_version: Option<i64>,
    },
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The materializer vs a naive path vs Postgres COPY.
    Materialize {
        /// Patches drained first, on workflows of their own, and not measured.
        #[arg(long, default_value_t = 20_000)]
        warmup_patches: usize,
        /// Longest time for the warm-up's steady rounds, which stop once the latency settles
        /// (0 skips them).
        #[arg(long, default_value_t = 60)]
        warmup_seconds: u64,
        /// Patches in the throughput phase.
        #[arg(long, default_value_t = 100_000)]
        patches: usize,
        /// Workflows they are spread over.
        #[arg(long, default_value_t = 10_000)]
        workflows: usize,
        /// Patches in the latency phase (at 80 % of the measured throughput: about three
        /// seconds, long enough for a steady state).
        #[arg(long, default_value_t = 60_000)]
        latency_patches: usize,
        /// Patches in the naive phase.
        #[arg(long, default_value_t = 2_000)]
        naive_patches: usize,
        /// Repetitions of the measured phases, each from the same clean state: the result
        /// has each figure's median, and its spread and targets over the repetitions.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        repeat: u16,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// The coordinator on root → fan-out 8 → join → tail runs vs one transaction per
    /// completion.
    Coordinator {
        /// Runs to drive.
        #[arg(long, default_value_t = 5_000)]
        runs: usize,
        /// Runs on the naive path (default: a tenth of --runs).
        #[arg(long)]
        naive_runs: Option<usize>,
        /// Repetitions of the measured phases, each from the same clean state: the result
        /// has each figure's median, and its spread and targets over the repetitions.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        repeat: u16,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Result cache: exact and semantic lookup latency, filtered recall, embedder throughput.
    Cache {
        /// Entries loaded (exact and semantic each).
        #[arg(long, default_value_t = 100_000)]
        entries: usize,
        /// Lookups measured per kind.
        #[arg(long, default_value_t = 2_000)]
        queries: usize,
        /// Repetitions of the measured phases, each from the same clean state: the result
        /// has each figure's median, and its spread and targets over the repetitions.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        repeat: u16,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Several relays publishing the outbox, one killed during the run.
    Relay {
        /// Outbox rows to publish.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Relays running at once.
        #[arg(long, default_value_t = 3)]
        relays: usize,
        /// Repetitions of the measured phases, each from the same clean state: the result
        /// has each figure's median, and its spread and targets over the repetitions.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        repeat: u16,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Live streams on the gateway: open streams held, and events per second fanned out.
    Streams {
        /// Streams held open.
        #[arg(long, default_value_t = 1000)]
        streams: usize,
        /// Workflows the streams are spread over.
        #[arg(long, default_value_t = 100)]
        workflows: usize,
        /// New versions written (and announced) per second in the fan-out phase.
        #[arg(long, default_value_t = 100)]
        changes_per_sec: u64,
        /// Seconds of the fan-out phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// The whole pipeline end to end: weir processes started as children, clients and
    /// workers through the gateway at fixed offered rates (open loop), outputs read from
    /// Kafka; latency, throughput and CPU per event of every process at each rate.
    E2e {
        /// Offered rates, events per second, comma-separated (patches/s; completions/s).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "50,500,1000,2000,3000,4000,6000,8000,12000,16000"
        )]
        rates: Vec<f64>,
        /// Workloads, comma-separated: patches, completions.
        #[arg(long, value_delimiter = ',', default_value = "patches,completions")]
        workloads: Vec<String>,
        /// Seconds of warm-up before each measured window.
        #[arg(long, default_value_t = 3.0)]
        warmup: f64,
        /// Seconds measured at each rate.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Longest wait, in seconds, for the outputs of a window's requests.
        #[arg(long, default_value_t = 30.0)]
        drain: f64,
        /// Processes of each of materializer, coordinator and relay.
        #[arg(long, default_value_t = 1)]
        processes: usize,
        /// Gateway processes.
        #[arg(long, default_value_t = 1)]
        gateways: usize,
        /// Workflows the patches are spread over.
        #[arg(long, default_value_t = 1000)]
        workflows: usize,
        /// Parallel nodes between a run's split and its join.
        #[arg(long, default_value_t = 8)]
        fan_out: usize,
        /// Most requests in flight at once (beyond it the generator falls behind, and says so).
        #[arg(long, default_value_t = 4096)]
        max_inflight: usize,
        /// Seconds before an unanswered request counts as a timeout (an error).
        #[arg(long, default_value_t = 10.0)]
        request_timeout: f64,
        /// A rate whose p99 (ms) is above this ends the workload's ladder.
        #[arg(long, default_value_t = 2000.0)]
        stop_p99_ms: f64,
        /// Write the latency-versus-throughput chart (SVG) here.
        #[arg(long)]
        chart: Option<PathBuf>,
        /// The weir executable the pipeline's processes run (default: this one), to measure
        /// another release with the same load generator, side by side.
        #[arg(long)]
        pipeline_bin: Option<PathBuf>,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// The HTTP gateway: POST patches with acks=all from many connections.
    Gateway {
        /// Concurrent connections.
        #[arg(long, default_value_t = 128)]
        connections: usize,
        /// Seconds of the measured phase.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Workflows the patches are spread over.
        #[arg(long, default_value_t = 64)]
        workflows: usize,
        /// Also drive the endpoint with wrk (Debian package `wrk`), side by side.
        #[arg(long)]
        wrk: bool,
        /// Repetitions of the measured phases, each from the same clean state: the result
        /// has each figure's median, and its spread and targets over the repetitions.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        repeat: u16,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters a `weir dlq` command looks at.
#[derive(clap::Args, Clone)]
pub struct DlqFilterArgs {
    /// Only letters from this source topic (full name, with the prefix).
    #[arg(long)]
    pub source_topic: Option<String>,
    /// Only letters of this consumer group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only letters of this error class (framing, unknown_schema, avro, invalid, apply, ...).
    #[arg(long)]
    pub class: Option<String>,
    /// Only letters whose reason contains this text.
    #[arg(long)]
    pub reason: Option<String>,
    /// Records read from the end of each DLQ partition, at most.
    #[arg(long, default_value_t = 10_000)]
    pub scan: i64,
    /// Letters shown or redriven, at most (the newest).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

impl DlqFilterArgs {
    pub fn filter(&self) -> weir_runtime::dlq::Filter {
        weir_runtime::dlq::Filter {
            source_topic: self.source_topic.clone(),
            group: self.group.clone(),
            class: self.class.clone(),
            reason_contains: self.reason.clone(),
        }
    }
}

#[derive(Subcommand)]
pub enum DlqCommand {
    /// List dead letters: DLQ position, source topic/partition/offset, group, class, reason,
    /// time, and whether it was redriven.
    List {
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show dead letters in full (original key, headers, value size and first bytes).
    Show {
        /// DLQ positions, `<partition>:<offset>` as `weir dlq list` prints them.
        #[arg(required = true)]
        at: Vec<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their source topic (original key, value and headers, plus
    /// `weir.redrive.from`), after the cause was fixed. Either positions or filters.
    Redrive {
        /// DLQ positions, `<partition>:<offset>`.
        at: Vec<String>,
        /// Redrive every letter matching the filters (needs at least one filter).
        #[arg(long, conflicts_with = "at")]
        matching: bool,
        #[command(flatten)]
        filter: DlqFilterArgs,
        /// Send again a letter that was redriven before.
        #[arg(long)]
        force: bool,
        /// Print what would be sent, send nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
pub enum TopicsCommand {
    /// Create every weir topic that does not exist yet (idempotent).
    Create,
}

#[derive(Subcommand)]
pub enum SchemasCommand {
    /// Register every schema (refused if any is not BACKWARD compatible).
    Register {
        /// Directory of `<topic>.avsc` files; default: the schemas compiled into weir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Check every schema against its registered version (BACKWARD compatibility).
    Check {
        /// Directory of `<topic>.avsc` files; default: the schemas compiled into weir.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}
