//! The coordinator processor: consumes weir.completions.v1 through the runtime. Per batch, in
//! the batch's one transaction (the timer loop uses the same path, [`Coordinator::advance`]):
//!
//! 1. groups the records by run (partition order is run order: the key is run_id),
//! 2. locks every touched run row (one `SELECT ... FOR UPDATE`, ordered by run_id, so the
//!    consumer and the timer loop never interleave on a run), loads their nodes (one query)
//!    and, for new runs, the idempotency keys already used, the heads and the pinned
//!    snapshots (one query each),
//! 3. steps each run's [`machine`](crate::machine) in memory,
//! 4. asks the dispatch cache, if any, about every dispatch at once (repeating while hits
//!    make further nodes ready),
//! 5. writes back with a handful of UNNEST statements: new runs, changed runs, changed
//!    nodes, timers, then the outbox rows (NodeReady and run events).
//!
//! Pinned definitions are immutable, so their compiled [`Plan`]s are cached in memory.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use weir_model::definition::{self, Limits};
use weir_materializer::replay::ReplayError;
use weir_runtime::cas::{Cas, CasError, CasRef};
use weir_runtime::config::Config;
use weir_runtime::events::{
    self, CompletionEvent, NodeInput, NodeReady, NodeRetried, NodeStatus, RunCancelled,
    RunCompleted, RunEvent, RunFailed, RunRequested, RunStarted, TopicEvent,
};
use weir_runtime::events::{CacheEvent, CacheStore};
use weir_runtime::{ApplyError, Disposition, Outbox, Processor, Record, Rejection};

use crate::cache::{CacheCandidate, DispatchCache};
use crate::machine::{
    self, AttemptEnd, Effect, Env, Ignored, Input, NodeRt, Phase, Plan, RunPhase, RunRt,
};
use crate::metrics as m;

/// Consumer group of the coordinator.
pub const GROUP: &str = "weir-coordinator";

/// A pinned definition's key: (workspace_id, workflow_id, version). Workflow ids are unique
/// per workspace only, so the workspace is part of every key.
type DefKey = (String, String, i64);

/// One thing that happens to a run.
#[derive(Debug, Clone)]
pub enum Item {
    /// A RunRequested (starts the run if it is new).
    Requested(Box<RunRequested>),
    /// An input for the machine; `workspace_id` is checked against the run's (`None` for the
    /// timer loop's own inputs); `at_us` is when it happened (for the hop latency).
    Input {
        /// The input.
        input: Input,
        /// Workspace of the sender.
        workspace_id: Option<String>,
        /// Event time, µs since the epoch.
        at_us: i64,
        /// What the attempt cost the worker (NodeCompleted.duration_ms; 0 otherwise): the
        /// saving recorded with a result offered to the cache.
        duration_ms: i64,
        /// W3C traceparent of the record that carried it ("" for the timer loop's): the
        /// context of the events it causes.
        traceparent: String,
    },
}

/// What one call of [`Coordinator::advance`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Advanced {
    /// Runs started.
    pub started: usize,
    /// NodeReady events written.
    pub dispatched: usize,
    /// Runs that ended.
    pub ended: usize,
    /// Inputs ignored.
    pub ignored: usize,
    /// Attempts answered by the cache.
    pub cache_hits: usize,
}

/// The coordinator.
pub struct Coordinator {
    cfg: Arc<Config>,
    pool: PgPool,
    cas: Cas,
    cache: Option<Arc<dyn DispatchCache>>,
    plans: Mutex<HashMap<DefKey, Arc<Plan>>>,
    limits: Limits,
}

/// A stored run, as locked.
struct StoredRun {
    workspace_id: String,
    workflow_id: String,
    version: Option<i64>,
    requester: String,
    permission: String,
    status: String,
    inputs_json: Option<String>,
    inputs_ref: Option<String>,
    traceparent: String,
    started_at: DateTime<Utc>,
}

/// A dispatch of the batch: node, attempt, hop, deadline (ms), and the completion that
/// caused it (predecessor, event time µs).
type Dispatch = (usize, i32, i32, Option<i64>, Option<(usize, i64)>);

/// A run being advanced in this batch.
struct Active {
    run_id: String,
    run: StoredRun,
    version: i64,
    is_new: bool,
    idempotency_key: Option<String>,
    plan: Arc<Plan>,
    rt: RunRt,
    /// Dispatch effects with the completion that caused them (from node, event time µs).
    dispatches: Vec<Dispatch>,
    /// Retry effects: node, failed attempt, next attempt, due ms, error.
    retries: Vec<(usize, i32, i32, i64, Option<String>)>,
    /// Lifecycle effects in order (Started, Completed, Failed, Cancelled, AttemptEnded).
    lifecycle: Vec<Effect>,
    /// Trace context of the batch's latest record for this run that carried one (else the
    /// run's own): what the run's output events of this batch carry.
    cause: Option<String>,
}

impl Active {
    /// The traceparent of this batch's output events for the run.
    fn traceparent(&self) -> String {
        self.cause
            .clone()
            .unwrap_or_else(|| self.run.traceparent.clone())
    }
}

/// A RunRequested that could not start.
struct FailedStart {
    req: RunRequested,
    reason: String,
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A due time in ms as a timestamp. Beyond chrono's range (a `deadline_ms` of u64::MAX
/// saturates to i64::MAX) it is the latest timestamp, "never", not now: a huge deadline must
/// not time out at once. chrono's latest (year 262143) is within Postgres's range.
fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms > 0 {
        DateTime::<Utc>::MAX_UTC
    } else {
        DateTime::<Utc>::UNIX_EPOCH
    })
}

fn other(message: String, disposition: Disposition) -> ApplyError {
    ApplyError::Other {
        message,
        disposition,
    }
}

/// An output (inline JSON text or CAS reference) as a JSON value.
pub(crate) fn output_value(json: Option<&str>, r: Option<&str>) -> Value {
    match (json, r) {
        (Some(j), _) => serde_json::from_str(j).unwrap_or_else(|_| Value::String(j.into())),
        (None, Some(r)) => serde_json::json!({ "$ref": r }),
        (None, None) => Value::Null,
    }
}

