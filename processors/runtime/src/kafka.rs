//! Kafka clients built from config (weir's defaults, then the librdkafka pass-through
//! options), and the topic admin behind `weir topics create`.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;

use crate::codec::Codec;
use crate::config::KafkaConfig;
use crate::error::EncodeError;
use crate::events::{TopicEvent, ALL_TOPICS};

fn base(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.bootstrap_servers)
        .set("client.id", "weir");
    c
}

fn overlay(c: &mut ClientConfig, extra: &BTreeMap<String, String>) {
    for (k, v) in extra {
        c.set(k, v);
    }
}

/// Consumer settings: weir stores offsets itself after each commit and lets auto-commit
/// report them (lag only); reading from the earliest record is safe because positions in
/// Postgres filter what was applied.
pub fn consumer_config(cfg: &KafkaConfig, group: &str, stats_interval_ms: u64) -> ClientConfig {
    consumer_config_with(cfg, group, stats_interval_ms, &[])
}

/// [`consumer_config`] with a caller's own defaults on top of weir's (a processor's, see
/// `Processor::consumer_defaults`); `kafka.consumer` from the configuration still wins.
pub fn consumer_config_with(
    cfg: &KafkaConfig,
    group: &str,
    stats_interval_ms: u64,
    defaults: &[(&str, &str)],
) -> ClientConfig {
    let mut c = base(cfg);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        // Bounded prefetch: backpressure reaches Kafka instead of growing memory.
        .set("queued.max.messages.kbytes", "16384")
        // The broker answers a fetch as soon as one record is there (an idle pipeline waits
        // on no timer); under load a fetch returns what piled up since the previous one, so
        // fetches grow with the load by themselves. `fetch.wait.max.ms` then only bounds how
        // long an empty fetch is held, which costs no latency: 100 ms instead of 10 halves an
        // idle process's CPU (ten times fewer empty fetches per consumer) and only delays by
        // at most that the first fetch of a partition assigned or resumed meanwhile.
        .set("fetch.min.bytes", "1")
        .set("fetch.wait.max.ms", "100")
        // A member learns of a rebalance at its next heartbeat: with the default 3 s, a second
        // consumer joining the group (runtime.consumers > 1) stalls the first for up to 3 s.
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", stats_interval_ms.to_string());
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    overlay(&mut c, &cfg.consumer);
    c
}

/// State of consumer group `group` as the broker reports it ("Stable", "PreparingRebalance",
/// ...) and its number of members; `None` if the broker does not know the group. Blocking: a
/// broker round trip, bounded by `timeout`.
pub fn group_state(
    cfg: &KafkaConfig,
    group: &str,
    timeout: Duration,
) -> Result<Option<(String, usize)>, KafkaError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let probe: BaseConsumer = consumer_config(cfg, "weir-group-probe", 0).create()?;
    let list = probe.fetch_group_list(Some(group), timeout)?;
    Ok(list
        .groups()
        .first()
        .map(|g| (g.state().to_string(), g.members().len())))
}

/// Producer settings: idempotent, acks=all, so an acknowledged event is durable and
/// retries never duplicate or reorder within a partition.
///
/// No linger: the callers (the relay, dead letters, tools) queue a whole batch at once and
/// then wait for its acknowledgements, so every record is already there when the first is
/// sent and a linger would only delay the last send; records queued while requests are in
/// flight (at most five per broker with idempotence) go together in the next one.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("compression.type", "zstd")
        .set("message.timeout.ms", "30000");
    overlay(&mut c, &cfg.producer);
    c
}

/// A producer with weir's settings.
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, KafkaError> {
    producer_config(cfg).create()
}

/// An admin client.
pub fn admin(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, KafkaError> {
    let mut c = base(cfg);
    overlay(&mut c, &cfg.producer);
    c.create()
}

/// What happened to one topic in [`create_topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    /// Newly created.
    Created,
    /// Was already there (left unchanged, except the dead-letter topic's retention).
    Existed,
}

/// Every topic weir uses (full names, with the prefix) and its partition count.
pub fn planned_topics(cfg: &KafkaConfig) -> Vec<(String, i32)> {
    ALL_TOPICS
        .iter()
        .map(|(name, _)| {
            let partitions = cfg
                .topic_partitions
                .get(*name)
                .copied()
                .unwrap_or(cfg.partitions);
            (cfg.topic(name), partitions)
        })
        .collect()
}

/// The topic-level configs of topic `name` (full name): `topic_config`, and for the
/// dead-letter topic its own retention (`dlq_retention_ms`).
pub fn topic_configs(cfg: &KafkaConfig, name: &str) -> BTreeMap<String, String> {
    let mut c = cfg.topic_config.clone();
    if name == cfg.topic(DLQ_TOPIC) {
        c.insert("retention.ms".into(), cfg.dlq_retention_ms.to_string());
    }
    c
}

/// The dead-letter topic's unprefixed name.
const DLQ_TOPIC: &str = <crate::events::DeadLetter as TopicEvent>::TOPIC;

