//! Confluent wire format for weir's events: magic byte 0, a 4-byte big-endian schema id, then
//! the Avro binary datum. Java's `KafkaAvroDeserializer` and Python's `AvroDeserializer`
//! read these bytes with no weir-specific code.
//!
//! Decoding resolves the writer schema (fetched by id and cached by schema_registry_converter)
//! against weir's own schema for the topic, so old events stay readable after a compatible
//! change. Union branches are matched by record name, never by position. Encoding uses the
//! id of exactly the local schema, looked up once per topic: weir never registers schemas
//! at run time (that is `weir schemas register`, a deliberate deployment step).

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::types::Value;
use apache_avro::Schema;
use schema_registry_converter::async_impl::avro::AvroDecoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use tokio::sync::RwLock;

use crate::config::{KafkaConfig, RegistryConfig};
use crate::error::{DecodeClass, DecodeError, EncodeError};
use crate::events::TopicEvent;
use crate::registry::{value_subject, RegistryClient, RegistryError};

/// Encodes and decodes events of every topic through the schema registry.
pub struct Codec {
    decoder: AvroDecoder,
    registry: RegistryClient,
    topic_prefix: String,
    /// Local (reader) schemas by unprefixed topic, parsed once.
    local: std::sync::Mutex<HashMap<&'static str, Arc<Schema>>>,
    /// Schema id of the local schema per full topic name.
    ids: RwLock<HashMap<String, u32>>,
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
            local: Default::default(),
            ids: Default::default(),
        })
    }

    /// The parsed local schema of `E`.
    ///
    /// # Panics
    /// If the schema text compiled into the binary does not parse; the unit tests of
    /// `events` parse every schema, so this cannot happen in a tested build.
    pub fn local_schema<E: TopicEvent>(&self) -> Arc<Schema> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        local
            .entry(E::TOPIC)
            .or_insert_with(|| {
                Arc::new(Schema::parse_str(E::SCHEMA).expect("compiled-in schema parses"))
            })
            .clone()
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
            .map_err(|e| match e {
                RegistryError::Unavailable(m) => EncodeError::Registry(m),
                other => EncodeError::Registry(other.to_string()),
            })?
            .ok_or_else(|| EncodeError::NotRegistered {
                topic: topic.clone(),
            })?;
        self.ids.write().await.insert(topic, found.id);
        Ok(found.id)
    }

    /// Encodes an event in Confluent wire format for its topic.
    pub async fn encode<E: TopicEvent>(&self, event: &E) -> Result<Vec<u8>, EncodeError> {
        let id = self.schema_id::<E>().await?;
        let schema = self.local_schema::<E>();
        encode_with(&schema, id, event).map_err(|message| EncodeError::Schema {
            topic: self.topic::<E>(),
            message,
        })
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
        let writer = self.decoder.get_schema(id).await.map_err(|e| {
            if e.retriable {
                DecodeError::new(DecodeClass::RegistryUnavailable, e.to_string())
            } else {
                DecodeError::new(
                    DecodeClass::UnknownSchema,
                    format!("schema id {id}: {}", e.error),
                )
            }
        })?;
        let reader = self.local_schema::<E>();
        decode_with(&writer.parsed, &reader, &bytes[5..])
            .map_err(|m| DecodeError::new(DecodeClass::Avro, format!("schema id {id}: {m}")))
    }
}

/// Encodes with a known schema and id (no registry access).
pub fn encode_with<E: TopicEvent>(schema: &Schema, id: u32, event: &E) -> Result<Vec<u8>, String> {
    let (name, record) = event.to_record().map_err(|e| e.to_string())?;
    let value = match schema {
        Schema::Union(u) => {
            let index = u
                .variants()
                .iter()
                .position(|v| record_name(v).as_deref() == Some(name))
                .ok_or_else(|| format!("{name} is not a branch of the topic's union"))?;
            Value::Union(index as u32, Box::new(record))
        }
        _ => record,
    };
    let datum = apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(datum.len() + 5);
    out.push(0);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&datum);
    Ok(out)
}

/// Decodes an Avro datum written with `writer` into `E`, whose schema is `reader`.
pub fn decode_with<E: TopicEvent>(
    writer: &Schema,
    reader: &Schema,
    datum: &[u8],
) -> Result<E, String> {
    let mut slice = datum;
    let value = apache_avro::reader::datum::GenericDatumReader::builder(writer)
        .build()
        .and_then(|r| r.read_value(&mut slice))
        .map_err(|e| e.to_string())?;
    if !slice.is_empty() {
        return Err(format!("{} trailing bytes after the datum", slice.len()));
    }
    let (name, value) = match (writer, value) {
        (Schema::Union(u), Value::Union(i, inner)) => {
            let branch = u
                .variants()
                .get(i as usize)
                .ok_or_else(|| format!("union index {i} out of range"))?;
            let name = record_name(branch).ok_or("union branch is not a record")?;
            (name, *inner)
        }
        (w, v) => (record_name(w).ok_or("top-level schema is not a record")?, v),
    };
    let target = match reader {
        Schema::Union(u) => u
            .variants()
            .iter()
            .find(|v| record_name(v).as_deref() == Some(name.as_str()))
            .ok_or_else(|| format!("record {name} is not known to this version of weir"))?,
        r => r,
    };
    // Named types may be defined in one branch and referenced from another.
    let names = apache_avro::schema::ResolvedSchema::try_from(reader).map_err(|e| e.to_string())?;
    let resolved = value
        .resolve_with_names(target, names.get_names())
        .map_err(|e| e.to_string())?;
    E::from_record(&name, resolved).map_err(|e| e.to_string())
}

fn record_name(s: &Schema) -> Option<String> {
    match s {
        Schema::Record(r) => Some(r.name.fullname(None)),
        _ => None,
    }
}
