//! Confluent wire format for weir's events: magic byte 0, a 4-byte big-endian schema id, then
//! the Avro binary datum. Java's `KafkaAvroDeserializer` and Python's `AvroDeserializer`
//! read these bytes with no weir-specific code.
//!
//! Decoding resolves the writer schema (fetched by id and cached by schema_registry_converter)
//! against weir's own schema for the topic, so old events stay readable after a compatible
//! change. Union branches are matched by record name, never by position. Encoding uses the
//! id of exactly the local schema, looked up once per topic: weir never registers schemas
//! at run time (that is `weir schemas register`, a deliberate deployment step).
//!
//! schema_registry_converter only fetches and caches writer schemas here. Its encoder either
//! registers the schema it is given or takes the subject's latest version, and its decoder
//! does not resolve a writer's record against weir's by record name: hence weir's own.

use std::collections::HashMap;
use std::sync::Arc;

use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use tokio::sync::RwLock;

use crate::config::{KafkaConfig, RegistryConfig};
use crate::error::{DecodeClass, DecodeError, EncodeError};
use crate::events::{self, TopicEvent, TopicSchema};
use crate::registry::{value_subject, RegistryClient, RegistryError};

/// A writer schema seen on the wire.
enum Writer {
    /// Identical to weir's own schema of the topic: decode without resolution.
    Local,
    /// Another (older or newer) version: resolve against weir's schema by record name.
    Other(Arc<TopicSchema>),
}

/// Encodes and decodes events of every topic through the schema registry.
pub struct Codec {
    decoder: AvroDecoder,
    registry: RegistryClient,
    topic_prefix: String,
    /// Schema id of the local schema per full topic name.
    ids: RwLock<HashMap<String, u32>>,
    /// Writer schemas by (schema id, unprefixed topic).
    writers: RwLock<HashMap<(u32, &'static str), Arc<Writer>>>,
}

impl Codec {
    /// Builds a codec; no network call happens until the first encode or decode.
    pub fn new(registry: &RegistryConfig, kafka: &KafkaConfig) -> Result<Self, RegistryError> {
        let mut builder = SrSettings::new_builder(registry.url.trim_end_matches('/').to_string());
        builder
            .no_proxy()
            .set_timeout(std::time::Duration::from_millis(registry.timeout_ms));
        if !registry.username.is_empty() {
            builder.set_basic_authorization(
                &registry.username,
                Some(registry.password.expose().as_str()),
            );
        }
        let settings = builder
            .build()
            .map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        Ok(Self {
            decoder: AvroDecoder::new(settings),
            registry: RegistryClient::new(registry)?,
            topic_prefix: kafka.topic_prefix.clone(),
            ids: Default::default(),
            writers: Default::default(),
        })
    }

    /// The full topic name of `E` in this environment.
    pub fn topic<E: TopicEvent>(&self) -> String {
        format!("{}{}", self.topic_prefix, E::TOPIC)
    }

    async fn schema_id<E: TopicEvent>(&self) -> Result<u32, EncodeError> {
        let topic = self.topic::<E>();
        if let Some(id) = self.ids.read().await.get(&topic) {
            return Ok(*id);
        }
        let found = self
            .registry
            .lookup(&value_subject(&topic), E::SCHEMA)
            .await
            .map_err(|e| EncodeError::Registry(e.to_string()))?
            .ok_or_else(|| EncodeError::NotRegistered {
                topic: topic.clone(),
            })?;
        self.ids.write().await.insert(topic, found.id);
        Ok(found.id)
    }

    /// Encodes an event in Confluent wire format for its topic.
    pub async fn encode<E: TopicEvent>(&self, event: &E) -> Result<Vec<u8>, EncodeError> {
        let id = self.schema_id::<E>().await?;
        let mut out = Vec::with_capacity(256);
        out.push(0);
        out.extend_from_slice(&id.to_be_bytes());
        event
            .write_datum(&mut out)
            .map_err(|e| EncodeError::Schema {
                topic: self.topic::<E>(),
                message: e.to_string(),
            })?;
        Ok(out)
    }