/// Creates every weir topic that does not exist yet, and gives an existing dead-letter topic
/// its configured retention; idempotent.
pub async fn create_topics(cfg: &KafkaConfig) -> Result<Vec<(String, TopicOutcome)>, KafkaError> {
    let admin = admin(cfg)?;
    let planned = planned_topics(cfg);
    let configs: Vec<BTreeMap<String, String>> = planned
        .iter()
        .map(|(name, _)| topic_configs(cfg, name))
        .collect();
    let new: Vec<NewTopic<'_>> = planned
        .iter()
        .zip(&configs)
        .map(|((name, partitions), configs)| {
            let mut t = NewTopic::new(
                name,
                *partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            );
            for (k, v) in configs {
                t = t.set(k, v);
            }
            t
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new.iter(), &opts).await?;
    let mut out = Vec::new();
    for r in results {
        match r {
            Ok(name) => out.push((name, TopicOutcome::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                out.push((name, TopicOutcome::Existed))
            }
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::error!(topic = %name, ?code, "creating topic failed"),
                )
            }
        }
    }
    // An existing dead-letter topic keeps what it was created with unless told: set its
    // configs again (AlterConfigs replaces a topic's whole set, so all of them are given).
    let dlq = cfg.topic(DLQ_TOPIC);
    if out
        .iter()
        .any(|(n, o)| *n == dlq && *o == TopicOutcome::Existed)
    {
        let configs = topic_configs(cfg, &dlq);
        let mut alter = AlterConfig::new(ResourceSpecifier::Topic(&dlq));
        for (k, v) in &configs {
            alter = alter.set(k, v);
        }
        for r in admin.alter_configs([&alter], &opts).await? {
            if let Err((_, code)) = r {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::error!(topic = %dlq, ?code, "setting the dead-letter topic's configs failed"),
                );
            }
        }
    }
    Ok(out)
}

/// Deletes `topics`, ignoring ones that do not exist. For tools and benchmarks that create
/// topics of their own (a random prefix): every partition left behind costs the broker
/// housekeeping for as long as it lives, and minutes of log loading at each start.
pub async fn delete_topics(cfg: &KafkaConfig, topics: &[String]) -> Result<(), KafkaError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin = admin(cfg)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&names, &opts).await? {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(
                    |_| tracing::error!(topic = %name, ?code, "deleting topic failed"),
                )
            }
        }
    }
    Ok(())
}

/// Deletes the topics [`create_topics`] creates for `cfg` (its prefix), for a tool or
/// benchmark that made them under a prefix of its own.
pub async fn delete_planned_topics(cfg: &KafkaConfig) -> Result<(), KafkaError> {
    let names: Vec<String> = planned_topics(cfg)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    delete_topics(cfg, &names).await
}

/// Producing a list of events failed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// An event could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The broker refused or did not acknowledge a record.
    #[error("produce to {topic}: {source}")]
    Kafka {
        /// Target topic.
        topic: String,
        /// The cause.
        #[source]
        source: KafkaError,
    },
}

/// Produces `events` to their topic in exactly the given order, then waits for every
/// acknowledgement. Sends are enqueued synchronously, so nothing can reorder them; a full
/// local queue is waited out, not dropped. Used by tools and benchmarks (processors write
/// through the outbox instead).
pub async fn produce_in_order<E: TopicEvent>(
    producer: &FutureProducer,
    codec: &Codec,
    events: &[E],
) -> Result<(), ProduceError> {
    let topic = codec.topic::<E>();
    let mut encoded = Vec::with_capacity(events.len());
    for e in events {
        encoded.push(codec.encode(e).await?);
    }
    let failed = |source| ProduceError::Kafka {
        topic: topic.clone(),
        source,
    };
    let mut pending = Vec::with_capacity(events.len());
    for (e, bytes) in events.iter().zip(&encoded) {
        loop {
            let record = rdkafka::producer::FutureRecord::to(&topic)
                .key(e.key())
                .payload(bytes.as_slice());
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err((e, _)) => return Err(failed(e)),
            }
        }
    }
    for d in pending {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => return Err(failed(e)),
            Err(_) => return Err(failed(KafkaError::Canceled)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dead_letter_topic_gets_its_own_retention() {
        let mut cfg = KafkaConfig {
            topic_prefix: "dev.".into(),
            ..KafkaConfig::default()
        };
        cfg.topic_config
            .insert("retention.ms".into(), "604800000".into());
        cfg.topic_config
            .insert("min.insync.replicas".into(), "2".into());
        let dlq = topic_configs(&cfg, "dev.weir.dlq.v1");
        assert_eq!(dlq["retention.ms"], "2592000000", "30 days by default");
        assert_eq!(dlq["min.insync.replicas"], "2", "the shared configs stay");
        let patches = topic_configs(&cfg, "dev.weir.patches.v1");
        assert_eq!(patches["retention.ms"], "604800000");
        // The unprefixed name of another environment is not this one's dead-letter topic.
        assert_eq!(
            topic_configs(&cfg, "weir.dlq.v1")["retention.ms"],
            "604800000"
        );
        cfg.dlq_retention_ms = 1000;
        assert_eq!(
            topic_configs(&cfg, "dev.weir.dlq.v1")["retention.ms"],
            "1000"
        );
    }
}
