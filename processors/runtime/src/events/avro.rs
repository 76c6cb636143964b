//! Avro values and datums of topic events: parsed topic schemas, the union wrapping by
//! record name, and encode/decode.

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;

use super::{EventError, Record, TopicEvent, ALL_TOPICS};

/// Turns a record into its Avro value, resolved against the record's schema in `topic`.
pub(super) fn record_to_value<R: Record>(
    topic: &'static str,
    record: &R,
) -> Result<(&'static str, Value), EventError> {
    let ts = topic_schema(topic)?;
    let schema = ts
        .record_schema(R::FULL_NAME)
        .ok_or_else(|| EventError::UnknownRecord(R::FULL_NAME.to_owned(), topic))?;
    let value = apache_avro::to_value(record)?.resolve_with_names(schema, &ts.names)?;
    Ok((R::FULL_NAME, value))
}

/// Appends the datum of `record` as the topic value of `topic`: for a union schema the
/// branch index (an Avro long), chosen by record name, then the record.
pub(super) fn write_record<R: Record>(
    topic: &'static str,
    record: &R,
    out: &mut Vec<u8>,
) -> Result<(), EventError> {
    let ts = topic_schema(topic)?;
    let i = ts
        .branches
        .iter()
        .position(|b| b == R::FULL_NAME)
        .ok_or_else(|| EventError::UnknownRecord(R::FULL_NAME.to_owned(), topic))?;
    if ts.is_union() {
        write_long(i as i64, out);
    }
    record_writer(topic, i)?.write_ser(out, record)?;
    Ok(())
}

/// Avro's long encoding: zigzag, then a little-endian base-128 varint.
fn write_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

pub(super) fn record_from_value<R: Record>(value: Value) -> Result<R, EventError> {
    Ok(apache_avro::from_value::<R>(&value)?)
}

/// A parsed topic value schema: a record or a union of records, with its named types.
///
/// Union branches are always chosen **by record name** ([`wrap`](Self::wrap) /
/// [`unwrap`](Self::unwrap)), never by apache-avro's structural matching, which can pick the
/// wrong branch when records share field names (e.g. `RunCancelled` also fits `RunFailed`).
/// For the same reason, decode bytes with their writer schema alone and then resolve the
/// record by name ([`resolve_record`](Self::resolve_record)); do not pass a reader schema to
/// `GenericDatumReader` for a union topic. [`decode`] does exactly that.
#[derive(Debug, Clone)]
pub struct TopicSchema {
    schema: Schema,
    names: HashMap<Name, Schema>,
    /// Full names of the records, in union order (a single one for a record schema).
    branches: Vec<String>,
}

impl TopicSchema {
    /// Parses a topic value schema (ours, or a writer schema fetched from the registry).
    pub fn parse(text: &str) -> Result<Self, EventError> {
        let schema = Schema::parse_str(text)?;
        let record_name = |s: &Schema| match s {
            Schema::Record(r) => Ok(r.name.fullname(None)),
            other => Err(EventError::Avro(format!(
                "a topic schema must be a record or a union of records, found {:?}",
                apache_avro::schema::SchemaKind::from(other)
            ))),
        };
        let branches = match &schema {
            Schema::Union(u) => u
                .variants()
                .iter()
                .map(record_name)
                .collect::<Result<_, _>>()?,
            other => vec![record_name(other)?],
        };
        let names = ResolvedSchema::try_from(&schema)?
            .get_names()
            .iter()
            .map(|(n, s)| (n.clone(), (*s).clone()))
            .collect();
        Ok(TopicSchema {
            schema,
            names,
            branches,
        })
    }

    /// The whole schema (what `GenericDatumWriter` / `GenericDatumReader` take).
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// Whether the value schema is a union.
    pub fn is_union(&self) -> bool {
        matches!(self.schema, Schema::Union(_))
    }

    /// Full names of the records, in union order.
    pub fn branches(&self) -> &[String] {
        &self.branches
    }

    /// The schema of the record named `full_name`.
    pub fn record_schema(&self, full_name: &str) -> Option<&Schema> {
        let i = self.branches.iter().position(|b| b == full_name)?;
        match &self.schema {
            Schema::Union(u) => u.variants().get(i),
            s => Some(s),
        }
    }

