//! Typed errors of the runtime. Each error says what the consumer loop does with it:
//! retry the batch later ([`Disposition::Retry`]), send the record to the dead-letter topic
//! ([`Disposition::DeadLetter`]) or stop the process ([`Disposition::Fatal`]).
//!
//! Record-level errors carry the record's Kafka coordinates so that logs and dead letters
//! name exactly which record failed.

use std::fmt;

/// Where a record lives in Kafka: the idempotency key of everything weir applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coordinates {
    /// Topic the record was read from.
    pub topic: String,
    /// Partition of that topic.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
}

impl fmt::Display for Coordinates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]@{}", self.topic, self.partition, self.offset)
    }
}

/// What the consumer loop does with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A transient failure (network, database down, broker unavailable): retry with backoff.
    Retry,
    /// The record itself is bad: dead-letter it and carry on with the rest.
    DeadLetter,
    /// A programming or configuration error that retrying cannot fix.
    Fatal,
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeClass {
    /// Not Confluent wire format (no magic byte, too short, empty).
    Framing,
    /// The schema id is not known to the registry.
    UnknownSchema,
    /// The bytes do not match the writer schema, or the writer schema cannot be read as ours.
    Avro,
    /// The registry could not be reached: transient, not the record's fault.
    RegistryUnavailable,
}

impl DecodeClass {
    /// Label used in dead-letter headers and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeClass::Framing => "framing",
            DecodeClass::UnknownSchema => "unknown_schema",
            DecodeClass::Avro => "avro",
            DecodeClass::RegistryUnavailable => "registry_unavailable",
        }
    }
}

/// Decoding one record failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot decode ({}): {message}", class.as_str())]
pub struct DecodeError {
    /// What kind of failure.
    pub class: DecodeClass,
    /// Human-readable detail.
    pub message: String,
}

impl DecodeError {
    pub(crate) fn new(class: DecodeClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    /// Retry for an unreachable registry, dead-letter otherwise.
    pub fn disposition(&self) -> Disposition {
        match self.class {
            DecodeClass::RegistryUnavailable => Disposition::Retry,
            _ => Disposition::DeadLetter,
        }
    }
}

/// Encoding an event for a topic failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The event does not fit the schema (a bug in the processor).
    #[error("event does not fit the schema of {topic}: {message}")]
    Schema {
        /// Target topic.
        topic: String,
        /// Detail.
        message: String,
    },
    /// The schema is not registered under the topic's subject.
    #[error("schema of {topic} is not registered; run `weir schemas register`")]
    NotRegistered {
        /// Target topic.
        topic: String,
    },
    /// The registry could not be reached.
    #[error("schema registry unavailable: {0}")]
    Registry(String),
}

impl EncodeError {
    /// Registry outages are retried; the rest cannot be fixed by waiting.
    pub fn disposition(&self) -> Disposition {
        match self {
            EncodeError::Registry(_) => Disposition::Retry,
            EncodeError::NotRegistered { .. } | EncodeError::Schema { .. } => Disposition::Fatal,
        }
    }
}

/// A processor's batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Postgres failed; classified by SQLSTATE.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Encoding an output event failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Any other failure, with its retry hint.
    #[error("{message}")]
    Other {
        /// Detail.
        message: String,
        /// What to do.
        disposition: Disposition,
    },
}

impl ApplyError {
    /// Transient database problems (connection lost, serialization failure, deadlock,
    /// too many connections, shutdown) are retried. Data errors (SQLSTATE class 22, 23)
    /// come from a bad record and are dead-lettered after the batch is split to find it.
    pub fn disposition(&self) -> Disposition {
        match self {
            ApplyError::Postgres(e) => postgres_disposition(e),
            ApplyError::Encode(e) => e.disposition(),
            ApplyError::Other { disposition, .. } => *disposition,
        }
    }
}

/// Classifies a sqlx error.
pub fn postgres_disposition(e: &sqlx::Error) -> Disposition {
    match e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(code) if code.starts_with("22") || code.starts_with("23") => {
                Disposition::DeadLetter
            }
            // 42: syntax or undefined object: a bug or a missing migration.
            Some(code) if code.starts_with("42") => Disposition::Fatal,
            _ => Disposition::Retry,
        },
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => Disposition::Retry,
        sqlx::Error::Configuration(_) => Disposition::Fatal,
        _ => Disposition::Retry,
    }
}

/// Errors that end a consumer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Kafka client setup or a fatal broker error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Postgres setup failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A batch failed in a way retrying cannot fix.
    #[error("batch {first} .. failed fatally: {source}")]
    FatalBatch {
        /// First record of the batch.
        first: Coordinates,
        /// The cause.
        #[source]
        source: ApplyError,
    },
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}
