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
//! same commit; the tests in this file check the round trip of every record through the binary
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

use std::collections::HashMap;
use std::sync::LazyLock;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::{Name, ResolvedSchema};
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

// ---------------------------------------------------------------------------------------------
// Serde helpers for uuid-as-text.

/// Serde for a `Uuid` in an Avro `string`/`uuid` field: always the hyphenated text; accepts text
/// or 16 raw bytes back.
mod uuid_text {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use uuid::Uuid;

    pub fn serialize<S: Serializer>(u: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(u.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        d.deserialize_str(UuidVisitor)
    }

    pub(super) struct UuidVisitor;

    impl Visitor<'_> for UuidVisitor {
        type Value = Uuid;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a UUID as text or 16 bytes")
        }
        fn visit_str<E: Error>(self, v: &str) -> Result<Uuid, E> {
            Uuid::parse_str(v).map_err(E::custom)
        }
        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Uuid, E> {
            Uuid::from_slice(v).map_err(E::custom)
        }
    }

    /// The same for `Vec<Uuid>` (an Avro array of uuid strings).
    pub mod vec {
        use serde::de::{Deserializer, SeqAccess, Visitor};
        use serde::ser::{SerializeSeq, Serializer};
        use uuid::Uuid;

        struct Text<'a>(&'a Uuid);
        impl serde::Serialize for Text<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                super::serialize(self.0, s)
            }
        }
        struct Owned(Uuid);
        impl<'de> serde::Deserialize<'de> for Owned {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                super::deserialize(d).map(Owned)
            }
        }

        pub fn serialize<S: Serializer>(v: &[Uuid], s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(v.len()))?;
            for u in v {
                seq.serialize_element(&Text(u))?;
            }
            seq.end()
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Uuid>, D::Error> {
            struct SeqVisitor;
            impl<'de> Visitor<'de> for SeqVisitor {
                type Value = Vec<Uuid>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an array of UUIDs")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Vec<Uuid>, A::Error> {
                    let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0));
                    while let Some(Owned(u)) = a.next_element()? {
                        out.push(u);
                    }
                    Ok(out)
                }
            }
            d.deserialize_seq(SeqVisitor)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records.

/// Declares an event record: the five common fields first, then the record's own fields, and
/// its [`Record`] impl.
macro_rules! event_record {
    (
        $(#[$meta:meta])*
        $name:ident = $full:literal {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[doc = ""]
        #[doc = concat!("Avro record `", $full, "`.")]
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            /// Unique id of the event, a UUIDv7 ([`new_event_id`]).
            #[serde(with = "uuid_text")]
            pub event_id: Uuid,
            /// When the event happened: microseconds since the Unix epoch, UTC ([`now_micros`]).
            pub occurred_at: i64,
            /// Tenant workspace.
            pub workspace_id: String,
            /// W3C traceparent; "" when none.
            pub traceparent: String,
            /// W3C tracestate.
            pub tracestate: Option<String>,
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl Record for $name {
            const FULL_NAME: &'static str = $full;
            fn event_id(&self) -> Uuid { self.event_id }
            fn occurred_at(&self) -> i64 { self.occurred_at }
            fn workspace_id(&self) -> &str { &self.workspace_id }
            fn traceparent(&self) -> &str { &self.traceparent }
            fn tracestate(&self) -> Option<&str> { self.tracestate.as_deref() }
        }
    };
}

// weir.patches.v1 ------------------------------------------------------------------------------

event_record! {
    /// A client asks to change one workflow definition with an RFC 6902 JSON Patch.
    PatchSubmitted = "weir.patches.PatchSubmitted" {
        /// Unique id of the patch, chosen by the submitter.
        #[serde(with = "uuid_text")]
        patch_id: Uuid,
        workflow_id: String,
        author: String,
        /// Head version the patch was written against; `None` applies to the current head.
        base_version: Option<i64>,
        /// The RFC 6902 operations array as JSON text; "" when `operations_ref` is set.
        operations_json: String,
        /// CAS ref (`sha256:<hex>`) of the operations when the patch is large.
        operations_ref: Option<String>,
    }
}

// weir.workflows.v1 ----------------------------------------------------------------------------

event_record! {
    /// A new version of a workflow definition was materialized (one per applied version).
    WorkflowMaterialized = "weir.workflows.WorkflowMaterialized" {
        workflow_id: String,
        version: i64,
        definition_json: Option<String>,
        /// CAS ref of the definition when stored in the CAS (claim check).
        definition_ref: Option<String>,
        #[serde(with = "uuid_text::vec")]
        patch_ids: Vec<Uuid>,
        /// Lowercase hex sha256 of the canonical definition JSON.
        definition_sha256: String,
    }
}

event_record! {
    /// A patch was rejected; later patches of the workflow still apply.
    PatchRejected = "weir.workflows.PatchRejected" {
        workflow_id: String,
        #[serde(with = "uuid_text")]
        patch_id: Uuid,
        base_version: Option<i64>,
        /// Head version when rejected (0 when the workflow does not exist).
        head_version: i64,
        /// test_failed, invalid_operation, invalid_definition, version_conflict, ... (open set).
        reason_code: String,
        reason: String,
    }
}

// weir.completions.v1 --------------------------------------------------------------------------

/// Avro enum `weir.runs.NodeStatus`: outcome of one node attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Succeeded,
    Failed,
}

event_record! {
    /// A client asks to start a run of one workflow version.
    RunRequested = "weir.runs.RunRequested" {
        run_id: String,
        workflow_id: String,
        /// Version to pin; `None` means the head when the run starts.
        version: Option<i64>,
        requester: String,
        /// read | write | admin.
        permission: String,
        inputs_json: Option<String>,
        inputs_ref: Option<String>,
        idempotency_key: Option<String>,
    }
}

event_record! {
    /// A worker reports the outcome of one node attempt.
    NodeCompleted = "weir.runs.NodeCompleted" {
        run_id: String,
        node_id: String,
        /// Starts at 1.
        attempt: i32,
        status: NodeStatus,
        output_json: Option<String>,
        output_ref: Option<String>,
        error: Option<String>,
        duration_ms: i64,
        worker_id: String,
        /// True when served from the result cache (Avro default false).
        from_cache: bool,
    }
}

event_record! {
    /// A client asks to cancel a run. Rust name differs from the Avro name
    /// (`weir.runs.RunCancelled`) to keep it apart from the coordinator's [`RunCancelled`].
    RunCancelRequested = "weir.runs.RunCancelled" {
        run_id: String,
        reason: Option<String>,
        requester: String,
    }
}

// weir.node-ready.v1 ---------------------------------------------------------------------------

/// Avro record `weir.runs.NodeInput`: the output of one predecessor of a ready node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInput {
    pub node_id: String,
    pub output_json: Option<String>,
    pub output_ref: Option<String>,
}

