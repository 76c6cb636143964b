//! Read models the gateway answers from but does not own: run status (the coordinator) and
//! synchronous cache lookups (the cache library). Each is a trait the process wiring
//! implements; a gateway built without one answers 503 "not configured" on that route.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Status of one node of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeState {
    /// Node id in the definition.
    pub node_id: String,
    /// Node type.
    pub node_type: String,
    /// Node status as the coordinator names it.
    pub status: String,
    /// Current attempt (1-based; 0 before the first).
    pub attempt: i32,
}

/// Status of one run, as `GET /v1/runs/{run_id}` answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// The run.
    pub run_id: Uuid,
    /// Its workflow.
    pub workflow_id: String,
    /// The pinned version; `None` when the run failed before one was pinned.
    pub version: Option<i64>,
    /// Run status as the coordinator names it.
    pub status: String,
    /// Why it failed or was cancelled, if it did.
    pub reason: Option<String>,
    /// Every node's state.
    pub nodes: Vec<NodeState>,
}

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

/// Run status from the coordinator's tables, read with its library.
pub struct CoordinatorRunStatus {
    pool: sqlx::PgPool,
}

impl CoordinatorRunStatus {
    /// Reads from `pool` (the database the coordinator writes).
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl RunStatusSource for CoordinatorRunStatus {
    async fn run_status(
        &self,
        workspace_id: &str,
        run_id: Uuid,
    ) -> Result<Option<RunStatus>, SourceError> {
        let found = weir_coordinator::run_status(&self.pool, workspace_id, run_id)
            .await
            .map_err(|e| SourceError::unavailable(format!("run status from postgres: {e}")))?;
        Ok(found.map(|r| RunStatus {
            run_id: r.run_id,
            workflow_id: r.workflow_id,
            version: r.version,
            status: r.status,
            reason: r.reason,
            nodes: r
                .nodes
                .into_iter()
                .map(|n| NodeState {
                    node_id: n.node_id,
                    node_type: n.node_type,
                    status: n.status,
                    attempt: n.attempt,
                })
                .collect(),
        }))
    }
}

/// Synchronous lookups in weir's result cache (weir-cache), exact then semantic.
pub struct ResultCacheLookup {
    cache: weir_cache::Cache,
}

impl ResultCacheLookup {
    /// Looks up in `cache`.
    pub fn new(cache: weir_cache::Cache) -> Self {
        Self { cache }
    }
}

/// Results up to this size are returned inline in the answer (else only their CAS ref).
const INLINE_RESULT_BYTES: usize = 256 * 1024;

#[async_trait]
impl CacheLookupSource for ResultCacheLookup {
    async fn lookup(
        &self,
        caller: &crate::auth::Caller,
        request: &CacheLookupRequest,
    ) -> Result<CacheLookupAnswer, SourceError> {
        let fail = |e: weir_cache::CacheError| SourceError {
            message: format!("cache lookup: {e}"),
            // A content-caused failure is the request's (422); the rest is the cache's (503).
            rejection: (e.disposition() == weir_runtime::Disposition::DeadLetter)
                .then(|| e.public_message()),
        };
        let req = weir_cache::LookupRequest {
            request_id: weir_runtime::events::new_event_id().to_string(),
            workspace_id: caller.workspace_id.clone(),
            // The audit trail names who asked: the API key, not the workspace.
            requester: caller.key_id.clone(),
            permission: weir_cache::Permission::parse(caller.permission.as_str()).map_err(fail)?,
            node_type: request.node_type.clone(),
            config: request.config.clone(),
            inputs: request.inputs.clone(),
            prompt: request.prompt.clone(),
            embedding: None,
            semantic: request.semantic,
        };
        let answer = self.cache.lookup(&req).await.map_err(fail)?;
        let mut result = None;
        if let Some(r) = &answer.result_ref {
            // Verified again on read: content addressing makes a stale or corrupt copy impossible.
            let blob = self
                .cache
                .cas()
                .get(r)
                .await
                .map_err(|e| SourceError::unavailable(format!("cache result {r}: {e}")))?;
            if blob.len() <= INLINE_RESULT_BYTES {
                result = serde_json::from_slice(&blob).ok();
            }
        }
        Ok(CacheLookupAnswer {
            hit: answer.hit,
            kind: answer.kind.map(|k| match k {
                weir_runtime::events::CacheKind::Exact => HitKind::Exact,
                weir_runtime::events::CacheKind::Semantic => HitKind::Semantic,
            }),
            similarity: answer.similarity,
            result_ref: answer.result_ref.map(|r| r.to_string()),
            result,
            saved_ms: answer.saved_ms,
        })
    }
}
