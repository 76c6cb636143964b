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
    /// What the consumer loop does with it. Postgres errors are classified by SQLSTATE
    /// class ([`postgres_class`]): environmental ones are retried, content-caused ones are
    /// dead-lettered after the batch is bisected to find the record, bugs are fatal.
    pub fn disposition(&self) -> Disposition {
        match self {
            ApplyError::Postgres(e) => postgres_disposition(e),
            ApplyError::Encode(e) => e.disposition(),
            ApplyError::Other { disposition, .. } => *disposition,
        }
    }

    /// A `Retry` that may well be the batch's own fault (an unknown SQLSTATE, an internal
    /// error, a statement timeout, out of memory): the consumer retries it only
    /// `runtime.suspect_retries` times, then treats it as a data error and bisects, so that a
    /// record whose content triggers it cannot stop its partitions forever. Errors a
    /// processor raises itself with `Retry` (a CAS outage, ...) are taken at their word.
    pub fn is_suspect(&self) -> bool {
        matches!(self, ApplyError::Postgres(e) if postgres_class(e) == PgClass::Suspect)
    }
}

/// What a Postgres error says about its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgClass {
    /// The database or the network, not the batch: retried for as long as it lasts
    /// (connections, serialization failures and deadlocks, resources, shutdowns, auth while
    /// a password rotates, a read-only replica after a failover).
    Transient,
    /// Probably transient, possibly caused by the batch's content: retried a bounded number
    /// of times, then bisected like a data error.
    Suspect,
    /// The content of a record: data exceptions (22), integrity violations (23), program
    /// limits (54: an index row too big, too many columns, a statement too complex),
    /// cardinality (21: an upsert touching a row twice), routine and trigger exceptions
    /// (2F, 38, 39, 27, 09, 20, 44, P0), features not supported for a value (0A).
    Content,
    /// weir's own bug or its deployment: syntax and undefined objects (42, 3F: a missing
    /// migration), invalid transaction or cursor state, configuration.
    Bug,
}

/// Classifies a sqlx error by the SQLSTATE class of a database error, or by its kind.
pub fn postgres_class(e: &sqlx::Error) -> PgClass {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .map_or(PgClass::Suspect, |code| sqlstate_class(&code)),
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => PgClass::Transient,
        sqlx::Error::Configuration(_)
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::Migrate(_) => PgClass::Bug,
        // Decoding a stored value, a row a processor expected, an encode of a bound value:
        // possibly the content; bounded retries, then bisection.
        _ => PgClass::Suspect,
    }
}

/// Classifies a SQLSTATE (five characters; its first two are the class).
pub fn sqlstate_class(code: &str) -> PgClass {
    match code {
        // Specific codes first where their class says otherwise.
        "53200" => PgClass::Suspect, // out_of_memory: a huge value may cause it
        "57014" => PgClass::Suspect, // query_canceled: statement_timeout on a batch
        "55P03" | "55006" => PgClass::Transient, // lock_not_available, object_in_use
        "25006" | "25P03" => PgClass::Transient, // read-only (failover), idle-in-tx timeout
        _ => match code.get(..2).unwrap_or("") {
            "08" | "40" | "53" | "57" | "58" | "28" | "72" => PgClass::Transient,
            "0A" | "09" | "20" | "21" | "22" | "23" | "27" | "2F" | "38" | "39" | "44" | "54"
            | "P0" => PgClass::Content,
            "03" | "0B" | "0F" | "0L" | "0P" | "0Z" | "24" | "26" | "2B" | "2D" | "34" | "3B"
            | "3D" | "3F" | "42" | "F0" => PgClass::Bug,
            // XX (internal, corruption), 55 (prerequisite state), HV, anything unknown.
            _ => PgClass::Suspect,
        },
    }
}

/// What the consumer loop does with a sqlx error (see [`PgClass`]).
pub fn postgres_disposition(e: &sqlx::Error) -> Disposition {
    match postgres_class(e) {
        PgClass::Transient | PgClass::Suspect => Disposition::Retry,
        PgClass::Content => Disposition::DeadLetter,
        PgClass::Bug => Disposition::Fatal,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sqlstate_class_has_the_intended_disposition() {
        use PgClass::*;
        let cases = [
            // Connections, rollbacks, resources, shutdowns, system, auth: environmental.
            ("08006", Transient),
            ("08001", Transient),
            ("40001", Transient),
            ("40P01", Transient),
            ("53300", Transient),
            ("53100", Transient),
            ("57P01", Transient),
            ("57P03", Transient),
            ("58030", Transient),
            ("28P01", Transient),
            ("25006", Transient),
            ("55P03", Transient),
            // Content: data, integrity, program limits, cardinality, raised by triggers.
            ("22001", Content),
            ("22P02", Content),
            ("22P05", Content),
            ("2200N", Content),
            ("23505", Content),
            ("23514", Content),
            ("54000", Content),
            ("54001", Content),
            ("54011", Content),
            ("54023", Content),
            ("21000", Content),
            ("0A000", Content),
            ("P0001", Content),
            ("2F005", Content),
            ("38001", Content),
            ("44000", Content),
            // Bugs and deployment: syntax, undefined objects, missing schema.
            ("42601", Bug),
            ("42P01", Bug),
            ("42703", Bug),
            ("42501", Bug),
            ("3F000", Bug),
            ("3D000", Bug),
            ("0B000", Bug),
            ("F0000", Bug),
            // Unknown or ambiguous: bounded retries, then bisection. 25P02 (in failed SQL
            // transaction) follows an earlier error of the same batch, so it may be content.
            ("25P02", Suspect),
            ("XX000", Suspect),
            ("XX001", Suspect),
            ("55000", Suspect),
            ("53200", Suspect),
            ("57014", Suspect),
            ("HV000", Suspect),
            ("ZZ999", Suspect),
            ("", Suspect),
        ];
        for (code, want) in cases {
            assert_eq!(sqlstate_class(code), want, "SQLSTATE {code:?}");
        }
    }

    #[test]
    fn non_database_errors_are_classified_by_kind() {
        assert_eq!(
            postgres_class(&sqlx::Error::PoolTimedOut),
            PgClass::Transient
        );
        assert_eq!(
            postgres_disposition(&sqlx::Error::PoolTimedOut),
            Disposition::Retry
        );
        assert_eq!(postgres_class(&sqlx::Error::RowNotFound), PgClass::Suspect);
        let suspect = ApplyError::Postgres(sqlx::Error::RowNotFound);
        assert_eq!(suspect.disposition(), Disposition::Retry);
        assert!(suspect.is_suspect());
        assert_eq!(
            postgres_disposition(&sqlx::Error::ColumnNotFound("x".into())),
            Disposition::Fatal
        );
        let io = ApplyError::Postgres(sqlx::Error::Io(std::io::Error::other("reset")));
        assert!(
            !io.is_suspect(),
            "a lost connection is retried without a cap"
        );
        let own = ApplyError::Other {
            message: "cas down".into(),
            disposition: Disposition::Retry,
        };
        assert!(
            !own.is_suspect(),
            "a processor's own Retry is taken at its word"
        );
    }
}
