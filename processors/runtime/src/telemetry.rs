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
///
/// With `OTEL_EXPORTER_OTLP_ENDPOINT` set (see [`crate::trace`]), weir's spans (info level and
/// up, whatever the log filter) are also exported over OTLP, and the spans that carry a trace
/// context record `trace_id`/`span_id` fields, which both log formats print. Without it the
/// subscriber is exactly the logging one: no OpenTelemetry layer sees any span.
pub fn init_tracing(cfg: &TelemetryConfig) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cfg.log_filter.clone()));
    let tracer = crate::trace::init_exporter().unwrap_or_else(|e| {
        // Logging is not up yet; a bad setting must not stop the processors.
        eprintln!("traces are not exported: {e}");
        None
    });
    let Some(tracer) = tracer else {
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr);
        let _ = match cfg.log_format {
            LogFormat::Json => builder.json().flatten_event(true).try_init(),
            LogFormat::Human => builder.try_init(),
        };
        return;
    };
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match cfg.log_format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Human => fmt.boxed(),
    };
    // Only weir's own spans are exported (dependencies' spans would flood the traces), at
    // info and up whatever the log filter says.
    let exported =
        tracing_subscriber::filter::Targets::new().with_target("weir", tracing::Level::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_filter(exported);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
}

/// Exports the spans still buffered and stops the exporter, within `deadline` (call once the
/// processors have stopped). Does nothing when export is off.
pub fn shutdown_tracing(deadline: std::time::Duration) {
    crate::trace::shutdown(deadline);
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Every histogram gets buckets chosen for its unit (by name suffix, see
            // crate::metrics): without them it renders as a summary, which
            // histogram_quantile cannot aggregate across instances. The suffixes do not
            // overlap, so the matcher order (a hash map) does not matter.
            use crate::metrics as m;
            let builder = [
                ("_seconds", m::SECONDS_BUCKETS),
                ("_ms", m::MS_BUCKETS),
                ("_records", m::RECORDS_BUCKETS),
                ("_similarity", m::SIMILARITY_BUCKETS),
            ]
            .into_iter()
            .try_fold(PrometheusBuilder::new(), |b, (suffix, buckets)| {
                b.set_buckets_for_metric(Matcher::Suffix(suffix.into()), buckets)
            })
            .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => {
                    crate::metrics::describe();
                    handle
                }
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
        let mut c = self.lock();
        c.entry(name.to_string()).or_insert(false);
        Self::export(&c);
    }
    /// Marks a component ready or not.
    pub fn set(&self, name: &str, ready: bool) {
        let mut c = self.lock();
        c.insert(name.to_string(), ready);
        Self::export(&c);
    }
    /// `weir_ready`: what /readyz answers, for alerting on a process that runs but is not
    /// ready (one unlabelled series; component names hold relay ids and groups).
    fn export(c: &BTreeMap<String, bool>) {
        let ready = !c.is_empty() && c.values().all(|r| *r);
        metrics::gauge!(crate::metrics::READY).set(if ready { 1.0 } else { 0.0 });
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
