//! The `kafka` section: connection, topic names, and the librdkafka pass-through maps.
//!
//! Invariant: `Debug`, and serialization inside [`super::secret::redacting`] (`weir config`),
//! hide the value of every secret-looking key of those maps ([`is_secret_key`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use super::secret::{is_redacting, REDACTED};

/// Kafka settings. Its `Debug` output (logs) and `weir config` hide the value of every
/// secret-looking key of the librdkafka maps ([`is_secret_key`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Comma-separated bootstrap servers (env: KAFKA_BOOTSTRAP_SERVERS).
    pub bootstrap_servers: String,
    /// Prefix put in front of every topic name and every processor's consumer group, to run
    /// several environments on one cluster.
    pub topic_prefix: String,
    /// Partitions of each topic that `weir topics create` makes, unless overridden below.
    pub partitions: i32,
    /// Partition count per topic (unprefixed name), overriding `partitions`.
    pub topic_partitions: BTreeMap<String, i32>,
    /// Replication factor of created topics (3 on MSK, 1 on the local single broker).
    pub replication_factor: i32,
    /// Topic-level configs applied to every created topic (e.g. `retention.ms`).
    #[serde(serialize_with = "redacted_options")]
    pub topic_config: BTreeMap<String, String>,
    /// Retention of the dead-letter topic (`weir.dlq.v1`), in ms: long enough to look at a
    /// letter and redrive it (`weir dlq redrive`). Overrides `topic_config`'s `retention.ms`
    /// for that topic; `weir topics create` also sets it on an existing dead-letter topic.
    pub dlq_retention_ms: u64,
    /// librdkafka options for consumers, passed through as is (e.g. `fetch.wait.max.ms`).
    #[serde(serialize_with = "redacted_options")]
    pub consumer: BTreeMap<String, String>,
    /// librdkafka options for producers, passed through as is (e.g. `linger.ms`).
    #[serde(serialize_with = "redacted_options")]
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap_servers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            partitions: 6,
            topic_partitions: BTreeMap::new(),
            replication_factor: 1,
            topic_config: BTreeMap::new(),
            dlq_retention_ms: 30 * 24 * 3_600_000,
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// Whether a librdkafka (or topic) option holds a secret: `sasl.password`,
/// `ssl.key.password`, `ssl.keystore.password`, `sasl.oauthbearer.client.secret`,
/// `ssl.key.pem`, `sasl.jaas.config`, ... Errs on the side of hiding: any key naming a
/// password, secret, token, credential or private key, or ending in `key`/`pem`.
pub fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "passwd",
        "secret",
        "token",
        "credential",
        "jaas",
        "private",
        "sasl.oauthbearer.config",
        "sasl.kerberos.keytab",
    ]
    .iter()
    .any(|w| k.contains(w))
        || k.ends_with("key")
        || k.ends_with(".pem")
        || k.ends_with("key.pem")
}

/// A librdkafka map as `Debug` prints it: secret-looking values replaced by `***`.
struct RedactedMap<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown: &str = if is_secret_key(k) { "***" } else { v };
                (k, shown)
            }))
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("topic_partitions", &self.topic_partitions)
            .field("replication_factor", &self.replication_factor)
            .field("topic_config", &RedactedMap(&self.topic_config))
            .field("consumer", &RedactedMap(&self.consumer))
            .field("producer", &RedactedMap(&self.producer))
            .finish()
    }
}

impl KafkaConfig {
    /// The full topic name of a default topic name, with the environment prefix.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }

    /// The consumer group of a processor's base group name, with the environment prefix:
    /// deployments sharing a Kafka cluster under different prefixes (staging beside dev,
    /// test runs) never share a group, so one's joins and slow members never stall another's
    /// rebalances. With no prefix it is the base name.
    pub fn group(&self, name: &str) -> String {
        format!("{}{}", self.topic_prefix, name)
    }
}

/// Serializes a librdkafka map; inside [`super::secret::redacting`] the values of
/// secret-looking keys are [`REDACTED`].
fn redacted_options<S: Serializer>(
    map: &BTreeMap<String, String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    if !is_redacting() {
        return map.serialize(serializer);
    }
    serializer.collect_map(map.iter().map(|(k, v)| {
        let shown: &str = if is_secret_key(k) { REDACTED } else { v };
        (k, shown)
    }))
}
