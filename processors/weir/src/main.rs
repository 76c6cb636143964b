//! The `weir` command. Thin: it parses arguments, loads the configuration and calls the
//! runtime. Exit codes: 0 success, 1 a check failed, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weir_runtime::{config::Config, ops, telemetry};

/// mimalloc instead of the system allocator: folding patches and encoding events allocate
/// and free many small JSON nodes, and glibc's malloc spent ~45 % of the materializer's CPU
/// on that (free-list consolidation) in `weir bench materialize` profiles. Built with
/// `no_thp`: mimalloc otherwise madvises its arenas for transparent huge pages, and the kernel
/// then zeroes a whole 2 MiB page on each fault after a purge (~5 % of the machine's CPU
/// during a materializer drain, in `clear_page_erms`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "weir: event-sourced stream processing for workflow orchestration"
)]
struct Cli {
    /// TOML configuration file (layered over the defaults, under the environment).
    #[arg(long, global = true, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
enum ProcessorName {
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
enum CacheCommand {
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
enum KeysCommand {
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
enum PatchCommand {
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
enum WorkflowsCommand {
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
enum BenchCommand {
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
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
}

/// Which dead letters a `weir dlq` command looks at.
#[derive(clap::Args, Clone)]
struct DlqFilterArgs {
    /// Only letters from this source topic (full name, with the prefix).
    #[arg(long)]
    source_topic: Option<String>,
    /// Only letters of this consumer group.
    #[arg(long)]
    group: Option<String>,
    /// Only letters of this error class (framing, unknown_schema, avro, invalid, apply, ...).
    #[arg(long)]
    class: Option<String>,
    /// Only letters whose reason contains this text.
    #[arg(long)]
    reason: Option<String>,
    /// Records read from the end of each DLQ partition, at most.
    #[arg(long, default_value_t = 10_000)]
    scan: i64,
    /// Letters shown or redriven, at most (the newest).
    #[arg(long, default_value_t = 100)]
    limit: usize,
}

impl DlqFilterArgs {
    fn filter(&self) -> weir_runtime::dlq::Filter {
        weir_runtime::dlq::Filter {
            source_topic: self.source_topic.clone(),
            group: self.group.clone(),
            class: self.class.clone(),
            reason_contains: self.reason.clone(),
        }
    }
}

#[derive(Subcommand)]
enum DlqCommand {
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
enum TopicsCommand {
    /// Create every weir topic that does not exist yet (idempotent).
    Create,
}

#[derive(Subcommand)]
enum SchemasCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_tracing(&cfg.telemetry);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let trace_deadline = std::time::Duration::from_millis(cfg.runtime.shutdown_deadline_ms);
    let code = match runtime.block_on(run(cli.command, Arc::new(cfg))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    };
    // The spans still buffered (the last batches' and requests'), within the deadline.
    telemetry::shutdown_tracing(trace_deadline);
    code
}

/// Runs processors until SIGINT/SIGTERM, with the health server; returns false if any
/// ended with an error.
async fn run_processors(cfg: Arc<Config>, which: &[ProcessorName]) -> anyhow::Result<bool> {
    let shutdown = CancellationToken::new();
    telemetry::cancel_on_signals(shutdown.clone());
    let services = weir_runtime::app::Services::new(cfg.clone())?;
    // The recorder first (what is described or recorded before it is lost), then every
    // crate's help text and units, and the samplers that run beside the processors.
    telemetry::metrics_handle();
    weir_materializer::metrics::describe();
    weir_coordinator::metrics::describe();
    weir_cache::metrics::describe();
    weir_relay::metrics::describe();
    weir_gateway::metrics::describe();
    weir_runtime::metrics::register_cas(&cfg);
    tokio::spawn(weir_runtime::metrics::watch_pool(
        services.pool.clone(),
        "main",
        shutdown.clone(),
    ));
    if which
        .iter()
        .any(|p| matches!(p, ProcessorName::Coordinator))
    {
        weir_coordinator::metrics::register();
    }
    if which.iter().any(|p| matches!(p, ProcessorName::Relay)) {
        tokio::spawn(weir_relay::metrics::sample_outbox(
            services.pool.clone(),
            shutdown.clone(),
        ));
    }
    // One CAS client, and one result cache (one embedding model in memory) shared by the
    // cache processor and the gateway when both run in this process (`weir dev`).
    let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
    let cache = if which
        .iter()
        .any(|p| matches!(p, ProcessorName::Cache | ProcessorName::Gateway))
    {
        let embedder = weir_cache::Embedder::from_config(&cfg.cache).await?;
        let cache = weir_cache::Cache::new(
            services.pool.clone(),
            cas.clone(),
            Arc::new(cfg.cache.clone()),
            Some(embedder),
        )
        .await?;
        Some(cache)
    } else {
        None
    };
    let mut tasks = tokio::task::JoinSet::new();
    for p in which {
        let s = services.clone();
        let stop = shutdown.clone();
        match p {
            ProcessorName::Materializer => {
                for _ in 0..cfg.runtime.consumers {
                    let consumer = s.consumer(weir_materializer::Materializer::new(
                        cfg.clone(),
                        cas.clone(),
                    ));
                    let stop = stop.clone();
                    tasks.spawn(
                        async move { consumer.run(stop).await.map_err(anyhow::Error::from) },
                    );
                }
            }
            ProcessorName::Coordinator => {
                let coordinator = Arc::new(
                    weir_coordinator::Coordinator::new(
                        cfg.clone(),
                        cas.clone(),
                        Arc::new(weir_wiring::PatchLogReplay::new(
                            s.pool.clone(),
                            cas.clone(),
                        )),
                    )
                    .with_cache(Arc::new(weir_wiring::ResultCache::new(
                        cas.clone(),
                        Arc::new(cfg.cache.clone()),
                    ))),
                );
                for _ in 0..cfg.runtime.consumers {
                    let consumer = weir_runtime::BatchConsumer::new(
                        cfg.clone(),
                        coordinator.clone(),
                        s.pool.clone(),
                        s.codec.clone(),
                        s.producer.clone(),
                        s.health.clone(),
                    );
                    let stop = stop.clone();
                    tasks.spawn(
                        async move { consumer.run(stop).await.map_err(anyhow::Error::from) },
                    );
                }
                let timers =
                    weir_coordinator::TimerLoop::new(coordinator, s.pool.clone(), s.codec.clone());
                tasks.spawn(async move { timers.run(stop).await.map_err(anyhow::Error::from) });
            }
            ProcessorName::Cache => {
                let cache = cache
                    .clone()
                    .context("the result cache is built for this processor")?;
                for _ in 0..cfg.runtime.consumers {
                    let consumer = s.consumer(
                        weir_cache::CacheProcessor::new(cache.clone(), &cfg.kafka)
                            .with_health(s.health.clone()),
                    );
                    let stop = stop.clone();
                    tasks.spawn(
                        async move { consumer.run(stop).await.map_err(anyhow::Error::from) },
                    );
                }
                let (pool, cache_cfg, cas) = (s.pool.clone(), cfg.cache.clone(), cas.clone());
                tasks.spawn(async move {
                    weir_cache::maintenance::run_upkeep(pool, cas, cache_cfg, stop).await;
                    Ok(())
                });
            }
            ProcessorName::Relay => {
                let id = format!("relay-{}", std::process::id());
                // The relay's own producer: it never expires messages, so a retry cannot
                // reorder a key (see docs/relay.md).
                let producer = weir_relay::producer(&cfg.kafka)?;
                let relay = weir_relay::Relay::new(
                    cfg.clone(),
                    s.pool.clone(),
                    producer,
                    s.health.clone(),
                    id,
                );
                tasks.spawn(async move { relay.run(stop).await.map_err(anyhow::Error::from) });
            }
            ProcessorName::Gateway => {
                let cfg = cfg.clone();
                let cache = cache
                    .clone()
                    .context("the result cache is built for the gateway")?;
                let sources = weir_gateway::Sources {
                    run_status: Some(Arc::new(weir_wiring::CoordinatorRunStatus::new(
                        s.pool.clone(),
                    ))),
                    cache_lookup: Some(Arc::new(weir_wiring::ResultCacheLookup::new(cache))),
                };
                let health = s.health.clone();
                tasks.spawn(async move { weir_gateway::run(cfg, sources, health, stop).await });
            }
        }
    }
    let server = tokio::spawn(telemetry::serve(
        cfg.telemetry.listen,
        services.health.clone(),
        shutdown.clone(),
    ));
    let mut ok = true;
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %format!("{e:#}"), "a processor stopped with an error; stopping the others");
                ok = false;
                shutdown.cancel();
            }
            Err(e) => {
                tracing::error!(error = %e, "a processor task failed; stopping the others");
                ok = false;
                shutdown.cancel();
            }
        }
    }
    shutdown.cancel();
    server.await??;
    Ok(ok)
}

async fn run(command: Command, cfg: Arc<Config>) -> anyhow::Result<bool> {
    match command {
        Command::Migrate => {
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            weir_runtime::db::MIGRATOR
                .run(&pool)
                .await
                .context("applying migrations")?;
            println!(
                "migrations applied ({} known)",
                weir_runtime::db::MIGRATOR.iter().count()
            );
            Ok(true)
        }
        Command::Topics {
            command: TopicsCommand::Create,
        } => {
            let outcomes = weir_runtime::kafka::create_topics(&cfg.kafka)
                .await
                .context("creating topics")?;
            for (topic, outcome) in outcomes {
                println!("{topic:<40} {outcome:?}");
            }
            Ok(true)
        }
        Command::Schemas { command } => {
            let (dir, register) = match command {
                SchemasCommand::Register { dir } => (dir, true),
                SchemasCommand::Check { dir } => (dir, false),
            };
            let schemas = ops::load_schemas(dir.as_deref()).map_err(anyhow::Error::msg)?;
            if register {
                Ok(ops::register_schemas(&cfg, &schemas).await?)
            } else {
                let results = ops::check_schemas(&cfg, &schemas).await?;
                let ok = ops::print_check(&results);
                if !ok {
                    eprintln!("schemas check failed: a change is not BACKWARD compatible");
                }
                Ok(ok)
            }
        }
        Command::Doctor => Ok(ops::doctor(&cfg).await),
        Command::Config => {
            print!("{}", cfg.to_toml_redacted()?);
            Ok(true)
        }
        Command::Dlq { command } => dlq(&cfg, command).await,
        Command::Dev => {
            run_processors(
                cfg,
                &[
                    ProcessorName::Materializer,
                    ProcessorName::Relay,
                    ProcessorName::Coordinator,
                    ProcessorName::Cache,
                    ProcessorName::Gateway,
                ],
            )
            .await
        }
        Command::Run { processor } => run_processors(cfg, &[processor]).await,
        Command::Demo {
            gateway,
            runs,
            timeout_secs,
            json,
            check,
        } => {
            let gateway = gateway.unwrap_or_else(|| format!("http://{}", cfg.gateway.listen));
            let metrics_url = format!("http://{}/metrics", cfg.telemetry.listen);
            let shutdown = CancellationToken::new();
            let on_signal = shutdown.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                on_signal.cancel();
            });
            let opts = weir_tools::demo::Options {
                gateway,
                runs,
                metrics_url,
                timeout: std::time::Duration::from_secs(timeout_secs),
            };
            let summary = weir_tools::demo::run(cfg, opts.clone(), shutdown).await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            }
            if check {
                let unmet = weir_tools::demo::unmet_expectations(&summary, &opts);
                for u in &unmet {
                    eprintln!("demo check failed: expected {u}");
                }
                return Ok(unmet.is_empty());
            }
            Ok(true)
        }
        Command::Cache { command } => {
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            match command {
                CacheCommand::Purge {
                    workspace,
                    node_type,
                } => {
                    let purged =
                        weir_cache::maintenance::purge(&pool, &workspace, node_type.as_deref())
                            .await?;
                    println!(
                        "purged {} exact and {} semantic entries",
                        purged.exact, purged.semantic
                    );
                    if purged.semantic >= weir_cache::maintenance::VACUUM_AFTER_DELETES {
                        weir_cache::maintenance::vacuum_semantic(&pool).await?;
                        println!("vacuumed cache_semantic");
                    }
                }
                CacheCommand::Sweep => {
                    let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
                    let swept =
                        weir_cache::maintenance::sweep_all(&pool, cfg.cache.sweep_batch).await?;
                    let window = weir_cache::maintenance::GcWindow::of(&cfg.cache);
                    let collected = weir_cache::maintenance::gc_once(
                        &pool,
                        &cas,
                        window,
                        cfg.cache.sweep_batch,
                    )
                    .await?;
                    println!("swept {swept} expired entries, collected {collected} blobs");
                }
            }
            Ok(true)
        }
        Command::Keys {
            command:
                KeysCommand::Create {
                    workspace,
                    permission,
                },
        } => {
            anyhow::ensure!(!workspace.is_empty(), "--workspace must not be empty");
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            let key = weir_gateway::create_key(&pool, &workspace, permission)
                .await
                .context("creating the key")?;
            eprintln!(
                "created key {} for workspace {workspace} ({}); it is shown only this once:",
                key.key_id,
                permission.as_str()
            );
            println!("{}", key.key);
            Ok(true)
        }
        Command::Keys {
            command: KeysCommand::List { workspace, json },
        } => {
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            let keys = weir_gateway::auth::list_keys(&pool, workspace.as_deref())
                .await
                .context("listing keys")?;
            if json {
                for k in &keys {
                    println!("{}", serde_json::to_string(k)?);
                }
            } else {
                let width = |f: fn(&weir_gateway::auth::KeyInfo) -> usize, min: usize| {
                    keys.iter().map(f).max().unwrap_or(0).max(min)
                };
                let id_w = width(|k| k.key_id.len(), 6);
                let ws_w = width(|k| k.workspace_id.len(), 9);
                println!(
                    "{:<id_w$} {:<ws_w$} {:<10} {:<20} REVOKED",
                    "KEY_ID", "WORKSPACE", "PERMISSION", "CREATED"
                );
                for k in &keys {
                    println!(
                        "{:<id_w$} {:<ws_w$} {:<10} {:<20} {}",
                        k.key_id,
                        k.workspace_id,
                        k.permission,
                        k.created_at,
                        k.revoked_at.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(true)
        }
        Command::Keys {
            command: KeysCommand::Revoke { key_id },
        } => {
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            let ttl_ms = cfg.gateway.key_cache_ttl_ms;
            match weir_gateway::auth::revoke_key(&pool, &key_id)
                .await
                .context("revoking the key")?
            {
                weir_gateway::auth::Revoked::Now => {
                    eprintln!(
                        "revoked key {key_id}; gateways refuse it at once (notified), at the \
                         latest within {ttl_ms} ms"
                    );
                    Ok(true)
                }
                weir_gateway::auth::Revoked::Already => {
                    eprintln!("key {key_id} was already revoked");
                    Ok(true)
                }
                weir_gateway::auth::Revoked::Unknown => {
                    eprintln!("no key {key_id}");
                    Ok(false)
                }
            }
        }
        Command::Patch {
            command:
                PatchCommand::Apply {
                    doc,
                    patch,
                    no_validate,
                },
        } => {
            let read = |p: &PathBuf| -> anyhow::Result<String> {
                if p.as_os_str() == "-" {
                    Ok(std::io::read_to_string(std::io::stdin())?)
                } else {
                    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
                }
            };
            let mut doc: serde_json::Value = weir_model::patch::parse_json_strict(&read(&doc)?)
                .context("the document is not valid JSON")?;
            let ops = match weir_model::patch::Patch::from_json_str(&read(&patch)?) {
                Ok(ops) => ops,
                Err(e) => {
                    eprintln!("error ({}): {e}", e.code());
                    return Ok(false);
                }
            };
            // The materializer's budget, so a patch that would be rejected there is rejected
            // here, with its reason, instead of exhausting memory or the stack.
            let budget = cfg.materializer.budget();
            if let Err(e) = ops.apply_with(&mut doc, &budget) {
                eprintln!("error ({}): {e}", e.code());
                if e.is_over_budget() {
                    eprintln!("(the limits are materializer.patch_max_*; see `weir config`)");
                }
                return Ok(false);
            }
            if !no_validate {
                let limits = cfg.materializer.limits();
                if let Err(e) = weir_model::definition::check(&doc, &limits) {
                    eprintln!(
                        "error ({}): the result is not a valid workflow definition: {e}",
                        e.code()
                    );
                    return Ok(false);
                }
            }
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(true)
        }
        Command::Workflows {
            command:
                WorkflowsCommand::Replay {
                    workflow_id,
                    workspace,
                    to_version,
                },
        } => {
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
            let report = weir_materializer::replay::replay_with(
                &pool,
                &cas,
                &workspace,
                &workflow_id,
                to_version,
                &cfg.materializer.limits(),
                &cfg.materializer.budget(),
            )
            .await?;
            if to_version.is_some() {
                println!("{}", serde_json::to_string_pretty(&report.definition)?);
            }
            eprintln!(
                "replayed {}/{} to version {} (stored head: {})",
                report.workspace_id,
                report.workflow_id,
                report.version,
                report
                    .stored_version
                    .map_or("none".into(), |v| format!("version {v}"))
            );
            if report.differences.is_empty() {
                eprintln!("no differences");
                Ok(true)
            } else {
                for d in &report.differences {
                    eprintln!("DIFFERENCE: {d}");
                }
                Ok(false)
            }
        }
        Command::Chaos(args) => weir_chaos::run(cfg, args).await,
        Command::Bench { command } => {
            let (result, json) = match command {
                BenchCommand::Materialize {
                    warmup_patches,
                    warmup_seconds,
                    patches,
                    workflows,
                    latency_patches,
                    naive_patches,
                    json,
                } => {
                    let params = weir_tools::bench::materializer::Params {
                        warmup_patches,
                        warmup_time: std::time::Duration::from_secs(warmup_seconds),
                        patches,
                        workflows,
                        latency_patches,
                        naive_patches,
                    };
                    (
                        weir_tools::bench::materializer::run(cfg, params).await?,
                        json,
                    )
                }
                BenchCommand::Coordinator {
                    runs,
                    naive_runs,
                    json,
                } => (
                    weir_tools::bench::coordinator::run(
                        cfg,
                        runs,
                        naive_runs.unwrap_or((runs / 10).max(1)),
                    )
                    .await?,
                    json,
                ),
                BenchCommand::Cache {
                    entries,
                    queries,
                    json,
                } => (
                    weir_tools::bench::cache::run(cfg, entries, queries).await?,
                    json,
                ),
                BenchCommand::Relay {
                    events,
                    relays,
                    json,
                } => (
                    weir_tools::bench::relay::run(cfg, events, relays).await?,
                    json,
                ),
                BenchCommand::Gateway {
                    connections,
                    seconds,
                    workflows,
                    wrk,
                    json,
                } => {
                    let params = weir_tools::bench::gateway::Params {
                        connections,
                        seconds,
                        workflows,
                        wrk,
                    };
                    (weir_tools::bench::gateway::run(cfg, params).await?, json)
                }
            };
            weir_tools::common::print_result(&result, json)?;
            Ok(true)
        }
    }
}

/// `weir dlq list | show | redrive`.
async fn dlq(cfg: &Config, command: DlqCommand) -> anyhow::Result<bool> {
    use weir_runtime::dlq::{self, DlqPosition};
    let codec = weir_runtime::codec::Codec::new(&cfg.schema_registry, &cfg.kafka)?;
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let positions = |at: &[String]| -> anyhow::Result<Vec<DlqPosition>> {
        at.iter()
            .map(|a| a.parse::<DlqPosition>().map_err(anyhow::Error::from))
            .collect()
    };
    match command {
        DlqCommand::List { filter, json } => {
            let listing = dlq::read(
                cfg,
                &codec,
                Some(&pool),
                &filter.filter(),
                &[],
                filter.scan,
                filter.limit,
            )
            .await?;
            if json {
                for e in &listing.entries {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                println!(
                    "{:<10} {:<24} {:<28} {:<20} {:<14} {:<10} REASON",
                    "DLQ", "TIME", "SOURCE", "GROUP", "CLASS", "REDRIVEN"
                );
                for e in &listing.entries {
                    println!(
                        "{:<10} {:<24} {:<28} {:<20} {:<14} {:<10} {}",
                        e.at.to_string(),
                        e.time,
                        format!(
                            "{}[{}]@{}",
                            e.source_topic, e.source_partition, e.source_offset
                        ),
                        e.consumer_group,
                        e.error_class,
                        if e.redriven_at.is_some() { "yes" } else { "-" },
                        e.error_message
                    );
                }
                eprintln!(
                    "{} shown, {} scanned, {} undecodable",
                    listing.entries.len(),
                    listing.scanned,
                    listing.undecodable
                );
            }
            Ok(true)
        }
        DlqCommand::Show { at, json } => {
            let at = positions(&at)?;
            let filter = dlq::Filter::default();
            let listing = dlq::read(cfg, &codec, Some(&pool), &filter, &at, 0, at.len()).await?;
            for e in &listing.entries {
                if json {
                    println!("{}", serde_json::to_string_pretty(e)?);
                    continue;
                }
                println!("dead letter {}", e.at);
                println!(
                    "  source      {}[{}]@{}",
                    e.source_topic, e.source_partition, e.source_offset
                );
                println!("  group       {}", e.consumer_group);
                println!("  class       {}", e.error_class);
                println!("  reason      {}", e.error_message);
                println!("  at          {}", e.time);
                println!("  redriven    {}", e.redriven_at.as_deref().unwrap_or("no"));
                println!(
                    "  key         {}",
                    e.original_key.as_deref().unwrap_or("(none)")
                );
                for (k, v) in &e.original_headers {
                    println!("  header      {k} = {}", v.as_deref().unwrap_or("(null)"));
                }
                match e.original_value() {
                    None => println!("  value       (none: a tombstone)"),
                    Some(v) => {
                        let framed = v.len() >= 5 && v[0] == 0;
                        let schema = if framed {
                            format!(
                                ", schema id {}",
                                u32::from_be_bytes([v[1], v[2], v[3], v[4]])
                            )
                        } else {
                            String::new()
                        };
                        let head: String = v.iter().take(64).map(|b| format!("{b:02x}")).collect();
                        println!(
                            "  value       {} bytes{schema}: {head}{}",
                            v.len(),
                            if v.len() > 64 { "..." } else { "" }
                        );
                    }
                }
            }
            Ok(listing.entries.len() == at.len())
        }
        DlqCommand::Redrive {
            at,
            matching,
            filter,
            force,
            dry_run,
        } => {
            let at = positions(&at)?;
            let f = filter.filter();
            let filtered = f.source_topic.is_some()
                || f.group.is_some()
                || f.class.is_some()
                || f.reason_contains.is_some();
            if at.is_empty() && !(matching && filtered) {
                anyhow::bail!(
                    "name the dead letters: DLQ positions (`weir dlq list`), or --matching with at least one filter"
                );
            }
            let limit = if at.is_empty() {
                filter.limit
            } else {
                at.len()
            };
            let listing = dlq::read(cfg, &codec, Some(&pool), &f, &at, filter.scan, limit).await?;
            if dry_run {
                for e in &listing.entries {
                    println!(
                        "would redrive {} to {} ({}{})",
                        e.at,
                        e.source_topic,
                        e.error_message,
                        if e.redriven_at.is_some() {
                            "; already redriven"
                        } else {
                            ""
                        }
                    );
                }
                return Ok(true);
            }
            let producer = weir_runtime::kafka::producer(&cfg.kafka)?;
            let done = dlq::redrive(cfg, &pool, &producer, &codec, &listing.entries, force).await?;
            let mut all = true;
            for r in &done {
                match (&r.landed, &r.skipped) {
                    (Some((p, o)), _) => println!("redriven {} to {}[{p}]@{o}", r.at, r.topic),
                    (None, Some(why)) => {
                        all = false;
                        eprintln!("warning: skipped {}: {why}", r.at);
                    }
                    (None, None) => {}
                }
            }
            eprintln!(
                "{} redriven, {} skipped",
                done.iter().filter(|r| r.landed.is_some()).count(),
                done.iter().filter(|r| r.skipped.is_some()).count()
            );
            Ok(all)
        }
    }
}