    /// Wraps a record value into the topic value: `Value::Union(index of name, record)` for a
    /// union schema, the record itself otherwise.
    pub fn wrap(&self, name: &str, record: Value) -> Result<Value, EventError> {
        let i = self
            .branches
            .iter()
            .position(|b| b == name)
            .ok_or_else(|| {
                EventError::Avro(format!(
                    "record {name} is not in this schema {:?}",
                    self.branches
                ))
            })?;
        Ok(if self.is_union() {
            Value::Union(i as u32, Box::new(record))
        } else {
            record
        })
    }

    /// Splits a decoded topic value into its record's full name and the record value.
    pub fn unwrap(&self, value: Value) -> Result<(&str, Value), EventError> {
        let (i, record) = match (self.is_union(), value) {
            (true, Value::Union(i, v)) => (i as usize, *v),
            (false, v @ Value::Record(_)) => (0, v),
            (_, v) => {
                return Err(EventError::Avro(format!(
                    "value does not match the topic schema: {:?}",
                    apache_avro::schema::SchemaKind::from(&v)
                )))
            }
        };
        let name = self
            .branches
            .get(i)
            .ok_or_else(|| EventError::Avro(format!("union branch {i} out of range")))?;
        Ok((name.as_str(), record))
    }

    /// Resolves a record value (e.g. decoded with an older writer schema) against this schema's
    /// record of the same full name: added fields take their defaults, removed ones are dropped.
    pub fn resolve_record(&self, name: &str, record: Value) -> Result<Value, EventError> {
        let schema = self
            .record_schema(name)
            .ok_or_else(|| EventError::Avro(format!("record {name} is not in this schema")))?;
        Ok(record.resolve_with_names(schema, &self.names)?)
    }
}

static TOPIC_SCHEMAS: LazyLock<Vec<(&'static str, Result<TopicSchema, String>)>> =
    LazyLock::new(|| {
        ALL_TOPICS
            .iter()
            .map(|(topic, text)| (*topic, TopicSchema::parse(text).map_err(|e| e.to_string())))
            .collect()
    });

/// This build's parsed schema of a default topic name (e.g. "weir.patches.v1"), parsed once.
pub fn topic_schema(topic: &str) -> Result<&'static TopicSchema, EventError> {
    match TOPIC_SCHEMAS.iter().find(|(t, _)| *t == topic) {
        Some((_, Ok(s))) => Ok(s),
        Some((_, Err(e))) => Err(EventError::Avro(format!("schema of {topic}: {e}"))),
        None => Err(EventError::Avro(format!("no schema for topic {topic}"))),
    }
}

// Building a datum writer or reader resolves the schema's names, which costs more than
// encoding a small event; the static topic schemas get one of each, built once.
static WRITERS: LazyLock<Vec<(&'static str, Result<GenericDatumWriter<'static>, String>)>> =
    LazyLock::new(|| {
        TOPIC_SCHEMAS
            .iter()
            .map(|(topic, ts)| {
                let w = ts.as_ref().map_err(Clone::clone).and_then(|ts| {
                    // Values are resolved against their record schema before they get here,
                    // so validating them again on write would only repeat that work.
                    GenericDatumWriter::builder(ts.schema())
                        .validate(false)
                        .build()
                        .map_err(|e| e.to_string())
                });
                (*topic, w)
            })
            .collect()
    });

type RecordWriters = Result<Vec<GenericDatumWriter<'static>>, String>;

// One schema-aware writer per record of each topic (in branch order), for `write_datum`.
// Each resolves references against the names of the whole topic schema, since a record may
// use a named type that another branch defines.
static RECORD_WRITERS: LazyLock<Vec<(&'static str, RecordWriters)>> = LazyLock::new(|| {
    TOPIC_SCHEMAS
        .iter()
        .map(|(topic, ts)| {
            let writers = ts.as_ref().map_err(Clone::clone).and_then(|ts| {
                ts.branches
                    .iter()
                    .map(|b| {
                        let schema = ts
                            .record_schema(b)
                            .ok_or_else(|| format!("record {b} is not in the schema"))?;
                        let names =
                            ResolvedSchema::try_from(ts.schema()).map_err(|e| e.to_string())?;
                        GenericDatumWriter::builder(schema)
                            .resolved_schemata(names)
                            .build()
                            .map_err(|e| e.to_string())
                    })
                    .collect()
            });
            (*topic, writers)
        })
        .collect()
});