impl Coordinator {
    /// A coordinator without a dispatch cache.
    pub fn new(cfg: Arc<Config>, pool: PgPool, cas: Cas) -> Self {
        let m = &cfg.materializer;
        let limits = Limits {
            max_bytes: m.max_definition_bytes,
            max_nodes: m.max_nodes,
            max_edges: m.max_edges,
        };
        Self {
            cfg,
            pool,
            cas,
            cache: None,
            plans: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Consults `cache` before every dispatch.
    pub fn with_cache(mut self, cache: Arc<dyn DispatchCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    fn cached_plan(&self, key: &DefKey) -> Option<Arc<Plan>> {
        self.plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn remember_plan(&self, key: DefKey, plan: Arc<Plan>) {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        // Crude bound: start over when full (plans are cheap to rebuild from the snapshots).
        if plans.len() >= self.cfg.coordinator.definition_cache.max(1) {
            plans.clear();
        }
        plans.insert(key, plan);
    }

    /// A definition held in the CAS. `Ok(Err(why))` when the blob itself is the problem (a
    /// bad ref, missing, corrupt, not JSON): the runs that need it fail with that reason, the
    /// coordinator carries on. `Err` for an outage (retried) or a misconfiguration.
    async fn blob_json(&self, r: &str) -> Result<Result<Value, String>, ApplyError> {
        let parsed: CasRef = match r.parse() {
            Ok(p) => p,
            Err(e) => return Ok(Err(format!("bad CAS ref {r:?}: {e}"))),
        };
        let bytes = match self.cas.get(&parsed).await {
            Ok(b) => b,
            Err(
                e @ (CasError::NotFound(_) | CasError::Corrupt { .. } | CasError::InvalidRef(_)),
            ) => return Ok(Err(format!("definition unavailable: {e}"))),
            Err(e) => {
                let d = e.disposition();
                return Err(other(format!("cas: {e}"), d));
            }
        };
        Ok(serde_json::from_slice(&bytes).map_err(|e| format!("blob {r} is not JSON: {e}")))
    }

    /// Compiles definitions off the async runtime (validation is the CPU-heavy part).
    async fn compile(
        &self,
        docs: Vec<(DefKey, Value)>,
    ) -> Result<HashMap<DefKey, Result<Arc<Plan>, String>>, ApplyError> {
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
        .map_err(|e| other(format!("compile task failed: {e}"), Disposition::Fatal))?;
        for (k, p) in &compiled {
            if let Ok(p) = p {
                self.remember_plan(k.clone(), p.clone());
            }
        }
        Ok(compiled)
    }

    /// Advances the runs of `groups` (each run's items in order) inside the caller's
    /// transaction, pushing output events to `outbox`.
    pub async fn advance(
        &self,
        conn: &mut PgConnection,
        groups: Vec<(String, Vec<Item>)>,
        outbox: &mut Outbox<'_>,
    ) -> Result<Advanced, ApplyError> {
        let mut stats = Advanced::default();
        if groups.is_empty() {
            return Ok(stats);
        }
        let mut ignored: HashMap<&'static str, u64> = HashMap::new();
        // (run, node, attempt) → the worker's duration of a successful attempt of this batch.
        let mut durations: HashMap<(String, String, i32), i64> = HashMap::new();
        let run_ids: Vec<String> = groups.iter().map(|(r, _)| r.clone()).collect();

        // 1. Lock the runs.
        let mut stored: HashMap<String, StoredRun> = sqlx::query!(
            r#"SELECT run_id, workspace_id, workflow_id, version, requester, permission, status,
                      inputs_json, inputs_ref, traceparent, started_at
               FROM weir_runs WHERE run_id = ANY($1::text[]) ORDER BY run_id FOR UPDATE"#,
            &run_ids,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            (
                r.run_id,
                StoredRun {
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
                },
            )
        })
        .collect();

        // 2. New runs: the first RunRequested of a run not stored yet; items before it are
        //    for an unknown run.
        let mut groups = groups;
        let mut new_requests: Vec<RunRequested> = Vec::new();
        for (run_id, items) in groups.iter_mut() {
            if stored.contains_key(run_id) {
                continue;
            }
            match items.iter().position(|i| matches!(i, Item::Requested(_))) {
                Some(p) => {
                    *ignored.entry("unknown_run").or_default() += p as u64;
                    let rest = items.split_off(p);
                    *items = rest;
                    if let Item::Requested(req) = &items[0] {
                        new_requests.push((**req).clone());
                    }
                }
                None => {
                    *ignored.entry("unknown_run").or_default() += items.len() as u64;
                    items.clear();
                }
            }
        }
        // Idempotency keys already used (by another run id) make a request a duplicate.
        let (ws, keys): (Vec<String>, Vec<String>) = new_requests
            .iter()
            .filter_map(|r| {
                r.idempotency_key
                    .clone()
                    .map(|k| (r.workspace_id.clone(), k))
            })
            .unzip();
        let mut used_keys: HashSet<(String, String)> = if ws.is_empty() {
            HashSet::new()
        } else {
            sqlx::query!(
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
            .collect()
        };
        let mut starting: Vec<RunRequested> = Vec::new();
        let mut failed_starts: Vec<FailedStart> = Vec::new();
        let mut duplicate_runs: HashSet<String> = HashSet::new();
        for req in new_requests {
            if let Some(k) = &req.idempotency_key {
                if !used_keys.insert((req.workspace_id.clone(), k.clone())) {
                    *ignored.entry("duplicate_request").or_default() += 1;
                    duplicate_runs.insert(req.run_id.clone());
                    continue;
                }
            }
            if let Some(reason) = invalid_request(&req) {
                failed_starts.push(FailedStart { req, reason });
            } else {
                starting.push(req);
            }
        }

        // 3. Pin versions for the new runs.
        let mut pinned: HashMap<String, (i64, Arc<Plan>)> = HashMap::new();
        if !starting.is_empty() {
            let (pins, failures) = self.pin(conn, &starting).await?;
            pinned = pins;
            for (run_id, reason) in failures {
                if let Some(p) = starting.iter().position(|r| r.run_id == run_id) {
                    let req = starting.swap_remove(p);
                    failed_starts.push(FailedStart { req, reason });
                }
            }
        }

        // 4. Plans of the stored running runs. A pinned definition that cannot be loaded or
        //    compiled (a missing or corrupt CAS blob, ...) goes to `broken` with the reason.
        let mut broken: HashMap<DefKey, String> = HashMap::new();
        // The plans this batch uses, held for it: the shared cache may be emptied (full, or
        // by the timer loop) while the batch runs, which must not fail a healthy run.
        let mut plans: HashMap<DefKey, Arc<Plan>> = HashMap::new();
        let mut want: Vec<DefKey> = Vec::new();
        for (run_id, items) in &groups {
            if let Some(s) = stored.get(run_id) {
                if let (Some(v), false) = (s.version, items.is_empty()) {
                    let key = (s.workspace_id.clone(), s.workflow_id.clone(), v);
                    if plans.contains_key(&key) || want.contains(&key) {
                        continue;
                    }
                    match self.cached_plan(&key) {
                        Some(plan) => {
                            plans.insert(key, plan);
                        }
                        None => want.push(key),
                    }
                }
            }
        }
        if !want.is_empty() {
            let (wss, (wfs, vs)): (Vec<String>, (Vec<String>, Vec<i64>)) =
                want.iter().cloned().map(|(w, f, v)| (w, (f, v))).unzip();
            let rows = sqlx::query!(
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
            let mut docs = Vec::with_capacity(rows.len());
            for r in rows {
                let key = (r.workspace_id, r.workflow_id, r.version);
                let doc = match (r.definition, r.definition_ref) {
                    (Some(d), _) => d,
                    (None, Some(rf)) => match self.blob_json(&rf).await? {
                        Ok(d) => d,
                        Err(why) => {
                            broken.insert(key, why);
                            continue;
                        }
                    },
                    (None, None) => Value::Null,
                };
                docs.push((key, doc));
            }
            // A snapshot that no longer compiles (limits lowered since it was pinned) fails
            // its runs; it cannot stop the coordinator.
            for (k, p) in self.compile(docs).await? {
                match p {
                    Ok(plan) => {
                        plans.insert(k, plan);
                    }
                    Err(e) => {
                        broken.insert(k, format!("pinned definition is invalid: {e}"));
                    }
                }
            }
        }

        // 5. Nodes of the stored runs.
        let stored_ids: Vec<String> = stored.keys().cloned().collect();
        let mut node_rows: HashMap<String, Vec<(String, NodeRt)>> = HashMap::new();
        if !stored_ids.is_empty() {
            for r in sqlx::query!(
                r#"SELECT run_id, node_id, status, attempt, hop, output_json, output_ref, error, from_cache
                   FROM weir_run_nodes WHERE run_id = ANY($1::text[])"#,
                &stored_ids,
            )
            .fetch_all(&mut *conn)
            .await?
            {
                let phase = Phase::from_name(&r.status).ok_or_else(|| {
                    other(
                        format!("run {} node {}: unknown status {}", r.run_id, r.node_id, r.status),
                        Disposition::Fatal,
                    )
                })?;
                node_rows.entry(r.run_id).or_default().push((
                    r.node_id,
                    NodeRt {
                        phase,
                        attempt: r.attempt,
                        hop: r.hop,
                        output_json: r.output_json,
                        output_ref: r.output_ref,
                        error: r.error,
                        from_cache: r.from_cache,
                        dirty: false,
                    },
                ));
            }
        }

        // 6. Step every run.
        let now = now_ms();
        let max_backoff_ms = self.cfg.coordinator.max_backoff_ms;
        let mut jitter = |n: u64| if n == 0 { 0 } else { rand::random_range(0..=n) };
        let mut env = Env {
            now_ms: now,
            max_backoff_ms,
            jitter: &mut jitter,
        };
        let mut actives: Vec<Active> = Vec::with_capacity(groups.len());
        let mut unrunnable: Vec<(String, StoredRun, i64, String)> = Vec::new();
        let started_at = ts(now);
        for (run_id, items) in groups {
            if items.is_empty() || duplicate_runs.contains(&run_id) {
                continue;
            }
            if failed_starts.iter().any(|f| f.req.run_id == run_id) {
                *ignored.entry("run_finished").or_default() += items.len() as u64 - 1;
                continue;
            }
            let (run, version, plan, rt, is_new, idempotency_key) = match stored.remove(&run_id) {
                Some(s) => {
                    let Some(version) = s.version else {
                        // A run that failed at start: nothing can happen to it.
                        *ignored.entry("run_finished").or_default() += items.len() as u64;
                        continue;
                    };
                    let key = (s.workspace_id.clone(), s.workflow_id.clone(), version);
                    let Some(plan) = plans.get(&key).cloned() else {
                        // The run cannot go on without its definition: it fails (once; a run
                        // already ended just ignores what comes after).
                        if s.status == RunPhase::Running.as_str() {
                            let why = broken.get(&key).cloned().unwrap_or_else(|| {
                                format!("no pinned definition {} v{version}", key.1)
                            });
                            unrunnable.push((run_id, s, version, why));
                        } else {
                            *ignored.entry("run_finished").or_default() += items.len() as u64;
                        }
                        continue;
                    };
                    let mut rt = RunRt::new(&plan);
                    rt.phase = RunPhase::from_name(&s.status).unwrap_or(RunPhase::Failed);
                    for (node_id, n) in node_rows.remove(&run_id).unwrap_or_default() {
                        if let Some(i) = plan.index(&node_id) {
                            rt.nodes[i] = n;
                        }
                    }
                    (s, version, plan, rt, false, None)
                }
                None => {
                    let Some((version, plan)) = pinned.get(&run_id).cloned() else {
                        continue;
                    };
                    let Some(Item::Requested(req)) = items.first() else {
                        continue;
                    };
                    let run = StoredRun {
                        workspace_id: req.workspace_id.clone(),
                        workflow_id: req.workflow_id.clone(),
                        version: Some(version),
                        requester: req.requester.clone(),
                        permission: req.permission.clone(),
                        status: "running".into(),
                        inputs_json: req.inputs_json.clone(),
                        inputs_ref: req.inputs_ref.clone(),
                        traceparent: req.traceparent.clone(),
                        started_at,
                    };
                    let rt = RunRt::new(&plan);
                    let key = req.idempotency_key.clone();
                    (run, version, plan, rt, true, key)
                }
            };
            let mut a = Active {
                run_id,
                run,
                version,
                is_new,
                idempotency_key,
                plan,
                rt,
                dispatches: Vec::new(),
                retries: Vec::new(),
                lifecycle: Vec::new(),
                cause: None,
            };
            let mut effects = Vec::new();
            for item in items {
                let (input, at) = match item {
                    Item::Requested(_) => (Input::Start, None),
                    Item::Input {
                        input,
                        workspace_id,
                        at_us,
                        duration_ms,
                        traceparent,
                    } => {
                        if workspace_id.is_some_and(|w| w != a.run.workspace_id) {
                            *ignored.entry("foreign_workspace").or_default() += 1;
                            continue;
                        }
                        if !traceparent.is_empty() {
                            a.cause = Some(traceparent);
                        }
                        if let Input::Completed {
                            node_id,
                            attempt,
                            succeeded: true,
                            ..
                        } = &input
                        {
                            durations
                                .insert((a.run_id.clone(), node_id.clone(), *attempt), duration_ms);
                        }
                        (input, Some(at_us))
                    }
                };
                machine::step(&a.plan, &mut a.rt, input, &mut env, &mut effects);
                collect(&mut a, &mut effects, at, &mut ignored);
            }
            actives.push(a);
        }

        // 7. The dispatch cache: answer what it can, repeatedly (hits make successors ready).
        if let Some(cache) = &self.cache {
            let mut asked: HashSet<(usize, usize, i32)> = HashSet::new();
            loop {
                let mut who: Vec<(usize, usize, i32)> = Vec::new();
                let mut candidates = Vec::new();
                for (ai, a) in actives.iter().enumerate() {
                    if a.rt.phase != RunPhase::Running {
                        continue;
                    }
                    for &(node, attempt, ..) in &a.dispatches {
                        let n = &a.rt.nodes[node];
                        if n.phase == Phase::Running
                            && n.attempt == attempt
                            && asked.insert((ai, node, attempt))
                        {
                            who.push((ai, node, attempt));
                            candidates.push(candidate(a, node));
                        }
                    }
                }
                if candidates.is_empty() {
                    break;
                }
                let answers = cache.lookup(conn, &candidates).await.map_err(|e| {
                    let d = e.disposition();
                    other(format!("dispatch cache: {e}"), d)
                })?;
                if answers.len() != candidates.len() {
                    return Err(other(
                        format!(
                            "dispatch cache answered {} results for {} candidates",
                            answers.len(),
                            candidates.len()
                        ),
                        Disposition::Fatal,
                    ));
                }
                for ((ai, node, attempt), answer) in who.into_iter().zip(answers) {
                    let Some(hit) = answer else { continue };
                    stats.cache_hits += 1;
                    metrics::counter!(m::CACHE_HITS).increment(1);
                    metrics::counter!(m::CACHE_SAVED_MS)
                        .increment(u64::try_from(hit.saved_ms).unwrap_or(0));
                    tracing::debug!(entry = %hit.entry_key, "dispatch answered by the cache");
                    let a = &mut actives[ai];
                    let input = Input::Completed {
                        node_id: a.plan.ids[node].clone(),
                        attempt,
                        succeeded: true,
                        output_json: hit.output_json,
                        output_ref: hit.output_ref,
                        error: None,
                        from_cache: true,
                    };
                    let mut effects = Vec::new();
                    machine::step(&a.plan, &mut a.rt, input, &mut env, &mut effects);
                    collect(a, &mut effects, None, &mut ignored);
                }
            }
        }

        // 8. Write back.
        self.fail_unrunnable(conn, unrunnable, outbox, &mut stats)
            .await?;
        self.write(
            conn,
            actives,
            failed_starts,
            &durations,
            now,
            outbox,
            &mut stats,
        )
        .await?;
        for (reason, n) in ignored {
            stats.ignored += n as usize;
            metrics::counter!(m::IGNORED, "reason" => reason).increment(n);
        }
        Ok(stats)
    }

    /// Resolves the version each new run pins and snapshots it. Returns the plans and the
    /// runs that cannot start, with why.
    #[allow(clippy::type_complexity)]
    async fn pin(
        &self,
        conn: &mut PgConnection,
        starting: &[RunRequested],
    ) -> Result<(HashMap<String, (i64, Arc<Plan>)>, Vec<(String, String)>), ApplyError> {
        struct Doc {
            workspace_id: String,
            version: i64,
            definition: Option<Value>,
            definition_ref: Option<String>,
        }
        // Plans taken from the shared cache, held for this call: the cache may be emptied
        // (full, or by the timer loop) before they are used.
        let mut held: HashMap<DefKey, Arc<Plan>> = HashMap::new();
        let (wss, wfs): (Vec<String>, Vec<String>) = starting
            .iter()
            .map(|r| (r.workspace_id.clone(), r.workflow_id.clone()))
            .unzip();
        let heads: HashMap<(String, String), Doc> = sqlx::query!(
            r#"SELECT h.workflow_id, h.workspace_id, h.version, h.definition, h.definition_ref
               FROM weir_workflow_heads h
               JOIN (SELECT DISTINCT * FROM UNNEST($1::text[], $2::text[])) AS k(workspace_id, workflow_id)
                 ON h.workspace_id = k.workspace_id AND h.workflow_id = k.workflow_id"#,
            &wss,
            &wfs,
        )
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|r| {
            (
                (r.workspace_id.clone(), r.workflow_id),
                Doc {
                    workspace_id: r.workspace_id,
                    version: r.version,
                    definition: r.definition,
                    definition_ref: r.definition_ref,
                },
            )
        })
        .collect();
        let explicit: Vec<DefKey> = starting
            .iter()
            .filter_map(|r| {
                r.version
                    .map(|v| (r.workspace_id.clone(), r.workflow_id.clone(), v))
            })
            .collect();
        let mut snapshots: HashMap<DefKey, Doc> = HashMap::new();
        if !explicit.is_empty() {
            let (es, (ew, ev)): (Vec<String>, (Vec<String>, Vec<i64>)) = explicit
                .iter()
                .cloned()
                .map(|(s, w, v)| (s, (w, v)))
                .unzip();
            for r in sqlx::query!(
                r#"SELECT d.workflow_id, d.version, d.workspace_id, d.definition, d.definition_ref
                   FROM weir_coordinator_definitions d
                   JOIN UNNEST($1::text[], $2::text[], $3::bigint[]) AS k(workspace_id, workflow_id, version)
                     ON d.workspace_id = k.workspace_id AND d.workflow_id = k.workflow_id
                    AND d.version = k.version"#,
                &es,
                &ew,
                &ev,
            )
            .fetch_all(&mut *conn)
            .await?
            {
                snapshots.insert(
                    (r.workspace_id.clone(), r.workflow_id, r.version),
                    Doc {
                        workspace_id: r.workspace_id,
                        version: r.version,
                        definition: r.definition,
                        definition_ref: r.definition_ref,
                    },
                );
            }
        }

        let mut failures = Vec::new();
        // Per run: the (workflow, version) it pins; per key: its document (to snapshot and
        // compile) when not compiled yet.
        let mut run_key: Vec<(String, DefKey)> = Vec::new();
        let mut docs: HashMap<DefKey, (String, Option<Value>, Option<String>, bool)> =
            HashMap::new();
        for req in starting {
            let unknown = || {
                format!(
                    "workflow {} not found in workspace {}",
                    req.workflow_id, req.workspace_id
                )
            };
            let head = heads.get(&(req.workspace_id.clone(), req.workflow_id.clone()));
            let Some(head) = head else {
                failures.push((req.run_id.clone(), unknown()));
                continue;
            };
            let version = req.version.unwrap_or(head.version);
            let key = (req.workspace_id.clone(), req.workflow_id.clone(), version);
            if let Some(s) = snapshots.get(&key) {
                if s.workspace_id != req.workspace_id {
                    failures.push((req.run_id.clone(), unknown()));
                    continue;
                }
                if let Some(plan) = self.cached_plan(&key) {
                    held.insert(key.clone(), plan);
                } else {
                    docs.entry(key.clone()).or_insert((
                        s.workspace_id.clone(),
                        s.definition.clone(),
                        s.definition_ref.clone(),
                        false,
                    ));
                }
            } else if version == head.version {
                docs.entry(key.clone()).or_insert((
                    head.workspace_id.clone(),
                    head.definition.clone(),
                    head.definition_ref.clone(),
                    true,
                ));
            } else if (1..head.version).contains(&version) {
                if !docs.contains_key(&key) {
                    // The materializer's configured budget: a patch it applied under raised
                    // limits must replay as applied.
                    let report = weir_materializer::replay::replay_with(
                        &self.pool,
                        &self.cas,
                        &req.workspace_id,
                        &req.workflow_id,
                        Some(version),
                        &self.limits,
                        &weir_materializer::processor::budget(&self.cfg.materializer),
                    )
                    .await;
                    // Only an outage is retried; a log that cannot be replayed fails the run.
                    let report = match report {
                        Ok(r) => r,
                        Err(ReplayError::Postgres(e)) => return Err(ApplyError::Postgres(e)),
                        Err(ReplayError::Cas(e)) if e.disposition() == Disposition::Retry => {
                            return Err(other(
                                format!("rebuilding {key:?}: {e}"),
                                Disposition::Retry,
                            ))
                        }
                        Err(e) => {
                            failures.push((
                                req.run_id.clone(),
                                format!(
                                    "workflow {} version {version} cannot be rebuilt: {e}",
                                    req.workflow_id
                                ),
                            ));
                            continue;
                        }
                    };
                    if !report.differences.is_empty() || report.version != version {
                        failures.push((
                            req.run_id.clone(),
                            format!(
                                "workflow {} version {version} cannot be rebuilt from its patch log: {}",
                                req.workflow_id,
                                report.differences.join("; ")
                            ),
                        ));
                        continue;
                    }
                    docs.insert(
                        key.clone(),
                        (
                            head.workspace_id.clone(),
                            Some(report.definition),
                            None,
                            true,
                        ),
                    );
                }
            } else {
                failures.push((
                    req.run_id.clone(),
                    format!(
                        "workflow {} has no version {version} (latest is {})",
                        req.workflow_id, head.version
                    ),
                ));
                continue;
            }
            run_key.push((req.run_id.clone(), key));
        }

        // Snapshot what is new (keys from the heads or rebuilt), once per key.
        let mut sw = Vec::new();
        let mut sv = Vec::new();
        let mut sws = Vec::new();
        let mut sd: Vec<Option<Value>> = Vec::new();
        let mut sr: Vec<Option<String>> = Vec::new();
        let mut to_compile = Vec::new();
        let mut unloadable: HashMap<DefKey, String> = HashMap::new();
        for (key, (workspace, def, rf, snapshot)) in docs {
            if snapshot {
                sw.push(key.1.clone());
                sv.push(key.2);
                sws.push(workspace);
                sd.push(def.clone());
                sr.push(rf.clone());
            }
            if let Some(plan) = self.cached_plan(&key) {
                held.insert(key, plan);
            } else {
                let doc = match (def, rf) {
                    (Some(d), _) => d,
                    (None, Some(r)) => match self.blob_json(&r).await? {
                        Ok(d) => d,
                        Err(why) => {
                            unloadable.insert(key, why);
                            continue;
                        }
                    },
                    (None, None) => Value::Null,
                };
                to_compile.push((key, doc));
            }
        }
        if !sw.is_empty() {
            sqlx::query!(
                r#"INSERT INTO weir_coordinator_definitions (workflow_id, version, workspace_id, definition, definition_ref)
                   SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::jsonb[], $5::text[])
                   ON CONFLICT DO NOTHING"#,
                &sw,
                &sv,
                &sws,
                &sd as &[Option<Value>],
                &sr as &[Option<String>],
            )
            .execute(&mut *conn)
            .await?;
        }
        let compiled = self.compile(to_compile).await?;
        let mut pins = HashMap::new();
        for (run_id, key) in run_key {
            let plan = held
                .get(&key)
                .cloned()
                .or_else(|| match compiled.get(&key) {
                    Some(Ok(plan)) => Some(plan.clone()),
                    _ => None,
                });
            match plan {
                Some(plan) => {
                    pins.insert(run_id, (key.2, plan));
                }
                None => {
                    let why = match (compiled.get(&key), unloadable.get(&key)) {
                        (Some(Err(e)), _) => e.clone(),
                        (_, Some(why)) => why.clone(),
                        _ => "not compiled".into(),
                    };
                    failures.push((
                        run_id,
                        format!("workflow {} version {} is invalid: {why}", key.1, key.2),
                    ));
                }
            }
        }
        Ok((pins, failures))
    }

    /// Fails stored running runs whose pinned definition cannot be had (see `broken` in
    /// [`Coordinator::advance`]): status failed with the reason, their timers dropped, a
    /// RunFailed event. The content of one workflow costs its runs, not the coordinator.
    async fn fail_unrunnable(
        &self,
        conn: &mut PgConnection,
        runs: Vec<(String, StoredRun, i64, String)>,
        outbox: &mut Outbox<'_>,
        stats: &mut Advanced,
    ) -> Result<(), ApplyError> {
        if runs.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = runs.iter().map(|r| r.0.clone()).collect();
        let reasons: Vec<String> = runs.iter().map(|r| r.3.clone()).collect();
        sqlx::query!(
            r#"UPDATE weir_runs r
               SET status = 'failed', reason = u.reason, finished_at = now(), stalled = false
               FROM UNNEST($1::text[], $2::text[]) AS u(run_id, reason)
               WHERE r.run_id = u.run_id"#,
            &ids,
            &reasons,
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query!(
            "DELETE FROM weir_run_timers WHERE run_id = ANY($1::text[])",
            &ids
        )
        .execute(&mut *conn)
        .await?;
        for (run_id, run, version, reason) in runs {
            tracing::warn!(%run_id, workflow_id = %run.workflow_id, %reason, "run failed: its definition is unavailable");
            stats.ended += 1;
            metrics::counter!(m::RUNS_ENDED, "status" => "failed").increment(1);
            outbox
                .push(&RunEvent::RunFailed(RunFailed {
                    event_id: events::new_event_id(),
                    occurred_at: events::now_micros(),
                    workspace_id: run.workspace_id,
                    traceparent: run.traceparent,
                    tracestate: None,
                    run_id,
                    workflow_id: run.workflow_id,
                    version,
                    failed_node_id: None,
                    reason,
                }))
                .await?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_lines, clippy::too_many_arguments)]
    async fn write(
        &self,
        conn: &mut PgConnection,
        actives: Vec<Active>,
        failed_starts: Vec<FailedStart>,
        durations: &HashMap<(String, String, i32), i64>,
        now: i64,
        outbox: &mut Outbox<'_>,
        stats: &mut Advanced,
    ) -> Result<(), ApplyError> {
        let now_at = ts(now);
        // New runs first: ON CONFLICT DO NOTHING is the guard against a concurrent request
        // with the same idempotency key on another partition; a run not inserted is dropped.
        let mut n_run = Vec::new();
        let mut n_ws = Vec::new();
        let mut n_wf = Vec::new();
        let mut n_ver: Vec<Option<i64>> = Vec::new();
        let mut n_req = Vec::new();
        let mut n_perm = Vec::new();
        let mut n_key: Vec<Option<String>> = Vec::new();
        let mut n_status = Vec::new();
        let mut n_reason: Vec<Option<String>> = Vec::new();
        let mut n_failed: Vec<Option<String>> = Vec::new();
        let mut n_ij: Vec<Option<String>> = Vec::new();
        let mut n_ir: Vec<Option<String>> = Vec::new();
        let mut n_tp = Vec::new();
        for f in &failed_starts {
            let r = &f.req;
            n_run.push(r.run_id.clone());
            n_ws.push(r.workspace_id.clone());
            n_wf.push(r.workflow_id.clone());
            n_ver.push(None);
            n_req.push(r.requester.clone());
            n_perm.push(r.permission.clone());
            n_key.push(r.idempotency_key.clone());
            n_status.push("failed".to_string());
            n_reason.push(Some(f.reason.clone()));
            n_failed.push(None);
            n_ij.push(r.inputs_json.clone());
            n_ir.push(r.inputs_ref.clone());
            n_tp.push(r.traceparent.clone());
        }
        for a in actives.iter().filter(|a| a.is_new) {
            n_run.push(a.run_id.clone());
            n_ws.push(a.run.workspace_id.clone());
            n_wf.push(a.run.workflow_id.clone());
            n_ver.push(Some(a.version));
            n_req.push(a.run.requester.clone());
            n_perm.push(a.run.permission.clone());
            n_key.push(a.idempotency_key.clone());
            n_status.push(a.rt.phase.as_str().to_string());
            n_reason.push(a.rt.reason.clone());
            n_failed.push(a.rt.failed_node.map(|i| a.plan.ids[i].clone()));
            n_ij.push(a.run.inputs_json.clone());
            n_ir.push(a.run.inputs_ref.clone());
            n_tp.push(a.run.traceparent.clone());
        }
        let mut inserted: HashSet<String> = HashSet::new();
        if !n_run.is_empty() {
            inserted = sqlx::query_scalar!(
                r#"INSERT INTO weir_runs (run_id, workspace_id, workflow_id, version, requester, permission,
                                          idempotency_key, status, reason, failed_node_id, inputs_json,
                                          inputs_ref, traceparent, started_at, finished_at, last_progress_at,
                                          completions_topic)
                   SELECT run_id, workspace_id, workflow_id, version, requester, permission, idempotency_key,
                          status, reason, failed_node_id, inputs_json, inputs_ref, traceparent, $14::timestamptz,
                          CASE WHEN status = 'running' THEN NULL ELSE $14::timestamptz END, $14::timestamptz,
                          $15::text
                   FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                               $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::text[])
                        AS t(run_id, workspace_id, workflow_id, version, requester, permission, idempotency_key,
                             status, reason, failed_node_id, inputs_json, inputs_ref, traceparent)
                   ON CONFLICT DO NOTHING
                   RETURNING run_id"#,
                &n_run,
                &n_ws,
                &n_wf,
                &n_ver as &[Option<i64>],
                &n_req,
                &n_perm,
                &n_key as &[Option<String>],
                &n_status,
                &n_reason as &[Option<String>],
                &n_failed as &[Option<String>],
                &n_ij as &[Option<String>],
                &n_ir as &[Option<String>],
                &n_tp,
                now_at,
                self.cfg.kafka.topic(CompletionEvent::TOPIC),
            )
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect();
        }
        let lost = n_run.len() - inserted.len();
        if lost > 0 {
            metrics::counter!(m::IGNORED, "reason" => "duplicate_request").increment(lost as u64);
            stats.ignored += lost;
        }
        let actives: Vec<Active> = actives
            .into_iter()
            .filter(|a| !a.is_new || inserted.contains(&a.run_id))
            .collect();

        // Changed stored runs.
        let mut u_run = Vec::new();
        let mut u_status = Vec::new();
        let mut u_reason: Vec<Option<String>> = Vec::new();
        let mut u_failed: Vec<Option<String>> = Vec::new();
        let mut u_prog = Vec::new();
        for a in actives.iter().filter(|a| !a.is_new) {
            if a.rt.dirty || a.rt.progressed {
                u_run.push(a.run_id.clone());
                u_status.push(a.rt.phase.as_str().to_string());
                u_reason.push(a.rt.reason.clone());
                u_failed.push(a.rt.failed_node.map(|i| a.plan.ids[i].clone()));
                u_prog.push(a.rt.progressed);
            }
        }
        if !u_run.is_empty() {
            sqlx::query!(
                r#"UPDATE weir_runs r
                   SET status = u.status, reason = u.reason, failed_node_id = u.failed_node_id,
                       finished_at = CASE WHEN u.status = 'running' THEN NULL ELSE coalesce(r.finished_at, $6::timestamptz) END,
                       last_progress_at = CASE WHEN u.progressed THEN $6::timestamptz ELSE r.last_progress_at END,
                       stalled = r.stalled AND NOT u.progressed
                   FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[])
                        AS u(run_id, status, reason, failed_node_id, progressed)
                   WHERE r.run_id = u.run_id"#,
                &u_run,
                &u_status,
                &u_reason as &[Option<String>],
                &u_failed as &[Option<String>],
                &u_prog,
                now_at,
            )
            .execute(&mut *conn)
            .await?;
        }

        // Changed nodes.
        let mut d_run = Vec::new();
        let mut d_node = Vec::new();
        let mut d_type = Vec::new();
        let mut d_status = Vec::new();
        let mut d_attempt = Vec::new();
        let mut d_hop = Vec::new();
        let mut d_oj: Vec<Option<String>> = Vec::new();
        let mut d_or: Vec<Option<String>> = Vec::new();
        let mut d_err: Vec<Option<String>> = Vec::new();
        let mut d_cache = Vec::new();
        for a in &actives {
            for (i, n) in a.rt.nodes.iter().enumerate() {
                if !n.dirty || n.phase == Phase::Waiting {
                    continue;
                }
                d_run.push(a.run_id.clone());
                d_node.push(a.plan.ids[i].clone());
                d_type.push(a.plan.node_types[i].to_string());
                d_status.push(n.phase.as_str().to_string());
                d_attempt.push(n.attempt.max(1));
                d_hop.push(n.hop.max(1));
                d_oj.push(n.output_json.clone());
                d_or.push(n.output_ref.clone());
                d_err.push(n.error.clone());
                d_cache.push(n.from_cache);
            }
        }
        if !d_run.is_empty() {
            sqlx::query!(
                r#"INSERT INTO weir_run_nodes (run_id, node_id, node_type, status, attempt, hop,
                                               output_json, output_ref, error, from_cache)
                   SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                                        $7::text[], $8::text[], $9::text[], $10::bool[])
                   ON CONFLICT (run_id, node_id) DO UPDATE
                   SET status = EXCLUDED.status, attempt = EXCLUDED.attempt, hop = EXCLUDED.hop,
                       output_json = EXCLUDED.output_json, output_ref = EXCLUDED.output_ref,
                       error = EXCLUDED.error, from_cache = EXCLUDED.from_cache"#,
                &d_run,
                &d_node,
                &d_type,
                &d_status,
                &d_attempt,
                &d_hop,
                &d_oj as &[Option<String>],
                &d_or as &[Option<String>],
                &d_err as &[Option<String>],
                &d_cache,
            )
            .execute(&mut *conn)
            .await?;
        }

