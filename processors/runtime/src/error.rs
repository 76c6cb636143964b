//! Typed errors of the runtime, classified once, where they arise.
//!
//! Every leaf error type implements [`Classify`]: it says what the consumer loop does with
//! it — retry the batch later ([`Disposition::Retry`]), send the record to the dead-letter
//! topic ([`Disposition::DeadLetter`]) or stop the process ([`Disposition::Fatal`]) — and
//! whether a `Retry` is only suspected to be transient ([`Classify::is_suspect`]). A
//! processor's apply fails with an [`ApplyError`], which holds its source error (so
//! [`std::error::Error::source`] walks the chain down to the sqlx or S3 error) and takes
//! the disposition from it: nothing re-classifies an error by hand on the way up.
//!
//! Invariants:
//! - A type that wraps another classified error forwards both [`Classify::disposition`] and
//!   [`Classify::is_suspect`] to it, so a Postgres error keeps its SQLSTATE class however
//!   deep it travels.
//! - Content a tenant sends never classifies as `Fatal`: a bad CAS ref, undecodable bytes, a
//!   data exception are dead-lettered; `Fatal` is kept for weir's bugs and its deployment.
//! - Record-level errors carry the record's Kafka coordinates so that logs and dead letters
//!   name exactly which record failed.

use std::error::Error as StdError;
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

/// An error that knows what the consumer loop does with it. Implemented by every leaf error
/// type (sqlx's, the codec's, the CAS's, each processor's own enum); [`ApplyError`] takes its
/// disposition from the source it holds.
pub trait Classify {
    /// Retry, dead-letter or stop.
    fn disposition(&self) -> Disposition;

    /// A [`Disposition::Retry`] that may well be the batch's own fault (an unknown SQLSTATE,
    /// an internal error, a statement timeout, out of memory): the consumer retries it only
    /// `runtime.suspect_retries` times, then treats it as a data error and bisects, so that a
    /// record whose content triggers it cannot stop its partitions forever. `false` unless a
    /// type says otherwise: a `Retry` raised for an outage (a CAS that does not answer) is
    /// taken at its word. Wrappers forward it to the error they wrap.
    fn is_suspect(&self) -> bool {
        false
    }
}

/// A classified error that can be an [`ApplyError`]'s source: any `Classify + Error` that can
/// cross threads.
pub trait ClassifiedError: Classify + StdError + Send + Sync + 'static {}

impl<T: Classify + StdError + Send + Sync + 'static> ClassifiedError for T {}

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
}

impl Classify for DecodeError {
    /// Retry for an unreachable registry, dead-letter otherwise.
    fn disposition(&self) -> Disposition {
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

impl Classify for EncodeError {
    /// Registry outages are retried; the rest cannot be fixed by waiting.
    fn disposition(&self) -> Disposition {
        match self {
            EncodeError::Registry(_) => Disposition::Retry,
            EncodeError::NotRegistered { .. } | EncodeError::Schema { .. } => Disposition::Fatal,
        }
    }
}

/// A processor's batch could not be applied: holds the classified error that caused it.
///
/// Any [`ClassifiedError`] converts into it (`?` works on sqlx, codec, CAS and a processor's
/// own errors alike); its [`Display`](fmt::Display) is the source's (a bare sqlx error's
/// prefixed `postgres: `), its [`source`](StdError::source) is the source itself, and
/// [`ApplyError::disposition`] and [`ApplyError::is_suspect`] are the source's
/// classification. There is no way to build one from a message and a hand-picked disposition.
#[derive(Debug)]
pub struct ApplyError(Box<dyn ClassifiedError>);

impl<E: ClassifiedError> From<E> for ApplyError {
    fn from(e: E) -> Self {
        ApplyError(Box::new(e))
    }
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.downcast_ref::<sqlx::Error>() {
            Some(e) => write!(f, "postgres: {e}"),
            None => fmt::Display::fmt(&self.0, f),
        }
    }
}

impl StdError for ApplyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(&*self.0)
    }
}

