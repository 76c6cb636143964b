//! The event contract: the Rust side of the Avro schemas in `schemas/`.
//!
//! Every Kafka topic weir reads or writes has exactly one value schema (Confluent
//! TopicNameStrategy, subject `<topic>-value`): a record, or a union of records when the topic
//! carries several kinds of event. This module holds one struct per record and one
//! [`TopicEvent`] type per topic (an enum for a union topic, the record itself for a record
//! topic), plus the helpers that turn them into Avro values and binary datums.
//!
//! **Invariant:** these types mirror `schemas/*.avsc` exactly — same records, same fields in the
//! same order, same snake_case names, same types. Changing one means changing the other in the
//! same commit; the tests (`tests.rs`) check the round trip of every record through the binary
//! encoding, and `weir schemas check` refuses a schema change that is not BACKWARD compatible
//! with the registered version (add fields only with defaults, never remove a union branch).
//! docs/events.md is the human-readable version of the contract.
//!
//! Type mapping (what round-trips through `apache-avro`):
//! - `{"type":"string","logicalType":"uuid"}` ↔ [`uuid::Uuid`], (de)serialized as its hyphenated
//!   text by the private `uuid_text` helpers. apache-avro's serde is not "human readable" by
//!   default, so a bare `Uuid` would serialize as 16 bytes, which does not resolve against a
//!   string-based uuid schema.
//! - `{"type":"long","logicalType":"timestamp-micros"}` ↔ `i64` microseconds since the Unix
//!   epoch, UTC (see [`now_micros`]).
//! - `["null", T]` ↔ `Option<T>`; `bytes` ↔ `Vec<u8>` through `apache_avro::serde::bytes_opt`.
//! - Avro enums ↔ Rust enums whose serde names are the Avro symbols.
//!
//! Only nested records ([`NodeInput`], [`Header`]) lack the five common fields; every event
//! record starts with `event_id`, `occurred_at`, `workspace_id`, `traceparent`, `tracestate`.
//! Output events get them from one place, an [`Envelope`] ([`Envelope::caused_by`] a consumed
//! record, [`Envelope::at_ingress`] for the gateway), spread into the record by [`new_event!`].
//!
//! Layout: this file holds the traits, the [`Envelope`] and the topic list; `patches`,
//! `workflows`, `runs` (completions and node-ready), `run_events`, `cache` and `dlq` hold one
//! topic's records each; `macros` declares records and topic impls; `avro` holds the parsed
//! schemas and encode/decode; `uuid_text` the uuid-as-text serde.

use apache_avro::types::Value;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

#[macro_use]
mod macros;

mod avro;
mod cache;
mod dlq;
mod patches;
mod run_events;
mod runs;
mod uuid_text;
mod workflows;

#[cfg(test)]
mod tests;

pub use avro::{decode, encode, encode_via_value, to_topic_value, topic_schema, TopicSchema};
pub use cache::{CacheAnswer, CacheEvent, CacheKind, CacheLookup, CacheStore};
pub use dlq::{DeadLetter, Header};
pub use patches::PatchSubmitted;
pub use run_events::{
    NodeRetried, RunCancelled, RunCompleted, RunEvent, RunFailed, RunStalled, RunStarted,
};
pub use runs::{
    CompletionEvent, NodeCompleted, NodeInput, NodeReady, NodeStatus, RunCancelRequested,
    RunRequested,
};
pub use workflows::{PatchRejected, WorkflowEvent, WorkflowMaterialized};

/// A Rust type that is the value of one topic: its schema is `SCHEMA` (the file in schemas/),
/// a record or a union of records.
pub trait TopicEvent: Sized + Send + Sync + 'static {
    /// Default topic name, without the environment prefix, e.g. "weir.patches.v1".
    const TOPIC: &'static str;
    /// The Avro schema text (include_str! of the file in schemas/).
    const SCHEMA: &'static str;
    /// Builds the event from a record value already resolved against the record schema
    /// whose full name is `name` (e.g. "weir.runs.NodeCompleted").
    fn from_record(name: &str, value: Value) -> Result<Self, EventError>;
    /// The full name of this event's record and its value (a Value::Record, not wrapped in a
    /// union), resolved against that record's schema: ready for `GenericDatumWriter` once wrapped
    /// with [`TopicSchema::wrap`].
    fn to_record(&self) -> Result<(&'static str, Value), EventError>;
    /// Appends the Avro binary datum of this event (union index first for a union topic),
    /// serialized straight from the struct against its record schema: the same bytes as
    /// writing [`to_record`](Self::to_record)'s value, without building and resolving it.
    fn write_datum(&self, out: &mut Vec<u8>) -> Result<(), EventError>;
    /// The Kafka key: workflow_id for patches/workflows, run_id for
    /// completions/node-ready/run-events, workspace_id for cache topics; for the DLQ the caller
    /// uses the original key, this returns the source topic.
    fn key(&self) -> &str;
    /// Unique id of the event (UUIDv7).
    fn event_id(&self) -> Uuid;
    /// Tenant workspace of the event.
    fn workspace_id(&self) -> &str;
    /// W3C traceparent of the event; "" when none.
    fn traceparent(&self) -> &str {
        ""
    }
    /// W3C tracestate of the event.
    fn tracestate(&self) -> Option<&str> {
        None
    }
    /// A copy of the event whose `traceparent` is `traceparent` (the outbox re-parents an
    /// output event under the batch span that caused it). The default leaves it unchanged.
    fn with_traceparent(&self, traceparent: String) -> Option<Self> {
        let _ = traceparent;
        None
    }
}

