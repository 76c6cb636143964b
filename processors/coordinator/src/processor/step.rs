//! Stepping the runs of a loaded batch: each run's items go through the
//! [`machine`](crate::machine) in order, and its effects are sorted into what the write
//! phase turns into rows and events (dispatches, retries, lifecycle events). Pure: no I/O;
//! time and jitter come from the [`Env`].
//!
//! Invariants: an input from another workspace than its run's changes nothing
//! (`foreign_workspace`); a run that failed at start, ended, or lost its definition takes no
//! input (`run_finished`), and a running one without its definition is handed to the write
//! phase to fail ([`Unrunnable`]). The dispatch cache completes attempts through the same
//! machine ([`Stepped::complete_from_cache`]), so its hits follow every rule a worker's
//! success does.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::load::{FailedStart, Loaded, Pin, StoredRun};
use super::rows::RunState;
use super::{output_value, ts, Ignores, Item};
use crate::cache::{CacheCandidate, CachedResult};
use crate::machine::{self, Effect, Env, Ignored, Input, Phase, Plan, RunPhase, RunRt};

/// The completion that made a node ready: what the hop latency is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cause {
    /// Plan index of the predecessor that succeeded.
    pub from: usize,
    /// Its event time, µs since the epoch.
    pub at_us: i64,
}

/// An attempt to dispatch (a NodeReady, unless the cache answers it or the batch overtakes
/// it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    /// Plan index.
    pub node: usize,
    /// The attempt.
    pub attempt: i32,
    /// Its hop.
    pub hop: i32,
    /// Its deadline, ms since the epoch (a deadline timer).
    pub deadline_at_ms: Option<i64>,
    /// The completion that caused it (none for roots, retries and cache hits).
    pub cause: Option<Cause>,
}

/// A failed attempt with the next one scheduled (a NodeRetried and a retry timer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Plan index.
    pub node: usize,
    /// The attempt that failed.
    pub failed_attempt: i32,
    /// The attempt to dispatch when the timer fires.
    pub next_attempt: i32,
    /// When, ms since the epoch.
    pub retry_at_ms: i64,
    /// Why the attempt failed.
    pub error: Option<String>,
}

/// A run being advanced in this batch.
#[derive(Debug)]
pub struct Active {
    /// The run.
    pub run_id: String,
    /// As stored (a new run: as it will be stored).
    pub run: StoredRun,
    /// The pinned version.
    pub version: i64,
    /// Not stored yet.
    pub is_new: bool,
    /// Its idempotency key (new runs only: stored with the row).
    pub idempotency_key: Option<String>,
    /// Its compiled definition.
    pub plan: Arc<Plan>,
    /// Its state, stepped.
    pub rt: RunRt,
    /// Dispatch effects, in order.
    pub dispatches: Vec<Dispatch>,
    /// Retry effects, in order.
    pub retries: Vec<Retry>,
    /// Lifecycle effects in order (Started, Completed, Failed, Cancelled, AttemptEnded).
    pub lifecycle: Vec<Effect>,
    /// Trace context of the batch's latest record for this run that carried one (else the
    /// run's own): what the run's output events of this batch carry.
    pub cause: Option<String>,
    /// What each successful attempt of the batch cost its worker, ms, by (node id, attempt):
    /// the cost recorded with a result offered to the cache.
    pub durations: HashMap<(String, i32), i64>,
}

impl Active {
    fn new(run_id: String, run: StoredRun, pin: Pin, rt: RunRt) -> Self {
        Self {
            run_id,
            run,
            version: pin.version,
            is_new: false,
            idempotency_key: None,
            plan: pin.plan,
            rt,
            dispatches: Vec::new(),
            retries: Vec::new(),
            lifecycle: Vec::new(),
            cause: None,
            durations: HashMap::new(),
        }
    }

    /// The traceparent of this batch's output events for the run.
    pub fn traceparent(&self) -> String {
        self.cause
            .clone()
            .unwrap_or_else(|| self.run.traceparent.clone())
    }

    /// The run's row state after the batch.
    pub fn state(&self) -> RunState {
        RunState {
            status: self.rt.phase.as_str(),
            reason: self.rt.reason.clone(),
            failed_node_id: self.rt.failed_node.map(|i| self.plan.ids[i].clone()),
        }
    }

