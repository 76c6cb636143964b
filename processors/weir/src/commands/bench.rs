//! `weir bench <what>`: the benchmarks of [`weir_tools::bench`] against the local stack; the
//! last line printed is one JSON object.

use std::sync::Arc;

use weir_runtime::config::Config;

use crate::cli::BenchCommand;

/// Runs one benchmark and prints its result.
pub async fn run(cfg: Arc<Config>, command: BenchCommand) -> anyhow::Result<bool> {
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
        BenchCommand::Streams {
            streams,
            workflows,
            changes_per_sec,
            seconds,
            json,
        } => {
            let params = weir_tools::bench::streams::Params {
                streams,
                workflows,
                changes_per_sec,
                seconds,
            };
            (weir_tools::bench::streams::run(cfg, params).await?, json)
        }
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
