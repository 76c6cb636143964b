//! The run state machine: pure, synchronous, no I/O. The processor and the timer loop load a
//! run, feed it inputs in order with [`step`], and write back what changed; the property tests
//! drive it against a reference model.
//!
//! # Invariants
//!
//! - A node is dispatched (an [`Effect::Dispatch`]) at most once per attempt, attempts count
//!   1, 2, 3, ... without gaps, and never beyond the node's `retry.max_attempts`.
//! - A node is dispatched only once every predecessor has succeeded, and only while the run
//!   is running.
//! - A completion is applied only if it names the node's current attempt while that attempt
//!   runs; anything else (an unknown node, an older or newer attempt, a repeat, a late answer
//!   after the deadline, a finished run) is an [`Effect::Ignored`] and changes nothing.
//! - A timer is applied only if the node is still in the state it was set for; otherwise it is
//!   ignored as stale, so timers never need to be cancelled.
//! - The run ends exactly once: completed (every node succeeded), failed (a node failed its
//!   last attempt, or a node would exceed `settings.max_hops`) or cancelled.

use std::collections::HashMap;

use weir_model::definition::Definition;

/// Hard cap on one retry delay: exponential growth stops here.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 300_000;

/// A definition compiled for running: nodes by dense index, in topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Node ids.
    pub ids: Vec<String>,
    index: HashMap<String, usize>,
    /// Node types (`NodeType::as_str`).
    pub node_types: Vec<&'static str>,
    /// Node configs as compact JSON text (what NodeReady carries).
    pub configs: Vec<String>,
    /// Direct predecessors, in definition (id) order.
    pub preds: Vec<Vec<usize>>,
    /// Direct successors, in definition (id) order.
    pub succs: Vec<Vec<usize>>,
    /// Nodes without predecessors.
    pub roots: Vec<usize>,
    /// Attempts allowed per node (1 without a retry policy).
    pub max_attempts: Vec<i32>,
    /// Base retry delay per node, ms.
    pub backoff_ms: Vec<u64>,
    /// Deadline of one attempt per node, ms.
    pub deadline_ms: Vec<Option<u64>>,
    /// `settings.max_hops`.
    pub max_hops: i32,
}

impl Plan {
    /// Compiles a validated definition.
    pub fn new(def: &Definition) -> Self {
        let ids: Vec<String> = def.topological_order().to_vec();
        let index: HashMap<String, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        let lookup = |list: Option<&[String]>| -> Vec<usize> {
            list.unwrap_or_default()
                .iter()
                .filter_map(|id| index.get(id).copied())
                .collect()
        };
        let mut plan = Plan {
            node_types: Vec::with_capacity(ids.len()),
            configs: Vec::with_capacity(ids.len()),
            preds: Vec::with_capacity(ids.len()),
            succs: Vec::with_capacity(ids.len()),
            roots: Vec::new(),
            max_attempts: Vec::with_capacity(ids.len()),
            backoff_ms: Vec::with_capacity(ids.len()),
            deadline_ms: Vec::with_capacity(ids.len()),
            max_hops: i32::try_from(def.settings().max_hops).unwrap_or(i32::MAX),
            ids: Vec::new(),
            index: HashMap::new(),
        };
        for (i, id) in ids.iter().enumerate() {
            // Every id of the topological order is a node of the definition (validate's
            // invariant); a missing one would be skipped by `filter_map` above, never panic.
            let Some(node) = def.node(id) else { continue };
            plan.node_types.push(node.node_type.as_str());
            plan.configs
                .push(serde_json::Value::Object(node.config.clone()).to_string());
            let preds = lookup(def.predecessors(id));
            if preds.is_empty() {
                plan.roots.push(i);
            }
            plan.preds.push(preds);
            plan.succs.push(lookup(def.successors(id)));
            let retry = node.retry;
            plan.max_attempts.push(
                retry
                    .map(|r| i32::try_from(r.max_attempts).unwrap_or(i32::MAX))
                    .unwrap_or(1),
            );
            plan.backoff_ms
                .push(retry.map(|r| r.backoff_ms).unwrap_or(0));
            plan.deadline_ms.push(node.deadline_ms);
        }
        plan.ids = ids;
        plan.index = index;
        plan
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the plan has no node (never true for a validated definition).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Index of node `id`.
    pub fn index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }
}

