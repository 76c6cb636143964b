//! Reading what a batch needs, in the batch's transaction:
//!
//! 1. the touched runs, locked (`SELECT ... FOR UPDATE` ordered by run_id: the consumer and
//!    the timer loop lock in the same order, so they never interleave on a run or deadlock);
//! 2. for runs not stored yet: the idempotency keys already used in their workspaces, then
//!    the version each one pins ([`pin`](super::pin): heads and explicit snapshots, one
//!    query each), snapshotted and compiled;
//! 3. the pinned definitions of the stored runs that are not compiled yet (one query);
//! 4. the nodes of the stored runs that have a row (one query).
//!
//! Invariant: a definition's content never makes loading fail. A blob that is missing,
//! corrupt, not JSON or behind a bad ref, a snapshot that no longer compiles and a patch log
//! that cannot be replayed become the reason the runs needing them fail
//! ([`Loaded::broken`], [`Loaded::failed_starts`]). Only outages (retried) and stored state
//! weir did not write are errors.
//!
//! Compiled definitions are kept in the coordinator's memory (pinned versions never change);
//! the ones a batch uses are also held in [`Loaded`], because the shared cache may be emptied
//! (full, or by the timer loop) while the batch runs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use weir_model::definition;
use weir_model::{CasRef, WireRef};
use weir_runtime::cas::CasError;
use weir_runtime::events::{CompletionEvent, RunRequested};
use weir_runtime::{Record, Rejection};

use super::{Coordinator, DefKey, Ignores, Item};
use crate::error::CoordinatorError;
use crate::machine::{NodeRt, Phase, Plan};

type Result<T, E = CoordinatorError> = std::result::Result<T, E>;

/// A run as stored in `weir_runs` (for a new run: as it will be stored).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRun {
    /// Tenant workspace.
    pub workspace_id: String,
    /// The workflow it runs.
    pub workflow_id: String,
    /// The pinned version; `None` for a run that failed at start.
    pub version: Option<i64>,
    /// Who requested it.
    pub requester: String,
    /// The requester's permission (read, write or admin).
    pub permission: String,
    /// `RunPhase::as_str` of the run.
    pub status: String,
    /// Run inputs, inline JSON text.
    pub inputs_json: Option<String>,
    /// Run inputs, CAS ref.
    pub inputs_ref: Option<String>,
    /// Trace context of its RunRequested.
    pub traceparent: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

impl StoredRun {
    /// A running run from its request, pinned to `version` (`None`: it cannot start).
    pub fn requested(req: &RunRequested, version: Option<i64>, started_at: DateTime<Utc>) -> Self {
        Self {
            workspace_id: req.workspace_id.clone(),
            workflow_id: req.workflow_id.clone(),
            version,
            requester: req.requester.clone(),
            permission: req.permission.clone(),
            status: "running".into(),
            inputs_json: req.inputs_json.clone(),
            inputs_ref: req.inputs_ref.clone().map(WireRef::into_string),
            traceparent: req.traceparent.clone(),
            started_at,
        }
    }
}

/// A RunRequested that cannot start, with why (the run is stored failed).
#[derive(Debug, Clone)]
pub struct FailedStart {
    /// The request.
    pub req: RunRequested,
    /// Why: `RunFailed.reason`.
    pub reason: String,
}

/// The version a new run pins, compiled.
#[derive(Debug, Clone)]
pub struct Pin {
    /// The version.
    pub version: i64,
    /// Its compiled definition.
    pub plan: Arc<Plan>,
}

/// What a batch read: the input of [`step`](super::step::step).
#[derive(Debug, Default)]
pub struct Loaded {
    /// Each run's items in partition order. A run not stored yet begins at its first
    /// RunRequested (what came before it is ignored, `unknown_run`) and has no items without
    /// one.
    pub groups: Vec<(String, Vec<Item>)>,
    /// The batch's stored runs, locked, by run id.
    pub stored: HashMap<String, StoredRun>,
    /// The stored runs' nodes that have a row (dispatched at least once), by run id.
    pub nodes: HashMap<String, Vec<(String, NodeRt)>>,
    /// Compiled definitions the stored runs pin, held for the batch.
    pub plans: HashMap<DefKey, Arc<Plan>>,
    /// Pinned definitions that cannot be had, with why: their running runs fail.
    pub broken: HashMap<DefKey, String>,
    /// New runs that start, by run id.
    pub pinned: HashMap<String, Pin>,
    /// New runs that cannot start, in the order found.
    pub failed_starts: Vec<FailedStart>,
    /// New runs whose idempotency key is used already: dropped with all they carry.
    pub duplicates: HashSet<String>,
    /// Inputs ignored while loading.
    pub ignored: Ignores,
}

