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
    /// Run every processor in this one process, with /metrics, /healthz and /readyz,
    /// until interrupted.
    Dev,
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
            let shutdown = CancellationToken::new();
            telemetry::cancel_on_signals(shutdown.clone());
            let health = telemetry::Health::default();
            health.set("process", true);
            telemetry::serve(cfg.telemetry.listen, health, shutdown).await?;
            Ok(true)
        }
    }
}
