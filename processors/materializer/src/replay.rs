//! `weir workflows replay`: rebuilds a workflow from its patch log with the same fold the
//! materializer uses, checks every rebuilt version against the sha256 recorded when it was
//! first materialized, and compares the result with the stored head.

use serde_json::Value;
use sqlx::PgPool;
use weir_model::CasRef;
use weir_runtime::cas::Cas;

use weir_model::definition::{canonical_json_verbatim_numbers, Limits};
use weir_model::fold::{self, Decision, Head, Submitted};
use weir_model::patch::{Budget, Patch};

/// What a replay found.
#[derive(Debug)]
pub struct ReplayReport {
    /// The workspace owning the workflow.
    pub workspace_id: String,
    /// The workflow.
    pub workflow_id: String,
    /// The version rebuilt.
    pub version: i64,
    /// The rebuilt definition at that version.
    pub definition: Value,
    /// The stored head's version, if the workflow has one.
    pub stored_version: Option<i64>,
    /// Every disagreement between the log, the fold and the stored head. Empty means
    /// the stored state is exactly what the log produces.
    pub differences: Vec<String>,
}

/// Replay failed before it could compare anything.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Postgres.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The CAS.
    #[error("cas: {0}")]
    Cas(#[from] weir_runtime::cas::CasError),
    /// The workflow has no applied patch.
    #[error("workflow {0} has no applied patches")]
    Unknown(String),
    /// The requested version is beyond the log.
    #[error("workflow {workflow_id} has versions 1..={latest}, not {requested}")]
    NoSuchVersion {
        /// The workflow.
        workflow_id: String,
        /// Latest applied version.
        latest: i64,
        /// What was asked for.
        requested: i64,
    },
}

async fn blob_json(cas: &Cas, r: &str) -> Result<Value, String> {
    let parsed: CasRef = r.parse().map_err(|e| format!("bad CAS ref {r:?}: {e}"))?;
    let bytes = cas.get(&parsed).await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| format!("blob {r} is not JSON: {e}"))
}

/// Rebuilds `workflow_id` of `workspace_id` up to `to_version` (default: the latest applied
/// version) within the default patch budget. Workflow ids are unique per workspace only:
/// another workspace's workflow of the same id is never read.
pub async fn replay(
    pool: &PgPool,
    cas: &Cas,
    workspace_id: &str,
    workflow_id: &str,
    to_version: Option<i64>,
    limits: &Limits,
) -> Result<ReplayReport, ReplayError> {
    let budget = fold::default_budget(limits);
    replay_with(
        pool,
        cas,
        workspace_id,
        workflow_id,
        to_version,
        limits,
        &budget,
    )
    .await
}

/// [`replay`] within `budget`: pass the materializer's configured budget
/// ([`MaterializerConfig::budget`](weir_runtime::config::MaterializerConfig::budget)), or a patch the materializer applied under raised limits
/// would replay as rejected.
pub async fn replay_with(
    pool: &PgPool,
    cas: &Cas,
    workspace_id: &str,
    workflow_id: &str,
    to_version: Option<i64>,
    limits: &Limits,
    budget: &Budget,
) -> Result<ReplayReport, ReplayError> {
    let rows = sqlx::query!(
        r#"SELECT workspace_id, version AS "version!", definition_sha256 AS "sha!", operations, operations_ref
           FROM weir_workflow_patches
           WHERE workspace_id = $1 AND workflow_id = $2 AND status = 'applied'
           ORDER BY version"#,
        workspace_id,
        workflow_id,
    )
    .fetch_all(pool)
    .await?;
    let latest = rows
        .last()
        .map(|r| r.version)
        .ok_or_else(|| ReplayError::Unknown(workflow_id.into()))?;
    let target = to_version.unwrap_or(latest);
    if target < 1 || target > latest {
        return Err(ReplayError::NoSuchVersion {
            workflow_id: workflow_id.into(),
            latest,
            requested: target,
        });
    }

    let mut differences = Vec::new();
    let mut head = Head::empty(&rows[0].workspace_id);
    for (expected_version, row) in (1..=target).zip(&rows) {
        if row.version != expected_version {
            differences.push(format!(
                "the log has version {} where {expected_version} was expected",
                row.version
            ));
        }
        let ops = match (&row.operations, &row.operations_ref) {
            (_, Some(r)) => blob_json(cas, r).await,
            (Some(v), None) => Ok(v.clone()),
            (None, None) => Err("no operations recorded".into()),
        };
        let submitted = Submitted {
            workspace_id: row.workspace_id.clone(),
            base_version: None,
            operations: ops
                .map_err(|m| weir_model::patch::PatchError::InvalidJson { message: m })
                .and_then(|v| Patch::from_value(&v)),
        };
        match fold::step_with(&mut head, &submitted, limits, budget) {
            Decision::Applied { sha256, .. } if sha256 == row.sha => {}
            Decision::Applied {
                sha256, version, ..
            } => differences.push(format!(
                "version {version}: replay gives sha256 {sha256}, the log recorded {}",
                row.sha
            )),
            Decision::Rejected { code, reason, .. } => {
                differences.push(format!(
                    "version {}: the patch no longer applies ({code}: {reason})",
                    row.version
                ));
            }
        }
    }

    let stored = sqlx::query!(
        "SELECT version, definition, definition_ref, definition_sha256 FROM weir_workflow_heads
         WHERE workspace_id = $1 AND workflow_id = $2",
        workspace_id,
        workflow_id,
    )
    .fetch_optional(pool)
    .await?;
    let stored_version = stored.as_ref().map(|s| s.version);
    match stored {
        None => differences.push("no stored head".into()),
        Some(s) if target == latest => {
            if s.version != head.version {
                differences.push(format!(
                    "stored head is version {}, the log gives {}",
                    s.version, head.version
                ));
            }
            let stored_def = match (s.definition, s.definition_ref) {
                (Some(d), _) => Ok(d),
                (None, Some(r)) => blob_json(cas, &r).await,
                (None, None) => Err("stored head has no definition".to_string()),
            };
            match stored_def {
                Err(m) => differences.push(m),
                Ok(d) => {
                    let (ours, theirs) = (
                        canonical_json_verbatim_numbers(&head.definition),
                        canonical_json_verbatim_numbers(&d),
                    );
                    if ours != theirs {
                        differences
                            .push("stored head definition differs from the replayed one".into());
                    }
                    if fold::sha256_hex(&theirs) != s.definition_sha256 {
                        differences.push(
                            "stored head definition does not match its recorded sha256".into(),
                        );
                    }
                }
            }
        }
        Some(_) => {}
    }
    Ok(ReplayReport {
        workspace_id: workspace_id.into(),
        workflow_id: workflow_id.into(),
        version: head.version,
        definition: head.definition,
        stored_version,
        differences,
    })
}
