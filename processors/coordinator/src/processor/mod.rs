//! The coordinator processor: consumes weir.completions.v1 through the runtime. Per batch, in
//! the batch's one transaction (the timer loop uses the same path, [`Coordinator::advance`]):
//!
//! 1. groups the records by run (partition order is run order: the key is run_id),
//! 2. [`load`]: locks every touched run row (one `SELECT ... FOR UPDATE`, ordered by run_id,
//!    so the consumer and the timer loop never interleave on a run), loads their nodes (one
//!    query) and, for new runs, the idempotency keys already used, the heads and the pinned
//!    snapshots (one query each),
//! 3. [`step`]: steps each run's [`machine`](crate::machine) in memory (pure),
//! 4. asks the dispatch cache, if any, about every dispatch at once (repeating while hits
//!    make further nodes ready),
//! 5. [`write`]: writes back with a handful of UNNEST statements ([`rows`]): new runs, changed
//!    runs, changed nodes, timers, then the outbox rows (NodeReady and run events).
//!
//! Pinned definitions are immutable, so their compiled [`Plan`]s are cached in memory.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgConnection;
use weir_model::definition::Limits;
use weir_model::WireRef;
use weir_runtime::cas::Cas;
use weir_runtime::config::Config;
use weir_runtime::events::{CompletionEvent, NodeStatus, RunRequested};
use weir_runtime::{ApplyError, Outbox, Processor, Record, Rejection};

use crate::cache::{CacheSeamError, DispatchCache};
use crate::error::CoordinatorError;
use crate::history::PatchLog;
use crate::machine::{Env, Input, Plan};
use crate::metrics as m;

pub mod load;
mod pin;
pub mod rows;
pub mod step;
pub mod write;

pub use load::Loaded;
pub use step::Stepped;

/// Consumer group of the coordinator.
pub const GROUP: &str = "weir-coordinator";

/// A pinned definition's key: (workspace_id, workflow_id, version). Workflow ids are unique
/// per workspace only, so the workspace is part of every key.
pub type DefKey = (String, String, i64);

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

/// Inputs that changed nothing, counted by reason (`weir_coordinator_ignored_total{reason}`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ignores(HashMap<&'static str, u64>);

impl Ignores {
    /// Counts `n` more inputs ignored for `reason` (0 still names the reason).
    pub fn add(&mut self, reason: &'static str, n: u64) {
        *self.0.entry(reason).or_default() += n;
    }

    /// How many were ignored for `reason`.
    pub fn get(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }

    /// Adds the counts to `stats` and the metric.
    fn record(self, stats: &mut Advanced) {
        for (reason, n) in self.0 {
            stats.ignored += n as usize;
            metrics::counter!(m::IGNORED, "reason" => reason).increment(n);
        }
    }
}

/// The coordinator.
pub struct Coordinator {
    cfg: Arc<Config>,
    cas: Cas,
    cache: Option<Arc<dyn DispatchCache>>,
    history: Arc<dyn PatchLog>,
    plans: Mutex<HashMap<DefKey, Arc<Plan>>>,
    limits: Limits,
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

/// An output (inline JSON text or CAS reference) as a JSON value.
pub(crate) fn output_value(json: Option<&str>, r: Option<&str>) -> Value {
    match (json, r) {
        (Some(j), _) => serde_json::from_str(j).unwrap_or_else(|_| Value::String(j.into())),
        (None, Some(r)) => serde_json::json!({ "$ref": r }),
        (None, None) => Value::Null,
    }
}

impl Coordinator {
    /// A coordinator without a dispatch cache; versions older than a workflow's head that it
    /// holds no snapshot of are rebuilt from `history`.
    pub fn new(cfg: Arc<Config>, cas: Cas, history: Arc<dyn PatchLog>) -> Self {
        let limits = cfg.materializer.limits();
        Self {
            cfg,
            cas,
            cache: None,
            history,
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

    /// Advances the runs of `groups` (each run's items in order) inside the caller's
    /// transaction, pushing output events to `outbox`: [`Coordinator::load`],
    /// [`step::step`], the dispatch cache, [`Coordinator::write`].
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
        let loaded = self.load(conn, groups).await?;
        let mut jitter = |n: u64| if n == 0 { 0 } else { rand::random_range(0..=n) };
        let mut env = Env {
            now_ms: now_ms(),
            max_backoff_ms: self.cfg.coordinator.max_backoff_ms,
            jitter: &mut jitter,
        };
        let mut batch = step::step(loaded, &mut env);
        if let Some(cache) = &self.cache {
            self.consult_cache(conn, cache.as_ref(), &mut batch, &mut env, &mut stats)
                .await?;
        }
        self.write(conn, batch, outbox, &mut stats).await?;
        Ok(stats)
    }

    /// The dispatch cache: answers what it can of the batch's dispatches, round after round
    /// (a hit makes successors ready, offered in the next round).
    async fn consult_cache(
        &self,
        conn: &mut PgConnection,
        cache: &dyn DispatchCache,
        batch: &mut Stepped,
        env: &mut Env<'_>,
        stats: &mut Advanced,
    ) -> Result<(), CoordinatorError> {
        let mut asked = HashSet::new();
        loop {
            let (offered, candidates) = batch.offer(&mut asked);
            if candidates.is_empty() {
                return Ok(());
            }
            let answers = cache.lookup(conn, &candidates).await?;
            if answers.len() != candidates.len() {
                return Err(CacheSeamError::Mismatch {
                    candidates: candidates.len(),
                    answers: answers.len(),
                }
                .into());
            }
            for (o, answer) in offered.into_iter().zip(answers) {
                let Some(hit) = answer else { continue };
                stats.cache_hits += 1;
                metrics::counter!(m::CACHE_HITS).increment(1);
                metrics::counter!(m::CACHE_SAVED_MS)
                    .increment(u64::try_from(hit.saved_ms).unwrap_or(0));
                tracing::debug!(entry = %hit.entry_key, "dispatch answered by the cache");
                batch.complete_from_cache(o, hit, env);
            }
        }
    }
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
                            output_ref: e.output_ref.clone().map(WireRef::into_string),
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
        let unowned = load::unowned_refs(conn, records).await?;
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