/// Errors turning events into Avro values and back.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    /// The record name is not one of the topic's records.
    #[error("unknown record {0} for topic {1}")]
    UnknownRecord(String, &'static str),
    /// Anything apache-avro or the shape of a value refused.
    #[error("avro: {0}")]
    Avro(String),
}

impl From<apache_avro::Error> for EventError {
    fn from(e: apache_avro::Error) -> Self {
        EventError::Avro(e.to_string())
    }
}

/// One event record (not a nested record): its Avro full name and the five common fields.
pub trait Record: Serialize + DeserializeOwned + Clone + std::fmt::Debug + PartialEq {
    /// Avro full name, e.g. "weir.runs.NodeCompleted".
    const FULL_NAME: &'static str;
    /// UUIDv7 of the event.
    fn event_id(&self) -> Uuid;
    /// Microseconds since the Unix epoch, UTC.
    fn occurred_at(&self) -> i64;
    /// Tenant workspace.
    fn workspace_id(&self) -> &str;
    /// W3C traceparent; "" when none.
    fn traceparent(&self) -> &str;
    /// W3C tracestate.
    fn tracestate(&self) -> Option<&str>;
}

/// A new event id: a UUIDv7 (time-ordered, so ids sort roughly by creation time).
pub fn new_event_id() -> Uuid {
    Uuid::now_v7()
}

/// Now, in microseconds since the Unix epoch, UTC (the unit of every timestamp-micros field).
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// The five fields every event record starts with, built once for an output event: a new
/// event id (UUIDv7), when it happened, the tenant workspace and the W3C trace context it
/// continues. [`new_event!`] spreads it into a record; the wire format is the record's, with
/// the five fields first.
///
/// Two ways in: [`caused_by`](Self::caused_by) a record a processor consumed (its workspace
/// and trace context), and [`at_ingress`](Self::at_ingress) (the caller's workspace and the
/// request's trace context). A cause weir stored rather than consumed (a run's workspace and
/// traceparent, kept in Postgres) uses [`new`](Self::new). [`at`](Self::at) sets the time
/// when it is not now (the coordinator stamps a batch's events with one time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique id of the event ([`new_event_id`]).
    pub event_id: Uuid,
    /// Microseconds since the Unix epoch, UTC.
    pub occurred_at: i64,
    /// Tenant workspace.
    pub workspace_id: String,
    /// W3C traceparent; "" when none.
    pub traceparent: String,
    /// W3C tracestate.
    pub tracestate: Option<String>,
}

impl Envelope {
    /// A new event id, now, in `workspace_id`, continuing the trace context given.
    pub fn new(
        workspace_id: impl Into<String>,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Self {
        Self {
            event_id: new_event_id(),
            occurred_at: now_micros(),
            workspace_id: workspace_id.into(),
            traceparent: traceparent.into(),
            tracestate,
        }
    }

    /// An event caused by `cause`, a record this processor consumed: a new event id, now, the
    /// cause's workspace and its trace context (traceparent and tracestate).
    pub fn caused_by(cause: &impl Record) -> Self {
        Self::new(
            cause.workspace_id(),
            cause.traceparent(),
            cause.tracestate().map(str::to_owned),
        )
    }

    /// An event entering weir (the gateway): a new event id, now, the caller's workspace and
    /// the request's trace context.
    pub fn at_ingress(workspace_id: &str, traceparent: &str, tracestate: Option<&str>) -> Self {
        Self::new(workspace_id, traceparent, tracestate.map(str::to_owned))
    }

    /// The same envelope for an event that happened at `occurred_at` (µs since the epoch).
    #[must_use]
    pub fn at(self, occurred_at: i64) -> Self {
        Self {
            occurred_at,
            ..self
        }
    }
}

/// An event record built from an [`Envelope`] and its own fields:
/// `new_event!(PatchRejected { envelope: Envelope::caused_by(e), workflow_id, .. })` is the
/// struct literal with the envelope's five fields first. Every field of the record must still
/// be given (no defaults), so a new schema field cannot be forgotten.
#[macro_export]
macro_rules! new_event {
    ($record:path { envelope: $envelope:expr, $($fields:tt)* }) => {{
        let envelope: $crate::events::Envelope = $envelope;
        $record {
            event_id: envelope.event_id,
            occurred_at: envelope.occurred_at,
            workspace_id: envelope.workspace_id,
            traceparent: envelope.traceparent,
            tracestate: envelope.tracestate,
            $($fields)*
        }
    }};
}
pub use crate::new_event;

/// Every (topic, value schema text) pair, for `weir schemas register` and `weir topics create`.
pub const ALL_TOPICS: &[(&str, &str)] = &[
    (PatchSubmitted::TOPIC, PatchSubmitted::SCHEMA),
    (WorkflowEvent::TOPIC, WorkflowEvent::SCHEMA),
    (CompletionEvent::TOPIC, CompletionEvent::SCHEMA),
    (NodeReady::TOPIC, NodeReady::SCHEMA),
    (RunEvent::TOPIC, RunEvent::SCHEMA),
    (CacheEvent::TOPIC, CacheEvent::SCHEMA),
    (CacheAnswer::TOPIC, CacheAnswer::SCHEMA),
    (DeadLetter::TOPIC, DeadLetter::SCHEMA),
];
