//! Typed errors of the relay, each with what the relay loop does about it: retry after a
//! capped, jittered backoff ([`Disposition::Retry`]), move the row to `weir_outbox_dead`
//! ([`Disposition::DeadLetter`], only for a row the broker can never accept), or stop the
//! relay ([`Disposition::Fatal`]).

use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
pub use weir_runtime::error::Disposition;
use weir_runtime::Classify;

/// Why the relay could not make progress.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Postgres failed. The relay drops its session (and with it every lane it held) and
    /// reconnects, unless the error is one that waiting cannot fix (a missing migration).
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The producer refused to queue a row.
    #[error("kafka refused outbox row {id}: {source}")]
    Enqueue {
        /// The outbox id of the row.
        id: i64,
        /// librdkafka's reason.
        #[source]
        source: KafkaError,
    },
    /// The broker did not acknowledge every row of a batch; none of the batch is deleted.
    #[error("{failed} of {total} outbox rows not acknowledged by the broker: {first}")]
    Delivery {
        /// Rows that failed.
        failed: usize,
        /// Rows queued in the batch.
        total: usize,
        /// The first failure.
        first: KafkaError,
    },
    /// The producer hit a fatal error (idempotence or gap-less guarantee broken): it cannot
    /// be used again, the process must restart with a new producer.
    #[error("kafka producer failed fatally: {0}")]
    ProducerFatal(String),
    /// The configuration cannot work.
    #[error("invalid relay configuration: {0}")]
    Config(String),
}

impl Classify for RelayError {
    /// What the relay does with this error.
    fn disposition(&self) -> Disposition {
        match self {
            // Rows that do not decode as the relay expects: a schema the relay does not know.
            RelayError::Postgres(
                sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
                | sqlx::Error::TypeNotFound { .. }
                | sqlx::Error::Decode(_),
            ) => Disposition::Fatal,
            RelayError::Postgres(e) => match e.disposition() {
                Disposition::Retry => Disposition::Retry,
                // A data or syntax error from our own statements is a bug or a missing
                // migration: retrying cannot fix it.
                Disposition::DeadLetter | Disposition::Fatal => Disposition::Fatal,
            },
            RelayError::Enqueue { source, .. } => enqueue_disposition(source),
            RelayError::Delivery { .. } => Disposition::Retry,
            RelayError::ProducerFatal(_) | RelayError::Config(_) => Disposition::Fatal,
        }
    }
}

impl RelayError {
    /// Whether the dedicated session must be dropped (and the lanes with it): any Postgres
    /// error, since the session state is then unknown.
    pub fn drops_session(&self) -> bool {
        matches!(self, RelayError::Postgres(_))
    }
}

/// What to do when librdkafka refuses to queue a message.
///
/// - Too large for `message.max.bytes`, invalid topic name or argument: the row can never be
///   published as it is → [`Disposition::DeadLetter`].
/// - Fatal producer state → [`Disposition::Fatal`].
/// - Anything else (unknown topic or partition while metadata is missing, queue full) is
///   transient → [`Disposition::Retry`].
pub fn enqueue_disposition(e: &KafkaError) -> Disposition {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidArgument,
        ) => Disposition::DeadLetter,
        Some(RDKafkaErrorCode::Fatal) => Disposition::Fatal,
        _ => Disposition::Retry,
    }
}

/// Whether a producer error says the destination topic is missing or unauthorized (a
/// [`crate::destinations::Problem`] of that topic, not of the broker): unknown topic,
/// partition or topic-or-partition, topic authorization failed. Everything else is not about
/// the destination (broker down, timeouts, ...) and is retried as it always was.
pub fn destination_problem(e: &KafkaError) -> Option<crate::destinations::Problem> {
    code_problem(e.rdkafka_error_code()?)
}

/// [`destination_problem`] for a bare error code (metadata answers carry one per topic).
pub fn code_problem(code: RDKafkaErrorCode) -> Option<crate::destinations::Problem> {
    use crate::destinations::Problem;
    match code {
        RDKafkaErrorCode::UnknownTopic
        | RDKafkaErrorCode::UnknownTopicOrPartition
        | RDKafkaErrorCode::UnknownPartition => Some(Problem::Missing),
        RDKafkaErrorCode::TopicAuthorizationFailed => Some(Problem::Unauthorized),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispositions() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(enqueue_disposition(&too_big), Disposition::DeadLetter);
        let full = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert_eq!(enqueue_disposition(&full), Disposition::Retry);
        let fatal = KafkaError::MessageProduction(RDKafkaErrorCode::Fatal);
        assert_eq!(enqueue_disposition(&fatal), Disposition::Fatal);
        let unknown = KafkaError::MessageProduction(RDKafkaErrorCode::UnknownTopic);
        assert_eq!(enqueue_disposition(&unknown), Disposition::Retry);
        use crate::destinations::Problem;
        assert_eq!(destination_problem(&unknown), Some(Problem::Missing));
        assert_eq!(
            destination_problem(&KafkaError::MessageProduction(
                RDKafkaErrorCode::UnknownTopicOrPartition
            )),
            Some(Problem::Missing)
        );
        assert_eq!(
            destination_problem(&KafkaError::MessageProduction(
                RDKafkaErrorCode::TopicAuthorizationFailed
            )),
            Some(Problem::Unauthorized)
        );
        for transient in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::BrokerTransportFailure,
            RDKafkaErrorCode::LeaderNotAvailable,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::ClusterAuthorizationFailed,
        ] {
            let e = KafkaError::MessageProduction(transient);
            assert_eq!(destination_problem(&e), None, "{transient:?}");
        }
        assert_eq!(destination_problem(&KafkaError::Canceled), None);

        let delivery = RelayError::Delivery {
            failed: 1,
            total: 2,
            first: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
        };
        assert_eq!(delivery.disposition(), Disposition::Retry);
        assert!(!delivery.drops_session());

        let io = RelayError::Postgres(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert_eq!(io.disposition(), Disposition::Retry);
        assert!(io.drops_session());
        assert_eq!(
            RelayError::Config("x".into()).disposition(),
            Disposition::Fatal
        );
    }
}
