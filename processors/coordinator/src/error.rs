//! The coordinator's failures, each classified once, here, with what the consumer does with
//! the batch that met it ([`Disposition`]).
//!
//! What a run's own content causes (a definition blob missing, corrupt, not JSON or behind a
//! bad ref; a snapshot that no longer compiles; a patch log that cannot be replayed) is not an
//! error of the batch at all: the run fails with a reason and the batch goes on. The variants
//! below are what is left: outages (retried), a broken dispatch cache or stored state weir
//! did not write (fatal), and the Postgres and encoding errors of the batch's statements and
//! outbox rows (classified by the runtime). `?` turns one into the runtime's `ApplyError`
//! with the error as its source, so the chain down to the sqlx or CAS error is kept.

use weir_runtime::cas::CasError;
use weir_runtime::{Classify, Disposition, EncodeError};

use crate::cache::CacheSeamError;

/// A coordinator batch (or timer tick) could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A statement of the batch failed; classified by SQLSTATE.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// Encoding an outbox event failed.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// Reading a pinned definition's blob failed for a reason other than the blob itself (an
    /// S3 or disk outage, the CAS configuration).
    #[error("cas: {0}")]
    Cas(#[source] CasError),
    /// Rebuilding an older version from the patch log met a CAS outage.
    #[error("rebuilding ({workspace_id:?}, {workflow_id:?}, {version}): {source}")]
    Rebuild {
        /// Workspace of the workflow.
        workspace_id: String,
        /// The workflow.
        workflow_id: String,
        /// The version being rebuilt.
        version: i64,
        /// What the CAS said.
        #[source]
        source: CasError,
    },
    /// The blocking task compiling definitions panicked or was cancelled.
    #[error("compile task failed: {0}")]
    CompileTask(#[source] tokio::task::JoinError),
    /// A stored node has a status the state machine does not know: the table was written by
    /// something else (or a newer weir); guessing could dispatch twice.
    #[error("run {run_id} node {node_id}: unknown status {status}")]
    NodeStatus {
        /// The run.
        run_id: String,
        /// The node.
        node_id: String,
        /// The stored status.
        status: String,
    },
    /// The dispatch cache failed, or answered a different number of results than asked.
    #[error("dispatch cache: {0}")]
    Cache(#[from] CacheSeamError),
}

/// A CAS failure's disposition here: a blob that is missing, corrupt or behind a bad ref is
/// content (the record that needs it is dead-lettered, like the materializer does), not a
/// reason to stop the coordinator; outages and configuration keep the CAS's own class.
fn cas_disposition(e: &CasError) -> Disposition {
    match e {
        CasError::InvalidRef(_) | CasError::NotFound(_) | CasError::Corrupt { .. } => {
            Disposition::DeadLetter
        }
        other => other.disposition(),
    }
}

impl Classify for CoordinatorError {
    fn disposition(&self) -> Disposition {
        match self {
            CoordinatorError::Postgres(e) => e.disposition(),
            CoordinatorError::Encode(e) => e.disposition(),
            CoordinatorError::Cas(e) | CoordinatorError::Rebuild { source: e, .. } => {
                cas_disposition(e)
            }
            CoordinatorError::CompileTask(_) | CoordinatorError::NodeStatus { .. } => {
                Disposition::Fatal
            }
            CoordinatorError::Cache(e) => e.disposition(),
        }
    }

    /// Forwarded from the Postgres error inside, the batch's own or the cache lookup's.
    fn is_suspect(&self) -> bool {
        match self {
            CoordinatorError::Postgres(e)
            | CoordinatorError::Cache(CacheSeamError::Postgres(e)) => e.is_suspect(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use weir_model::CasRef;
    use weir_runtime::ApplyError;

    use super::*;

    #[test]
    fn a_bad_blob_is_content_and_an_outage_is_retried() {
        let bad_ref = "sha256:nope".parse::<CasRef>().unwrap_err();
        let bad_ref = CoordinatorError::Cas(CasError::InvalidRef(bad_ref));
        assert_eq!(bad_ref.disposition(), Disposition::DeadLetter);
        let missing = CoordinatorError::Cas(CasError::NotFound(CasRef::of(b"gone")));
        assert_eq!(missing.disposition(), Disposition::DeadLetter);
        let outage = CasError::S3 {
            op: "GetObject",
            key: "k".into(),
            status: Some(503),
            code: None,
            message: "slow down".into(),
            disposition: Disposition::Retry,
        };
        let rebuild = ApplyError::from(CoordinatorError::Rebuild {
            workspace_id: "ws".into(),
            workflow_id: "wf".into(),
            version: 2,
            source: outage,
        });
        assert_eq!(rebuild.disposition(), Disposition::Retry);
        assert!(!rebuild.is_suspect(), "an outage is taken at its word");
        let cas = rebuild.source().and_then(|e| e.source());
        assert!(
            cas.and_then(|e| e.downcast_ref::<CasError>()).is_some(),
            "the chain keeps the CAS error"
        );
    }

    #[test]
    fn bugs_are_fatal_and_postgres_keeps_its_class() {
        let status = CoordinatorError::NodeStatus {
            run_id: "r".into(),
            node_id: "n".into(),
            status: "exploded".into(),
        };
        assert_eq!(status.disposition(), Disposition::Fatal);
        let mismatch = CoordinatorError::Cache(CacheSeamError::Mismatch {
            candidates: 2,
            answers: 1,
        });
        assert_eq!(mismatch.disposition(), Disposition::Fatal);
        let pg = ApplyError::from(CoordinatorError::Postgres(sqlx::Error::RowNotFound));
        assert_eq!(pg.disposition(), Disposition::Retry);
        assert!(pg.is_suspect(), "a suspect Postgres error stays suspect");
        let io = sqlx::Error::Io(std::io::Error::other("reset"));
        let cache = ApplyError::from(CoordinatorError::Cache(CacheSeamError::Postgres(io)));
        assert_eq!(cache.disposition(), Disposition::Retry);
        assert!(
            !cache.is_suspect(),
            "a lost connection is retried without a cap"
        );
    }
}