event_record! {
    /// A node of a run is ready to execute: work for a worker, once per attempt.
    NodeReady = "weir.runs.NodeReady" {
        run_id: String,
        workflow_id: String,
        version: i64,
        node_id: String,
        node_type: String,
        config_json: String,
        /// Predecessors' outputs, in definition order; empty for a root.
        inputs: Vec<NodeInput>,
        attempt: i32,
        hop: i32,
        /// timestamp-micros; `None` for no deadline.
        deadline_at: Option<i64>,
        run_inputs_json: Option<String>,
        run_inputs_ref: Option<String>,
    }
}

// weir.run-events.v1 ---------------------------------------------------------------------------

event_record! {
    /// A run started on its pinned version.
    RunStarted = "weir.run_events.RunStarted" {
        run_id: String,
        workflow_id: String,
        version: i64,
        requester: String,
    }
}

event_record! {
    /// Every node of the run succeeded.
    RunCompleted = "weir.run_events.RunCompleted" {
        run_id: String,
        workflow_id: String,
        version: i64,
        duration_ms: i64,
        outputs_json: Option<String>,
        outputs_ref: Option<String>,
    }
}

event_record! {
    /// The run failed.
    RunFailed = "weir.run_events.RunFailed" {
        run_id: String,
        workflow_id: String,
        version: i64,
        failed_node_id: Option<String>,
        reason: String,
    }
}

event_record! {
    /// The run was cancelled (the coordinator's answer to a [`RunCancelRequested`]).
    RunCancelled = "weir.run_events.RunCancelled" {
        run_id: String,
        workflow_id: String,
        version: i64,
        reason: Option<String>,
    }
}

event_record! {
    /// A node attempt failed and another one is scheduled.
    NodeRetried = "weir.run_events.NodeRetried" {
        run_id: String,
        workflow_id: String,
        version: i64,
        node_id: String,
        failed_attempt: i32,
        next_attempt: i32,
        /// timestamp-micros.
        retry_at: i64,
        error: Option<String>,
    }
}

event_record! {
    /// A run made no progress for longer than the stall time.
    RunStalled = "weir.run_events.RunStalled" {
        run_id: String,
        workflow_id: String,
        version: i64,
        idle_ms: i64,
        /// timestamp-micros.
        last_progress_at: i64,
    }
}

// weir.cache.v1 / weir.cache-answers.v1 --------------------------------------------------------

event_record! {
    /// Offer a node result to the workspace's result cache.
    CacheStore = "weir.cache.CacheStore" {
        request_id: String,
        requester: String,
        permission: String,
        node_type: String,
        config_json: String,
        inputs_json: String,
        result_json: Option<String>,
        result_ref: Option<String>,
        prompt: Option<String>,
        embedding: Option<Vec<f32>>,
        cost_ms: i64,
        /// read | write | admin: the least a requester needs to be served this entry.
        required_permission: String,
    }
}

event_record! {
    /// Ask the workspace's result cache for a result.
    CacheLookup = "weir.cache.CacheLookup" {
        request_id: String,
        requester: String,
        permission: String,
        node_type: String,
        config_json: String,
        inputs_json: String,
        prompt: Option<String>,
        embedding: Option<Vec<f32>>,
        /// Whether a semantic match may answer (Avro default true).
        semantic: bool,
    }
}

/// Avro enum `weir.cache.CacheKind`: how a cache hit matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheKind {
    Exact,
    Semantic,
}