/// Where one node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Not dispatched yet (some predecessor has not succeeded).
    Waiting,
    /// Its current attempt was dispatched and has not ended.
    Running,
    /// Its current attempt failed; the next one waits for its retry timer.
    RetryWait,
    /// Done.
    Succeeded,
    /// Failed its last attempt.
    Failed,
    /// Was running or waiting for a retry when the run ended.
    Cancelled,
}

impl Phase {
    /// The name stored in Postgres and shown by the run status.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Waiting => "waiting",
            Phase::Running => "running",
            Phase::RetryWait => "retry_wait",
            Phase::Succeeded => "succeeded",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// The phase stored as `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Phase::Waiting,
            Phase::Running,
            Phase::RetryWait,
            Phase::Succeeded,
            Phase::Failed,
            Phase::Cancelled,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunPhase {
    /// In progress.
    Running,
    /// Every node succeeded.
    Completed,
    /// A node failed for good, or the start failed.
    Failed,
    /// Cancelled on request.
    Cancelled,
}

impl RunPhase {
    /// The name stored in Postgres and shown by the run status.
    pub fn as_str(self) -> &'static str {
        match self {
            RunPhase::Running => "running",
            RunPhase::Completed => "completed",
            RunPhase::Failed => "failed",
            RunPhase::Cancelled => "cancelled",
        }
    }

    /// The phase stored as `s`.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            RunPhase::Running,
            RunPhase::Completed,
            RunPhase::Failed,
            RunPhase::Cancelled,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// One node of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRt {
    /// Where it is.
    pub phase: Phase,
    /// Current attempt (0 while waiting).
    pub attempt: i32,
    /// Hops from the start (1 for a root); 0 while waiting.
    pub hop: i32,
    /// Output of the successful attempt, inline JSON text.
    pub output_json: Option<String>,
    /// Output of the successful attempt, CAS reference.
    pub output_ref: Option<String>,
    /// Error of the last failed attempt.
    pub error: Option<String>,
    /// Whether the output came from the result cache.
    pub from_cache: bool,
    /// Changed since loaded (to be written back).
    pub dirty: bool,
}

impl NodeRt {
    /// A node that has not been dispatched.
    pub fn waiting() -> Self {
        Self {
            phase: Phase::Waiting,
            attempt: 0,
            hop: 0,
            output_json: None,
            output_ref: None,
            error: None,
            from_cache: false,
            dirty: false,
        }
    }
}

/// One run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRt {
    /// Where it is.
    pub phase: RunPhase,
    /// Its nodes, by plan index.
    pub nodes: Vec<NodeRt>,
    /// Why it failed or was cancelled.
    pub reason: Option<String>,
    /// The node whose failure failed it.
    pub failed_node: Option<usize>,
    /// Some attempt started or ended since loaded (resets the stall clock).
    pub progressed: bool,
    /// Phase or reason changed since loaded.
    pub dirty: bool,
}

impl RunRt {
    /// A run that has not started: every node waiting.
    pub fn new(plan: &Plan) -> Self {
        Self {
            phase: RunPhase::Running,
            nodes: vec![NodeRt::waiting(); plan.len()],
            reason: None,
            failed_node: None,
            progressed: false,
            dirty: false,
        }
    }
}

