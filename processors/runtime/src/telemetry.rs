//! Logs, metrics and the health server that every weir process runs.
//!
//! `/metrics` serves Prometheus text (only here: the gateway's client-facing port does not
//! serve it, so metrics need not be exposed to tenants); `/healthz` answers while the
//! process runs;
//! `/readyz` answers 200 only once every registered component reported ready (for a
//! consumer: Postgres reachable and partitions assigned).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, TelemetryConfig};

/// Installs the global tracing subscriber (RUST_LOG wins over the configured filter).
/// Calling it twice is harmless: the second call does nothing.
pub fn init_tracing(cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cfg.log_filter.clone()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (only in tests that build their own);
                // keep a detached one so /metrics still answers.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Readiness of the process's components.
#[derive(Clone, Default)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    /// Declares a component, not ready yet.
    pub fn register(&self, name: &str) {
        self.lock().entry(name.to_string()).or_insert(false);
    }
    /// Marks a component ready or not.
    pub fn set(&self, name: &str, ready: bool) {
        self.lock().insert(name.to_string(), ready);
    }
    /// Whether every component is ready (and there is at least one).
    pub fn ready(&self) -> bool {
        let c = self.lock();
        !c.is_empty() && c.values().all(|r| *r)
    }
    /// A line per component.
    pub fn report(&self) -> String {
        self.lock()
            .iter()
            .map(|(k, v)| format!("{k}: {}\n", if *v { "ready" } else { "not ready" }))
            .collect()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        self.components.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Clone)]
struct ServerState {
    metrics: PrometheusHandle,
    health: Health,
}

/// Serves /metrics, /healthz and /readyz on `listen` until `shutdown` is cancelled.
pub async fn serve(
    listen: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    serve_listener(listener, health, shutdown).await
}

/// Serves /metrics, /healthz and /readyz on a bound `listener` until `shutdown` (tests bind
/// port 0 and read the address back).
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listen = listener.local_addr()?;
    let state = ServerState {
        metrics: metrics_handle(),
        health,
    };
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<ServerState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(s): State<ServerState>| async move {
                let code = if s.health.ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (code, s.health.report())
            }),
        )
        .with_state(state);
    tracing::info!(%listen, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}