/// A definition as stored in a head or a snapshot: inline, or a CAS ref.
#[derive(Debug, Clone)]
pub(super) struct Doc {
    pub(super) workspace_id: String,
    pub(super) workflow_id: String,
    pub(super) version: i64,
    pub(super) definition: Option<Value>,
    pub(super) definition_ref: Option<String>,
}

impl Doc {
    fn key(&self) -> DefKey {
        (
            self.workspace_id.clone(),
            self.workflow_id.clone(),
            self.version,
        )
    }
}

/// Columns of a list of definition keys, for an UNNEST join.
fn key_columns(keys: &[DefKey]) -> (Vec<String>, Vec<String>, Vec<i64>) {
    let mut columns = (Vec::new(), Vec::new(), Vec::new());
    for (workspace_id, workflow_id, version) in keys.iter().cloned() {
        columns.0.push(workspace_id);
        columns.1.push(workflow_id);
        columns.2.push(version);
    }
    columns
}

/// Locks the runs of `run_ids` that are stored.
async fn lock_runs(
    conn: &mut PgConnection,
    run_ids: &[String],
) -> Result<HashMap<String, StoredRun>> {
    let rows = sqlx::query!(
        r#"SELECT run_id, workspace_id, workflow_id, version, requester, permission, status,
                  inputs_json, inputs_ref, traceparent, started_at
           FROM weir_runs WHERE run_id = ANY($1::text[]) ORDER BY run_id FOR UPDATE"#,
        run_ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let run = StoredRun {
                workspace_id: r.workspace_id,
                workflow_id: r.workflow_id,
                version: r.version,
                requester: r.requester,
                permission: r.permission,
                status: r.status,
                inputs_json: r.inputs_json,
                inputs_ref: r.inputs_ref,
                traceparent: r.traceparent,
                started_at: r.started_at,
            };
            (r.run_id, run)
        })
        .collect())
}

/// The (workspace, idempotency key) pairs of `requests` already used by a stored run.
async fn used_keys(
    conn: &mut PgConnection,
    requests: &[RunRequested],
) -> Result<HashSet<(String, String)>> {
    let (ws, keys): (Vec<String>, Vec<String>) = requests
        .iter()
        .filter_map(|r| {
            r.idempotency_key
                .clone()
                .map(|k| (r.workspace_id.clone(), k))
        })
        .unzip();
    if ws.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(sqlx::query!(
        r#"SELECT r.workspace_id, r.idempotency_key AS "idempotency_key!"
           FROM weir_runs r
           JOIN UNNEST($1::text[], $2::text[]) AS k(workspace_id, idempotency_key)
             ON r.workspace_id = k.workspace_id AND r.idempotency_key = k.idempotency_key"#,
        &ws,
        &keys,
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|r| (r.workspace_id, r.idempotency_key))
    .collect())
}

/// The pinned snapshots of `keys` that exist.
pub(super) async fn load_snapshots(
    conn: &mut PgConnection,
    keys: &[DefKey],
) -> Result<HashMap<DefKey, Doc>> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let (wss, wfs, vs) = key_columns(keys);
    let snapshots = sqlx::query_as!(
        Doc,
        r#"SELECT d.workspace_id, d.workflow_id, d.version, d.definition, d.definition_ref
           FROM weir_coordinator_definitions d
           JOIN UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(workspace_id, workflow_id, version)
             ON d.workspace_id = k.workspace_id AND d.workflow_id = k.workflow_id
            AND d.version = k.version"#,
        &wss,
        &wfs,
        &vs,
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(snapshots.into_iter().map(|d| (d.key(), d)).collect())
}