fn record_writer(
    topic: &str,
    branch: usize,
) -> Result<&'static GenericDatumWriter<'static>, EventError> {
    match RECORD_WRITERS.iter().find(|(t, _)| *t == topic) {
        Some((_, Ok(w))) => w
            .get(branch)
            .ok_or_else(|| EventError::Avro(format!("{topic}: no record writer {branch}"))),
        Some((_, Err(e))) => Err(EventError::Avro(format!("schema of {topic}: {e}"))),
        None => Err(EventError::Avro(format!("no schema for topic {topic}"))),
    }
}

static READERS: LazyLock<Vec<(&'static str, Result<GenericDatumReader<'static>, String>)>> =
    LazyLock::new(|| {
        TOPIC_SCHEMAS
            .iter()
            .map(|(topic, ts)| {
                let r = ts.as_ref().map_err(Clone::clone).and_then(|ts| {
                    GenericDatumReader::builder(ts.schema())
                        .build()
                        .map_err(|e| e.to_string())
                });
                (*topic, r)
            })
            .collect()
    });

fn datum_writer(topic: &str) -> Result<&'static GenericDatumWriter<'static>, EventError> {
    match WRITERS.iter().find(|(t, _)| *t == topic) {
        Some((_, Ok(w))) => Ok(w),
        Some((_, Err(e))) => Err(EventError::Avro(format!("schema of {topic}: {e}"))),
        None => Err(EventError::Avro(format!("no schema for topic {topic}"))),
    }
}

fn datum_reader(topic: &str) -> Result<&'static GenericDatumReader<'static>, EventError> {
    match READERS.iter().find(|(t, _)| *t == topic) {
        Some((_, Ok(r))) => Ok(r),
        Some((_, Err(e))) => Err(EventError::Avro(format!("schema of {topic}: {e}"))),
        None => Err(EventError::Avro(format!("no schema for topic {topic}"))),
    }
}

/// The event as a topic value of this build's schema (union-wrapped by record name).
pub fn to_topic_value<E: TopicEvent>(event: &E) -> Result<Value, EventError> {
    let (name, record) = event.to_record()?;
    topic_schema(E::TOPIC)?.wrap(name, record)
}

/// Avro binary datum of the event with this build's schema (no Confluent framing).
pub fn encode<E: TopicEvent>(event: &E) -> Result<Vec<u8>, EventError> {
    let mut out = Vec::with_capacity(256);
    event.write_datum(&mut out)?;
    Ok(out)
}

/// The same datum as [`encode`], built the generic way: the event's Avro value, resolved
/// against its record schema, union-wrapped by name and written. Slower; kept as the
/// reference `encode` is tested against.
pub fn encode_via_value<E: TopicEvent>(event: &E) -> Result<Vec<u8>, EventError> {
    let value = to_topic_value(event)?;
    let writer = datum_writer(E::TOPIC)?;
    Ok(writer.write_value_to_vec(value)?)
}

/// Decodes an Avro binary datum written with `writer` (the schema the Confluent frame's id
/// names; `None` means this build's schema). The branch is taken from the writer's union
/// index, and the record is resolved by name against this build's record. Trailing bytes are
/// an error.
pub fn decode<E: TopicEvent>(bytes: &[u8], writer: Option<&TopicSchema>) -> Result<E, EventError> {
    let reader = topic_schema(E::TOPIC)?;
    let writer = writer.unwrap_or(reader);
    let mut rest = bytes;
    let value = if std::ptr::eq(writer, reader) {
        datum_reader(E::TOPIC)?.read_value(&mut rest)?
    } else {
        GenericDatumReader::builder(writer.schema())
            .build()?
            .read_value(&mut rest)?
    };
    if !rest.is_empty() {
        return Err(EventError::Avro(format!(
            "{} trailing bytes after the datum",
            rest.len()
        )));
    }
    let (name, record) = writer.unwrap(value)?;
    let record = if std::ptr::eq(writer, reader) {
        record
    } else {
        reader.resolve_record(name, record)?
    };
    E::from_record(name, record)
}
