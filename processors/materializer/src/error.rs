//! The materializer's failures, each classified once, here ([`Classify`]).
//!
//! What a patch's own content causes (a bad or missing operations blob, a failing test op, an
//! invalid result, a stored head that cannot be read) is not an error of the batch: the patch
//! is rejected and recorded. The variants below are what is left: a CAS that does not answer
//! (retried), a head the batch expected to hold (retried: the next attempt loads it again), a
//! fold that panicked on some record's content (bisected to that record) and weir's own bugs
//! (fatal). Postgres and encoding errors reach [`ApplyError`] directly, classified by the
//! runtime.

use tokio::task::JoinError;
use weir_model::cas_ref::ParseRefError;
use weir_runtime::cas::CasError;
use weir_runtime::{Classify, Disposition};

#[cfg(doc)]
use weir_runtime::ApplyError;

/// A materializer batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum MaterializerError {
    /// Reading an operations blob or storing a definition in the CAS failed for a reason
    /// other than the blob itself (an S3 or disk outage, the CAS configuration).
    #[error("cas: {0}")]
    Cas(#[source] CasError),
    /// A head marked as held in the head cache had no copy among the ones sent.
    #[error("head of {workflow_id} is marked cached but no copy is held")]
    HeadNotHeld {
        /// The workflow.
        workflow_id: String,
    },
    /// A stored head has neither a definition nor a definition ref.
    #[error("head of {workflow_id}: no definition to load")]
    HeadWithoutDefinition {
        /// The workflow.
        workflow_id: String,
    },
    /// The blocking task folding the batch panicked or was cancelled.
    #[error("fold task failed: {0}")]
    FoldTask(#[source] JoinError),
    /// The hash the fold computed for a definition is not a CAS ref.
    #[error("definition hash: {0}")]
    DefinitionRef(#[source] ParseRefError),
    /// The event built as `WorkflowMaterialized` came back as another kind.
    #[error("materialized event changed kind")]
    EventKind,
}

impl Classify for MaterializerError {
    fn disposition(&self) -> Disposition {
        match self {
            MaterializerError::Cas(e) => e.disposition(),
            // The heads are loaded again on the next attempt.
            MaterializerError::HeadNotHeld { .. }
            | MaterializerError::HeadWithoutDefinition { .. } => Disposition::Retry,
            // The fold is pure: a panic there is a bug that a record's content triggers, and
            // would again on every restart. Dead-lettering makes the runtime bisect the batch
            // and dead-letter the record that does it. A cancelled task is the runtime
            // shutting down: retry.
            MaterializerError::FoldTask(e) if e.is_panic() => Disposition::DeadLetter,
            MaterializerError::FoldTask(_) => Disposition::Retry,
            // The ref is weir's own hash, not a record's: a bad one is a bug.
            MaterializerError::DefinitionRef(_) | MaterializerError::EventKind => {
                Disposition::Fatal
            }
        }
    }

    fn is_suspect(&self) -> bool {
        match self {
            MaterializerError::Cas(e) => e.is_suspect(),
            _ => false,
        }
    }
}

impl From<CasError> for MaterializerError {
    fn from(e: CasError) -> Self {
        MaterializerError::Cas(e)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use weir_runtime::ApplyError;

    use super::*;
    use weir_model::CasRef;

    #[tokio::test]
    async fn each_failure_keeps_its_disposition_and_its_cause() {
        let panicked = tokio::task::spawn_blocking(|| panic!("a record broke the fold"))
            .await
            .unwrap_err();
        let e = ApplyError::from(MaterializerError::FoldTask(panicked));
        assert_eq!(e.disposition(), Disposition::DeadLetter);
        assert!(!e.is_suspect());
        assert!(e.to_string().starts_with("fold task failed"), "{e}");

        let held = ApplyError::from(MaterializerError::HeadNotHeld {
            workflow_id: "w".into(),
        });
        assert_eq!(held.disposition(), Disposition::Retry);
        assert!(!held.is_suspect(), "the next attempt loads the head again");

        let bad = "sha256:short".parse::<CasRef>().unwrap_err();
        let hash = ApplyError::from(MaterializerError::DefinitionRef(bad.clone()));
        assert_eq!(hash.disposition(), Disposition::Fatal, "weir's own hash");
        let cas = ApplyError::from(MaterializerError::Cas(CasError::from(bad)));
        assert_eq!(
            cas.disposition(),
            Disposition::DeadLetter,
            "a bad ref from a record is the record's"
        );
        let cause = cas
            .source()
            .and_then(|m| m.source())
            .expect("the CAS error");
        assert!(cause.downcast_ref::<CasError>().is_some(), "{cause:?}");

        let missing = MaterializerError::from(CasError::NotFound(CasRef::of(b"x")));
        assert_eq!(missing.disposition(), Disposition::Fatal);
        assert_eq!(
            MaterializerError::EventKind.disposition(),
            Disposition::Fatal
        );
    }
}