    /// What the dispatch cache is asked about `node`, and what a result of it is stored
    /// under: its type and config, the predecessors' outputs and the run inputs.
    pub fn candidate(&self, node: usize) -> CacheCandidate {
        let mut preds = serde_json::Map::new();
        for &p in &self.plan.preds[node] {
            let n = &self.rt.nodes[p];
            preds.insert(
                self.plan.ids[p].clone(),
                output_value(n.output_json.as_deref(), n.output_ref.as_deref()),
            );
        }
        let run = &self.run;
        CacheCandidate {
            run_id: self.run_id.clone(),
            node_id: self.plan.ids[node].clone(),
            workspace_id: run.workspace_id.clone(),
            requester: run.requester.clone(),
            permission: run.permission.clone(),
            node_type: self.plan.node_types[node].to_string(),
            config: serde_json::from_str(&self.plan.configs[node]).unwrap_or(Value::Null),
            inputs: serde_json::json!({
                "predecessors": preds,
                "run": output_value(run.inputs_json.as_deref(), run.inputs_ref.as_deref()),
            }),
        }
    }

    /// Steps the run's items in order.
    fn apply(&mut self, items: Vec<Item>, env: &mut Env<'_>, ignored: &mut Ignores) {
        for item in items {
            let (input, at_us) = match item {
                Item::Requested(_) => (Input::Start, None),
                Item::Input {
                    input,
                    workspace_id,
                    at_us,
                    duration_ms,
                    traceparent,
                } => {
                    if workspace_id.is_some_and(|w| w != self.run.workspace_id) {
                        ignored.add("foreign_workspace", 1);
                        continue;
                    }
                    if !traceparent.is_empty() {
                        self.cause = Some(traceparent);
                    }
                    if let Input::Completed {
                        node_id,
                        attempt,
                        succeeded: true,
                        ..
                    } = &input
                    {
                        self.durations
                            .insert((node_id.clone(), *attempt), duration_ms);
                    }
                    (input, Some(at_us))
                }
            };
            self.step(input, at_us, env, ignored);
        }
    }

    /// One input through the machine; `at_us` is its event time (for the hop latency).
    fn step(&mut self, input: Input, at_us: Option<i64>, env: &mut Env<'_>, ignored: &mut Ignores) {
        let mut effects = Vec::new();
        machine::step(&self.plan, &mut self.rt, input, env, &mut effects);
        for e in effects {
            match e {
                Effect::Dispatch {
                    node,
                    attempt,
                    hop,
                    deadline_at_ms,
                    after,
                } => self.dispatches.push(Dispatch {
                    node,
                    attempt,
                    hop,
                    deadline_at_ms,
                    cause: after.zip(at_us).map(|(from, at_us)| Cause { from, at_us }),
                }),
                Effect::Retry {
                    node,
                    failed_attempt,
                    next_attempt,
                    retry_at_ms,
                    error,
                } => self.retries.push(Retry {
                    node,
                    failed_attempt,
                    next_attempt,
                    retry_at_ms,
                    error,
                }),
                Effect::Ignored(why) => {
                    let reason = match why {
                        Ignored::Duplicate => "duplicate",
                        other => other.as_str(),
                    };
                    ignored.add(reason, 1);
                }
                other => self.lifecycle.push(other),
            }
        }
    }

    /// Whether `d` is still to be sent: its attempt still runs (not answered by the cache
    /// nor overtaken within the batch).
    pub fn pending(&self, d: &Dispatch) -> bool {
        let n = &self.rt.nodes[d.node];
        n.phase == Phase::Running && n.attempt == d.attempt
    }
}

/// A stored running run whose pinned definition cannot be had: it fails with `reason`.
#[derive(Debug)]
pub struct Unrunnable {
    /// The run.
    pub run_id: String,
    /// As stored.
    pub run: StoredRun,
    /// Its pinned version.
    pub version: i64,
    /// Why: `RunFailed.reason`.
    pub reason: String,
}

/// A stepped batch: what the write phase stores and sends.
#[derive(Debug)]
pub struct Stepped {
    /// The runs advanced, in batch order.
    pub actives: Vec<Active>,
    /// Stored runs to fail for want of their definition.
    pub unrunnable: Vec<Unrunnable>,
    /// New runs that cannot start.
    pub failed_starts: Vec<FailedStart>,
    /// Inputs that changed nothing.
    pub ignored: Ignores,
    /// The batch's time, ms since the epoch.
    pub now_ms: i64,
}

/// One dispatch offered to the cache: which run of the batch, node and attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Offered {
    /// Index into [`Stepped::actives`].
    pub active: usize,
    /// Plan index.
    pub node: usize,
    /// The attempt.
    pub attempt: i32,
}