/// What to feed a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Start the run: dispatch the roots.
    Start,
    /// A node attempt ended.
    Completed {
        /// Node id (may be unknown).
        node_id: String,
        /// Attempt it reports on.
        attempt: i32,
        /// Succeeded (else failed).
        succeeded: bool,
        /// Inline output.
        output_json: Option<String>,
        /// CAS output.
        output_ref: Option<String>,
        /// Error of a failed attempt.
        error: Option<String>,
        /// Answered by the result cache.
        from_cache: bool,
    },
    /// Cancel the run.
    Cancel {
        /// Why.
        reason: Option<String>,
    },
    /// A retry timer: dispatch `attempt` of `node_id`.
    RetryDue {
        /// Node id.
        node_id: String,
        /// The attempt to dispatch.
        attempt: i32,
    },
    /// A deadline timer: `attempt` of `node_id` ran out of time.
    DeadlineDue {
        /// Node id.
        node_id: String,
        /// The attempt it was set for.
        attempt: i32,
    },
}

/// Why an input changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ignored {
    /// The run already started.
    AlreadyStarted,
    /// The node is not in the run's definition.
    UnknownNode,
    /// A completion for an attempt that is not the current one, or for a node never
    /// dispatched.
    StaleAttempt,
    /// The attempt already ended (a redelivery, or a late answer after its deadline).
    Duplicate,
    /// The run already ended.
    RunFinished,
    /// A timer whose node moved on.
    StaleTimer,
}

impl Ignored {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Ignored::AlreadyStarted => "already_started",
            Ignored::UnknownNode => "unknown_node",
            Ignored::StaleAttempt => "stale_attempt",
            Ignored::Duplicate => "duplicate",
            Ignored::RunFinished => "run_finished",
            Ignored::StaleTimer => "stale_timer",
        }
    }
}

/// How an attempt ended (metric label `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttemptEnd {
    /// A worker reported success.
    Succeeded,
    /// A worker reported failure.
    Failed,
    /// The deadline passed first.
    DeadlineExceeded,
    /// Served from the result cache.
    Cached,
}

impl AttemptEnd {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptEnd::Succeeded => "succeeded",
            AttemptEnd::Failed => "failed",
            AttemptEnd::DeadlineExceeded => "deadline_exceeded",
            AttemptEnd::Cached => "cached",
        }
    }
}

/// What a step did, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The run started (roots dispatched).
    Started,
    /// Dispatch `attempt` of `node` (a NodeReady, unless the cache answers it).
    Dispatch {
        /// Plan index.
        node: usize,
        /// Attempt.
        attempt: i32,
        /// Hop.
        hop: i32,
        /// Deadline of the attempt, ms since the epoch.
        deadline_at_ms: Option<i64>,
        /// The node whose success made it ready (none for roots and retries).
        after: Option<usize>,
    },
    /// An attempt ended.
    AttemptEnded {
        /// Plan index.
        node: usize,
        /// Attempt.
        attempt: i32,
        /// How.
        end: AttemptEnd,
    },
    /// An attempt failed and `next_attempt` is scheduled.
    Retry {
        /// Plan index.
        node: usize,
        /// The attempt that failed.
        failed_attempt: i32,
        /// The attempt to dispatch at `retry_at_ms`.
        next_attempt: i32,
        /// ms since the epoch.
        retry_at_ms: i64,
        /// Why it failed.
        error: Option<String>,
    },
    /// Every node succeeded.
    Completed,
    /// The run failed.
    Failed {
        /// The node responsible, if any.
        node: Option<usize>,
        /// Why.
        reason: String,
    },
    /// The run was cancelled.
    Cancelled {
        /// Why.
        reason: Option<String>,
    },
    /// The input changed nothing.
    Ignored(Ignored),
}

/// Time and randomness of a step, injected so the machine stays pure.
pub struct Env<'a> {
    /// Now, ms since the epoch.
    pub now_ms: i64,
    /// Cap of one retry delay, ms.
    pub max_backoff_ms: u64,
    /// Jitter: a value in `0..=n` for the given `n`.
    pub jitter: &'a mut (dyn FnMut(u64) -> u64 + Send),
}