event_record! {
    /// The cache's answer to one [`CacheLookup`].
    CacheAnswer = "weir.cache.CacheAnswer" {
        request_id: String,
        hit: bool,
        kind: Option<CacheKind>,
        similarity: Option<f64>,
        result_ref: Option<String>,
        saved_ms: i64,
        entry_key: Option<String>,
    }
}

// weir.dlq.v1 ----------------------------------------------------------------------------------

/// Avro record `weir.dlq.Header`: one Kafka header of a dead-lettered record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub key: String,
    #[serde(with = "apache_avro::serde::bytes_opt")]
    pub value: Option<Vec<u8>>,
}

event_record! {
    /// A record a processor could not process, with its original bytes and the reason.
    /// `workspace_id` is "" when the original could not be decoded.
    DeadLetter = "weir.dlq.DeadLetter" {
        source_topic: String,
        source_partition: i32,
        source_offset: i64,
        consumer_group: String,
        /// decode | unknown_schema | invalid | ... (open set).
        error_class: String,
        error_message: String,
        #[serde(with = "apache_avro::serde::bytes_opt")]
        original_key: Option<Vec<u8>>,
        #[serde(with = "apache_avro::serde::bytes_opt")]
        original_value: Option<Vec<u8>>,
        original_headers: Vec<Header>,
    }
}

// ---------------------------------------------------------------------------------------------
// Topics.