/// The nodes of the stored runs that have a row, by run id.
async fn load_nodes(
    conn: &mut PgConnection,
    stored: &HashMap<String, StoredRun>,
) -> Result<HashMap<String, Vec<(String, NodeRt)>>> {
    let mut nodes: HashMap<String, Vec<(String, NodeRt)>> = HashMap::new();
    let stored_ids: Vec<String> = stored.keys().cloned().collect();
    if stored_ids.is_empty() {
        return Ok(nodes);
    }
    let rows = sqlx::query!(
        r#"SELECT run_id, node_id, status, attempt, hop, output_json, output_ref, error, from_cache
           FROM weir_run_nodes WHERE run_id = ANY($1::text[])"#,
        &stored_ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    for r in rows {
        let Some(phase) = Phase::from_name(&r.status) else {
            return Err(CoordinatorError::NodeStatus {
                run_id: r.run_id,
                node_id: r.node_id,
                status: r.status,
            });
        };
        let node = NodeRt {
            phase,
            attempt: r.attempt,
            hop: r.hop,
            output_json: r.output_json,
            output_ref: r.output_ref,
            error: r.error,
            from_cache: r.from_cache,
            dirty: false,
        };
        nodes.entry(r.run_id).or_default().push((r.node_id, node));
    }
    Ok(nodes)
}

/// Why a RunRequested cannot start, before looking at its workflow.
fn invalid_request(req: &RunRequested) -> Option<String> {
    if weir_model::Permission::parse(&req.permission).is_err() {
        return Some(format!(
            "permission must be read, write or admin, not {:?}",
            req.permission
        ));
    }
    if let Some(v) = req.version {
        if v < 1 {
            return Some(format!("version must be at least 1, not {v}"));
        }
    }
    if let Some(j) = &req.inputs_json {
        if let Err(e) = serde_json::from_str::<Value>(j) {
            return Some(format!("inputs_json is not valid JSON: {e}"));
        }
    }
    None
}

impl Loaded {
    /// The first RunRequested of each run not stored yet; the items before it are for an
    /// unknown run and are dropped, as are all items of a run without one.
    fn take_new_requests(&mut self) -> Vec<RunRequested> {
        let mut requests = Vec::new();
        for (run_id, items) in &mut self.groups {
            if self.stored.contains_key(run_id) {
                continue;
            }
            match items.iter().position(|i| matches!(i, Item::Requested(_))) {
                Some(p) => {
                    self.ignored.add("unknown_run", p as u64);
                    items.drain(..p);
                    if let Item::Requested(req) = &items[0] {
                        requests.push((**req).clone());
                    }
                }
                None => {
                    self.ignored.add("unknown_run", items.len() as u64);
                    items.clear();
                }
            }
        }
        requests
    }

    /// The requests that go on to pin a version: a request whose idempotency key is used
    /// (already, or earlier in the batch) is a duplicate; an invalid one fails at start.
    fn admit(
        &mut self,
        requests: Vec<RunRequested>,
        mut used_keys: HashSet<(String, String)>,
    ) -> Vec<RunRequested> {
        let mut starting = Vec::new();
        for req in requests {
            if let Some(k) = &req.idempotency_key {
                if !used_keys.insert((req.workspace_id.clone(), k.clone())) {
                    self.ignored.add("duplicate_request", 1);
                    self.duplicates.insert(req.run_id.clone());
                    continue;
                }
            }
            match invalid_request(&req) {
                Some(reason) => self.failed_starts.push(FailedStart { req, reason }),
                None => starting.push(req),
            }
        }
        starting
    }
}

impl Coordinator {
    /// Reads what `groups` need (see the module doc), locking their stored runs. Run it in
    /// the transaction that writes the batch back.
    pub async fn load(
        &self,
        conn: &mut PgConnection,
        groups: Vec<(String, Vec<Item>)>,
    ) -> Result<Loaded> {
        let run_ids: Vec<String> = groups.iter().map(|(r, _)| r.clone()).collect();
        let stored = lock_runs(conn, &run_ids).await?;
        let mut loaded = Loaded {
            groups,
            stored,
            ..Loaded::default()
        };
        let requests = loaded.take_new_requests();
        let used = used_keys(conn, &requests).await?;
        let starting = loaded.admit(requests, used);
        if !starting.is_empty() {
            self.pin(conn, &starting, &mut loaded).await?;
        }
        self.load_plans(conn, &mut loaded).await?;
        loaded.nodes = load_nodes(conn, &loaded.stored).await?;
        Ok(loaded)
    }

    /// A definition held in the CAS. `Ok(Err(why))` when the blob itself is the problem (a
    /// bad ref, missing, corrupt, not JSON): the runs that need it fail with that reason, the
    /// coordinator carries on. `Err` for an outage (retried) or a misconfiguration.
    async fn blob_json(&self, r: &str) -> Result<Result<Value, String>> {
        let parsed: CasRef = match r.parse() {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("bad CAS ref {r:?}: {e}"))),
        };
        let bytes = match self.cas.get(&parsed).await {
            Ok(b) => b,
            Err(
                e @ (CasError::NotFound(_) | CasError::Corrupt { .. } | CasError::InvalidRef(_)),
            ) => return Ok(Err(format!("definition unavailable: {e}"))),
            Err(e) => return Err(CoordinatorError::Cas(e)),
        };
        Ok(serde_json::from_slice(&bytes).map_err(|e| format!("blob {r} is not JSON: {e}")))
    }

    /// The JSON of a stored definition (inline, or its blob; see [`Coordinator::blob_json`]).
    pub(super) async fn document(&self, doc: Doc) -> Result<Result<Value, String>> {
        match (doc.definition, doc.definition_ref) {
            (Some(d), _) => Ok(Ok(d)),
            (None, Some(r)) => self.blob_json(&r).await,
            (None, None) => Ok(Ok(Value::Null)),
        }
    }

    /// Compiles definitions off the async runtime (validation is the CPU-heavy part), and
    /// keeps the compiled ones.
    pub(super) async fn compile(
        &self,
        docs: Vec<(DefKey, Value)>,
    ) -> Result<HashMap<DefKey, Result<Arc<Plan>, String>>> {
        if docs.is_empty() {
            return Ok(HashMap::new());
        }
        let limits = self.limits;
        let compiled = tokio::task::spawn_blocking(move || {
            docs.into_iter()
                .map(|(k, doc)| {
                    let plan = definition::validate(&doc, &limits)
                        .map(|d| Arc::new(Plan::new(&d)))
                        .map_err(|e| e.to_string());
                    (k, plan)
                })
                .collect::<HashMap<_, _>>()
        })
        .await
        .map_err(CoordinatorError::CompileTask)?;
        for (k, p) in &compiled {
            if let Ok(p) = p {
                self.remember_plan(k.clone(), p.clone());
            }
        }
        Ok(compiled)
    }

    /// The plans of the stored runs with items in the batch, from memory or compiled from
    /// their snapshots; what cannot be had goes to [`Loaded::broken`] with the reason.
    async fn load_plans(&self, conn: &mut PgConnection, loaded: &mut Loaded) -> Result<()> {
        let mut want: Vec<DefKey> = Vec::new();
        for (run_id, items) in &loaded.groups {
            let Some(s) = loaded.stored.get(run_id) else {
                continue;
            };
            let (Some(v), false) = (s.version, items.is_empty()) else {
                continue;
            };
            let key = (s.workspace_id.clone(), s.workflow_id.clone(), v);
            if loaded.plans.contains_key(&key) || want.contains(&key) {
                continue;
            }
            match self.cached_plan(&key) {
                Some(plan) => {
                    loaded.plans.insert(key, plan);
                }
                None => want.push(key),
            }
        }
        let mut docs = Vec::new();
        for (key, doc) in load_snapshots(conn, &want).await? {
            match self.document(doc).await? {
                Ok(d) => docs.push((key, d)),
                Err(why) => {
                    loaded.broken.insert(key, why);
                }
            }
        }
        // A snapshot that no longer compiles (limits lowered since it was pinned) fails its
        // runs; it cannot stop the coordinator.
        for (k, p) in self.compile(docs).await? {
            match p {
                Ok(plan) => {
                    loaded.plans.insert(k, plan);
                }
                Err(e) => {
                    loaded
                        .broken
                        .insert(k, format!("pinned definition is invalid: {e}"));
                }
            }
        }
        Ok(())
    }
}