    async fn writer<E: TopicEvent>(&self, id: u32) -> Result<Arc<Writer>, DecodeError> {
        if let Some(w) = self.writers.read().await.get(&(id, E::TOPIC)) {
            return Ok(w.clone());
        }
        let fetched = self.decoder.get_schema(id).await.map_err(|e| {
            if registry_unavailable(&e) {
                // The client caches errors it thinks final (any HTTP status but 502/503): a
                // 500 while the registry's own database restarts would then dead-letter every
                // record of that schema until this process restarts. Forget it, retry later.
                if !e.retriable {
                    self.decoder.remove_errors_from_cache();
                }
                DecodeError::new(DecodeClass::RegistryUnavailable, e.to_string())
            } else {
                DecodeError::new(
                    DecodeClass::UnknownSchema,
                    format!("schema id {id}: {}", e.error),
                )
            }
        })?;
        let local = events::topic_schema(E::TOPIC)
            .map_err(|e| DecodeError::new(DecodeClass::Avro, e.to_string()))?;
        let writer = if fetched.parsed.canonical_form() == local.schema().canonical_form() {
            Writer::Local
        } else {
            let parsed = TopicSchema::parse(&fetched.raw)
                .map_err(|e| DecodeError::new(DecodeClass::Avro, format!("schema id {id}: {e}")))?;
            Writer::Other(Arc::new(parsed))
        };
        let writer = Arc::new(writer);
        self.writers
            .write()
            .await
            .insert((id, E::TOPIC), writer.clone());
        Ok(writer)
    }

    /// Decodes Confluent wire-format bytes into an event of topic `E`.
    pub async fn decode<E: TopicEvent>(&self, bytes: &[u8]) -> Result<E, DecodeError> {
        if bytes.len() < 5 || bytes[0] != 0 {
            return Err(DecodeError::new(
                DecodeClass::Framing,
                format!(
                    "not Confluent wire format ({} bytes, first byte {:?})",
                    bytes.len(),
                    bytes.first()
                ),
            ));
        }
        let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
        let writer = self.writer::<E>(id).await?;
        let writer = match writer.as_ref() {
            Writer::Local => None,
            Writer::Other(w) => Some(w.as_ref()),
        };
        events::decode(&bytes[5..], writer)
            .map_err(|e| DecodeError::new(DecodeClass::Avro, format!("schema id {id}: {e}")))
    }
}

/// Whether a schema lookup failed because of the registry (retry), not because the record
/// names a schema that does not exist (dead letter). Only an answer of 404 says the latter;
/// any other HTTP status (500 while its storage is down, 401/403 while credentials rotate,
/// 429) and every connection error is the registry's, whatever the client's own flag says.
fn registry_unavailable(e: &schema_registry_converter::error::SRCError) -> bool {
    const STATUS: &str = "failed with status ";
    if e.retriable {
        return true;
    }
    match e.error.find(STATUS) {
        Some(at) => !e.error[at + STATUS.len()..].starts_with("404"),
        // Not an HTTP answer: the registry's reply could not be read as a schema.
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_404_makes_a_schema_unknown() {
        use schema_registry_converter::error::SRCError;
        let status = |code: &str| {
            SRCError::non_retryable_without_cause(&format!(
                "HTTP request to schema registry failed with status {code}"
            ))
        };
        assert!(!registry_unavailable(&status("404 Not Found")));
        assert!(registry_unavailable(&status("500 Internal Server Error")));
        assert!(registry_unavailable(&status("401 Unauthorized")));
        assert!(registry_unavailable(&SRCError::new(
            "http call to schema registry failed",
            None,
            true
        )));
        assert!(!registry_unavailable(
            &SRCError::non_retryable_without_cause("could not parse to RawRegisteredSchema")
        ));
    }
}
