//! Pinning: the version each new run executes, resolved, snapshotted and compiled.
//!
//! `version: null` pins the head at the time the run starts; an explicit version uses its
//! snapshot in `weir_coordinator_definitions`, or, without one, the head (if it is that
//! version) or a rebuild from the patch log ([`PatchLog`](crate::history::PatchLog)),
//! checked against the sha256 recorded when it was materialized. What is pinned for the first
//! time is snapshotted (insert on conflict do nothing), so later heads never affect the run.
//!
//! Invariant: a workflow missing from the requester's workspace, a version beyond the head,
//! one that cannot be rebuilt, or a definition that cannot be read or compiled fails the run
//! at start with the reason ([`FailedStart`]); whether the workflow exists in another
//! workspace is never revealed. Only an outage is an error.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;
use sqlx::PgConnection;
use weir_runtime::events::RunRequested;
use weir_runtime::{Classify as _, Disposition};

use super::load::{load_snapshots, Doc, FailedStart, Loaded, Pin};
use super::rows::SnapshotRows;
use super::{Coordinator, DefKey};
use crate::error::CoordinatorError;
use crate::history::RebuildError;
use crate::machine::Plan;

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// A definition a new run pins that is not compiled yet.
struct ToPin {
    doc: Doc,
    /// Not snapshotted yet (taken from the head, or rebuilt).
    snapshot: bool,
}

/// The heads of the workflows `starting` names, by (workspace, workflow).
async fn load_heads(
    conn: &mut PgConnection,
    starting: &[RunRequested],
) -> Result<HashMap<(String, String), Doc>> {
    let (wss, wfs): (Vec<String>, Vec<String>) = starting
        .iter()
        .map(|r| (r.workspace_id.clone(), r.workflow_id.clone()))
        .unzip();
    let heads = sqlx::query_as!(
        Doc,
        r#"SELECT h.workspace_id, h.workflow_id, h.version, h.definition, h.definition_ref
           FROM weir_workflow_heads h
           JOIN (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[])) AS k(workspace_id, workflow_id)
             ON h.workspace_id = k.workspace_id AND h.workflow_id = k.workflow_id"#,
        &wss,
        &wfs,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(heads
        .into_iter()
        .map(|d| ((d.workspace_id.clone(), d.workflow_id.clone()), d))
        .collect())
}

impl Coordinator {
    /// Resolves the version each new run pins, snapshots what is new and compiles what is not
    /// compiled yet: the runs go to [`Loaded::pinned`] or [`Loaded::failed_starts`].
    pub(super) async fn pin(
        &self,
        conn: &mut PgConnection,
        starting: &[RunRequested],
        loaded: &mut Loaded,
    ) -> Result<()> {
        let heads = load_heads(conn, starting).await?;
        let explicit: Vec<DefKey> = starting
            .iter()
            .filter_map(|r| {
                r.version
                    .map(|v| (r.workspace_id.clone(), r.workflow_id.clone(), v))
            })
            .collect();
        let snapshots = load_snapshots(conn, &explicit).await?;
        // Plans taken from the shared cache, held for this call: the cache may be emptied
        // (full, or by the timer loop) before they are used.
        let mut held: HashMap<DefKey, Arc<Plan>> = HashMap::new();
        // Per run: the key it pins; per key: its document when not compiled yet.
        let mut run_keys: Vec<(&RunRequested, DefKey)> = Vec::new();
        let mut docs: HashMap<DefKey, ToPin> = HashMap::new();
        for req in starting {
            let head = heads.get(&(req.workspace_id.clone(), req.workflow_id.clone()));
            let chosen = match head {
                None => Err(unknown_workflow(req)),
                Some(head) => {
                    self.choose(req, head, &snapshots, &mut held, &mut docs)
                        .await?
                }
            };
            match chosen {
                Ok(key) => run_keys.push((req, key)),
                Err(reason) => loaded.failed_starts.push(FailedStart {
                    req: req.clone(),
                    reason,
                }),
            }
        }
        let (compiled, unloadable) = self.snapshot_and_compile(conn, docs, &mut held).await?;
        for (req, key) in run_keys {
            let plan = held
                .get(&key)
                .cloned()
                .or_else(|| match compiled.get(&key) {
                    Some(Ok(plan)) => Some(plan.clone()),
                    _ => None,
                });
            if let Some(plan) = plan {
                let pin = Pin {
                    version: key.2,
                    plan,
                };
                loaded.pinned.insert(req.run_id.clone(), pin);
                continue;
            }
            let why = match (compiled.get(&key), unloadable.get(&key)) {
                (Some(Err(e)), _) => e.clone(),
                (_, Some(why)) => why.clone(),
                _ => "not compiled".into(),
            };
            loaded.failed_starts.push(FailedStart {
                req: req.clone(),
                reason: format!("workflow {} version {} is invalid: {why}", key.1, key.2),
            });
        }
        Ok(())
    }

