//! A child process for the crash tests: runs `LedgerProcessor` through the runtime with
//! the configuration from the environment, until SIGTERM/SIGINT (or SIGKILL).
//! Usage: it-consumer GROUP

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use weir_it::LedgerProcessor;
use weir_runtime::{codec::Codec, config::Config, telemetry, BatchConsumer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let group = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: it-consumer GROUP"))?;
    let cfg = Arc::new(Config::load(None)?);
    telemetry::init_tracing(&cfg.telemetry);
    let shutdown = CancellationToken::new();
    telemetry::cancel_on_signals(shutdown.clone());
    let pool = weir_runtime::db::pool(&cfg.postgres)?;
    let codec = Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?);
    let producer = weir_runtime::kafka::producer(&cfg.kafka)?;
    let consumer = BatchConsumer::new(
        cfg.clone(),
        Arc::new(LedgerProcessor { group }),
        pool,
        codec,
        producer,
        telemetry::Health::default(),
    );
    consumer.run(shutdown).await?;
    Ok(())
}
