//! This instance's Kafka feed of the fan-out: every partition of `weir.run-events.v1`,
//! `weir.node-ready.v1` (key: run id) and `weir.workflows.v1` (key: workflow id), read from
//! the end with no consumer group (assigned partitions, nothing committed), so every gateway
//! instance sees every record and any instance can serve any stream.
//!
//! Only the record's key and timestamp are used: a record announces that its key changed,
//! and the streams read the change from Postgres (see the module above). Values are not
//! decoded, so a record the gateway could not decode still wakes its streams.
//!
//! If the feed fails (broker unreachable, topic missing) it logs, waits and starts again
//! from the end; streams meanwhile stay correct through their heartbeat reads.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use weir_runtime::config::KafkaConfig;

use super::{Hub, Kind, Notice};

/// Wait before starting again after a failure.
const RESTART_AFTER: Duration = Duration::from_secs(2);

/// Base names of the topics the feed reads, with the kind of stream their key names.
pub const TOPICS: [(&str, Kind); 3] = [
    ("weir.run-events.v1", Kind::Run),
    ("weir.node-ready.v1", Kind::Run),
    ("weir.workflows.v1", Kind::Workflow),
];

/// Errors of the feed (logged; the feed starts again).
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// A Kafka client call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The metadata read was interrupted (shutdown).
    #[error("the metadata read was interrupted")]
    Interrupted,
    /// A topic has no partitions (not created yet).
    #[error("topic {0} has no partitions")]
    NoPartitions(String),
}

/// Feeds `hub` from Kafka until `shutdown`, then ends every stream.
pub async fn run(hub: Hub, cfg: KafkaConfig, shutdown: CancellationToken) {
    loop {
        match follow(&hub, &cfg, &shutdown).await {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = %e, "the event stream feed failed; starting again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RESTART_AFTER) => {}
        }
    }
    hub.close_all();
}

async fn follow(
    hub: &Hub,
    cfg: &KafkaConfig,
    shutdown: &CancellationToken,
) -> Result<(), FeedError> {
    // A group id is required by librdkafka but never joined: partitions are assigned, and
    // nothing is committed, so instances never share or wait for one another.
    let group = format!("weir-gateway-streams-{}", uuid::Uuid::now_v7());
    let mut c = weir_runtime::kafka::consumer_config(cfg, &group, 0);
    c.set("enable.auto.commit", "false")
        .set("auto.offset.reset", "latest");
    let consumer: std::sync::Arc<StreamConsumer> = std::sync::Arc::new(c.create()?);
    let names: Vec<(String, Kind)> = TOPICS.iter().map(|(t, k)| (cfg.topic(t), *k)).collect();
    let mut tpl = TopicPartitionList::new();
    for (topic, _) in &names {
        let (probe, name) = (consumer.clone(), topic.clone());
        // A broker round trip: off the async threads.
        let md = tokio::task::spawn_blocking(move || {
            probe.fetch_metadata(Some(&name), Duration::from_secs(5))
        })
        .await
        .map_err(|_| FeedError::Interrupted)??;
        let parts = md
            .topics()
            .first()
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if parts == 0 {
            return Err(FeedError::NoPartitions(topic.clone()));
        }
        for p in 0..parts as i32 {
            tpl.add_partition_offset(topic, p, Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
    tracing::info!(topics = names.len(), "event stream feed assigned");
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => m?,
        };
        let Some(kind) = names
            .iter()
            .find(|(t, _)| t == msg.topic())
            .map(|(_, k)| *k)
        else {
            continue;
        };
        // Keys are UTF-8 ids; anything else cannot name a stream.
        let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            continue;
        };
        let at_ms = msg.timestamp().to_millis().unwrap_or_else(now_ms);
        hub.notify(kind, key, Notice { at_ms });
    }
}

/// Now, in ms since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
