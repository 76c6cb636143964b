//! Where an older version of a workflow comes from when a run pins one the coordinator holds
//! no snapshot of: the patch log, folded again with the materializer's limits and budget
//! ([`PatchLog`]). A trait the process wiring implements (`weir_wiring::PatchLogReplay`, with
//! the materializer's replay), so this crate depends on no other processor.
//!
//! Invariant: a rebuilt version is used only if the log replays to exactly that version with
//! no difference from the sha256 recorded when it was materialized; anything else fails the
//! run with the reason, and only an outage (Postgres, an unreachable CAS) retries the batch.

use futures::future::BoxFuture;
use serde_json::Value;
use weir_model::definition::Limits;
use weir_model::patch::Budget;
use weir_runtime::cas::CasError;

/// A version rebuilt from the patch log.
#[derive(Debug, Clone, PartialEq)]
pub struct Rebuilt {
    /// The version the log reached.
    pub version: i64,
    /// The definition at that version.
    pub definition: Value,
    /// Every disagreement between the log, the fold and the recorded hashes; empty when the
    /// log gives exactly what was materialized.
    pub differences: Vec<String>,
}

/// A rebuild that did not get as far as a comparison.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// Postgres failed (classified as any Postgres error of the batch).
    #[error("postgres: {0}")]
    Postgres(#[source] sqlx::Error),
    /// The CAS failed: an outage retries the batch, a missing or corrupt blob fails the run.
    #[error("cas: {0}")]
    Cas(#[source] CasError),
    /// The log cannot give the version (no applied patch, a version beyond it): the run
    /// fails with this reason.
    #[error("{0}")]
    Unavailable(String),
}

/// A workflow's patch log, replayed.
pub trait PatchLog: Send + Sync {
    /// `workflow_id` of `workspace_id` rebuilt up to `version` within `limits` and `budget`
    /// (the materializer's configured ones: a patch it applied under raised limits must
    /// replay as applied).
    fn rebuild<'a>(
        &'a self,
        workspace_id: &'a str,
        workflow_id: &'a str,
        version: i64,
        limits: &'a Limits,
        budget: &'a Budget,
    ) -> BoxFuture<'a, Result<Rebuilt, RebuildError>>;
}
