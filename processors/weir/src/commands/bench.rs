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
            repeat,
            json,
        } => {
            let params = weir_tools::bench::materializer::Params {
                warmup_patches,
                warmup_time: std::time::Duration::from_secs(warmup_seconds),
                patches,
                workflows,
                latency_patches,
                naive_patches,
                repeat: usize::from(repeat),
            };
            (
                weir_tools::bench::materializer::run(cfg, params).await?,
                json,
            )
        }
        BenchCommand::Coordinator {
            runs,
            naive_runs,
            repeat,
            json,
        } => (
            weir_tools::bench::coordinator::run(
                cfg,
                runs,
                naive_runs.unwrap_or((runs / 10).max(1)),
                usize::from(repeat),
            )
            .await?,
            json,
        ),
        BenchCommand::Cache {
            entries,
            queries,
            repeat,
            json,
        } => (
            weir_tools::bench::cache::run(cfg, entries, queries, usize::from(repeat)).await?,
            json,
        ),
        BenchCommand::Relay {
            events,
            relays,
            repeat,
            json,
        } => (
            weir_tools::bench::relay::run(cfg, events, relays, usize::from(repeat)).await?,
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
            repeat,
            json,
        } => {
            let params = weir_tools::bench::gateway::Params {
                connections,
                seconds,
                workflows,
                wrk,
                repeat: usize::from(repeat),
            };
            (weir_tools::bench::gateway::run(cfg, params).await?, json)
        }
        BenchCommand::E2e {
            rates,
            workloads,
            warmup,
            duration,
            drain,
            processes,
            gateways,
            workflows,
            fan_out,
            max_inflight,
            request_timeout,
            stop_p99_ms,
            chart,
            pipeline_bin,
            json,
        } => {
            use weir_tools::bench::e2e::{report::Workload, Params};
            let secs = |s: f64, what: &str| {
                anyhow::ensure!(s.is_finite() && s >= 0.0, "--{what}: seconds, not negative");
                Ok(std::time::Duration::from_secs_f64(s))
            };
            let workloads = workloads
                .iter()
                .map(|w| match w.as_str() {
                    "patches" => Ok(Workload::Patches),
                    "completions" => Ok(Workload::Completions),
                    other => Err(anyhow::anyhow!(
                        "--workloads: unknown {other:?} (patches, completions)"
                    )),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let params = Params {
                rates,
                workloads,
                warmup: secs(warmup, "warmup")?,
                duration: secs(duration, "duration")?,
                drain: secs(drain, "drain")?,
                processes,
                gateways,
                workflows,
                fan_out,
                max_inflight,
                request_timeout: secs(request_timeout, "request-timeout")?,
                stop_p99_ms,
                chart,
                pipeline_bin,
                json_only: json,
            };
            // The benchmark prints its tables itself; only the JSON line follows them.
            (weir_tools::bench::e2e::run(cfg, params).await?, true)
        }
    };
    if !json {
        weir_tools::bench::common::print_spread(&result);
    }
    weir_tools::common::print_result(&result, json)?;
    Ok(true)
}