impl ApplyError {
    /// What the consumer loop does with it: the source's [`Classify::disposition`]. Postgres
    /// errors are classified by SQLSTATE class ([`postgres_class`]): environmental ones are
    /// retried, content-caused ones are dead-lettered after the batch is bisected to find
    /// the record, bugs are fatal.
    pub fn disposition(&self) -> Disposition {
        self.0.disposition()
    }

    /// The source's [`Classify::is_suspect`]: a `Retry` the consumer retries only
    /// `runtime.suspect_retries` times before bisecting the batch.
    pub fn is_suspect(&self) -> bool {
        self.0.is_suspect()
    }

    /// The source error as `T`, if it is one (the error itself, not its causes).
    pub fn downcast_ref<T: StdError + 'static>(&self) -> Option<&T> {
        (&*self.0 as &(dyn StdError + 'static)).downcast_ref()
    }
}

/// A failure of the consumer's own steps around a processor's `apply`. Record-level ones
/// name the record; the batch's first record is in [`RuntimeError::FatalBatch`] and the logs.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The registry could not be reached to decode a record (other decode failures are the
    /// record's and dead-letter it without failing the batch).
    #[error("decoding {at}: {source}")]
    Decode {
        /// The record.
        at: Coordinates,
        /// The cause.
        #[source]
        source: DecodeError,
    },
    /// The processor rejected a record that is not in the batch it was given.
    #[error("processor rejected index {index} of {len}")]
    RejectedOutOfRange {
        /// The index it returned.
        index: usize,
        /// How many records it was given.
        len: usize,
    },
    /// Records must be dead-lettered but `runtime.dead_letter` is off.
    #[error("{count} poison record(s) and runtime.dead_letter is off")]
    DeadLetterOff {
        /// How many.
        count: usize,
    },
    /// The producer's queue refused a dead letter.
    #[error("dead-letter queue full (dead letter of {at}): {source}")]
    DeadLetterQueueFull {
        /// The record being dead-lettered.
        at: Coordinates,
        /// The cause.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The broker did not acknowledge a dead letter.
    #[error("dead letter of {at} not acknowledged: {source}")]
    DeadLetterNotAcknowledged {
        /// The record being dead-lettered.
        at: Coordinates,
        /// The cause.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The producer dropped a dead letter's delivery report (it is shutting down).
    #[error("dead-letter producer dropped the delivery of {at}")]
    DeadLetterDropped {
        /// The record being dead-lettered.
        at: Coordinates,
    },
}

impl Classify for ConsumerError {
    fn disposition(&self) -> Disposition {
        match self {
            ConsumerError::Decode { source, .. } => source.disposition(),
            // The broker is the environment: retried with the batch.
            ConsumerError::DeadLetterQueueFull { .. }
            | ConsumerError::DeadLetterNotAcknowledged { .. }
            | ConsumerError::DeadLetterDropped { .. } => Disposition::Retry,
            // A processor's bug, or a deployment that refuses to lose records.
            ConsumerError::RejectedOutOfRange { .. } | ConsumerError::DeadLetterOff { .. } => {
                Disposition::Fatal
            }
        }
    }

    fn is_suspect(&self) -> bool {
        match self {
            ConsumerError::Decode { source, .. } => source.is_suspect(),
            _ => false,
        }
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

/// Postgres errors by SQLSTATE class ([`PgClass`]); a [`PgClass::Suspect`] one is retried a
/// bounded number of times.
impl Classify for sqlx::Error {
    fn disposition(&self) -> Disposition {
        postgres_disposition(self)
    }

    fn is_suspect(&self) -> bool {
        postgres_class(self) == PgClass::Suspect
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
        let suspect = ApplyError::from(sqlx::Error::RowNotFound);
        assert_eq!(suspect.disposition(), Disposition::Retry);
        assert!(suspect.is_suspect());
        assert_eq!(
            postgres_disposition(&sqlx::Error::ColumnNotFound("x".into())),
            Disposition::Fatal
        );
        let io = ApplyError::from(sqlx::Error::Io(std::io::Error::other("reset")));
        assert!(
            !io.is_suspect(),
            "a lost connection is retried without a cap"
        );
        let own = ApplyError::from(ConsumerError::DeadLetterDropped {
            at: Coordinates {
                topic: "t".into(),
                partition: 0,
                offset: 0,
            },
        });
        assert_eq!(own.disposition(), Disposition::Retry);
        assert!(
            !own.is_suspect(),
            "a processor's own Retry is taken at its word"
        );
    }

    /// A Postgres error as the server reports it: only the SQLSTATE matters here.
    #[derive(Debug)]
    struct Db(String);

    impl fmt::Display for Db {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "server error {}", self.0)
        }
    }

    impl StdError for Db {}

    impl sqlx::error::DatabaseError for Db {
        fn message(&self) -> &str {
            "server error"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.as_str().into())
        }
        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn db(code: &str) -> sqlx::Error {
        sqlx::Error::Database(Box::new(Db(code.to_owned())))
    }

    /// A processor's own error wrapping a Postgres one, the way processors write them.
    #[derive(Debug, thiserror::Error)]
    enum Step {
        #[error("loading heads: {0}")]
        Load(#[source] sqlx::Error),
        #[error("a head without a definition")]
        NoDefinition,
    }

    impl Classify for Step {
        fn disposition(&self) -> Disposition {
            match self {
                Step::Load(e) => e.disposition(),
                Step::NoDefinition => Disposition::Retry,
            }
        }
        fn is_suspect(&self) -> bool {
            match self {
                Step::Load(e) => e.is_suspect(),
                Step::NoDefinition => false,
            }
        }
    }

    fn apply(r: Result<(), Step>) -> Result<(), ApplyError> {
        r?;
        Ok(())
    }

    #[test]
    fn a_sqlx_error_of_each_class_keeps_its_disposition_through_apply_error() {
        for (code, disposition, suspect) in [
            ("40001", Disposition::Retry, false),
            ("23505", Disposition::DeadLetter, false),
            ("42P01", Disposition::Fatal, false),
            ("XX000", Disposition::Retry, true),
        ] {
            let direct: ApplyError = db(code).into();
            assert_eq!(direct.disposition(), disposition, "{code}");
            assert_eq!(direct.is_suspect(), suspect, "{code}");
            assert!(direct.to_string().starts_with("postgres: "), "{direct}");
            let wrapped = apply(Err(Step::Load(db(code)))).unwrap_err();
            assert_eq!(wrapped.disposition(), disposition, "{code} wrapped");
            assert_eq!(wrapped.is_suspect(), suspect, "{code} wrapped");
        }
    }

    #[test]
    fn the_source_chain_survives() {
        let e = apply(Err(Step::Load(db("23505")))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "loading heads: error returned from database: server error 23505"
        );
        let step = e.source().expect("the processor's error");
        assert!(step.downcast_ref::<Step>().is_some(), "{step:?}");
        assert!(e.downcast_ref::<Step>().is_some());
        let sql = step.source().expect("the sqlx error");
        let sql = sql.downcast_ref::<sqlx::Error>().expect("a sqlx::Error");
        assert_eq!(
            sql.as_database_error().and_then(|d| d.code()).as_deref(),
            Some("23505")
        );
        // The runtime's fatal batch error keeps the whole chain under it.
        let fatal = RuntimeError::FatalBatch {
            first: Coordinates {
                topic: "t".into(),
                partition: 0,
                offset: 7,
            },
            source: apply(Err(Step::NoDefinition)).unwrap_err(),
        };
        let chain: Vec<String> =
            std::iter::successors(Some(&fatal as &(dyn StdError + 'static)), |&e| e.source())
                .map(ToString::to_string)
                .collect();
        assert_eq!(
            chain,
            [
                "batch t[0]@7 .. failed fatally: a head without a definition",
                "a head without a definition",
                "a head without a definition",
            ]
        );
    }

    /// One more layer around a classified error, forwarding its classification.
    #[derive(Debug)]
    struct Layer(Box<dyn ClassifiedError>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "layer: {}", self.0)
        }
    }

    impl StdError for Layer {
        fn source(&self) -> Option<&(dyn StdError + 'static)> {
            Some(&*self.0)
        }
    }

    impl Classify for Layer {
        fn disposition(&self) -> Disposition {
            self.0.disposition()
        }
        fn is_suspect(&self) -> bool {
            self.0.is_suspect()
        }
    }

    proptest::proptest! {
        /// However deep a Postgres error is wrapped, the batch gets its SQLSTATE's
        /// disposition and suspect hint, and the chain still leads to it.
        #[test]
        fn a_sqlstate_class_survives_any_depth(code in "[0-9A-Z]{5}", depth in 0usize..5) {
            let mut e: Box<dyn ClassifiedError> = Box::new(db(&code));
            for _ in 0..depth {
                e = Box::new(Layer(e));
            }
            let apply = ApplyError(e);
            let class = sqlstate_class(&code);
            proptest::prop_assert_eq!(apply.disposition(), postgres_disposition(&db(&code)));
            proptest::prop_assert_eq!(apply.is_suspect(), class == PgClass::Suspect);
            let chain: Vec<&(dyn StdError + 'static)> =
                std::iter::successors(apply.source(), |&e| e.source()).collect();
            // The layers, then the sqlx error, then the server's error under it.
            proptest::prop_assert_eq!(chain.len(), depth + 2);
            proptest::prop_assert!(
                chain[depth].downcast_ref::<sqlx::Error>().is_some(),
                "the chain leads to the sqlx error"
            );
        }
    }

    #[test]
    fn leaf_errors_classify_themselves() {
        let registry = DecodeError::new(DecodeClass::RegistryUnavailable, "refused");
        assert_eq!(Classify::disposition(&registry), Disposition::Retry);
        for class in [
            DecodeClass::Framing,
            DecodeClass::UnknownSchema,
            DecodeClass::Avro,
        ] {
            let e = DecodeError::new(class, "x");
            assert_eq!(Classify::disposition(&e), Disposition::DeadLetter);
        }
        let at = Coordinates {
            topic: "weir.patches.v1".into(),
            partition: 3,
            offset: 41,
        };
        let decode = ApplyError::from(ConsumerError::Decode {
            at: at.clone(),
            source: registry,
        });
        assert_eq!(decode.disposition(), Disposition::Retry);
        assert!(
            !decode.is_suspect(),
            "an unreachable registry is waited out"
        );
        assert!(
            decode.to_string().contains("weir.patches.v1[3]@41"),
            "{decode}"
        );
        assert_eq!(
            Classify::disposition(&EncodeError::Registry("down".into())),
            Disposition::Retry
        );
        assert_eq!(
            ApplyError::from(EncodeError::NotRegistered { topic: "t".into() }).disposition(),
            Disposition::Fatal
        );
        assert_eq!(
            ApplyError::from(ConsumerError::DeadLetterDropped { at }).disposition(),
            Disposition::Retry
        );
        assert_eq!(
            ApplyError::from(ConsumerError::DeadLetterOff { count: 2 }).disposition(),
            Disposition::Fatal
        );
        let bad_ref = "sha256:nope".parse::<weir_model::CasRef>().unwrap_err();
        assert_eq!(
            ApplyError::from(crate::cas::CasError::from(bad_ref)).disposition(),
            Disposition::DeadLetter,
            "a bad CAS ref comes with a record"
        );
    }
}