        // Timers still relevant at the end of the batch, and the output events.
        let mut t_run = Vec::new();
        let mut t_node = Vec::new();
        let mut t_kind = Vec::new();
        let mut t_attempt = Vec::new();
        let mut t_due = Vec::new();
        let end_us = events::now_micros();
        for f in failed_starts
            .iter()
            .filter(|f| inserted.contains(&f.req.run_id))
        {
            metrics::counter!(m::RUNS_ENDED, "status" => "failed").increment(1);
            stats.ended += 1;
            outbox
                .push(&RunEvent::RunFailed(RunFailed {
                    event_id: events::new_event_id(),
                    occurred_at: end_us,
                    workspace_id: f.req.workspace_id.clone(),
                    traceparent: f.req.traceparent.clone(),
                    tracestate: None,
                    run_id: f.req.run_id.clone(),
                    workflow_id: f.req.workflow_id.clone(),
                    version: f.req.version.unwrap_or(0),
                    failed_node_id: None,
                    reason: f.reason.clone(),
                }))
                .await?;
        }
        for a in &actives {
            let running = a.rt.phase == RunPhase::Running;
            let base = |event_id| (event_id, end_us, a.run.workspace_id.clone());
            for e in &a.lifecycle {
                let (event_id, occurred_at, workspace_id) = base(events::new_event_id());
                let traceparent = a.traceparent();
                match e {
                    Effect::Started => {
                        stats.started += 1;
                        metrics::counter!(m::WORKFLOWS_STARTED).increment(1);
                        outbox
                            .push(&RunEvent::RunStarted(RunStarted {
                                event_id,
                                occurred_at,
                                workspace_id,
                                traceparent,
                                tracestate: None,
                                run_id: a.run_id.clone(),
                                workflow_id: a.run.workflow_id.clone(),
                                version: a.version,
                                requester: a.run.requester.clone(),
                            }))
                            .await?;
                    }
                    Effect::AttemptEnded { node, end, attempt } => {
                        metrics::counter!(m::NODE_EXECUTIONS, "type" => a.plan.node_types[*node],
                            "status" => end.as_str())
                        .increment(1);
                        // A worker's result of a cacheable node is offered to the result
                        // cache (the cache processor stores it, or refuses it, e.g. PII).
                        let stores = self
                            .cache
                            .as_ref()
                            .is_some_and(|c| c.stores(a.plan.node_types[*node]));
                        if *end == AttemptEnd::Succeeded && stores {
                            let c = candidate(a, *node);
                            let n = &a.rt.nodes[*node];
                            let key = (a.run_id.clone(), a.plan.ids[*node].clone(), *attempt);
                            outbox
                                .push(&CacheEvent::CacheStore(CacheStore {
                                    event_id: events::new_event_id(),
                                    occurred_at,
                                    workspace_id: c.workspace_id,
                                    traceparent: traceparent.clone(),
                                    tracestate: None,
                                    request_id: format!(
                                        "{}/{}/{attempt}",
                                        a.run_id, a.plan.ids[*node]
                                    ),
                                    requester: c.requester,
                                    permission: c.permission.clone(),
                                    node_type: c.node_type,
                                    config_json: c.config.to_string(),
                                    inputs_json: c.inputs.to_string(),
                                    result_json: n.output_json.clone(),
                                    result_ref: n.output_ref.clone(),
                                    prompt: None,
                                    embedding: None,
                                    cost_ms: durations.get(&key).copied().unwrap_or(0),
                                    required_permission: c.permission,
                                }))
                                .await?;
                        }
                    }
                    Effect::Completed => {
                        stats.ended += 1;
                        metrics::counter!(m::RUNS_ENDED, "status" => "completed").increment(1);
                        let mut outputs = serde_json::Map::new();
                        for (i, n) in a.rt.nodes.iter().enumerate() {
                            if a.plan.succs[i].is_empty() {
                                outputs.insert(
                                    a.plan.ids[i].clone(),
                                    output_value(n.output_json.as_deref(), n.output_ref.as_deref()),
                                );
                            }
                        }
                        outbox
                            .push(&RunEvent::RunCompleted(RunCompleted {
                                event_id,
                                occurred_at,
                                workspace_id,
                                traceparent,
                                tracestate: None,
                                run_id: a.run_id.clone(),
                                workflow_id: a.run.workflow_id.clone(),
                                version: a.version,
                                duration_ms: (now - a.run.started_at.timestamp_millis()).max(0),
                                outputs_json: Some(Value::Object(outputs).to_string()),
                                outputs_ref: None,
                            }))
                            .await?;
                    }
                    Effect::Failed { node, reason } => {
                        stats.ended += 1;
                        metrics::counter!(m::RUNS_ENDED, "status" => "failed").increment(1);
                        outbox
                            .push(&RunEvent::RunFailed(RunFailed {
                                event_id,
                                occurred_at,
                                workspace_id,
                                traceparent,
                                tracestate: None,
                                run_id: a.run_id.clone(),
                                workflow_id: a.run.workflow_id.clone(),
                                version: a.version,
                                failed_node_id: node.map(|i| a.plan.ids[i].clone()),
                                reason: reason.clone(),
                            }))
                            .await?;
                    }
                    Effect::Cancelled { reason } => {
                        stats.ended += 1;
                        metrics::counter!(m::RUNS_ENDED, "status" => "cancelled").increment(1);
                        outbox
                            .push(&RunEvent::RunCancelled(RunCancelled {
                                event_id,
                                occurred_at,
                                workspace_id,
                                traceparent,
                                tracestate: None,
                                run_id: a.run_id.clone(),
                                workflow_id: a.run.workflow_id.clone(),
                                version: a.version,
                                reason: reason.clone(),
                            }))
                            .await?;
                    }
                    _ => {}
                }
            }
            for (node, failed_attempt, next_attempt, due, error) in &a.retries {
                metrics::counter!(m::NODES_RETRIED).increment(1);
                outbox
                    .push(&RunEvent::NodeRetried(NodeRetried {
                        event_id: events::new_event_id(),
                        occurred_at: end_us,
                        workspace_id: a.run.workspace_id.clone(),
                        traceparent: a.traceparent(),
                        tracestate: None,
                        run_id: a.run_id.clone(),
                        workflow_id: a.run.workflow_id.clone(),
                        version: a.version,
                        node_id: a.plan.ids[*node].clone(),
                        failed_attempt: *failed_attempt,
                        next_attempt: *next_attempt,
                        retry_at: due.saturating_mul(1000),
                        error: error.clone(),
                    }))
                    .await?;
                let n = &a.rt.nodes[*node];
                if running && n.phase == Phase::RetryWait && n.attempt == *failed_attempt {
                    t_run.push(a.run_id.clone());
                    t_node.push(a.plan.ids[*node].clone());
                    t_kind.push("retry".to_string());
                    t_attempt.push(*next_attempt);
                    t_due.push(ts(*due));
                }
            }
            if !running {
                continue;
            }
            for &(node, attempt, hop, deadline, cause) in &a.dispatches {
                let n = &a.rt.nodes[node];
                if n.phase != Phase::Running || n.attempt != attempt {
                    continue; // answered by the cache, or overtaken within the batch
                }
                if let Some(due) = deadline {
                    t_run.push(a.run_id.clone());
                    t_node.push(a.plan.ids[node].clone());
                    t_kind.push("deadline".to_string());
                    t_attempt.push(attempt);
                    t_due.push(ts(due));
                }
                let to_type = a.plan.node_types[node];
                metrics::counter!(m::NODES_DISPATCHED, "type" => to_type).increment(1);
                if let Some((from, at_us)) = cause {
                    metrics::histogram!(m::HOP_LATENCY, "from_type" => a.plan.node_types[from],
                        "to_type" => to_type)
                    .record((end_us - at_us).max(0) as f64 / 1e3);
                }
                stats.dispatched += 1;
                outbox
                    .push(&NodeReady {
                        event_id: events::new_event_id(),
                        occurred_at: end_us,
                        workspace_id: a.run.workspace_id.clone(),
                        traceparent: a.traceparent(),
                        tracestate: None,
                        run_id: a.run_id.clone(),
                        workflow_id: a.run.workflow_id.clone(),
                        version: a.version,
                        node_id: a.plan.ids[node].clone(),
                        node_type: to_type.to_string(),
                        config_json: a.plan.configs[node].clone(),
                        inputs: node_inputs(&a.plan, &a.rt, node),
                        attempt,
                        hop,
                        deadline_at: deadline.map(|d| d.saturating_mul(1000)),
                        run_inputs_json: a.run.inputs_json.clone(),
                        run_inputs_ref: a.run.inputs_ref.clone(),
                    })
                    .await?;
            }
        }
        if !t_run.is_empty() {
            sqlx::query!(
                r#"INSERT INTO weir_run_timers (run_id, node_id, kind, attempt, due_at)
                   SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[], $5::timestamptz[])
                   ON CONFLICT (run_id, node_id, kind) DO UPDATE
                   SET attempt = EXCLUDED.attempt, due_at = EXCLUDED.due_at"#,
                &t_run,
                &t_node,
                &t_kind,
                &t_attempt,
                &t_due,
            )
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }
}