/// Delay before retrying after failed attempt `failed_attempt` (1-based): `backoff_ms`
/// doubled per earlier attempt, capped, with jitter in the upper half (`[d/2, d]`) so many
/// runs failing together do not retry in lockstep.
pub fn retry_delay_ms(backoff_ms: u64, failed_attempt: i32, env: &mut Env<'_>) -> u64 {
    let shift = u32::try_from(failed_attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let full = backoff_ms
        .saturating_mul(1u64 << shift)
        .min(env.max_backoff_ms);
    let half = full / 2;
    half + (env.jitter)(full - half).min(full - half)
}

/// Applies one input to `run`, appending what happened to `effects`.
pub fn step(
    plan: &Plan,
    run: &mut RunRt,
    input: Input,
    env: &mut Env<'_>,
    effects: &mut Vec<Effect>,
) {
    match input {
        Input::Start => {
            if run.phase != RunPhase::Running || run.nodes.iter().any(|n| n.phase != Phase::Waiting)
            {
                effects.push(Effect::Ignored(Ignored::AlreadyStarted));
                return;
            }
            effects.push(Effect::Started);
            for &r in &plan.roots {
                effects.push(dispatch(plan, run, r, 1, 1, None, env.now_ms));
            }
        }
        Input::Cancel { reason } => {
            if run.phase != RunPhase::Running {
                effects.push(Effect::Ignored(Ignored::RunFinished));
                return;
            }
            finish(run, RunPhase::Cancelled, None, reason.clone());
            effects.push(Effect::Cancelled { reason });
        }
        Input::Completed {
            node_id,
            attempt,
            succeeded,
            output_json,
            output_ref,
            error,
            from_cache,
        } => {
            if run.phase != RunPhase::Running {
                effects.push(Effect::Ignored(Ignored::RunFinished));
                return;
            }
            let Some(i) = plan.index(&node_id) else {
                effects.push(Effect::Ignored(Ignored::UnknownNode));
                return;
            };
            let node = &run.nodes[i];
            if node.phase == Phase::Waiting || attempt != node.attempt {
                effects.push(Effect::Ignored(Ignored::StaleAttempt));
                return;
            }
            if node.phase != Phase::Running {
                effects.push(Effect::Ignored(Ignored::Duplicate));
                return;
            }
            run.progressed = true;
            if succeeded {
                let node = &mut run.nodes[i];
                node.phase = Phase::Succeeded;
                node.output_json = output_json;
                node.output_ref = output_ref;
                node.error = None;
                node.from_cache = from_cache;
                node.dirty = true;
                effects.push(Effect::AttemptEnded {
                    node: i,
                    attempt,
                    end: if from_cache {
                        AttemptEnd::Cached
                    } else {
                        AttemptEnd::Succeeded
                    },
                });
                for &s in &plan.succs[i] {
                    if run.phase != RunPhase::Running {
                        break;
                    }
                    if run.nodes[s].phase != Phase::Waiting
                        || plan.preds[s]
                            .iter()
                            .any(|&p| run.nodes[p].phase != Phase::Succeeded)
                    {
                        continue;
                    }
                    let hop = plan.preds[s]
                        .iter()
                        .map(|&p| run.nodes[p].hop)
                        .max()
                        .unwrap_or(0)
                        .saturating_add(1);
                    if hop > plan.max_hops {
                        let reason = format!(
                            "node {} would be hop {hop}, beyond settings.max_hops = {}",
                            plan.ids[s], plan.max_hops
                        );
                        finish(run, RunPhase::Failed, Some(s), Some(reason.clone()));
                        effects.push(Effect::Failed {
                            node: Some(s),
                            reason,
                        });
                        return;
                    }
                    effects.push(dispatch(plan, run, s, 1, hop, Some(i), env.now_ms));
                }
                if run.phase == RunPhase::Running
                    && run.nodes.iter().all(|n| n.phase == Phase::Succeeded)
                {
                    finish(run, RunPhase::Completed, None, None);
                    effects.push(Effect::Completed);
                }
            } else {
                effects.push(Effect::AttemptEnded {
                    node: i,
                    attempt,
                    end: AttemptEnd::Failed,
                });
                fail_attempt(plan, run, i, error, env, effects);
            }
        }
        Input::RetryDue { node_id, attempt } => {
            let Some(i) = plan.index(&node_id) else {
                effects.push(Effect::Ignored(Ignored::StaleTimer));
                return;
            };
            let node = &run.nodes[i];
            if run.phase != RunPhase::Running
                || node.phase != Phase::RetryWait
                || node.attempt.checked_add(1) != Some(attempt)
            {
                effects.push(Effect::Ignored(Ignored::StaleTimer));
                return;
            }
            let hop = node.hop;
            effects.push(dispatch(plan, run, i, attempt, hop, None, env.now_ms));
        }
        Input::DeadlineDue { node_id, attempt } => {
            let Some(i) = plan.index(&node_id) else {
                effects.push(Effect::Ignored(Ignored::StaleTimer));
                return;
            };
            let node = &run.nodes[i];
            if run.phase != RunPhase::Running
                || node.phase != Phase::Running
                || node.attempt != attempt
            {
                effects.push(Effect::Ignored(Ignored::StaleTimer));
                return;
            }
            run.progressed = true;
            effects.push(Effect::AttemptEnded {
                node: i,
                attempt,
                end: AttemptEnd::DeadlineExceeded,
            });
            let error = format!(
                "deadline of {} ms exceeded",
                plan.deadline_ms[i].unwrap_or_default()
            );
            fail_attempt(plan, run, i, Some(error), env, effects);
        }
    }
}

/// Moves node `i` to `attempt` at `hop` and returns its dispatch (`after`: the predecessor
/// whose success made it ready; its deadline counts from `now_ms`).
fn dispatch(
    plan: &Plan,
    run: &mut RunRt,
    i: usize,
    attempt: i32,
    hop: i32,
    after: Option<usize>,
    now_ms: i64,
) -> Effect {
    let node = &mut run.nodes[i];
    node.phase = Phase::Running;
    node.attempt = attempt;
    node.hop = hop;
    node.dirty = true;
    run.progressed = true;
    let deadline_at_ms =
        plan.deadline_ms[i].map(|d| now_ms.saturating_add(i64::try_from(d).unwrap_or(i64::MAX)));
    Effect::Dispatch {
        node: i,
        attempt,
        hop,
        deadline_at_ms,
        after,
    }
}

fn fail_attempt(
    plan: &Plan,
    run: &mut RunRt,
    i: usize,
    error: Option<String>,
    env: &mut Env<'_>,
    effects: &mut Vec<Effect>,
) {
    let attempt = run.nodes[i].attempt;
    run.nodes[i].error = error.clone();
    run.nodes[i].dirty = true;
    if attempt < plan.max_attempts[i] {
        run.nodes[i].phase = Phase::RetryWait;
        let delay = retry_delay_ms(plan.backoff_ms[i], attempt, env);
        effects.push(Effect::Retry {
            node: i,
            failed_attempt: attempt,
            next_attempt: attempt + 1,
            retry_at_ms: env
                .now_ms
                .saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
            error,
        });
    } else {
        run.nodes[i].phase = Phase::Failed;
        let reason = format!(
            "node {} failed after {attempt} attempt{}: {}",
            plan.ids[i],
            if attempt == 1 { "" } else { "s" },
            error.as_deref().unwrap_or("no error given")
        );
        finish(run, RunPhase::Failed, Some(i), Some(reason.clone()));
        effects.push(Effect::Failed {
            node: Some(i),
            reason,
        });
    }
}

/// Ends the run; nodes still running or waiting for a retry are cancelled.
fn finish(run: &mut RunRt, phase: RunPhase, node: Option<usize>, reason: Option<String>) {
    run.phase = phase;
    run.failed_node = node;
    run.reason = reason;
    run.dirty = true;
    for n in &mut run.nodes {
        if matches!(n.phase, Phase::Running | Phase::RetryWait) {
            n.phase = Phase::Cancelled;
            n.dirty = true;
        }
    }
}

#[cfg(test)]
mod tests;