/// Steps every run of `loaded` (see the module doc).
pub fn step(mut loaded: Loaded, env: &mut Env<'_>) -> Stepped {
    let groups = std::mem::take(&mut loaded.groups);
    let started_at = ts(env.now_ms);
    let mut actives = Vec::with_capacity(groups.len());
    let mut unrunnable = Vec::new();
    for (run_id, items) in groups {
        if items.is_empty() || loaded.duplicates.contains(&run_id) {
            continue;
        }
        if loaded.failed_starts.iter().any(|f| f.req.run_id == run_id) {
            loaded.ignored.add("run_finished", items.len() as u64 - 1);
            continue;
        }
        let active = match loaded.stored.remove(&run_id) {
            Some(s) => loaded.resume(run_id, s, items.len(), &mut unrunnable),
            None => loaded.start(run_id, &items, started_at),
        };
        let Some(mut a) = active else { continue };
        a.apply(items, env, &mut loaded.ignored);
        actives.push(a);
    }
    Stepped {
        actives,
        unrunnable,
        failed_starts: loaded.failed_starts,
        ignored: loaded.ignored,
        now_ms: env.now_ms,
    }
}

impl Loaded {
    /// The stored run `run_id` with its nodes, to advance with its `items` inputs; `None`
    /// when it takes none (it failed at start or ended), or has lost its definition (a
    /// running one is then `unrunnable`).
    fn resume(
        &mut self,
        run_id: String,
        s: StoredRun,
        items: usize,
        unrunnable: &mut Vec<Unrunnable>,
    ) -> Option<Active> {
        let Some(version) = s.version else {
            // A run that failed at start: nothing can happen to it.
            self.ignored.add("run_finished", items as u64);
            return None;
        };
        let key = (s.workspace_id.clone(), s.workflow_id.clone(), version);
        let Some(plan) = self.plans.get(&key).cloned() else {
            // The run cannot go on without its definition: it fails (once; a run already
            // ended just ignores what comes after).
            if s.status == RunPhase::Running.as_str() {
                let reason = self
                    .broken
                    .get(&key)
                    .cloned()
                    .unwrap_or_else(|| format!("no pinned definition {} v{version}", key.1));
                unrunnable.push(Unrunnable {
                    run_id,
                    run: s,
                    version,
                    reason,
                });
            } else {
                self.ignored.add("run_finished", items as u64);
            }
            return None;
        };
        let mut rt = RunRt::new(&plan);
        rt.phase = RunPhase::from_name(&s.status).unwrap_or(RunPhase::Failed);
        for (node_id, n) in self.nodes.remove(&run_id).unwrap_or_default() {
            if let Some(i) = plan.index(&node_id) {
                rt.nodes[i] = n;
            }
        }
        Some(Active::new(run_id, s, Pin { version, plan }, rt))
    }

    /// The new run `run_id` (its first item is its RunRequested), if it pinned a version.
    fn start(
        &self,
        run_id: String,
        items: &[Item],
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> Option<Active> {
        let pin = self.pinned.get(&run_id).cloned()?;
        let Some(Item::Requested(req)) = items.first() else {
            return None;
        };
        let run = StoredRun::requested(req, Some(pin.version), started_at);
        let rt = RunRt::new(&pin.plan);
        let mut a = Active::new(run_id, run, pin, rt);
        a.is_new = true;
        a.idempotency_key = req.idempotency_key.clone();
        Some(a)
    }
}

impl Stepped {
    /// The dispatches of running runs not offered to the cache yet (`asked` remembers the
    /// ones that were), with their candidates.
    pub fn offer(&self, asked: &mut HashSet<Offered>) -> (Vec<Offered>, Vec<CacheCandidate>) {
        let mut offered = Vec::new();
        let mut candidates = Vec::new();
        for (active, a) in self.actives.iter().enumerate() {
            if a.rt.phase != RunPhase::Running {
                continue;
            }
            for d in &a.dispatches {
                let o = Offered {
                    active,
                    node: d.node,
                    attempt: d.attempt,
                };
                if a.pending(d) && asked.insert(o) {
                    offered.push(o);
                    candidates.push(a.candidate(d.node));
                }
            }
        }
        (offered, candidates)
    }

    /// Completes the attempt `o` with the cache's result, as a succeeded attempt
    /// `from_cache`: its successors may become ready (to offer in the next round).
    pub fn complete_from_cache(&mut self, o: Offered, hit: CachedResult, env: &mut Env<'_>) {
        let a = &mut self.actives[o.active];
        let input = Input::Completed {
            node_id: a.plan.ids[o.node].clone(),
            attempt: o.attempt,
            succeeded: true,
            output_json: hit.output_json,
            output_ref: hit.output_ref,
            error: None,
            from_cache: true,
        };
        a.step(input, None, env, &mut self.ignored);
    }
}
