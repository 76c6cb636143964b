//! The `weir` command. Thin: it parses arguments, loads the configuration and calls the
//! runtime. Exit codes: 0 success, 1 a check failed, 2 bad configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use weir_runtime::{config::Config, ops, telemetry};

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
    /// Print the effective configuration (secrets hidden).
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
    /// Benchmarks against the local stack (the last line printed is one JSON object).
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ProcessorName {
    /// Folds patches into workflow versions.
    Materializer,
    /// Publishes the outbox to Kafka.
    Relay,
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
        /// Workflow id.
        workflow_id: String,
        /// Stop at this version and print it.
        #[arg(long)]
        to_version: Option<i64>,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The materializer vs a naive path vs Postgres COPY.
    Materialize {
        /// Patches in the throughput phase.
        #[arg(long, default_value_t = 100_000)]
        patches: usize,
        /// Workflows they are spread over.
        #[arg(long, default_value_t = 10_000)]
        workflows: usize,
        /// Patches in the latency phase.
        #[arg(long, default_value_t = 20_000)]
        latency_patches: usize,
        /// Patches in the naive phase.
        #[arg(long, default_value_t = 2_000)]
        naive_patches: usize,
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
    match runtime.block_on(run(cli.command, Arc::new(cfg))) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn limits(cfg: &Config) -> weir_materializer::definition::Limits {
    weir_materializer::definition::Limits {
        max_bytes: cfg.materializer.max_definition_bytes,
        max_nodes: cfg.materializer.max_nodes,
        max_edges: cfg.materializer.max_edges,
    }
}

/// Runs processors until SIGINT/SIGTERM, with the health server; returns false if any
/// ended with an error.
async fn run_processors(cfg: Arc<Config>, which: &[ProcessorName]) -> anyhow::Result<bool> {
    let shutdown = CancellationToken::new();
    telemetry::cancel_on_signals(shutdown.clone());
    let services = weir_runtime::app::Services::new(cfg.clone())?;
    let mut tasks = tokio::task::JoinSet::new();
    for p in which {
        let s = services.clone();
        let stop = shutdown.clone();
        match p {
            ProcessorName::Materializer => {
                let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
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
            ProcessorName::Cache => {
                let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
                let embedder = weir_cache::Embedder::from_config(&cfg.cache).await?;
                let cache = weir_cache::Cache::new(
                    s.pool.clone(),
                    cas.clone(),
                    Arc::new(cfg.cache.clone()),
                    Some(embedder),
                )
                .await?;
                for _ in 0..cfg.runtime.consumers {
                    let consumer = s.consumer(weir_cache::CacheProcessor::new(cache.clone()));
                    let stop = stop.clone();
                    tasks.spawn(
                        async move { consumer.run(stop).await.map_err(anyhow::Error::from) },
                    );
                }
                let (pool, cache_cfg) = (s.pool.clone(), cfg.cache.clone());
                tasks.spawn(async move {
                    weir_cache::maintenance::run_upkeep(pool, cas, cache_cfg, stop).await;
                    Ok(())
                });
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
            println!("{cfg:#?}");
            Ok(true)
        }
        Command::Dev => {
            run_processors(
                cfg,
                &[
                    ProcessorName::Materializer,
                    ProcessorName::Relay,
                    ProcessorName::Cache,
                ],
            )
            .await
        }
        Command::Run { processor } => run_processors(cfg, &[processor]).await,
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
                }
                CacheCommand::Sweep => {
                    let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
                    let swept =
                        weir_cache::maintenance::sweep_all(&pool, cfg.cache.sweep_batch).await?;
                    let grace = std::time::Duration::from_secs(cfg.cache.gc_grace_secs);
                    let collected =
                        weir_cache::maintenance::gc_once(&pool, &cas, grace, cfg.cache.sweep_batch)
                            .await?;
                    println!("swept {swept} expired entries, collected {collected} blobs");
                }
            }
            Ok(true)
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
            let mut doc: serde_json::Value =
                weir_materializer::patch::parse_json_strict(&read(&doc)?)
                    .context("the document is not valid JSON")?;
            let ops = match weir_materializer::patch::Patch::from_json_str(&read(&patch)?) {
                Ok(ops) => ops,
                Err(e) => {
                    eprintln!("error ({}): {e}", e.code());
                    return Ok(false);
                }
            };
            if let Err(e) = ops.apply(&mut doc) {
                eprintln!("error ({}): {e}", e.code());
                return Ok(false);
            }
            if !no_validate {
                let limits = limits(&cfg);
                if let Err(e) = weir_materializer::definition::check(&doc, &limits) {
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
                    to_version,
                },
        } => {
            let pool = weir_runtime::db::pool(&cfg.postgres)?;
            let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
            let report = weir_materializer::replay::replay(
                &pool,
                &cas,
                &workflow_id,
                to_version,
                &limits(&cfg),
            )
            .await?;
            if to_version.is_some() {
                println!("{}", serde_json::to_string_pretty(&report.definition)?);
            }
            eprintln!(
                "replayed {} to version {} (stored head: {})",
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
        Command::Bench { command } => {
            let (result, json) = match command {
                BenchCommand::Materialize {
                    patches,
                    workflows,
                    latency_patches,
                    naive_patches,
                    json,
                } => {
                    let params = weir_materializer::bench::Params {
                        patches,
                        workflows,
                        latency_patches,
                        naive_patches,
                    };
                    (weir_materializer::bench::run(cfg, params).await?, json)
                }
                BenchCommand::Relay {
                    events,
                    relays,
                    json,
                } => (weir_relay::bench::bench(cfg, events, relays).await?, json),
                BenchCommand::Cache {
                    entries,
                    queries,
                    json,
                } => (weir_cache::bench::run(cfg, entries, queries).await?, json),
            };
            if !json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            }
            println!("{result}");
            Ok(true)
        }
    }
}