/// The records whose CAS ref (a completion's `output_ref`, a request's `inputs_ref`) is not a
/// blob of the event's workspace, as rejections (one query for the batch). The gateway checks
/// the same; this catches events that did not come through it. The answer does not depend on
/// whether the blob exists for another workspace, and the blob is never read.
pub(super) async fn unowned_refs(
    conn: &mut PgConnection,
    records: &[Record<CompletionEvent>],
) -> Result<Vec<Rejection>> {
    let given: Vec<(usize, &str, &str)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.event {
            CompletionEvent::NodeCompleted(e) => e
                .output_ref
                .as_deref()
                .map(|o| (i, e.workspace_id.as_str(), o)),
            CompletionEvent::RunRequested(e) => e
                .inputs_ref
                .as_deref()
                .map(|o| (i, e.workspace_id.as_str(), o)),
            CompletionEvent::RunCancelRequested(_) => None,
        })
        .collect();
    if given.is_empty() {
        return Ok(Vec::new());
    }
    let pairs: Vec<(String, String)> = given
        .iter()
        .map(|(_, w, r)| ((*w).to_string(), (*r).to_string()))
        .collect();
    let owned = weir_runtime::cas::owners::owned(conn, &pairs).await?;
    Ok(given
        .into_iter()
        .zip(pairs)
        .filter(|(_, p)| !owned.contains(p))
        .map(|((index, _, r), _)| Rejection {
            index,
            reason: format!(
                "unknown_ref: {} is not a blob of this workspace",
                r.chars().take(80).collect::<String>()
            ),
        })
        .collect())
}