/// Turns a record into its Avro value, resolved against the record's schema in `topic`.
fn record_to_value<R: Record>(
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
fn write_record<R: Record>(
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

fn record_from_value<R: Record>(value: Value) -> Result<R, EventError> {
    Ok(apache_avro::from_value::<R>(&value)?)
}

/// A topic whose value schema is a union of records: one enum variant per branch, named like
/// the record's Rust type.
macro_rules! union_topic {
    (
        $(#[$meta:meta])*
        $enum:ident { topic: $topic:literal, key: $key:ident,
                      records: [ $( $variant:ident ),+ $(,)? ] }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub enum $enum {
            $( $variant($variant), )+
        }

        $(
            impl From<$variant> for $enum {
                fn from(e: $variant) -> Self {
                    Self::$variant(e)
                }
            }
        )+

        impl TopicEvent for $enum {
            const TOPIC: &'static str = $topic;
            const SCHEMA: &'static str = include_str!(concat!("../../../../schemas/", $topic, ".avsc"));

            fn from_record(name: &str, value: Value) -> Result<Self, EventError> {
                $(
                    if name == <$variant as Record>::FULL_NAME {
                        return record_from_value::<$variant>(value).map(Self::$variant);
                    }
                )+
                Err(EventError::UnknownRecord(name.to_owned(), Self::TOPIC))
            }

            fn to_record(&self) -> Result<(&'static str, Value), EventError> {
                match self {
                    $( Self::$variant(e) => record_to_value(Self::TOPIC, e), )+
                }
            }

            fn write_datum(&self, out: &mut Vec<u8>) -> Result<(), EventError> {
                match self {
                    $( Self::$variant(e) => write_record(Self::TOPIC, e, out), )+
                }
            }

            fn key(&self) -> &str {
                match self {
                    $( Self::$variant(e) => &e.$key, )+
                }
            }

            fn event_id(&self) -> Uuid {
                match self {
                    $( Self::$variant(e) => e.event_id, )+
                }
            }

            fn workspace_id(&self) -> &str {
                match self {
                    $( Self::$variant(e) => &e.workspace_id, )+
                }
            }

            fn traceparent(&self) -> &str {
                match self {
                    $( Self::$variant(e) => &e.traceparent, )+
                }
            }

            fn tracestate(&self) -> Option<&str> {
                match self {
                    $( Self::$variant(e) => e.tracestate.as_deref(), )+
                }
            }

            fn with_traceparent(&self, traceparent: String) -> Option<Self> {
                let mut e = self.clone();
                match &mut e {
                    $( Self::$variant(r) => r.traceparent = traceparent, )+
                }
                Some(e)
            }
        }
    };
}

/// A topic whose value schema is a single record: the record type itself is the topic event.
macro_rules! record_topic {
    ($record:ident { topic: $topic:literal, key: $key:ident }) => {
        impl TopicEvent for $record {
            const TOPIC: &'static str = $topic;
            const SCHEMA: &'static str =
                include_str!(concat!("../../../../schemas/", $topic, ".avsc"));

            fn from_record(name: &str, value: Value) -> Result<Self, EventError> {
                if name == <$record as Record>::FULL_NAME {
                    record_from_value::<$record>(value)
                } else {
                    Err(EventError::UnknownRecord(name.to_owned(), Self::TOPIC))
                }
            }

            fn to_record(&self) -> Result<(&'static str, Value), EventError> {
                record_to_value(Self::TOPIC, self)
            }

            fn write_datum(&self, out: &mut Vec<u8>) -> Result<(), EventError> {
                write_record(Self::TOPIC, self, out)
            }

            fn key(&self) -> &str {
                &self.$key
            }

            fn event_id(&self) -> Uuid {
                self.event_id
            }

            fn workspace_id(&self) -> &str {
                &self.workspace_id
            }

            fn traceparent(&self) -> &str {
                &self.traceparent
            }

            fn tracestate(&self) -> Option<&str> {
                self.tracestate.as_deref()
            }

            fn with_traceparent(&self, traceparent: String) -> Option<Self> {
                Some(Self {
                    traceparent,
                    ..self.clone()
                })
            }
        }
    };
}

record_topic!(PatchSubmitted {
    topic: "weir.patches.v1",
    key: workflow_id
});

union_topic! {
    /// Value of weir.workflows.v1 (key workflow_id): the materializer's output.
    WorkflowEvent {
        topic: "weir.workflows.v1", key: workflow_id,
        records: [WorkflowMaterialized, PatchRejected]
    }
}

union_topic! {
    /// Value of weir.completions.v1 (key run_id): the coordinator's input.
    CompletionEvent {
        topic: "weir.completions.v1", key: run_id,
        records: [RunRequested, NodeCompleted, RunCancelRequested]
    }
}

record_topic!(NodeReady {
    topic: "weir.node-ready.v1",
    key: run_id
});

union_topic! {
    /// Value of weir.run-events.v1 (key run_id): run lifecycle events from the coordinator.
    RunEvent {
        topic: "weir.run-events.v1", key: run_id,
        records: [RunStarted, RunCompleted, RunFailed, RunCancelled, NodeRetried, RunStalled]
    }
}

union_topic! {
    /// Value of weir.cache.v1 (key workspace_id): the cache's input.
    CacheEvent {
        topic: "weir.cache.v1", key: workspace_id,
        records: [CacheStore, CacheLookup]
    }
}

record_topic!(CacheAnswer {
    topic: "weir.cache-answers.v1",
    key: workspace_id
});

record_topic!(DeadLetter {
    topic: "weir.dlq.v1",
    key: source_topic
});

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

// ---------------------------------------------------------------------------------------------
// Parsed topic schemas and the union wrapping.

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

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::schema::{SchemaKind, UuidSchema};

    fn meta(ws: &str) -> (Uuid, i64, String, String, Option<String>) {
        (
            new_event_id(),
            now_micros(),
            ws.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            Some("rojo=00f067aa0ba902b7".to_owned()),
        )
    }

    /// Fills the five common fields, then the given ones, and checks that the struct's fields
    /// are the schema's fields in the schema's order (nested records included).
    macro_rules! ev {
        ($ty:ident, $ws:expr, { $($f:ident : $v:expr),* $(,)? }) => {{
            let (event_id, occurred_at, workspace_id, traceparent, tracestate) = meta($ws);
            let e = $ty { event_id, occurred_at, workspace_id, traceparent, tracestate, $($f: $v),* };
            check_field_order(&e);
            e
        }};
    }

    fn check_field_order<R: Record>(record: &R) {
        let schema = ALL_TOPICS
            .iter()
            .find_map(|(t, _)| topic_schema(t).unwrap().record_schema(R::FULL_NAME))
            .unwrap_or_else(|| panic!("{} is in no topic schema", R::FULL_NAME));
        same_shape(
            R::FULL_NAME,
            &apache_avro::to_value(record).unwrap(),
            schema,
        );
    }

    fn same_shape(at: &str, value: &Value, schema: &Schema) {
        match (value, schema) {
            (Value::Record(fields), Schema::Record(r)) => {
                let rust: Vec<_> = fields.iter().map(|(k, _)| k.as_str()).collect();
                let avro: Vec<_> = r.fields.iter().map(|f| f.name.as_str()).collect();
                assert_eq!(rust, avro, "{at}: Rust fields = schema fields, in order");
                for ((k, v), f) in fields.iter().zip(&r.fields) {
                    same_shape(&format!("{at}.{k}"), v, &f.schema);
                }
            }
            (Value::Array(items), Schema::Array(a)) => {
                items.iter().for_each(|v| same_shape(at, v, &a.items));
            }
            (Value::Union(_, inner), Schema::Union(u)) if **inner != Value::Null => {
                let non_null: Vec<_> = u
                    .variants()
                    .iter()
                    .filter(|v| !matches!(v, Schema::Null))
                    .collect();
                assert_eq!(non_null.len(), 1, "{at}: nullable = [null, T]");
                same_shape(at, inner, non_null[0]);
            }
            _ => {}
        }
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    fn patch() -> PatchSubmitted {
        ev!(PatchSubmitted, "ws-1", {
            patch_id: new_event_id(), workflow_id: s("wf-1"), author: s("ada"),
            base_version: Some(3),
            operations_json: s(r#"[{"op":"add","path":"/nodes/a","value":{"type":"pure"}}]"#),
            operations_ref: None,
        })
    }

    fn workflow_events() -> Vec<WorkflowEvent> {
        vec![
            ev!(WorkflowMaterialized, "ws-1", {
                workflow_id: s("wf-1"), version: 4, definition_json: Some(s("{\"nodes\":{}}")),
                definition_ref: None, patch_ids: vec![new_event_id(), new_event_id()],
                definition_sha256: s("ab".repeat(32).as_str()),
            })
            .into(),
            ev!(PatchRejected, "ws-1", {
                workflow_id: s("wf-1"), patch_id: new_event_id(), base_version: None,
                head_version: 4, reason_code: s("test_failed"), reason: s("/a is not 1"),
            })
            .into(),
        ]
    }

    fn completion_events() -> Vec<CompletionEvent> {
        vec![
            ev!(RunRequested, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: None, requester: s("ada"),
                permission: s("write"), inputs_json: Some(s("{\"x\":1}")), inputs_ref: None,
                idempotency_key: Some(s("k-1")),
            })
            .into(),
            ev!(NodeCompleted, "ws-1", {
                run_id: s("run-1"), node_id: s("fetch"), attempt: 2, status: NodeStatus::Failed,
                output_json: None, output_ref: Some(s("sha256:00ff")), error: Some(s("timeout")),
                duration_ms: 1234, worker_id: s("w-7"), from_cache: true,
            })
            .into(),
            ev!(RunCancelRequested, "ws-1", {
                run_id: s("run-1"), reason: Some(s("user")), requester: s("ada"),
            })
            .into(),
        ]
    }

    fn node_ready() -> NodeReady {
        ev!(NodeReady, "ws-1", {
            run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, node_id: s("summarize"),
            node_type: s("agent"), config_json: s("{\"model\":\"m\"}"),
            inputs: vec![
                NodeInput { node_id: s("fetch"), output_json: Some(s("{}")), output_ref: None },
                NodeInput { node_id: s("b"), output_json: None, output_ref: Some(s("sha256:ab")) },
            ],
            attempt: 1, hop: 2, deadline_at: Some(now_micros() + 30_000_000),
            run_inputs_json: None, run_inputs_ref: Some(s("sha256:cd")),
        })
    }

    fn run_events() -> Vec<RunEvent> {
        vec![
            ev!(RunStarted, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, requester: s("ada"),
            })
            .into(),
            ev!(RunCompleted, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, duration_ms: 99,
                outputs_json: Some(s("{}")), outputs_ref: None,
            })
            .into(),
            ev!(RunFailed, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: 4,
                failed_node_id: Some(s("fetch")), reason: s("attempts exhausted"),
            })
            .into(),
            // Shaped so that structural matching would take it for a RunFailed.
            ev!(RunCancelled, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, reason: Some(s("user")),
            })
            .into(),
            ev!(NodeRetried, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, node_id: s("fetch"),
                failed_attempt: 1, next_attempt: 2, retry_at: now_micros() + 500_000,
                error: None,
            })
            .into(),
            ev!(RunStalled, "ws-1", {
                run_id: s("run-1"), workflow_id: s("wf-1"), version: 4, idle_ms: 60_000,
                last_progress_at: now_micros() - 60_000_000,
            })
            .into(),
        ]
    }

    fn cache_events() -> Vec<CacheEvent> {
        vec![
            ev!(CacheStore, "ws-2", {
                request_id: s("rq-1"), requester: s("bob"), permission: s("admin"),
                node_type: s("agent"), config_json: s("{}"), inputs_json: s("{}"),
                result_json: Some(s("\"hi\"")), result_ref: None, prompt: Some(s("say hi")),
                embedding: Some(vec![0.25, -1.5, 3.0]), cost_ms: 800,
                required_permission: s("write"),
            })
            .into(),
            ev!(CacheLookup, "ws-2", {
                request_id: s("rq-2"), requester: s("bob"), permission: s("read"),
                node_type: s("agent"), config_json: s("{}"), inputs_json: s("{}"),
                prompt: Some(s("say hello")), embedding: None, semantic: false,
            })
            .into(),
        ]
    }

    fn cache_answers() -> Vec<CacheAnswer> {
        vec![
            ev!(CacheAnswer, "ws-2", {
                request_id: s("rq-2"), hit: true, kind: Some(CacheKind::Semantic),
                similarity: Some(0.95), result_ref: Some(s("sha256:ee")), saved_ms: 800,
                entry_key: Some(s("k")),
            }),
            ev!(CacheAnswer, "ws-2", {
                request_id: s("rq-3"), hit: false, kind: None, similarity: None,
                result_ref: None, saved_ms: 0, entry_key: None,
            }),
        ]
    }

    fn dead_letter() -> DeadLetter {
        ev!(DeadLetter, "", {
            source_topic: s("weir.patches.v1"), source_partition: 7, source_offset: 1 << 40,
            consumer_group: s("weir-materializer"), error_class: s("decode"),
            error_message: s("bad magic byte"), original_key: Some(b"wf-1".to_vec()),
            original_value: Some(vec![0xff, 0, 1, 2]),
            original_headers: vec![
                Header { key: s("traceparent"), value: Some(b"00-ab".to_vec()) },
                Header { key: s("empty"), value: None },
            ],
        })
    }

    /// The explicit path the codec takes: to_record → wrap by name → binary → decode → unwrap
    /// by index → from_record. Returns the decoded branch name.
    fn roundtrip<E: TopicEvent + PartialEq + std::fmt::Debug>(event: &E) -> String {
        let schema = Schema::parse_str(E::SCHEMA).unwrap();
        let branches: Vec<String> = match &schema {
            Schema::Union(u) => u
                .variants()
                .iter()
                .map(|v| v.name().unwrap().fullname(None))
                .collect(),
            s => vec![s.name().unwrap().fullname(None)],
        };
        let (name, record) = event.to_record().unwrap();
        assert!(
            matches!(record, Value::Record(_)),
            "{name}: to_record gives a record"
        );
        let index = branches
            .iter()
            .position(|b| b == name)
            .expect("branch by name");
        let value = match &schema {
            Schema::Union(_) => Value::Union(index as u32, Box::new(record)),
            _ => record,
        };
        let bytes = GenericDatumWriter::builder(&schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let decoded = GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut &bytes[..])
            .unwrap();
        let (i, record) = match (&schema, decoded) {
            (Schema::Union(_), Value::Union(i, v)) => (i as usize, *v),
            (Schema::Union(_), other) => panic!("expected a union, got {other:?}"),
            (_, v) => (0, v),
        };
        assert_eq!(i, index, "{name}: union index survives");
        let back = E::from_record(&branches[i], record).unwrap();
        assert_eq!(&back, event, "{name}: round trip");
        // The library helpers agree with the explicit path.
        assert_eq!(encode(event).unwrap(), bytes, "{name}: encode");
        assert_eq!(
            encode_via_value(event).unwrap(),
            bytes,
            "{name}: the generic path"
        );
        assert_eq!(&decode::<E>(&bytes, None).unwrap(), event, "{name}: decode");
        name.to_owned()
    }

    #[test]
    fn every_schema_parses_and_lists_unique_records() {
        let expected = [
            ("weir.patches.v1", vec!["weir.patches.PatchSubmitted"]),
            (
                "weir.workflows.v1",
                vec![
                    "weir.workflows.WorkflowMaterialized",
                    "weir.workflows.PatchRejected",
                ],
            ),
            (
                "weir.completions.v1",
                vec![
                    "weir.runs.RunRequested",
                    "weir.runs.NodeCompleted",
                    "weir.runs.RunCancelled",
                ],
            ),
            ("weir.node-ready.v1", vec!["weir.runs.NodeReady"]),
            (
                "weir.run-events.v1",
                vec![
                    "weir.run_events.RunStarted",
                    "weir.run_events.RunCompleted",
                    "weir.run_events.RunFailed",
                    "weir.run_events.RunCancelled",
                    "weir.run_events.NodeRetried",
                    "weir.run_events.RunStalled",
                ],
            ),
            (
                "weir.cache.v1",
                vec!["weir.cache.CacheStore", "weir.cache.CacheLookup"],
            ),
            ("weir.cache-answers.v1", vec!["weir.cache.CacheAnswer"]),
            ("weir.dlq.v1", vec!["weir.dlq.DeadLetter"]),
        ];
        assert_eq!(ALL_TOPICS.len(), expected.len());
        for ((topic, text), (want_topic, want_branches)) in ALL_TOPICS.iter().zip(&expected) {
            assert_eq!(topic, want_topic);
            Schema::parse_str(text).unwrap_or_else(|e| panic!("{topic}: {e}"));
            let ts = topic_schema(topic).unwrap();
            assert_eq!(ts.branches(), want_branches.as_slice(), "{topic}");
            assert_eq!(ts.is_union(), want_branches.len() > 1, "{topic}");
            let mut unique = ts.branches().to_vec();
            unique.sort();
            unique.dedup();
            assert_eq!(
                unique.len(),
                ts.branches().len(),
                "{topic}: branch names unique"
            );
            // Every record and enum has a doc (the registry and analytics readers rely on it).
            let json: serde_json::Value = serde_json::from_str(text).unwrap();
            let mut named = Vec::new();
            collect_named(&json, &mut named);
            for n in &named {
                assert!(
                    n.get("doc")
                        .and_then(|d| d.as_str())
                        .is_some_and(|d| !d.is_empty()),
                    "{topic}: {n} has no doc"
                );
            }
        }
        // Distinct topic names.
        let mut topics: Vec<_> = ALL_TOPICS.iter().map(|(t, _)| *t).collect();
        topics.sort();
        topics.dedup();
        assert_eq!(topics.len(), ALL_TOPICS.len());
    }

    fn collect_named<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        match v {
            serde_json::Value::Object(m) => {
                if matches!(
                    m.get("type").and_then(|t| t.as_str()),
                    Some("record" | "enum")
                ) {
                    out.push(v);
                }
                m.values().for_each(|x| collect_named(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| collect_named(x, out)),
            _ => {}
        }
    }

    #[test]
    fn every_record_starts_with_the_common_fields() {
        let mut records = 0;
        for (topic, _) in ALL_TOPICS {
            let ts = topic_schema(topic).unwrap();
            for name in ts.branches() {
                records += 1;
                let Some(Schema::Record(r)) = ts.record_schema(name) else {
                    panic!("{name}")
                };
                let f: Vec<_> = r.fields.iter().take(5).collect();
                let names: Vec<_> = f.iter().map(|f| f.name.as_str()).collect();
                assert_eq!(
                    names,
                    [
                        "event_id",
                        "occurred_at",
                        "workspace_id",
                        "traceparent",
                        "tracestate"
                    ],
                    "{name}"
                );
                assert!(
                    matches!(f[0].schema, Schema::Uuid(UuidSchema::String)),
                    "{name}.event_id"
                );
                assert!(
                    matches!(f[1].schema, Schema::TimestampMicros),
                    "{name}.occurred_at"
                );
                assert!(matches!(f[2].schema, Schema::String), "{name}.workspace_id");
                assert!(matches!(f[3].schema, Schema::String), "{name}.traceparent");
                match &f[4].schema {
                    Schema::Union(u) => assert!(
                        matches!(u.variants(), [Schema::Null, Schema::String]),
                        "{name}"
                    ),
                    other => panic!("{name}.tracestate: {:?}", SchemaKind::from(other)),
                }
                assert_eq!(
                    f[4].default,
                    Some(serde_json::Value::Null),
                    "{name}.tracestate default"
                );
                for field in &r.fields {
                    assert!(
                        field
                            .name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                        "{name}.{} is snake_case",
                        field.name
                    );
                    // Nullable fields are ["null", T] with default null.
                    if let Schema::Union(u) = &field.schema {
                        assert!(
                            matches!(u.variants()[0], Schema::Null),
                            "{name}.{}",
                            field.name
                        );
                        assert_eq!(
                            field.default,
                            Some(serde_json::Value::Null),
                            "{name}.{}",
                            field.name
                        );
                    }
                }
            }
        }
        assert_eq!(records, 17);
    }

    #[test]
    fn every_record_round_trips_through_avro_binary() {
        let mut seen = Vec::new();
        seen.push(roundtrip(&patch()));
        for e in workflow_events() {
            seen.push(roundtrip(&e));
        }
        for e in completion_events() {
            seen.push(roundtrip(&e));
        }
        seen.push(roundtrip(&node_ready()));
        for e in run_events() {
            seen.push(roundtrip(&e));
        }
        for e in cache_events() {
            seen.push(roundtrip(&e));
        }
        for e in cache_answers() {
            seen.push(roundtrip(&e));
        }
        seen.push(roundtrip(&dead_letter()));
        seen.sort();
        seen.dedup();
        let all: usize = ALL_TOPICS
            .iter()
            .map(|(t, _)| topic_schema(t).unwrap().branches().len())
            .sum();
        assert_eq!(seen.len(), all, "every record type covered: {seen:?}");

        // Unknown record names are refused with the topic named.
        let (_, v) = patch().to_record().unwrap();
        let err = RunEvent::from_record("weir.patches.PatchSubmitted", v).unwrap_err();
        assert!(
            matches!(err, EventError::UnknownRecord(ref n, "weir.run-events.v1") if n == "weir.patches.PatchSubmitted"),
            "{err}"
        );
        // Trailing garbage and truncated datums are errors, not silently accepted.
        let mut bytes = encode(&dead_letter()).unwrap();
        assert!(decode::<DeadLetter>(&bytes[..bytes.len() - 1], None).is_err());
        bytes.push(0);
        assert!(decode::<DeadLetter>(&bytes, None).is_err());
    }

    #[test]
    fn wire_types_are_the_avro_logical_types() {
        // A consumer with stock deserializers sees uuid text and timestamp-micros longs.
        let p = patch();
        let (_, Value::Record(fields)) = p.to_record().unwrap() else {
            panic!()
        };
        let get = |n: &str| {
            fields
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("event_id"), Value::Uuid(p.event_id));
        assert_eq!(get("patch_id"), Value::Uuid(p.patch_id));
        assert_eq!(get("occurred_at"), Value::TimestampMicros(p.occurred_at));
        assert_eq!(
            get("base_version"),
            Value::Union(1, Box::new(Value::Long(3)))
        );
        assert_eq!(
            get("operations_ref"),
            Value::Union(0, Box::new(Value::Null))
        );
        assert_eq!(p.event_id.get_version_num(), 7);
        // The uuid travels as its 36-character text right after the record start.
        let bytes = encode(&p).unwrap();
        assert_eq!(bytes[0], 72, "zigzag length 36");
        assert_eq!(&bytes[1..37], p.event_id.to_string().as_bytes());

        let n = node_ready();
        let (_, Value::Record(fields)) = n.to_record().unwrap() else {
            panic!()
        };
        let deadline = fields
            .iter()
            .find(|(k, _)| k == "deadline_at")
            .unwrap()
            .1
            .clone();
        assert_eq!(
            deadline,
            Value::Union(1, Box::new(Value::TimestampMicros(n.deadline_at.unwrap())))
        );

        let (_, Value::Record(fields)) = completion_events()[1].to_record().unwrap() else {
            panic!()
        };
        let status = fields
            .iter()
            .find(|(k, _)| k == "status")
            .unwrap()
            .1
            .clone();
        assert_eq!(status, Value::Enum(1, s("failed")));

        // now_micros is microseconds (not millis or nanos).
        let now = now_micros();
        assert!(
            now > 1_700_000_000_000_000 && now < 4_000_000_000_000_000,
            "{now}"
        );
    }

    #[test]
    fn union_branches_are_chosen_by_name_not_by_shape() {
        // A RunCancelled value also resolves against RunFailed (reason: string, failed_node_id
        // defaulted); by-name wrapping keeps it a RunCancelled.
        let cancelled = run_events().remove(3);
        assert!(matches!(cancelled, RunEvent::RunCancelled(_)));
        let ts = topic_schema(RunEvent::TOPIC).unwrap();
        let (name, record) = cancelled.to_record().unwrap();
        assert_eq!(name, "weir.run_events.RunCancelled");
        let structural = record.clone().resolve(ts.schema()).unwrap();
        let Value::Union(i, _) = structural else {
            panic!()
        };
        assert_eq!(
            ts.branches()[i as usize],
            "weir.run_events.RunFailed",
            "structural matching is ambiguous"
        );
        assert_eq!(
            ts.wrap(name, record).unwrap().clone(),
            to_topic_value(&cancelled).unwrap()
        );
        assert_eq!(
            decode::<RunEvent>(&encode(&cancelled).unwrap(), None).unwrap(),
            cancelled
        );
    }

    #[test]
    fn decoding_with_an_older_writer_schema_fills_defaults() {
        // An older CompletionEvent schema without from_cache (added later with default false).
        let mut json: serde_json::Value = serde_json::from_str(CompletionEvent::SCHEMA).unwrap();
        let fields = json[1]["fields"].as_array_mut().unwrap();
        fields.retain(|f| f["name"] != "from_cache");
        let old = TopicSchema::parse(&json.to_string()).unwrap();
        let CompletionEvent::NodeCompleted(mut done) = completion_events().remove(1) else {
            panic!()
        };
        let (name, record) = CompletionEvent::NodeCompleted(done.clone())
            .to_record()
            .unwrap();
        let Value::Record(mut fields) = record else {
            panic!()
        };
        fields.retain(|(k, _)| k != "from_cache");
        let old_value = old.wrap(name, Value::Record(fields)).unwrap();
        let bytes = GenericDatumWriter::builder(old.schema())
            .build()
            .unwrap()
            .write_value_to_vec(old_value)
            .unwrap();
        let back = decode::<CompletionEvent>(&bytes, Some(&old)).unwrap();
        done.from_cache = false;
        assert_eq!(back, CompletionEvent::NodeCompleted(done));
    }

    #[test]
    fn keys_and_metadata_follow_the_brief() {
        let p = patch();
        assert_eq!(p.key(), "wf-1");
        assert_eq!(TopicEvent::event_id(&p), p.event_id);
        for e in workflow_events() {
            assert_eq!(e.key(), "wf-1");
            assert_eq!(e.workspace_id(), "ws-1");
        }
        for e in completion_events() {
            assert_eq!(e.key(), "run-1");
        }
        assert_eq!(node_ready().key(), "run-1");
        for e in run_events() {
            assert_eq!(e.key(), "run-1");
        }
        for e in cache_events() {
            assert_eq!(e.key(), "ws-2");
        }
        for e in cache_answers() {
            assert_eq!(e.key(), "ws-2");
        }
        let d = dead_letter();
        assert_eq!(d.key(), "weir.patches.v1");
        assert_eq!(TopicEvent::workspace_id(&d), "");
        // Event ids are v7 and increase with time.
        let (a, b) = (new_event_id(), new_event_id());
        assert!(a < b && a.get_version_num() == 7);
    }

    proptest::proptest! {
        /// The direct serializer writes exactly the generic path's bytes for the hot output
        /// events, whatever their strings, numbers and optional fields hold.
        #[test]
        fn direct_encoding_equals_the_generic_path(
            text in ".{0,40}",
            version in proptest::num::i64::ANY,
            definition in proptest::option::of(".{0,200}"),
            ids in 0usize..4,
            base in proptest::option::of(proptest::num::i64::ANY),
        ) {
            let m: WorkflowEvent = WorkflowMaterialized {
                event_id: new_event_id(),
                occurred_at: version,
                workspace_id: text.clone(),
                traceparent: text.clone(),
                tracestate: definition.clone(),
                workflow_id: text.clone(),
                version,
                definition_ref: definition.is_none().then(|| format!("sha256:{text}")),
                definition_json: definition,
                patch_ids: (0..ids).map(|_| new_event_id()).collect(),
                definition_sha256: text.clone(),
            }
            .into();
            let r: WorkflowEvent = PatchRejected {
                event_id: new_event_id(),
                occurred_at: -version,
                workspace_id: text.clone(),
                traceparent: String::new(),
                tracestate: None,
                workflow_id: text.clone(),
                patch_id: new_event_id(),
                base_version: base,
                head_version: version,
                reason_code: "test_failed".into(),
                reason: text,
            }
            .into();
            for e in [m, r] {
                let bytes = encode(&e).unwrap();
                proptest::prop_assert_eq!(&bytes, &encode_via_value(&e).unwrap());
                proptest::prop_assert_eq!(decode::<WorkflowEvent>(&bytes, None).unwrap(), e);
            }
        }
    }
}
