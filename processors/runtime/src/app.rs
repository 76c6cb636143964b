//! What every weir process builds once at start: the Postgres pool, the codec, the producer
//! and the health registry, from one configuration. Nothing connects here; connections are
//! made lazily so a process can start before its dependencies and report not ready.

use std::sync::Arc;

use rdkafka::producer::FutureProducer;
use sqlx::PgPool;

use crate::codec::Codec;
use crate::config::Config;
use crate::telemetry::Health;

/// Shared handles of a process.
#[derive(Clone)]
pub struct Services {
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Postgres ([`crate::db::batch_pool`]: pinged before use only after being idle).
    pub pool: PgPool,
    /// Avro through the registry.
    pub codec: Arc<Codec>,
    /// Idempotent, acks=all producer (dead letters, the relay).
    pub producer: FutureProducer,
    /// Readiness of the process's components.
    pub health: Health,
}

impl Services {
    /// Builds the handles.
    pub fn new(cfg: Arc<Config>) -> anyhow::Result<Self> {
        Ok(Self {
            pool: crate::db::batch_pool(&cfg.postgres)?,
            codec: Arc::new(Codec::new(&cfg.schema_registry, &cfg.kafka)?),
            producer: crate::kafka::producer(&cfg.kafka)?,
            health: Health::default(),
            cfg,
        })
    }

    /// A batch consumer running `processor` with these handles.
    pub fn consumer<P: crate::Processor>(&self, processor: P) -> crate::BatchConsumer<P> {
        crate::BatchConsumer::new(
            self.cfg.clone(),
            Arc::new(processor),
            self.pool.clone(),
            self.codec.clone(),
            self.producer.clone(),
            self.health.clone(),
        )
    }
}
