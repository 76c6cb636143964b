//! Read models the gateway answers from but does not own: run status (the coordinator) and
//! synchronous cache lookups (the cache library). Each is a trait the process wiring
//! implements (`weir_wiring`), so the gateway depends on no other
//! processor; a gateway built without one answers 503 "not configured" on that route.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;
use weir_model::run::RunStatus;

/// A read model failed; the caller answers 503 and logs `message` — or, when `rejection` is
/// set, the request itself was invalid and the caller answers 422 with that reason.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// What failed (logged, never sent to clients).
    pub message: String,
    /// Why the request is invalid (an empty or over-long prompt, a prompt the embedder
    /// refuses), safe to show the caller: a client mistake is a 4xx, never a 503.
    pub rejection: Option<String>,
}

impl SourceError {
    /// A failure of the read model (503).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            rejection: None,
        }
    }
}

/// Where run status comes from (the coordinator's tables).
#[async_trait]
pub trait RunStatusSource: Send + Sync + 'static {
    /// The run `run_id` of `workspace_id`; `None` when there is none in that workspace.
    async fn run_status(
        &self,
        workspace_id: &str,
        run_id: Uuid,
    ) -> Result<Option<RunStatus>, SourceError>;

    /// Whether run `run_id` exists in `workspace_id`: the check before a completion is
    /// accepted. A source that can answer it without the run's nodes should.
    async fn run_exists(&self, workspace_id: &str, run_id: Uuid) -> Result<bool, SourceError> {
        Ok(self.run_status(workspace_id, run_id).await?.is_some())
    }
}

/// A synchronous cache lookup (`POST /v1/cache/lookup`); workspace and permission come from
/// the caller's key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheLookupRequest {
    /// Node type whose result is looked up.
    pub node_type: String,
    /// Node configuration.
    pub config: Value,
    /// Node inputs.
    pub inputs: Value,
    /// Prompt text, for semantic matching.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Whether a semantic (similar, not identical) match may answer.
    #[serde(default = "yes")]
    pub semantic: bool,
}

fn yes() -> bool {
    true
}

/// How a hit matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HitKind {
    /// Same node type, config and inputs.
    Exact,
    /// A similar prompt.
    Semantic,
}

/// The answer to a [`CacheLookupRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheLookupAnswer {
    /// Whether an entry was found.
    pub hit: bool,
    /// How it matched (`None` on a miss).
    pub kind: Option<HitKind>,
    /// Cosine similarity of a semantic hit.
    pub similarity: Option<f64>,
    /// CAS ref of the result.
    pub result_ref: Option<String>,
    /// The result itself when small.
    pub result: Option<Value>,
    /// Time the hit saves (the entry's recorded cost), in ms; 0 on a miss.
    pub saved_ms: i64,
}

/// Where cache lookups go (the cache library).
#[async_trait]
pub trait CacheLookupSource: Send + Sync + 'static {
    /// Looks `request` up in the caller's workspace's cache at the caller's permission; the
    /// audit trail names the caller's key id.
    async fn lookup(
        &self,
        caller: &crate::auth::Caller,
        request: &CacheLookupRequest,
    ) -> Result<CacheLookupAnswer, SourceError>;
}