/// Sorts a step's effects into the run's lists.
fn collect(
    a: &mut Active,
    effects: &mut Vec<Effect>,
    at_us: Option<i64>,
    ignored: &mut HashMap<&'static str, u64>,
) {
    for e in effects.drain(..) {
        match e {
            Effect::Dispatch {
                node,
                attempt,
                hop,
                deadline_at_ms,
                after,
            } => {
                let cause = after.zip(at_us);
                a.dispatches
                    .push((node, attempt, hop, deadline_at_ms, cause));
            }
            Effect::Retry {
                node,
                failed_attempt,
                next_attempt,
                retry_at_ms,
                error,
            } => a
                .retries
                .push((node, failed_attempt, next_attempt, retry_at_ms, error)),
            Effect::Ignored(why) => {
                let reason = match why {
                    Ignored::Duplicate => "duplicate",
                    other => other.as_str(),
                };
                *ignored.entry(reason).or_default() += 1;
            }
            other => a.lifecycle.push(other),
        }
    }
}

/// The predecessors' outputs of `node`, in definition order.
fn node_inputs(plan: &Plan, rt: &RunRt, node: usize) -> Vec<NodeInput> {
    plan.preds[node]
        .iter()
        .map(|&p| NodeInput {
            node_id: plan.ids[p].clone(),
            output_json: rt.nodes[p].output_json.clone(),
            output_ref: rt.nodes[p].output_ref.clone(),
        })
        .collect()
}