    /// The key `req` pins given its workflow's `head`: `Ok(Err(reason))` when it cannot start.
    /// A definition not compiled yet is added to `docs` (to snapshot when it is not one yet).
    async fn choose(
        &self,
        req: &RunRequested,
        head: &Doc,
        snapshots: &HashMap<DefKey, Doc>,
        held: &mut HashMap<DefKey, Arc<Plan>>,
        docs: &mut HashMap<DefKey, ToPin>,
    ) -> Result<Result<DefKey, String>> {
        let version = req.version.unwrap_or(head.version);
        let key = (req.workspace_id.clone(), req.workflow_id.clone(), version);
        if let Some(s) = snapshots.get(&key) {
            if s.workspace_id != req.workspace_id {
                return Ok(Err(unknown_workflow(req)));
            }
            if let Some(plan) = self.cached_plan(&key) {
                held.insert(key.clone(), plan);
            } else {
                docs.entry(key.clone()).or_insert_with(|| ToPin {
                    doc: s.clone(),
                    snapshot: false,
                });
            }
        } else if version == head.version {
            docs.entry(key.clone()).or_insert_with(|| ToPin {
                doc: head.clone(),
                snapshot: true,
            });
        } else if (1..head.version).contains(&version) {
            if !docs.contains_key(&key) {
                let definition = match self.rebuild(&key).await? {
                    Ok(d) => d,
                    Err(reason) => return Ok(Err(reason)),
                };
                let doc = Doc {
                    workspace_id: head.workspace_id.clone(),
                    workflow_id: head.workflow_id.clone(),
                    version,
                    definition: Some(definition),
                    definition_ref: None,
                };
                docs.insert(
                    key.clone(),
                    ToPin {
                        doc,
                        snapshot: true,
                    },
                );
            }
        } else {
            return Ok(Err(format!(
                "workflow {} has no version {version} (latest is {})",
                req.workflow_id, head.version
            )));
        }
        Ok(Ok(key))
    }

    /// Rebuilds an older version from the patch log, checked against the recorded sha256.
    /// `Ok(Err(reason))` when the log cannot give it (the run fails); only an outage is an
    /// error.
    async fn rebuild(&self, key: &DefKey) -> Result<Result<Value, String>> {
        let (workspace_id, workflow_id, version) = key;
        // The materializer's configured budget: a patch it applied under raised limits must
        // replay as applied.
        let budget = self.cfg.materializer.budget();
        let report = self
            .history
            .rebuild(workspace_id, workflow_id, *version, &self.limits, &budget)
            .await;
        let report = match report {
            Ok(r) => r,
            Err(RebuildError::Postgres(e)) => return Err(CoordinatorError::Postgres(e)),
            Err(RebuildError::Cas(e)) if e.disposition() == Disposition::Retry => {
                return Err(CoordinatorError::Rebuild {
                    workspace_id: workspace_id.clone(),
                    workflow_id: workflow_id.clone(),
                    version: *version,
                    source: e,
                })
            }
            Err(e) => {
                return Ok(Err(format!(
                    "workflow {workflow_id} version {version} cannot be rebuilt: {e}"
                )))
            }
        };
        if !report.differences.is_empty() || report.version != *version {
            return Ok(Err(format!(
                "workflow {workflow_id} version {version} cannot be rebuilt from its patch log: {}",
                report.differences.join("; ")
            )));
        }
        Ok(Ok(report.definition))
    }

    /// Snapshots the new definitions of `docs` (once per key) and compiles those not in
    /// memory. Returns the compiled plans and the definitions that could not be read, with
    /// why.
    async fn snapshot_and_compile(
        &self,
        conn: &mut PgConnection,
        docs: HashMap<DefKey, ToPin>,
        held: &mut HashMap<DefKey, Arc<Plan>>,
    ) -> Result<(
        HashMap<DefKey, Result<Arc<Plan>, String>>,
        HashMap<DefKey, String>,
    )> {
        let mut snapshots = SnapshotRows::default();
        let mut to_compile = Vec::new();
        let mut unloadable: HashMap<DefKey, String> = HashMap::new();
        for (key, ToPin { doc, snapshot }) in docs {
            if snapshot {
                snapshots.push(
                    &key,
                    &doc.workspace_id,
                    &doc.definition,
                    &doc.definition_ref,
                );
            }
            if let Some(plan) = self.cached_plan(&key) {
                held.insert(key, plan);
                continue;
            }
            match self.document(doc).await? {
                Ok(d) => to_compile.push((key, d)),
                Err(why) => {
                    unloadable.insert(key, why);
                }
            }
        }
        snapshots.insert(conn).await?;
        Ok((self.compile(to_compile).await?, unloadable))
    }
}

/// The reason of a run whose workflow is not in its workspace (whether it exists elsewhere is
/// not revealed).
fn unknown_workflow(req: &RunRequested) -> String {
    format!(
        "workflow {} not found in workspace {}",
        req.workflow_id, req.workspace_id
    )
}
