//! Running processors in this process (`weir run <processor>`, `weir dev`): the shared
//! services (pool, codec, producer, health), metric descriptions and samplers, one CAS
//! client and one result cache shared by whatever runs here, each processor's consumers and
//! loops, the gateway with its read sources (from `weir-wiring`), the telemetry listener,
//! and shutdown.
//!
//! Invariants: SIGINT/SIGTERM or any processor ending with an error stops all of them; the
//! result is false when any ended with an error.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use weir_runtime::{config::Config, telemetry};

use crate::cli::ProcessorName;

/// Runs processors until SIGINT/SIGTERM, with the health server; returns false if any
/// ended with an error.
pub async fn processors(cfg: Arc<Config>, which: &[ProcessorName]) -> anyhow::Result<bool> {
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
                // Callers' reads get a pool that pings before use: after a Postgres restart
                // a request must not be the one that finds a broken connection.
                let status_pool = weir_runtime::db::pool(&cfg.postgres)?;
                let sources = weir_gateway::Sources {
                    run_status: Some(Arc::new(weir_wiring::CoordinatorRunStatus::new(
                        status_pool,
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
