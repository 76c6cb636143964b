//! The HTTP ingestion gateway (`weir run gateway`): JSON over HTTP in, acknowledged Kafka
//! events out, and reads of what the processors made. See docs/gateway.md and the OpenAPI
//! document docs/openapi.json (served at /openapi.json).
//!
//! - [`api`]: routes and handlers; [`auth`]: API keys (with the negative cache and the
//!   per-client budget of unknown keys); [`limit`]: token buckets per workspace and per
//!   client address;
//! - [`server`]: the HTTP/1.1 server with connection caps and header, idle and body timeouts;
//! - [`guard`]: checks every body gets (`\u0000`); [`idempotency`]: Idempotency-Key records;
//! - [`produce`]: one event per request, 202 only after acks=all;
//! - [`trace`]: the W3C trace context of a request, carried by its events;
//! - [`sources`]: run status and cache lookups, plugged in by the process wiring;
//! - [`streams`]: live run and workflow event streams (SSE), fanned out from Kafka.

pub mod api;
pub mod auth;
pub mod guard;
pub mod idempotency;
pub mod limit;
pub mod metrics;
pub mod problem;
pub mod produce;
pub mod server;
pub mod sources;
pub mod streams;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use weir_runtime::codec::Codec;
use weir_runtime::config::Config;

pub use api::{router, AppState, Sources, OPENAPI};
pub use auth::{create_key, Caller, NewKey};
pub use sources::{
    CacheLookupAnswer, CacheLookupRequest, CacheLookupSource, HitKind, RunStatusSource, SourceError,
};

/// How often readiness (Postgres and Kafka reachable) is checked.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// Builds the gateway's state from the configuration (pool, codec, producer, CAS).
pub async fn state(cfg: Arc<Config>, sources: Sources) -> anyhow::Result<AppState> {
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?);
    let producer = produce::producer(&cfg)?;
    let cas = weir_runtime::cas::Cas::from_config(&cfg).await?;
    let sender = produce::Sender::new(&cfg, producer, codec);
    Ok(AppState::new(cfg, pool, cas, sender, sources))
}

/// The gateway's name among the process's health components.
const HEALTH_COMPONENT: &str = "gateway";

/// Copies the gateway's readiness into the process's health until `shutdown`.
async fn mirror_readiness(
    state: AppState,
    health: weir_runtime::telemetry::Health,
    shutdown: CancellationToken,
) {
    loop {
        health.set(HEALTH_COMPONENT, state.is_ready());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
        }
    }
}

/// A running gateway: its address and the task serving it.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Ends when the server stopped (after `shutdown` is cancelled).
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `state` on `listener` until `shutdown`, with the readiness watcher and the sweep
/// of expired idempotency records. `/metrics` is not served here: it is on the process's
/// telemetry listener (`telemetry.listen`), which is not meant to face clients.
pub fn spawn(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    tokio::spawn(
        state
            .clone()
            .watch_readiness(READINESS_INTERVAL, shutdown.clone()),
    );
    tokio::spawn(state.clone().sweep_idempotency(shutdown.clone()));
    tokio::spawn(state.clone().watch_revocations(shutdown.clone()));
    tokio::spawn(streams::feed::run(
        state.streams().clone(),
        state.config().kafka.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(weir_runtime::metrics::watch_pool(
        state.pool().clone(),
        "gateway",
        shutdown.clone(),
    ));
    let limits = server::ServerLimits::from_config(&state.config().gateway);
    let app = router(state);
    let task = tokio::spawn(server::serve(listener, app, limits, shutdown));
    Ok(Running { addr, task })
}

/// `weir run gateway`: binds `gateway.listen` and serves until `shutdown`.
///
/// `health` is the process's (served on `telemetry.listen`): the gateway registers itself
/// there as `gateway`, ready when its own `/readyz` is, so a gateway-only process reports
/// ready too.
pub async fn run(
    cfg: Arc<Config>,
    sources: Sources,
    health: weir_runtime::telemetry::Health,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = server::bind(cfg.gateway.listen, cfg.gateway.listen_backlog)?;
    let state = state(cfg, sources).await?;
    health.register(HEALTH_COMPONENT);
    tokio::spawn(mirror_readiness(state.clone(), health, shutdown.clone()));
    let running = spawn(listener, state, shutdown)?;
    tracing::info!(addr = %running.addr, "gateway listening");
    running.task.await??;
    Ok(())
}
