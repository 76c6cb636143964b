//! Topics `weir.cache.v1` (the cache's input: offers and lookups) and `weir.cache-answers.v1` (its
//! answers), both keyed by workspace_id.

use apache_avro::types::Value;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use weir_model::WireRef;

use super::avro::{record_from_value, record_to_value, write_record};
use super::{uuid_text, EventError, Record, TopicEvent};

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
        result_ref: Option<WireRef>,
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
        result_ref: Option<WireRef>,
        saved_ms: i64,
        entry_key: Option<String>,
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
