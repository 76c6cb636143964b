//! Topic `weir.dlq.v1` (key: the original record's key): records a processor could not process,
//! with their original bytes and the reason.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::avro::{record_from_value, record_to_value, write_record};
use super::{uuid_text, EventError, Record, TopicEvent};

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

record_topic!(DeadLetter {
    topic: "weir.dlq.v1",
    key: source_topic
});
