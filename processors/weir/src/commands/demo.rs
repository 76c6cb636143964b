//! `weir demo`: the demo workload through the gateway of a running `weir dev`
//! (see [`weir_tools::demo`]).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use weir_runtime::config::Config;

/// Drives the demo against `gateway` (default: the configured `gateway.listen`); with
/// `check`, false unless the summary shows what a healthy system does.
pub async fn run(
    cfg: Arc<Config>,
    gateway: Option<String>,
    runs: usize,
    timeout_secs: u64,
    json: bool,
    check: bool,
) -> anyhow::Result<bool> {
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
        outln!("{}", serde_json::to_string(&summary)?);
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