fn candidate(a: &Active, node: usize) -> CacheCandidate {
    let mut preds = serde_json::Map::new();
    for &p in &a.plan.preds[node] {
        let n = &a.rt.nodes[p];
        preds.insert(
            a.plan.ids[p].clone(),
            output_value(n.output_json.as_deref(), n.output_ref.as_deref()),
        );
    }
    CacheCandidate {
        run_id: a.run_id.clone(),
        node_id: a.plan.ids[node].clone(),
        workspace_id: a.run.workspace_id.clone(),
        requester: a.run.requester.clone(),
        permission: a.run.permission.clone(),
        node_type: a.plan.node_types[node].to_string(),
        config: serde_json::from_str(&a.plan.configs[node]).unwrap_or(Value::Null),
        inputs: serde_json::json!({
            "predecessors": preds,
            "run": output_value(a.run.inputs_json.as_deref(), a.run.inputs_ref.as_deref()),
        }),
    }
}

/// Why a RunRequested cannot start, before looking at its workflow.
fn invalid_request(req: &RunRequested) -> Option<String> {
    if !["read", "write", "admin"].contains(&req.permission.as_str()) {
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

/// Turns a batch of completion records into per-run items, in partition order.
pub fn group(records: &[Record<CompletionEvent>]) -> (Vec<(String, Vec<Item>)>, Vec<Rejection>) {
    group_except(records, &HashSet::new())
}

/// [`group`], leaving out the records at `skip` (already rejected).
fn group_except(
    records: &[Record<CompletionEvent>],
    skip: &HashSet<usize>,
) -> (Vec<(String, Vec<Item>)>, Vec<Rejection>) {
    let mut order: Vec<(String, Vec<Item>)> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut rejected = Vec::new();
    for (index, r) in records.iter().enumerate() {
        if skip.contains(&index) {
            continue;
        }
        let (run_id, item) = match &r.event {
            CompletionEvent::RunRequested(e) => (&e.run_id, Item::Requested(Box::new(e.clone()))),
            CompletionEvent::NodeCompleted(e) => {
                if e.attempt < 1 {
                    rejected.push(Rejection {
                        index,
                        reason: format!("attempt must be at least 1, not {}", e.attempt),
                    });
                    continue;
                }
                (
                    &e.run_id,
                    Item::Input {
                        input: Input::Completed {
                            node_id: e.node_id.clone(),
                            attempt: e.attempt,
                            succeeded: e.status == NodeStatus::Succeeded,
                            output_json: e.output_json.clone(),
                            output_ref: e.output_ref.clone(),
                            error: e.error.clone(),
                            from_cache: e.from_cache,
                        },
                        workspace_id: Some(e.workspace_id.clone()),
                        at_us: e.occurred_at,
                        duration_ms: e.duration_ms,
                        traceparent: e.traceparent.clone(),
                    },
                )
            }
            CompletionEvent::RunCancelRequested(e) => (
                &e.run_id,
                Item::Input {
                    input: Input::Cancel {
                        reason: e.reason.clone(),
                    },
                    workspace_id: Some(e.workspace_id.clone()),
                    at_us: e.occurred_at,
                    duration_ms: 0,
                    traceparent: e.traceparent.clone(),
                },
            ),
        };
        if run_id.is_empty() {
            rejected.push(Rejection {
                index,
                reason: "run_id is empty".into(),
            });
            continue;
        }
        let slot = *at.entry(run_id.clone()).or_insert_with(|| {
            order.push((run_id.clone(), Vec::new()));
            order.len() - 1
        });
        order[slot].1.push(item);
    }
    (order, rejected)
}

/// The records whose CAS ref (a completion's `output_ref`, a request's `inputs_ref`) is not a
/// blob of the event's workspace, as rejections (one query for the batch). The gateway checks
/// the same; this catches events that did not come through it. The answer does not depend on
/// whether the blob exists for another workspace, and the blob is never read.
async fn unowned_refs(
    conn: &mut PgConnection,
    records: &[Record<CompletionEvent>],
) -> Result<Vec<Rejection>, ApplyError> {
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

#[async_trait]
impl Processor for Coordinator {
    type Event = CompletionEvent;

    fn group(&self) -> String {
        self.cfg.kafka.group(GROUP)
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        records: &[Record<CompletionEvent>],
        outbox: &mut Outbox<'_>,
    ) -> Result<Vec<Rejection>, ApplyError> {
        let started = std::time::Instant::now();
        let unowned = unowned_refs(conn, records).await?;
        let skip: HashSet<usize> = unowned.iter().map(|r| r.index).collect();
        let (groups, mut rejected) = group_except(records, &skip);
        rejected.extend(unowned);
        let runs = groups.len();
        let done = self.advance(conn, groups, outbox).await?;
        tracing::debug!(
            records = records.len(),
            runs,
            started = done.started,
            dispatched = done.dispatched,
            ended = done.ended,
            ignored = done.ignored,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "coordinated batch"
        );
        Ok(rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_due_time_beyond_the_calendar_is_never_not_now() {
        let never = ts(i64::MAX);
        assert!(never > Utc::now() + chrono::Duration::days(365 * 1_000));
        assert_eq!(ts(i64::MIN), DateTime::<Utc>::UNIX_EPOCH);
        assert_eq!(ts(1_000).timestamp_millis(), 1_000);
    }
}
