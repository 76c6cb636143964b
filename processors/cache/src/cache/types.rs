//! What goes in and out of the cache: lookups and their answers, stores and their outcomes,
//! the coordinator's exact requests and hits, and [`UnitVector`], the only form in which a
//! vector reaches a statement.
//!
//! Invariant: a [`UnitVector`] has been validated ([`validate_vector`]: finite components, a
//! norm that is a number and not near zero, scaled to unit length) exactly once, by
//! [`UnitVector::new`]; nothing downstream checks it again.

use serde_json::Value;
use weir_model::cache::validate_vector;
use weir_model::{CasRef, Permission};
use weir_runtime::events::CacheKind;

use crate::pii;

/// A validated embedding: exactly the dimension it was checked against, finite, unit
/// length. Bound to Postgres as it is, in pgvector's binary form ([`pgvector::Vector`]).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitVector(pgvector::Vector);

impl UnitVector {
    /// Validates `v` for a deployment of `dims` dimensions and scales it to unit length; the
    /// error is the reason, for the requester.
    pub fn new(v: Vec<f32>, dims: usize) -> Result<UnitVector, String> {
        validate_vector(v, dims).map(|v| UnitVector(pgvector::Vector::from(v)))
    }

    /// Number of components.
    pub fn dims(&self) -> usize {
        self.0.as_slice().len()
    }

    /// The components.
    pub fn as_slice(&self) -> &[f32] {
        self.0.as_slice()
    }

    /// The value to bind.
    pub fn to_pg(&self) -> pgvector::Vector {
        self.0.clone()
    }
}

/// One lookup.
#[derive(Debug, Clone)]
pub struct LookupRequest {
    /// Correlates the answer.
    pub request_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// Who asks (for the audit trail).
    pub requester: String,
    /// The requester's level.
    pub permission: Permission,
    /// Node type.
    pub node_type: String,
    /// Node config.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// Agent prompt, for a semantic lookup.
    pub prompt: Option<String>,
    /// The prompt's embedding, if the caller has it.
    pub embedding: Option<UnitVector>,
    /// Whether a semantic match may answer.
    pub semantic: bool,
}

/// The answer to one lookup (the fields of a CacheAnswer).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The request's id.
    pub request_id: String,
    /// Whether an entry was served.
    pub hit: bool,
    /// How it matched, on a hit.
    pub kind: Option<CacheKind>,
    /// Similarity of a semantic hit, or of the best near miss.
    pub similarity: Option<f64>,
    /// The verified result, on a hit.
    pub result_ref: Option<CasRef>,
    /// Work the hit saved, in ms.
    pub saved_ms: i64,
    /// Hex key of the entry that answered.
    pub entry_key: Option<String>,
}

impl Answer {
    pub(super) fn miss(request_id: &str, similarity: Option<f64>) -> Answer {
        Answer {
            request_id: request_id.into(),
            hit: false,
            kind: None,
            similarity,
            result_ref: None,
            saved_ms: 0,
            entry_key: None,
        }
    }
}

/// The result offered to the cache.
#[derive(Debug, Clone)]
pub enum StoreResult {
    /// JSON text; the cache puts it in the CAS.
    Json(String),
    /// Already in the CAS.
    Ref(CasRef),
}

/// One store.
#[derive(Debug, Clone)]
pub struct StoreRequest {
    /// Correlation id.
    pub request_id: String,
    /// Tenant.
    pub workspace_id: String,
    /// Who produced the result (the entry's owner, in the audit trail).
    pub requester: String,
    /// The producer's level (must be at least `required_permission`).
    pub permission: Permission,
    /// Node type.
    pub node_type: String,
    /// Node config.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// The result.
    pub result: StoreResult,
    /// Agent prompt, for a semantic entry.
    pub prompt: Option<String>,
    /// The prompt's embedding, if the producer has it.
    pub embedding: Option<UnitVector>,
    /// What producing the result cost, in ms.
    pub cost_ms: i64,
    /// The least level a requester needs to be served this entry.
    pub required_permission: Permission,
}

/// Why a result was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node type is not cacheable.
    NotCacheable,
    /// The result matched the PII guard.
    Pii(pii::PiiKind),
    /// Larger than `cache.max_result_bytes`.
    TooLarge,
    /// The referenced blob is missing or corrupt.
    BadBlob,
}

impl Refusal {
    /// The reason, as audited and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::NotCacheable => "not_cacheable",
            Refusal::Pii(pii::PiiKind::Email) => "pii:email",
            Refusal::Pii(pii::PiiKind::CardNumber) => "pii:card_number",
            Refusal::Pii(pii::PiiKind::NationalId) => "pii:national_id",
            Refusal::Pii(pii::PiiKind::Secret) => "pii:secret",
            Refusal::TooLarge => "too_large",
            Refusal::BadBlob => "bad_blob",
        }
    }
}

/// What a store did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Stored: the exact key (hex) and whether a semantic entry was written too.
    Stored {
        /// Hex exact key.
        entry_key: String,
        /// Whether a semantic entry was written.
        semantic: bool,
    },
    /// Not stored: the cache does not keep this result (audited as `refused`).
    Refused(Refusal),
    /// The request is invalid (a bad prompt or vector, a prompt the embedder refuses, a
    /// required permission above the producer's): nothing was written; the processor
    /// dead-letters the record with this reason.
    Rejected(String),
}

/// A request of [`exact_lookup_batch`] (the coordinator's pre-dispatch check).
#[derive(Debug, Clone)]
pub struct ExactRequest {
    /// Tenant.
    pub workspace_id: String,
    /// The requester's level.
    pub permission: Permission,
    /// Node type.
    pub node_type: String,
    /// Node config.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// The prompt, when the node has one (part of the exact key).
    pub prompt: Option<String>,
    /// Who asks, for the audit trail (the coordinator: the key that requested the run).
    pub requester: String,
    /// Correlation id for the audit trail (e.g. `<run_id>/<node_id>`).
    pub request_id: String,
}

/// A verified exact hit.
#[derive(Debug, Clone, PartialEq)]
pub struct ExactHit {
    /// The result parsed as JSON, when it is at most [`INLINE_RESULT_BYTES`].
    pub result_json: Option<Value>,
    /// The result's CAS ref (always set; verified).
    pub result_ref: CasRef,
    /// Work the hit saved, in ms.
    pub saved_ms: i64,
    /// Hex key of the entry.
    pub entry_key: String,
}

/// Results up to this size come back parsed in [`ExactHit::result_json`].
pub const INLINE_RESULT_BYTES: usize = 256 * 1024;
